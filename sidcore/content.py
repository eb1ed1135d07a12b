"""Cheap structural checks that a downloaded file is the kind of file its registry entry says it is.

:func:`problem` runs before :mod:`sidcore.download` pins the sha256 of a first download. No check runs
or imports anything the file names: pickles go through the project's restricted unpicklers (or are only
walked opcode by opcode), archives are listed and CRC-checked, never loaded (a TorchScript archive is
not executed), and npz arrays are judged by their ``.npy`` headers.
"""
from __future__ import annotations

import gzip
import json
import pickle
import pickletools
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

ZIP = (b"PK\x03\x04", b"PK\x05\x06")
PICKLE = (b"\x80",)  # protocol 2 or later, which every pickle in the registry uses
GZIP = (b"\x1f\x8b",)
TORCH_LEGACY = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)  # torch.save's magic before its zip format
HEAD = 9  # bytes of a refused file quoted in the message
UNREADABLE = (OSError, EOFError, ValueError, LookupError, TypeError, pickle.UnpicklingError, zipfile.BadZipFile,
              tarfile.TarError, zlib.error)


class _Refused(Exception):
    """The file is not of the expected kind; the message says how, as a phrase."""


def problem(kind: str, path: Path) -> str | None:
    """What makes ``path`` not a file of ``kind`` (a phrase such as "not a pickle (starts with ...)"), or None."""
    if path.stat().st_size == 0:
        return "an empty file"
    try:
        CHECKS[kind](path)
    except _Refused as exc:
        return str(exc)
    except UNREADABLE as exc:
        while exc.__cause__ is not None:  # the parser's own words, not a wrapper's
            exc = exc.__cause__
        return f"not a valid {kind} file ({str(exc).removeprefix(f'{path}: ')})"
    return None


# ----------------------------------------------------------------------------
# One check per kind; each raises _Refused or a parsing error.


def _network_pickle(path: Path) -> None:
    """NVIDIA persistence pickle (teacher or generator): a top-level dict whose ``ema`` is a persistent network."""
    from sidcore.persistence import load_records

    _expect(path, PICKLE, "a pickle")
    load_records(path, "ema")


def _stats_pkl(path: Path) -> None:
    """EDM2 reference statistics: a pickle of ``{'fid': {'mu', 'sigma'}[, 'fd_dinov2': {...}]}`` of numpy arrays."""
    from sidcore.safe_pickle import RestrictedUnpickler

    _expect(path, PICKLE, "a pickle")
    with open(path, "rb") as f:
        data = RestrictedUnpickler(f, path).load()
    if not isinstance(data, dict) or not isinstance(data.get("fid"), dict):
        raise _Refused("not FID statistics (expected a dict with a 'fid' entry)")
    for name in ("fid", "fd_dinov2"):
        if name in data:
            entry = data[name] if isinstance(data[name], dict) else {}
            _gaussian(name, *(getattr(entry.get(k), "shape", None) for k in ("mu", "sigma")))


def _stats_npz(path: Path) -> None:
    """EDM reference statistics: an npz holding ``mu`` [d] and ``sigma`` [d, d]."""
    arrays = _npz_arrays(path)
    _gaussian("the npz", *(arrays.get(k, (None,))[0] for k in ("mu", "sigma")))


def _image_batch_npz(path: Path) -> None:
    """OpenAI's reference batch: an npz whose ``arr_0`` holds uint8 images [N, H, W, 3]."""
    arrays = _npz_arrays(path)
    if "arr_0" not in arrays:
        raise _Refused(f"an npz archive without 'arr_0' (arrays: {', '.join(sorted(arrays)) or 'none'})")
    shape, dtype = arrays["arr_0"]
    if dtype != "uint8" or len(shape) != 4 or shape[-1] != 3:
        raise _Refused(f"an npz whose 'arr_0' is {dtype} {list(shape)}, not uint8 images [N, H, W, 3]")


def _torchscript(path: Path) -> None:
    """TorchScript archive (``torch.jit.save``): a zip with one top folder holding data.pkl, version and code/."""
    _expect(path, ZIP, "a zip archive")
    root, names = _torch_zip(path, "a TorchScript archive")
    if not any(name.startswith(f"{root}/code/") for name in names):
        raise _Refused(f"a zip archive without {root}/code/, so not a TorchScript archive")


def _torch_checkpoint(path: Path) -> None:
    """``torch.save`` file (read with ``torch.load(weights_only=True)``): its zip layout, or the legacy stream.

    The legacy stream is recognised by its magic number only.
    """
    _expect(path, (*ZIP, TORCH_LEGACY), "a torch.save checkpoint")
    if _head(path, len(TORCH_LEGACY)) != TORCH_LEGACY:
        _torch_zip(path, "a torch.save checkpoint")


def _pickle(path: Path) -> None:
    """Any pickle: a complete opcode stream ending at the end of the file; nothing is unpickled."""
    _expect(path, PICKLE, "a pickle")
    with open(path, "rb") as f:
        for _ in pickletools.genops(f):
            pass
        if f.read(1):
            raise _Refused("a pickle followed by trailing data")


