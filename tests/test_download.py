"""Downloads against a local HTTP server on 127.0.0.1: resume, retries, checksums, lock file."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sidcore import cli, download, registry
from sidcore.download import ContentError, DownloadError, VerificationError, fetch, verify
from sidcore.errors import UserError
from sidcore.registry import Artifact, lookup

MAX_REQUESTS = 20  # per test; the server refuses anything beyond


@dataclass
class ServerState:
    """What the server serves and how it misbehaves; what it has seen."""

    files: dict[str, bytes] = field(default_factory=dict)
    redirects: dict[str, tuple[str, str]] = field(default_factory=dict)  # path -> (target, X-Linked-Etag)
    # Per request, in order: an HTTP status, or faults joined by "+": "cut" (half the body), "no-range"
    # (ignores Range), "no-etag", "no-length" (no Content-Length), "over-announce" (Content-Length 10 too
    # many), "stale-range" (ignores If-Range), "swap" (serves files[path + "~"] from then on).
    faults: list[int | str] = field(default_factory=list)
    requests: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Handler(BaseHTTPRequestHandler):
    state: ServerState

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        with self.state.lock:
            self.state.requests.append({"path": self.path, **self.headers})
            fault = self.state.faults.pop(0) if self.state.faults else None
            too_many = len(self.state.requests) > MAX_REQUESTS
        if self.path in self.state.redirects and not too_many:
            target, etag = self.state.redirects[self.path]
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = self.state.files.get(self.path)
        if too_many or isinstance(fault, int) or data is None:
            self.send_error(400 if too_many else fault if isinstance(fault, int) else 404)
            return
        faults = set(fault.split("+")) if fault else set()
        etag = f'"{sha(data)[:16]}"'
        ranged = "Range" in self.headers and "no-range" not in faults
        if ranged and self.headers.get("If-Range", etag) != etag and "stale-range" not in faults:
            ranged = False  # the file changed since the client's part: send all of it
        start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-")) if ranged else 0
        if start >= len(data) > 0:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if ranged else 200)
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if "no-etag" not in faults:
            self.send_header("ETag", etag)
        body = data[start:]
        if "no-length" not in faults:
            self.send_header("Content-Length", str(len(body) + 10 * ("over-announce" in faults)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if "cut" in faults else body)
        if "swap" in faults:
            self.state.files[self.path] = self.state.files[self.path + "~"]
        self.close_connection = True


@pytest.fixture(scope="module")
def http_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def state(http_server) -> ServerState:
    Handler.state = ServerState()
    return Handler.state


@pytest.fixture
def blob(http_server, state) -> tuple[str, bytes]:
    """URL of a pickle of a few hundred KB of random bytes (a kind its name says, so a first download is checked)."""
    data = random_pickle(300_000 + 17)
    state.files["/blob.pkl"] = data
    host, port = http_server.server_address
    return f"http://{host}:{port}/blob.pkl", data


def random_pickle(n: int) -> bytes:
    return pickle.dumps(os.urandom(n), protocol=4)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


FAST = dict(backoff=0.0, timeout=5.0, progress=False)


def test_complete_download_with_known_sha256(blob, state, tmp_path, capsys):
    url, data = blob
    art = Artifact("test/blob", url, sha256=sha(data), size=len(data))
    out = fetch(art, tmp_path / "sub" / "blob.bin", tmp_path / "lock.json", backoff=0.0, timeout=5.0, chunk=1 << 16)
    assert out.read_bytes() == data
    assert not out.with_name("blob.bin.part").exists()
    assert len(state.requests) == 1 and "Range" not in state.requests[0]
    pinned = json.loads((tmp_path / "lock.json").read_text())["test/blob"]
    assert pinned == {"sha256": sha(data), "size": len(data), "url": url}
    assert "MB/s" in capsys.readouterr().err


def test_cut_transfer_resumes_with_range(blob, state, tmp_path):
    url, data = blob
    state.faults = ["cut"]
    out = fetch(Artifact("test/blob", url, sha256=sha(data)), tmp_path / "blob.bin", **FAST)
    assert out.read_bytes() == data
    assert len(state.requests) == 2
    assert state.requests[1]["Range"] == f"bytes={len(data) // 2}-"
    assert state.requests[1]["If-Range"] == f'"{sha(data)[:16]}"'  # the first response's ETag
    assert not (tmp_path / "blob.bin.part.origin").exists()


def test_range_ignored_restarts_from_zero(blob, state, tmp_path):
    url, data = blob
    state.faults = ["cut", "no-range"]
    out = fetch(Artifact("test/blob", url, sha256=sha(data)), tmp_path / "blob.bin", **FAST)
    assert out.read_bytes() == data and len(state.requests) == 2


def test_wrong_sha256_fails_and_leaves_nothing(blob, state, tmp_path):
    url, data = blob
    wrong = "0" * 64
    out = tmp_path / "blob.bin"
    with pytest.raises(VerificationError) as info:
        fetch(Artifact("test/blob", url, sha256=wrong), out, tmp_path / "lock.json", **FAST)
    assert url in str(info.value) and wrong in str(info.value) and sha(data) in str(info.value)
    assert not out.exists() and not out.with_name("blob.bin.part").exists()
    assert not (tmp_path / "lock.json").exists()


def test_server_errors_are_retried(blob, state, tmp_path):
    url, data = blob
    state.faults = [500, 500]
    out = fetch(url, tmp_path / "blob.bin", retries=3, **FAST)
    assert out.read_bytes() == data and len(state.requests) == 3


def test_retries_are_bounded(blob, state, tmp_path):
    url, _ = blob
    state.faults = [503, 429, 500]
    with pytest.raises(DownloadError, match="giving up"):
        fetch(url, tmp_path / "blob.bin", retries=2, **FAST)
    assert len(state.requests) == 3 and not (tmp_path / "blob.bin").exists()


def test_404_fails_at_once(blob, state, tmp_path):
    url, _ = blob
    missing = url.replace("blob.pkl", "missing.pkl")
    with pytest.raises(DownloadError) as info:
        fetch(missing, tmp_path / "missing.bin", retries=5, **FAST)
    assert missing in str(info.value) and "404" in str(info.value)
    assert len(state.requests) == 1
    assert not (tmp_path / "missing.bin").exists() and not (tmp_path / "missing.bin.part").exists()


def test_lock_file_pins_first_download(blob, state, tmp_path):
    url, data = blob
    lock = tmp_path / "lock.json"
    first = fetch(url, tmp_path / "a.bin", lock, **FAST)
    assert json.loads(lock.read_text())[url]["sha256"] == sha(data)
    assert verify(url, first, lock) == sha(data)

    state.files["/blob.pkl"] = os.urandom(len(data))  # the server now serves something else
    with pytest.raises(VerificationError, match="lock file") as info:
        fetch(url, tmp_path / "b.bin", lock, **FAST)
    assert url in str(info.value) and sha(data) in str(info.value)
    assert not (tmp_path / "b.bin").exists() and not (tmp_path / "b.bin.part").exists()

    first.write_bytes(data[:-1] + b"\0")  # a tampered local copy is refused too
    with pytest.raises(VerificationError):
        verify(url, first, lock)


def test_verify_needs_a_known_digest(blob, tmp_path):
    url, data = blob
    (tmp_path / "blob.bin").write_bytes(data)
    with pytest.raises(VerificationError, match="no sha256 known"):
        verify(url, tmp_path / "blob.bin", tmp_path / "lock.json")


def test_verified_file_is_not_downloaded_again(blob, state, tmp_path):
    url, data = blob
    lock = tmp_path / "lock.json"
    out = fetch(url, tmp_path / "blob.bin", lock, **FAST)
    state.requests.clear()
    assert fetch(url, out, lock, **FAST) == out
    (tmp_path / "other.bin").write_bytes(data)
    fetch(Artifact("test/blob", url, sha256=sha(data)), tmp_path / "other.bin", **FAST)
    assert state.requests == []


def test_corrupt_existing_file_is_replaced(blob, state, tmp_path):
    url, data = blob
    out = tmp_path / "blob.bin"
    out.write_bytes(b"stale")
    fetch(Artifact("test/blob", url, sha256=sha(data)), out, **FAST)
    assert out.read_bytes() == data and len(state.requests) == 1


def test_disk_full_names_the_target(blob, tmp_path, monkeypatch):
    url, _ = blob

    class FullDisk:
        def __init__(self, path, mode):
            self.file = open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, block):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(download, "open", FullDisk, raising=False)
    out = tmp_path / "blob.bin"
    with pytest.raises(DownloadError, match="no space left") as info:
        fetch(url, out, **FAST)
    assert str(out) in str(info.value) and not out.exists()


def test_file_url(tmp_path):
    data = random_pickle(1000)
    (tmp_path / "src.pkl").write_bytes(data)
    out = fetch((tmp_path / "src.pkl").as_uri(), tmp_path / "dst.pkl", tmp_path / "lock.json", **FAST)
    assert out.read_bytes() == data


def test_a_missing_file_url_fails_at_once(tmp_path):
    url = (tmp_path / "no-such.pkl").as_uri()
    with pytest.raises(DownloadError, match=f"^{url}: No such file or directory$"):
        fetch(url, tmp_path / "dst.pkl", retries=5, backoff=1.0, timeout=5.0, progress=False)
    assert not list(tmp_path.iterdir())


def test_command_line(blob, tmp_path, capsys):
    url, data = blob
    assert cli.main(["download", url, "--out", str(tmp_path / "blob.bin"), "--lock", str(tmp_path / "lock.json"),
                     "--timeout", "5"]) == 0
    assert (tmp_path / "blob.bin").read_bytes() == data
    assert cli.main(["download", "teacher/no-such-teacher", "--out", str(tmp_path / "x.pkl")]) == cli.USER_ERROR_EXIT
    err = capsys.readouterr().err
    assert "teacher/no-such-teacher" in err and "Traceback" not in err


def test_unknown_key_names_it_and_close_matches():
    with pytest.raises(UserError) as info:
        lookup("teacher/edm-cifar10-32x32-uncond")
    message = str(info.value)
    assert "teacher/edm-cifar10-32x32-uncond" in message and "teacher/edm-cifar10-32x32-uncond-vp" in message


def test_registry_entries():
    table = registry.artifacts()
    assert all(key == art.key for key, art in table.items())
    assert all(art.url.startswith("https://") for art in table.values())
    assert len({art.url for art in table.values()}) == len(table)
    for key in [
        "teacher/edm-cifar10-32x32-uncond-vp",
        "teacher/edm-imagenet-64x64-cond-adm",
        "teacher/edm2-img512-xxl-0939524-0.070",
        "teacher/edm2-img512-xs-2147483-0.200",
        "refs/img512",
        "refs/VIRTUAL_imagenet64_labeled",
        "detector/inception-2015-12-05-pt",
        "detector/pt_inception-2015-12-05",
        "detector/dinov2-vitl14",
        "vae/sd-vae-ft-mse/diffusion_pytorch_model.safetensors",
    ]:
        assert key in table
    assert sum(key.startswith("teacher/edm2-") for key in table) == 12
    assert lookup("teacher/edm-cifar10-32x32-uncond-vp").url.endswith("/edm/pretrained/edm-cifar10-32x32-uncond-vp.pkl")


def test_registry_rejects_duplicate_keys():
    text = "refs:\n  a:\n    url: https://example.org/a\n  a:\n    url: https://example.org/b\n"
    with pytest.raises(Exception, match="duplicate key"):
        registry.parse(text)


@pytest.mark.parametrize("published_ok", [True, False])
def test_digest_published_with_the_redirect_is_checked(blob, state, tmp_path, published_ok):
    """Hugging Face announces an LFS file's sha256 in X-Linked-Etag on the redirect to its storage."""
    url, data = blob
    published = sha(data) if published_ok else sha(b"something else")
    state.redirects["/resolve/main/blob.pkl"] = ("/blob.pkl", published)
    art = Artifact("test/blob", url.replace("/blob.pkl", "/resolve/main/blob.pkl"), kind="pickle")
    out = tmp_path / "blob.bin"
    if published_ok:
        fetch(art, out, tmp_path / "lock.json", **FAST)
        assert out.read_bytes() == data
        assert json.loads((tmp_path / "lock.json").read_text())["test/blob"]["sha256"] == published
    else:
        with pytest.raises(VerificationError, match="server publishes " + published):
            fetch(art, out, tmp_path / "lock.json", **FAST)
        assert not out.exists() and not (tmp_path / "blob.bin.part").exists()
        assert not (tmp_path / "lock.json").exists()


