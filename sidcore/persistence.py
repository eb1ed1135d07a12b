"""NVIDIA ``torch_utils.persistence`` pickles read as data, never as code.

EDM and EDM2 teachers and the released SiD / SiDA / SiD²A generators are pickles in which every
network module is a call ``torch_utils.persistence._reconstruct_persistent_obj(meta)``; NVIDIA's
loader ``exec``s the module source stored in ``meta``. Here the unpickler admits only tensor and
storage rebuilding, numpy arrays, plain containers and a few inert torch containers: each persistent
object becomes a :class:`Record` (class name, constructor arguments, state) and any other global
is refused with an error naming it. :func:`convert` rebuilds the network with sidcore's own classes
from a record and loads every weight strictly.
"""
from __future__ import annotations

import collections
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from sidcore import checkpoint
from sidcore.errors import UserError
from sidcore.safe_pickle import RestrictedUnpickler, UnsafePickleError, numpy_array_globals

PERSISTENT_GLOBAL = ("torch_utils.persistence", "_reconstruct_persistent_obj")
PERSISTENCE_VERSION = 6


@dataclass
class Record:
    """One persistent object of the pickle, inert: nothing of it was imported or run."""

    class_name: str
    init_args: tuple
    init_kwargs: dict
    state: dict
    module_src_sha256: str  # identifies the (never executed) source text stored with the object


class Inert:
    """An object of an admitted plain-pickled class (e.g. ``torch.nn.ModuleDict``): its class path and state."""

    qualname = ""
    state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"Inert({self.qualname})"


class InertDict(dict):
    """A dict subclass of the file (``dnnlib.util.EasyDict``) read as a plain dict."""

    def __setstate__(self, state: Any) -> None:
        pass


@dataclass
class BoundMethod:
    """``getattr(obj, name)`` as pickled for a registered hook: recorded, never looked up."""

    owner: Any
    name: str


def _inert_class(module: str, name: str, dict_like: bool) -> type:
    """Stand-in class for an admitted class; pickle's NEWOBJ instantiates it without running anything."""
    return type(name, (InertDict if dict_like else Inert,), {"qualname": f"{module}.{name}"})


def _is_inert_class(cls: Any) -> bool:
    return isinstance(cls, type) and issubclass(cls, (Inert, InertDict))


