"""Resumable, verified downloads of registry artifacts, using the standard library only.

A download is written to ``<out>.part``, beside ``<out>.part.origin``: the validator (strong ETag, else
Last-Modified) and the length announced by the response that started it. Transient failures (connection
errors, time-outs, 5xx, 429, a body shorter than announced) are retried with exponential back-off, and
the part is resumed by a Range request with ``If-Range``: a server whose file changed sends all of it,
which replaces the part. A 206 whose start, total or validators contradict the origin, and a part with
no validator, restart from zero: a part is only extended when its origin is confirmed.

``out`` appears only once the file has the announced length, the registry's size, the expected sha256
(the registry's, else the lock file's) and any sha256 the server publishes (Hugging Face's
``X-Linked-Etag`` on the redirect to its storage). A first download (no expected sha256) must also open
as its kind (:mod:`sidcore.content`: the registry entry's; for a bare URL the caller's or its extension's)
before its digest is pinned; one whose content nothing can check is refused before any request.
A refusal deletes the part and its origin, so that the next run starts clean, and pins nothing;
transport failures keep them for a later resume.

Lock file: JSON ``{key or url: {"sha256": ..., "size": ..., "url": ...}}``, rewritten atomically.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import http.client
import json
import os
import re
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from sidcore import __version__, content
from sidcore.errors import UserError
from sidcore.progress import Progress
from sidcore.registry import Artifact, lookup

PROGRESS_INTERVAL = 2.0  # seconds between progress lines
USER_AGENT = f"sidcore/{__version__}"
TRANSIENT = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, ssl.SSLError)


class DownloadError(UserError, RuntimeError):
    """A download that cannot succeed (HTTP 4xx, retries exhausted, disk full, ...)."""


class VerificationError(DownloadError):
    """A file whose sha256 or size differs from the expected one, or that cannot be checked."""


class ContentError(VerificationError):
    """A download refused because its length or content is not what the server announced or the registry says."""


# ----------------------------------------------------------------------------
# Public API.


def fetch(
    source: str | Artifact,
    out: str | os.PathLike,
    lock_file: str | os.PathLike | None = None,
    *,
    retries: int = 5,
    timeout: float = 60.0,
    backoff: float = 2.0,
    chunk: int = 1 << 20,
    progress: bool = True,
    kind: str | None = None,
) -> Path:
    """Download ``source`` (registry key, URL or Artifact) to ``out`` and verify it; return ``out``.

    An existing ``out`` that verifies is kept without network access; one that does not is
    deleted and downloaded again. ``retries`` counts consecutive attempts that made no progress.
    Without a known sha256 the download is checked for length and content (``kind`` names a bare URL's).
    """
    art = source if isinstance(source, Artifact) else lookup(source, kind)
    out = Path(out)
    if out.is_dir():
        raise DownloadError(f"{out}: a directory is in the way of the file to download")
    lock_file = Path(lock_file) if lock_file is not None else None
    label = art.key or art.url.rsplit("/", 1)[-1]
    expected, _ = _expected(art, lock_file)
    if expected is None and art.kind is None:
        raise VerificationError(f"refusing {art.url}: nothing could check what it serves (no sha256 known, and "
                                f"its name says no content kind); name its kind (--kind, one of "
                                f"{', '.join(content.KINDS)}) or register it in sidcore/data/artifacts.yaml")
    if out.exists() and expected is not None:
        try:
            digest = _check(art, out, lock_file)
        except VerificationError as exc:
            _say(progress, f"{exc}; downloading again")
            out.unlink()
        else:
            _say(progress, f"{label}: {out} is present and verified")
            _record(lock_file, art, digest, out.stat().st_size)
            return out

    part = out.with_name(out.name + ".part")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        published = _download(art, part, label, retries=retries, timeout=timeout, backoff=backoff, chunk=chunk,
                               progress=progress)
        digest = _accept(art, part, lock_file, published, first=expected is None)
    except VerificationError:
        _discard(part)
        raise
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DownloadError(f"no space left on device while writing {out} (partial data kept in {part})") from exc
        raise
    os.replace(part, out)
    _origin_file(part).unlink(missing_ok=True)
    _record(lock_file, art, digest, out.stat().st_size)
    _say(progress, f"{label}: sha256 {digest} -> {out}")
    return out


def verify(source: str | Artifact, path: str | os.PathLike, lock_file: str | os.PathLike | None = None) -> str:
    """Return the sha256 of ``path`` after checking it against the registry or lock file.

    Raises VerificationError on a mismatch, or when neither knows a digest for ``source``.
    """
    art = source if isinstance(source, Artifact) else lookup(source)
    lock_file = Path(lock_file) if lock_file is not None else None
    if _expected(art, lock_file)[0] is None:
        raise VerificationError(f"no sha256 known for {art.id}: none in the registry or in lock file {lock_file}")
    return _check(art, Path(path), lock_file)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's contents."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------
# Expected digests, content and the lock file.


def _expected(art: Artifact, lock_file: Path | None) -> tuple[str | None, str]:
    """Expected sha256 of ``art`` and where it comes from (registry first, then lock file)."""
    if art.sha256 is not None:
        return art.sha256, "registry"
    if lock_file is not None and (entry := _read_lock(lock_file).get(art.id)) is not None:
        return entry["sha256"], f"lock file {lock_file}"
    return None, ""


def _check(art: Artifact, path: Path, lock_file: Path | None) -> str:
    """sha256 of ``path``, raising VerificationError if it or the size differs from the expected."""
    size = path.stat().st_size
    if art.size is not None and size != art.size:
        raise VerificationError(f"size mismatch for {art.url}: expected {art.size} bytes (registry), got {size} "
                                f"({path})")
    digest = sha256_file(path)
    expected, origin = _expected(art, lock_file)
    if expected is not None and digest != expected:
        raise VerificationError(f"sha256 mismatch for {art.url}: expected {expected} ({origin}), got {digest} ({path})")
    return digest


def _accept(art: Artifact, part: Path, lock_file: Path | None, published: str | None, *, first: bool) -> str:
    """sha256 of a downloaded ``part`` that passes every check; a ``first`` download also by content kind."""
    remedy = (f"check that {art.url} still serves the file (not an error page) and download again, "
              f"or fix the registry entry")
    if art.size is not None and (size := part.stat().st_size) != art.size:
        problem = f"expected {art.size:,} bytes as the registry says, got {size:,}"
        raise ContentError(_refusal(art, part, problem, remedy))
    digest = _check(art, part, lock_file)
    if published is not None and digest != published:
        raise VerificationError(f"sha256 mismatch for {art.url}: the server publishes {published}, got {digest} "
                                f"({part})")
    if first and art.kind is not None and (problem := content.problem(art.kind, part)) is not None:
        raise ContentError(_refusal(art, part, problem, remedy))
    return digest


def _refusal(art: Artifact, part: Path, problem: str, remedy: str) -> str:
    name = f"{art.key} ({art.url})" if art.key else art.url
    return f"refusing {name}: {part}: {problem}; it was deleted and nothing was pinned — {remedy}"


def _read_lock(lock_file: Path) -> dict:
    if not lock_file.exists():
        return {}
    try:
        return json.loads(lock_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DownloadError(f"lock file {lock_file} is not valid JSON: {exc}") from None


def _record(lock_file: Path | None, art: Artifact, digest: str, size: int) -> None:
    """Pin ``art``'s digest in the lock file (atomic rewrite, serialised between processes)."""
    if lock_file is None:
        return
    with _exclusive(lock_file):
        table = _read_lock(lock_file)
        entry = {"sha256": digest, "size": size, "url": art.url}
        if table.get(art.id) == entry:
            return
        table[art.id] = entry
        tmp = lock_file.with_name(f"{lock_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, lock_file)


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """Serialise updates of ``lock_file`` between parallel download jobs (flock on a ``.lck`` sidecar)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file.with_name(lock_file.name + ".lck"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------
# Transfer.


def _download(art: Artifact, part: Path, label: str, *, retries: int, timeout: float, backoff: float, chunk: int,
              progress: bool) -> str | None:
    """Bring ``part`` to the complete content of ``art.url``, retrying transient failures.

    Returns the sha256 the server published for the file, if any.
    """
    failures = 0
    while True:
        before = _size(part)
        try:
            return _transfer(art.url, part, label, timeout=timeout, chunk=chunk, progress=progress)
        except urllib.error.HTTPError as exc:
            if exc.code != 429 and exc.code < 500:
                raise DownloadError(f"HTTP {exc.code} {exc.reason} for {art.url}") from None
            error: Exception = exc
        except urllib.error.URLError as exc:
            if art.url.startswith("file://") and isinstance(exc.reason, OSError):  # a local file: no retry helps
                raise DownloadError(f"{art.url}: {exc.reason.strerror or exc.reason}") from None
            error = exc
        except TRANSIENT as exc:
            error = exc
        failures = 0 if _size(part) > before else failures + 1
        if failures > retries and isinstance(error, _ShortBody):
            problem = f"expected {error.announced:,} bytes as the server announced, got {error.got:,}"
            raise ContentError(_refusal(art, part, problem, f"{failures} attempts in a row got no further, so the "
                                                            f"server sends less than it announces; try again later"))
        if failures > retries:
            raise DownloadError(f"giving up on {art.url} after {failures} attempts without progress: "
                                f"{error}") from error
        delay = backoff * 2 ** max(failures - 1, 0)
        _say(progress, f"{label}: {error!r}; retrying in {delay:.0f} s")
        time.sleep(delay)


class _ShortBody(http.client.HTTPException):
    """A response that ended before the length the server announced."""

    def __init__(self, got: int, announced: int) -> None:
        super().__init__(f"{got:,} of {announced:,} announced bytes")
        self.got, self.announced = got, announced


@dataclasses.dataclass
class _Origin:
    """What the response that started a part said about the file."""

    url: str
    etag: str | None
    modified: str | None  # Last-Modified
    length: int | None  # total bytes announced

    @property
    def validator(self) -> str | None:
        """What a resume sends as If-Range: a strong ETag, else Last-Modified."""
        return self.etag if self.etag and not self.etag.startswith("W/") else self.modified


def _origin_file(part: Path) -> Path:
    return part.with_name(part.name + ".origin")


def _load_origin(part: Path, url: str) -> _Origin | None:
    """The saved origin of ``part``, if there is a part and it was started from ``url``."""
    try:
        origin = _Origin(**json.loads(_origin_file(part).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None
    return origin if origin.url == url and part.exists() else None


def _discard(part: Path) -> None:
    part.unlink(missing_ok=True)
    _origin_file(part).unlink(missing_ok=True)


def _continues(headers, offset: int, origin: _Origin) -> bool:
    """Whether a 206 answer continues the part ``origin`` started: same start, total length and validators."""
    start, total = _content_range(headers.get("Content-Range"))
    same_total = None in (total, origin.length) or total == origin.length
    validators = (("ETag", origin.etag), ("Last-Modified", origin.modified))
    return start == offset and same_total and all(headers.get(name) in (None, saved) for name, saved in validators)


class _DigestRecorder(urllib.request.HTTPRedirectHandler):
    """Follows redirects like the default handler, keeping a sha256 published in any response's headers."""

    def __init__(self) -> None:
        self.published: str | None = None

    def note(self, headers) -> None:
        match = _SHA256_ETAG.fullmatch((headers.get("X-Linked-Etag") or "").strip())
        if match:
            self.published = match.group(1).lower()

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.note(headers)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_SHA256_ETAG = re.compile(r'(?:W/)?"?([0-9a-fA-F]{64})"?')


def _transfer(url: str, part: Path, label: str, *, timeout: float, chunk: int, progress: bool) -> str | None:
    """One request: resume ``part`` if its origin is confirmed (else start over) and read to the end.

    Returns the sha256 published by the server, if any.
    """
    origin = _load_origin(part, url)
    offset = _size(part) if origin is not None and origin.validator else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers |= {"Range": f"bytes={offset}-", "If-Range": origin.validator}
    recorder = _DigestRecorder()
    try:
        response = urllib.request.build_opener(recorder).open(urllib.request.Request(url, headers=headers),
                                                              timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code != 416 or not offset:
            raise
        exc.close()  # Range not satisfiable: the partial file is not a prefix; start over.
        _discard(part)
        return _transfer(url, part, label, timeout=timeout, chunk=chunk, progress=progress)

    with response:
        status = response.status or 200  # file:// responses carry no status
        resumed = bool(offset) and status == 206
        if resumed and not _continues(response.headers, offset, origin):
            _discard(part)
            return _transfer(url, part, label, timeout=timeout, chunk=chunk, progress=progress)
        if not resumed:  # a new file, or the server sends the whole file: it replaces the part
            offset = 0
            _discard(part)
            origin = _Origin(url, response.headers.get("ETag"), response.headers.get("Last-Modified"),
                             _announced(response.headers, 0))
            _origin_file(part).write_text(json.dumps(dataclasses.asdict(origin)), encoding="utf-8")
        total = _announced(response.headers, offset)
        meter = Progress(total, "MB", scale=1e6, done=offset, every=PROGRESS_INTERVAL)
        with open(part, "ab" if offset else "wb") as f:
            while block := response.read(chunk):
                f.write(block)
                if meter.advance(meter.done + len(block)):
                    _say(progress, f"{label}: {meter.line()}")
            f.flush()
            os.fsync(f.fileno())
    if total is not None and _size(part) != total:
        raise _ShortBody(_size(part), total)
    _say(progress, f"{label}: {meter.line()}")
    recorder.note(response.headers)
    return recorder.published


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """First byte position and total length of a ``Content-Range: bytes a-b/n`` header (None if absent or ``*``)."""
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", (value or "").strip())
    if not match:
        return None, None
    return int(match.group(1)), int(match.group(2)) if match.group(2) != "*" else None


def _announced(headers, offset: int) -> int | None:
    """Total file length a response announces: its Content-Range total, else ``offset`` + Content-Length."""
    total = _content_range(headers.get("Content-Range"))[1]
    if total is None and (length := headers.get("Content-Length")) is not None:
        total = offset + int(length)
    return total


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


# ----------------------------------------------------------------------------
# Progress reporting.


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)