# ----------------------------------------------------------------------------
# Resumes only onto a part whose origin is confirmed; announced lengths.


@pytest.fixture
def changing(blob, state) -> tuple[str, bytes, bytes]:
    """URL of a file, its content and what it becomes (same length) after a response with the "swap" fault."""
    url, old = blob
    new = random_pickle(300_000 + 17)
    state.files["/blob.pkl~"] = new
    return url, old, new


def test_changed_file_replaces_the_part(changing, state, tmp_path):
    """The resume's If-Range no longer matches: the server sends the whole new file, which is not appended."""
    url, old, new = changing
    state.faults = ["cut+swap"]
    out = fetch(url, tmp_path / "blob.bin", tmp_path / "lock.json", **FAST)
    assert out.read_bytes() == new and len(state.requests) == 2
    assert state.requests[1]["If-Range"] == f'"{sha(old)[:16]}"'
    assert json.loads((tmp_path / "lock.json").read_text())[url]["sha256"] == sha(new)


def test_range_answer_with_another_etag_restarts(changing, state, tmp_path):
    url, _, new = changing
    state.faults = ["cut+swap", "stale-range"]  # ignores If-Range, but its ETag tells the file changed
    out = fetch(url, tmp_path / "blob.bin", **FAST)
    assert out.read_bytes() == new and len(state.requests) == 3
    assert "Range" not in state.requests[2]


