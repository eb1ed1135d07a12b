"""First downloads (no known sha256) are pinned only when they open as their registry kind."""
from __future__ import annotations

import gzip
import io
import json
import pickle
import re
import tarfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from nvidia_pickle import write_network_pickle
from test_download import FAST, ServerState, http_server, sha, state  # noqa: F401 — the server fixtures

from sidcore import content, registry
from sidcore.download import ContentError, VerificationError, fetch
from sidcore.networks.layers import Linear
from sidcore.registry import Artifact, lookup

HTML = b"<!DOCTYPE html>\n<p>no</p>\n"  # 26 bytes


def network_pickle(tmp: Path) -> bytes:
    write_network_pickle(tmp / "net.pkl", Linear(3, 2), "EDMPrecond", dict(img_resolution=8, img_channels=3,
                                                                          label_dim=0))
    return (tmp / "net.pkl").read_bytes()


def stats(d: int) -> dict[str, np.ndarray]:
    return {"mu": np.arange(d, dtype=np.float64), "sigma": np.eye(d)}


def npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def torchscript(tmp: Path) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, but it is what the file is
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), buffer)
    return buffer.getvalue()


def checkpoint(zip_format: bool = True) -> bytes:
    buffer = io.BytesIO()
    torch.save({"cls_token": torch.zeros(1, 1, 4)}, buffer, _use_new_zipfile_serialization=zip_format)
    return buffer.getvalue()


def tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zip_of(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buffer.getvalue()


CIFAR = tar_gz({"cifar-10-batches-py/data_batch_1": pickle.dumps({"data": [0] * 8}),
                "cifar-10-batches-py/readme": b"x"})
SAFETENSORS = safetensors.torch.save({"encoder.conv_in.weight": torch.ones(2, 3)})

# kind -> a tiny valid file (a function of a scratch directory)
GOOD: dict[str, Callable[[Path], bytes]] = {
    "network-pickle": network_pickle,
    "stats-pkl": lambda tmp: pickle.dumps({"num_images": 3, "fid": stats(4), "fd_dinov2": stats(2)}),
    "stats-npz": lambda tmp: npz(**stats(4)),
    "image-batch-npz": lambda tmp: npz(arr_0=np.zeros((2, 4, 4, 3), np.uint8), arr_1=np.arange(2)),
    "torchscript": torchscript,
    "torch-checkpoint": lambda tmp: checkpoint(),
    "pickle": lambda tmp: pickle.dumps({"anything": [1, 2.0]}),
    "tar-gz": lambda tmp: CIFAR,
    "safetensors": lambda tmp: SAFETENSORS,
    "json": lambda tmp: json.dumps({"_class_name": "AutoencoderKL", "latent_channels": 4}).encode(),
}

# kind -> (a well-formed file of the wrong content, what the refusal says)
WRONG: dict[str, tuple[Callable[[Path], bytes], str]] = {
    "network-pickle": (lambda tmp: pickle.dumps({"G": 1}), "expected a dict with key 'ema'"),
    "stats-pkl": (lambda tmp: pickle.dumps({"fid": {"mu": np.zeros(3), "sigma": np.eye(4)}}),
                  r"expected mu \[d\] and sigma \[d, d\], got \[3\] and \[4, 4\]"),
    "stats-npz": (lambda tmp: npz(mu=np.zeros(4)), r"got \[4\] and no sigma"),
    "image-batch-npz": (lambda tmp: npz(arr_0=np.zeros((2, 4, 4, 3), np.float32)),
                        r"'arr_0' is float32 \[2, 4, 4, 3\], not uint8 images"),
    "torchscript": (lambda tmp: checkpoint(), "without archive/code/, so not a TorchScript archive"),
    "torch-checkpoint": (lambda tmp: zip_of({"weights/a.npy": b"x"}), "without one top folder holding data.pkl"),
    "pickle": (lambda tmp: pickle.dumps([1]) + b"tail", "a pickle followed by trailing data"),
    "tar-gz": (lambda tmp: gzip.compress(b"\0" * 1024), "an empty tar archive"),
    "safetensors": (lambda tmp: SAFETENSORS + b"\0" * 8, "with 32 bytes of tensor data where its header describes 24"),
    "json": (lambda tmp: b"[1, 2]", r"not a JSON object \(starts with '\[1, 2\]'\)"),
}


def serve(server_state: ServerState, http_server, name: str, data: bytes) -> str:  # noqa: F811
    server_state.files[f"/{name}"] = data
    host, port = http_server.server_address
    return f"http://{host}:{port}/{name}"


def check(kind: str, tmp_path: Path, data: bytes) -> str | None:
    path = tmp_path / f"{kind}.bin"
    path.write_bytes(data)
    return content.problem(kind, path)


def test_every_registry_kind_has_fixtures():
    assert set(GOOD) == set(WRONG) == set(content.KINDS) >= {a.kind for a in registry.artifacts().values()}


@pytest.mark.parametrize("kind", content.KINDS)
def test_good_first_download_is_pinned(kind, http_server, state, tmp_path):  # noqa: F811
    data = GOOD[kind](tmp_path)
    url = serve(state, http_server, kind, data)
    out, lock = tmp_path / "dl" / kind, tmp_path / "lock.json"
    fetch(Artifact(f"test/{kind}", url, kind=kind), out, lock, **FAST)
    assert out.read_bytes() == data
    assert json.loads(lock.read_text())[f"test/{kind}"] == {"sha256": sha(data), "size": len(data), "url": url}


@pytest.mark.parametrize("kind", content.KINDS)
def test_wrong_content_is_refused(kind, http_server, state, tmp_path):  # noqa: F811
    make, why = WRONG[kind]
    url = serve(state, http_server, kind, make(tmp_path))
    message = refused(Artifact(f"test/{kind}", url, kind=kind), tmp_path)
    assert message.startswith(f"refusing test/{kind} ({url}): {tmp_path / 'out.bin.part'}: ")
    assert re.search(why, message), message


@pytest.mark.parametrize("kind", content.KINDS)
def test_html_page_is_refused(kind, tmp_path):
    problem = check(kind, tmp_path, HTML)
    assert problem is not None and "(starts with '<!DOCTYPE')" in problem and problem.startswith("not ")


@pytest.mark.parametrize("kind", content.KINDS)
def test_truncated_file_is_refused(kind, tmp_path):
    data = GOOD[kind](tmp_path)
    assert check(kind, tmp_path, data[: len(data) // 2]) is not None
    assert check(kind, tmp_path, b"") == "an empty file"


def test_legacy_torch_checkpoint_is_accepted(tmp_path):
    assert check("torch-checkpoint", tmp_path, checkpoint(zip_format=False)) is None


def test_damaged_zip_is_refused(tmp_path):
    data = bytearray(GOOD["stats-npz"](tmp_path))
    data[100] ^= 0xFF  # inside mu's data
    assert "fails its CRC check" in check("stats-npz", tmp_path, bytes(data))


def test_network_pickle_is_read_as_data(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("ran",))

    problem = check("network-pickle", tmp_path, pickle.dumps({"ema": Exploit()}))
    assert "refusing to load global builtins.print" in problem


# ----------------------------------------------------------------------------
# The three bad downloads observed: refused, nothing pinned, no `out`.


def refused(art: Artifact, tmp_path: Path, **kwargs) -> str:
    out, lock = tmp_path / "out.bin", tmp_path / "lock.json"
    with pytest.raises(ContentError) as info:
        fetch(art, out, lock, **{**FAST, **kwargs})
    assert not out.exists() and not (tmp_path / "out.bin.part").exists()
    assert not (tmp_path / "out.bin.part.origin").exists()
    assert not lock.exists()
    return str(info.value)


def test_body_cut_short_without_content_length(http_server, state, tmp_path):  # noqa: F811
    data = GOOD["network-pickle"](tmp_path)
    url = serve(state, http_server, "net.pkl", data)
    state.faults = ["no-length+cut"]
    message = refused(Artifact("teacher/x", url, kind="network-pickle"), tmp_path)
    part = tmp_path / "out.bin.part"
    assert message.startswith(f"refusing teacher/x ({url}): {part}: not a valid network-pickle file")
    assert "nothing was pinned" in message


def test_body_cut_short_is_refused_by_registry_size(http_server, state, tmp_path):  # noqa: F811
    url = serve(state, http_server, "cifar.tar.gz", CIFAR)
    state.faults = ["no-length+cut"]
    message = refused(Artifact("dataset/x", url, size=len(CIFAR), kind="tar-gz"), tmp_path)
    assert f"expected {len(CIFAR):,} bytes as the registry says, got {len(CIFAR) // 2:,}" in message


def test_file_spliced_across_a_resume(http_server, state, tmp_path):  # noqa: F811
    """The file changes (same length) between the cut and a resume that ignores If-Range and sends no ETag."""
    old, new = npz(**stats(64)), npz(mu=np.ones(64), sigma=2 * np.eye(64))
    assert len(old) == len(new)
    url = serve(state, http_server, "ref.npz", old)
    state.files["/ref.npz~"] = new
    state.faults = ["cut+swap", "stale-range+no-etag"]
    message = refused(Artifact("refs/x", url, kind="stats-npz"), tmp_path)
    assert "fails its CRC check" in message and "Range" in state.requests[1]


def test_html_page_with_status_200(http_server, state, tmp_path):  # noqa: F811
    url = serve(state, http_server, "teacher.pkl", HTML)
    message = refused(Artifact("teacher/x", url, kind="network-pickle"), tmp_path)
    assert f"{tmp_path / 'out.bin.part'}: not a pickle (starts with '<!DOCTYPE')" in message
    assert "check that" in message and url in message


@pytest.mark.parametrize("name, kind, fault, said", [
    ("teacher.pkl", None, None, "not a pickle (starts with '<!DOCTYPE')"),  # the 26-byte error page, status 200
    ("net.pkl", None, "no-length+cut", "not a valid pickle file"),  # truncated, no Content-Length
    ("weights", "network-pickle", "no-length+cut", "not a valid network-pickle file"),  # the caller names the kind
])
def test_a_bare_url_is_checked_by_the_kind_its_name_or_the_caller_says(http_server, state, tmp_path,  # noqa: F811
                                                                      name, kind, fault, said):
    body = HTML if fault is None else GOOD["network-pickle"](tmp_path)
    url = serve(state, http_server, name, body)
    state.faults = [fault] if fault else []
    message = refused(lookup(url, kind), tmp_path)
    assert message.startswith(f"refusing {url}: {tmp_path / 'out.bin.part'}: {said}"), message


def test_a_bare_url_nothing_can_check_is_refused_before_any_request(http_server, state, tmp_path):  # noqa: F811
    url = serve(state, http_server, "ref.npz", npz(**stats(4)))
    with pytest.raises(VerificationError, match=f"refusing {url}: nothing could check what it serves"):
        fetch(url, tmp_path / "out.npz", tmp_path / "lock.json", **FAST)
    assert state.requests == [] and not list(tmp_path.iterdir())
    assert fetch(url, tmp_path / "out.npz", tmp_path / "lock.json", kind="stats-npz", **FAST).exists()