def _tar_gz(path: Path) -> None:
    """gzip-compressed tar archive: listed to its end, gzip CRC and length checked."""
    _expect(path, GZIP, "a gzip file")
    with gzip.open(path) as gz:
        with tarfile.open(fileobj=gz, mode="r|") as tar:
            members = sum(1 for _ in tar)
        while gz.read(1 << 20):
            pass
    if not members:
        raise _Refused("an empty tar archive")


def _safetensors(path: Path) -> None:
    """safetensors: a little-endian header length, a JSON header, tensor data exactly as long as it describes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if f.read(1) != b"{":
            raise _Refused(f"not a safetensors file (starts with {_quote(path)})")
        if 8 + n > size:
            raise _Refused(f"a safetensors file cut short ({size:,} bytes, less than its {n:,}-byte header)")
        table = json.loads(b"{" + f.read(n - 1))
    described = max((entry["data_offsets"][1] for name, entry in table.items() if name != "__metadata__"), default=0)
    if described != size - 8 - n:
        raise _Refused(f"a safetensors file with {size - 8 - n:,} bytes of tensor data where its header describes "
                       f"{described:,}")


def _json(path: Path) -> None:
    """A UTF-8 JSON object (the VAE's config.json, the label file dataset.json)."""
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith("{"):
        raise _Refused(f"not a JSON object (starts with {_quote(path)})")
    json.loads(text)


CHECKS: dict[str, Callable[[Path], None]] = {
    "network-pickle": _network_pickle,
    "stats-pkl": _stats_pkl,
    "stats-npz": _stats_npz,
    "image-batch-npz": _image_batch_npz,
    "torchscript": _torchscript,
    "torch-checkpoint": _torch_checkpoint,
    "pickle": _pickle,
    "tar-gz": _tar_gz,
    "safetensors": _safetensors,
    "json": _json,
}
KINDS = tuple(CHECKS)
# The kind a plain URL's file name says: a .pkl gets the check every pickle kind shares; an .npz, which
# holds statistics or images, must be named.
EXTENSIONS = {".pkl": "pickle", ".pickle": "pickle", ".pt": "torch-checkpoint", ".pth": "torch-checkpoint",
              ".tar.gz": "tar-gz", ".tgz": "tar-gz", ".safetensors": "safetensors", ".json": "json"}


def kind_of_name(url: str) -> str | None:
    """The content kind a URL's file name says by its extension (``EXTENSIONS``), if any."""
    name = url.split("?", 1)[0].rsplit("/", 1)[-1].lower()
    return next((kind for ext, kind in EXTENSIONS.items() if name.endswith(ext)), None)


# ----------------------------------------------------------------------------
# Helpers.


def _head(path: Path, n: int = HEAD) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _quote(path: Path) -> str:
    return repr(_head(path).decode("latin-1"))


def _expect(path: Path, magic: tuple[bytes, ...], what: str) -> None:
    if not _head(path, max(map(len, magic))).startswith(magic):
        raise _Refused(f"not {what} (starts with {_quote(path)})")


def _zip_names(path: Path) -> list[str]:
    """Entry names of a zip archive after every entry passed its CRC check."""
    with zipfile.ZipFile(path) as zf:
        if (bad := zf.testzip()) is not None:
            raise _Refused(f"a damaged zip archive (entry {bad} fails its CRC check)")
        return zf.namelist()


def _torch_zip(path: Path, what: str) -> tuple[str, list[str]]:
    """The one top folder of a torch zip archive, checked to hold ``data.pkl`` and ``version``, and its entries."""
    names = _zip_names(path)
    roots = {name.split("/", 1)[0] for name in names}
    root = roots.pop() if len(roots) == 1 else ""
    if not root or not {f"{root}/data.pkl", f"{root}/version"} <= set(names):
        raise _Refused(f"a zip archive without one top folder holding data.pkl and version, so not {what}")
    return root, names


def _npz_arrays(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype name)}`` of an npz, read from the ``.npy`` headers (no array is loaded)."""
    import numpy as np

    _expect(path, ZIP, "a zip archive")
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    names = _zip_names(path)
    arrays = {}
    with zipfile.ZipFile(path) as zf:
        for name in names:
            if name.endswith(".npy"):
                with zf.open(name) as f:
                    shape, _, dtype = readers[np.lib.format.read_magic(f)](f)
                arrays[name.removesuffix(".npy")] = (shape, dtype.name)
    return arrays


def _gaussian(where: str, mu: tuple[int, ...] | None, sigma: tuple[int, ...] | None) -> None:
    """Check statistics shapes: ``mu`` [d] and ``sigma`` [d, d]."""
    if mu is None or sigma is None or len(mu) != 1 or tuple(sigma) != (mu[0], mu[0]) or not mu[0]:
        got = f"{list(mu) if mu is not None else 'no mu'} and {list(sigma) if sigma is not None else 'no sigma'}"
        raise _Refused(f"not FID statistics ({where}: expected mu [d] and sigma [d, d], got {got})")