def _newobj(cls: Any, *args: Any) -> Any:
    """``copyreg.__newobj__`` restricted to admitted classes."""
    if not _is_inert_class(cls):
        raise UnsafePickleError(f"copyreg.__newobj__ on {cls!r} refused")
    return cls.__new__(cls)


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copyreg._reconstructor`` (protocol 0/1 objects) restricted to admitted classes."""
    if not _is_inert_class(cls) or base not in (object, dict):
        raise UnsafePickleError(f"copyreg._reconstructor on {cls!r} refused")
    return cls.__new__(cls)


def _reconstruct_persistent_obj(meta: dict) -> Record:
    """The record of one persistent object (NVIDIA's loader would exec ``meta['module_src']`` here)."""
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise UnsafePickleError(f"persistent object with unexpected meta {type(meta).__name__}")
    if meta.get("version") != PERSISTENCE_VERSION:
        raise UnsafePickleError(f"persistence format version {meta.get('version')!r}, "
                                f"expected {PERSISTENCE_VERSION}")
    state = dict(meta.get("state") or {})
    src = meta.get("module_src") or ""
    return Record(class_name=str(meta["class_name"]), init_args=tuple(state.pop("_init_args", ())),
                  init_kwargs=dict(state.pop("_init_kwargs", {})), state=state,
                  module_src_sha256=hashlib.sha256(src.encode()).hexdigest())


def _load_storage(blob: bytes) -> Any:
    """``torch.storage._load_from_bytes``: the storage blob is itself read with ``weights_only=True``."""
    if not isinstance(blob, bytes):
        raise UnsafePickleError("storage payload is not bytes")
    try:
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — said without torch's advice to load it unsafely
        raise UnsafePickleError(f"a tensor storage that is not plain data ({checkpoint.refusal_reason(e)})") from None


def _rebuild_tensor(storage: Any, offset: int, size: tuple, stride: tuple, requires_grad: bool = False,
                    backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2`` without hooks or metadata side effects."""
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise UnsafePickleError(f"tensor rebuilt from a {type(storage).__name__}, not a storage")
    return torch._utils._rebuild_tensor_v2(storage, int(offset), tuple(size), tuple(stride), False,
                                           collections.OrderedDict())


def _rebuild_parameter(data: torch.Tensor, requires_grad: bool = True, backward_hooks: Any = None,
                       state: Any = None) -> torch.Tensor:
    """``torch._utils._rebuild_parameter[_with_state]``: the tensor is all we keep."""
    if not isinstance(data, torch.Tensor):
        raise UnsafePickleError("parameter rebuilt from a non-tensor")
    return data


# torch containers that sidcore networks replace; their plain-pickled instances become Inert objects.
INERT_CLASSES = {
    ("torch.nn.modules.container", "ModuleDict"): False,
    ("torch.nn.modules.container", "ModuleList"): False,
    ("torch.nn.modules.container", "Sequential"): False,
    ("dnnlib.util", "EasyDict"): True,
    ("dnnlib", "EasyDict"): True,
}


def _globals() -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = {
        PERSISTENT_GLOBAL: _reconstruct_persistent_obj,
        ("torch.storage", "_load_from_bytes"): _load_storage,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "object"): object,
        ("builtins", "dict"): dict,
        ("builtins", "getattr"): BoundMethod,
        ("copyreg", "__newobj__"): _newobj,
        ("copyreg", "_reconstructor"): _reconstructor,
        ("torch", "Size"): torch.Size,
        **numpy_array_globals(),
    }
    for (module, name), dict_like in INERT_CLASSES.items():
        table[module, name] = _inert_class(module, name, dict_like)
    return table


class PersistenceUnpickler(RestrictedUnpickler):
    what = "tensors, arrays, containers and persistent networks"

    def __init__(self, file: BinaryIO, path: str | os.PathLike) -> None:
        super().__init__(file, path, _globals())


def read_pickle(path: str | os.PathLike) -> Any:
    """The content of a persistence pickle, with every persistent object as a :class:`Record`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"network pickle not found: {path}")
    with open(path, "rb") as f:
        return PersistenceUnpickler(f, path).load()  # a truncated or foreign file: a UserError naming it


def module_tensors(obj: Record | Inert, prefix: str = "") -> dict[str, torch.Tensor]:
    """``state_dict()``-equivalent of a module record: own parameters, persistent buffers, then children."""
    state = obj.state if isinstance(obj, (Record, Inert)) else None
    if not isinstance(state, dict):
        raise UserError(f"{prefix or 'top level'}: not a module record ({type(obj).__name__})")
    out = {}
    for name, t in (state.get("_parameters") or {}).items():
        if t is not None:
            out[prefix + name] = t
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    for name, t in (state.get("_buffers") or {}).items():
        if t is not None and name not in non_persistent:
            out[prefix + name] = t
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(module_tensors(child, f"{prefix}{name}."))
    return out


# NVIDIA / SiD preconditioner classes -> sidcore preconditioning; the U-Net classes -> sidcore architecture.
PRECONDITIONERS = {
    "EDMPrecond": "edm", "EDMPrecond_EncoderDecoder": "edm", "VPPrecond": "vp", "VEPrecond": "ve",
    "iDDPMPrecond": "iddpm", "Precond": "edm2", "EDM_2_Precond_EncoderDecoder": "edm2",
    "EDM_2_Precond_Generator": "edm2",
}
INNER_MODULE = {"edm": "model", "vp": "model", "ve": "model", "iddpm": "model", "edm2": "unet"}
INTERFACE = ("img_resolution", "img_channels", "label_dim")
INNER_INTERFACE = ("img_resolution", "in_channels", "out_channels", "img_channels", "label_dim")
TRAINING_FLAGS = ("force_normalization", "use_gan")  # SiD's EDM2 training switches, not architecture


def recorded_settings(record: Record, tensors: dict[str, torch.Tensor]) -> dict:
    """sidcore constructor settings (``build_network`` keywords) of a preconditioner record."""
    if record.class_name not in PRECONDITIONERS:
        raise UserError(f"top-level network class {record.class_name!r} is not a known preconditioner "
                         f"(known: {sorted(PRECONDITIONERS)})")
    precond = PRECONDITIONERS[record.class_name]
    kwargs = dict(zip(INTERFACE, record.init_args))
    kwargs.update(record.init_kwargs)
    for key in INTERFACE:
        if key not in kwargs and key in record.state:
            kwargs[key] = record.state[key]
    missing = [k for k in INTERFACE if k not in kwargs]
    if missing:
        raise UserError(f"{record.class_name}: constructor arguments {missing} are neither stored nor recorded")
    inner = record.state.get("_modules", {}).get(INNER_MODULE[precond])
    if isinstance(inner, Record):
        kwargs.update({k: v for k, v in inner.init_kwargs.items() if k not in INNER_INTERFACE})
    for flag in TRAINING_FLAGS:
        kwargs.pop(flag, None)
    if precond == "edm2":
        kwargs["arch"] = "edm2"
        kwargs["logvar"] = "logvar_linear.weight" in tensors
    else:
        model_type = str(kwargs.pop("model_type", "DhariwalUNet" if precond in ("edm", "iddpm") else "SongUNet"))
        if model_type.startswith("DhariwalUNet"):
            kwargs["arch"] = "adm"
        elif model_type.startswith("SongUNet"):
            kwargs["arch"] = "ncsnpp" if kwargs.get("embedding_type") == "fourier" else "ddpmpp"
        else:
            raise UserError(f"{record.class_name}: unknown model_type {model_type!r}")
        if precond != "edm":
            kwargs["precond"] = precond
    return kwargs


def load_records(path: str | os.PathLike, key: str = "ema") -> Record:
    """The network record stored under ``key`` of a pickle's top-level dict."""
    data = read_pickle(path)
    if not isinstance(data, dict) or key not in data:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise UserError(f"{path}: expected a dict with key {key!r}, found {found}")
    if not isinstance(data[key], Record):
        raise UserError(f"{path}: [{key!r}] is not a persistent network object")
    return data[key]


def convert(path: str | os.PathLike, key: str = "ema", network: dict | None = None) -> tuple[torch.nn.Module, dict]:
    """Rebuild the network of a persistence pickle with sidcore classes; every weight loaded strictly.

    ``network`` gives the constructor settings (config.yaml's, for the pipeline); without it they are
    read from the constructor arguments recorded in the file. Returns the network (float32; EDM2's fp16
    weights are upcast) and its settings.
    """
    from sidcore.networks import build_network
    record = load_records(path, key)
    tensors = module_tensors(record)
    recorded = recorded_settings(record, tensors)
    settings = dict(network) if network is not None else recorded
    try:
        net = build_network(**settings)
    except TypeError as e:
        raise UserError(f"{path}: network settings {settings} are not understood ({e})") from e
    expected = net.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    wrong = [f"{k} {list(tensors[k].shape)} != {list(v.shape)}" for k, v in expected.items()
             if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise UserError(f"{path}: weights do not match the network settings {settings} (the file records "
                         f"{record.class_name}{recorded}): missing {missing[:5]}, unexpected {unexpected[:5]}, "
                         f"wrong shapes {wrong[:5]}")
    net.load_state_dict({k: t.to(torch.float32) if t.is_floating_point() else t for k, t in tensors.items()},
                        strict=True)
    return net, settings


def convert_to_snapshot(src: str, out: str, key: str = "ema", network: dict | None = None,
                        sampling: dict | None = None, log=print) -> None:
    """Write an NVIDIA persistence pickle's network (entry ``key``) as one of our network snapshots; a one-step
    generator's with how to sample it (``sampling``: ``init_sigma``, and ``vae`` where latent)."""
    from sidcore.download import sha256_file
    net, settings = convert(src, key, network)
    sampling = sampling or {}
    snap = checkpoint.network_snapshot(net, settings, source=Path(src).name, source_sha256=sha256_file(src),
                                       **sampling)
    checkpoint.save_atomic(snap, out)
    log(f"{src}: {settings} -> {out}")