def test_part_without_validator_is_not_resumed(blob, state, tmp_path):
    url, data = blob
    state.faults = ["cut+no-etag"]
    out = fetch(Artifact("test/blob", url, sha256=sha(data)), tmp_path / "blob.bin", **FAST)
    assert out.read_bytes() == data and len(state.requests) == 2
    assert "Range" not in state.requests[1]


def test_part_of_an_earlier_run_is_resumed(blob, state, tmp_path):
    url, data = blob
    state.faults = ["cut", 404]
    with pytest.raises(DownloadError, match="404"):
        fetch(url, tmp_path / "blob.bin", **FAST)
    assert (tmp_path / "blob.bin.part").stat().st_size == len(data) // 2
    out = fetch(url, tmp_path / "blob.bin", **FAST)
    assert out.read_bytes() == data
    assert state.requests[-1]["Range"] == f"bytes={len(data) // 2}-"


def test_range_answer_with_another_total_restarts(blob, state, tmp_path):
    url, old = blob
    new = random_pickle(300_000 + 117)
    state.files["/blob.pkl~"] = new
    state.faults = ["cut+swap", "stale-range+no-etag"]  # ignores If-Range, no ETag: only the total tells
    out = fetch(url, tmp_path / "blob.bin", **FAST)
    assert out.read_bytes() == new and len(state.requests) == 3
    assert "Range" not in state.requests[2]


