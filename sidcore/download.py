"""Resumable, verified downloads of registry artifacts, using the standard library only.

A download is written to ``<out>.part``; an interrupted transfer is resumed with an HTTP Range
request, and transient failures (connection errors, time-outs, 5xx, 429) are retried with
exponential back-off. The file is renamed to ``out`` only after its sha256 matches the expected
digest: the registry's, else the one pinned in the lock file on first download. A digest the server
publishes with the file (Hugging Face's ``X-Linked-Etag`` for LFS files, sent with the redirect to
the storage backend) is checked as well. So ``out`` exists only as a complete, verified file.

Lock file: JSON ``{key or url: {"sha256": ..., "size": ..., "url": ...}}``, rewritten atomically.
"""
from __future__ import annotations

import argparse
import contextlib
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

from sidcore import __version__
from sidcore.registry import Artifact, lookup

DEFAULT_LOCK = Path("resources/artifacts.lock.json")
PROGRESS_INTERVAL = 2.0  # seconds between progress lines
USER_AGENT = f"sidcore/{__version__}"
TRANSIENT = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, ssl.SSLError)


class DownloadError(RuntimeError):
    """A download that cannot succeed (HTTP 4xx, retries exhausted, disk full, ...)."""


class VerificationError(DownloadError):
    """A file whose sha256 or size differs from the expected one, or that cannot be checked."""


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
) -> Path:
    """Download ``source`` (registry key, URL or Artifact) to ``out`` and verify it; return ``out``.

    An existing ``out`` that verifies is kept without network access; one that does not is
    deleted and downloaded again. ``retries`` counts consecutive attempts that made no progress.
    Without a registry sha256 and without a lock file the download is checked only for length.
    """
    art = source if isinstance(source, Artifact) else lookup(source)
    out = Path(out)
    lock_file = Path(lock_file) if lock_file is not None else None
    label = art.key or art.url.rsplit("/", 1)[-1]
    expected, _ = _expected(art, lock_file)
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
        published = _download(art.url, part, label, retries=retries, timeout=timeout, backoff=backoff, chunk=chunk,
                               progress=progress)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DownloadError(f"no space left on device while writing {out} (partial data kept in {part})") from exc
        raise
    try:
        digest = _check(art, part, lock_file)
        if published is not None and digest != published:
            raise VerificationError(f"sha256 mismatch for {art.url}: the server publishes {published}, got {digest} "
                                    f"({part})")
    except VerificationError:
        part.unlink()
        raise
    os.replace(part, out)
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
# Expected digests and the lock file.


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
        raise VerificationError(f"size mismatch for {art.url}: expected {art.size} bytes (registry), got {size} ({path})")
    digest = sha256_file(path)
    expected, origin = _expected(art, lock_file)
    if expected is not None and digest != expected:
        raise VerificationError(f"sha256 mismatch for {art.url}: expected {expected} ({origin}), got {digest} ({path})")
    return digest


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


def _download(url: str, part: Path, label: str, *, retries: int, timeout: float, backoff: float, chunk: int,
              progress: bool) -> str | None:
    """Bring ``part`` to the complete content of ``url``, retrying transient failures.

    Returns the sha256 the server published for the file, if any.
    """
    failures = 0
    while True:
        before = _size(part)
        try:
            return _transfer(url, part, label, timeout=timeout, chunk=chunk, progress=progress)
        except urllib.error.HTTPError as exc:
            if exc.code != 429 and exc.code < 500:
                raise DownloadError(f"HTTP {exc.code} {exc.reason} for {url}") from None
            error: Exception = exc
        except TRANSIENT as exc:
            error = exc
        failures = 0 if _size(part) > before else failures + 1
        if failures > retries:
            raise DownloadError(f"giving up on {url} after {failures} attempts without progress: {error}") from error
        delay = backoff * 2 ** max(failures - 1, 0)
        _say(progress, f"{label}: {error!r}; retrying in {delay:.0f} s")
        time.sleep(delay)


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
    """One request: resume ``part`` from its current size (or restart) and read to the end.

    Returns the sha256 published by the server, if any.
    """
    offset = _size(part)
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    recorder = _DigestRecorder()
    try:
        response = urllib.request.build_opener(recorder).open(urllib.request.Request(url, headers=headers),
                                                              timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code != 416 or not offset:
            raise
        exc.close()  # Range not satisfiable: the partial file is not a prefix; start over.
        part.unlink()
        return _transfer(url, part, label, timeout=timeout, chunk=chunk, progress=progress)

    with response:
        status = response.status or 200  # file:// responses carry no status
        if offset and status == 206 and _range_start(response.headers.get("Content-Range")) != offset:
            part.unlink()
            return _transfer(url, part, label, timeout=timeout, chunk=chunk, progress=progress)
        if status != 206:
            offset = 0  # the server ignored the Range request and sends the whole file
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        meter = _Progress(label, offset, total, progress)
        with open(part, "ab" if offset else "wb") as f:
            while block := response.read(chunk):
                f.write(block)
                meter.advance(len(block))
            f.flush()
            os.fsync(f.fileno())
    if total is not None and _size(part) != total:
        raise http.client.IncompleteRead(b"", total - _size(part))
    meter.finish()
    recorder.note(response.headers)
    return recorder.published


def _range_start(content_range: str | None) -> int | None:
    """First byte position of a ``Content-Range: bytes a-b/n`` header."""
    match = re.match(r"bytes (\d+)-", content_range or "")
    return int(match.group(1)) if match else None


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


# ----------------------------------------------------------------------------
# Progress reporting.


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)


class _Progress:
    """Plain-text progress lines on stderr, at most one per PROGRESS_INTERVAL seconds."""

    def __init__(self, label: str, done: int, total: int | None, enabled: bool) -> None:
        self.label, self.done, self.total, self.enabled = label, done, total, enabled
        self.first = done
        self.start = self.last = time.monotonic()

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= PROGRESS_INTERVAL:
            self.last = now
            self._print(now)

    def finish(self) -> None:
        self._print(time.monotonic())

    def _print(self, now: float) -> None:
        rate = (self.done - self.first) / max(now - self.start, 1e-6)
        line = f"{self.label}: {self.done / 1e6:.1f}"
        if self.total:
            line += f" / {self.total / 1e6:.1f} MB ({100 * self.done / self.total:.0f}%)"
        else:
            line += " MB"
        line += f", {rate / 1e6:.1f} MB/s"
        if self.total and rate > 0:
            line += f", ETA {_clock((self.total - self.done) / rate)}"
        _say(self.enabled, line)


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    h, m = divmod(minutes, 60)
    return f"{h}:{m:02d}:{s:02d}"


# ----------------------------------------------------------------------------
# Command line.


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``download`` subcommand."""
    p = subparsers.add_parser("download", help="download an artifact resumably and verify its sha256")
    p.add_argument("source", help="registry key (e.g. teacher/edm-cifar10-32x32-uncond-vp) or http(s):// / file:// URL")
    p.add_argument("--out", type=Path, required=True, metavar="PATH", help="destination file")
    p.add_argument("--lock", type=Path, default=DEFAULT_LOCK, metavar="PATH", help="lock file pinning sha256 digests (default: %(default)s)")
    p.add_argument("--retries", type=int, default=5, help="retries of a failed attempt that made no progress (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=60.0, help="socket time-out in seconds (default: %(default)s)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        fetch(args.source, args.out, args.lock, retries=args.retries, timeout=args.timeout)
    except (DownloadError, KeyError) as exc:
        print(f"sidcore download: error: {exc.args[0]}", file=sys.stderr)
        return 1
    return 0