def test_announced_length_is_checked_with_a_known_digest(blob, state, tmp_path):
    """Right bytes, but never as many as announced: refused although the sha256 would match."""
    url, data = blob
    state.faults = ["over-announce"] * 6
    out, lock = tmp_path / "blob.bin", tmp_path / "lock.json"
    with pytest.raises(ContentError) as info:
        fetch(Artifact("test/blob", url, sha256=sha(data)), out, lock, retries=1, **FAST)
    message = str(info.value)
    assert f"expected {len(data) + 10:,} bytes as the server announced, got {len(data):,}" in message
    assert "test/blob" in message and url in message and "nothing was pinned" in message
    assert not out.exists() and not (tmp_path / "blob.bin.part").exists() and not lock.exists()


def test_download_errors_are_user_errors():
    assert issubclass(ContentError, VerificationError) and issubclass(DownloadError, UserError)


def test_registry_kind_is_required_and_known():
    with pytest.raises(ValueError, match="refs/a.*kind"):
        registry.parse("refs:\n  a:\n    url: https://example.org/a\n")
    with pytest.raises(ValueError, match="refs/a: unknown kind 'npz'; use one of .*stats-npz"):
        registry.parse("refs:\n  a:\n    url: https://example.org/a\n    kind: npz\n")
    table = registry.parse("refs:\n  a:\n    url: https://example.org/a\n    kind: stats-npz\n")
    assert table["refs/a"].kind == "stats-npz"
