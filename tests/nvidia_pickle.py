"""Writes sidcore networks in the layout of NVIDIA ``torch_utils.persistence`` pickles (formats.md §1).

Every sidcore network module becomes a ``torch_utils.persistence._reconstruct_persistent_obj(meta)``
call carrying a module source text, its NVIDIA class name and its ``__dict__`` (with ``_init_args`` /
``_init_kwargs``); torch containers and tensors are pickled as plain pickle does. The module source
written here would create ``SENTINEL`` if anything ran it.
"""
from __future__ import annotations

import copy
import pickle
from pathlib import Path

import torch

SENTINEL = "sidcore-module-src-was-executed"
MODULE_SRC = f"open({SENTINEL!r}, 'w').close()\nraise SystemExit('module_src executed')\n"
CLASS_NAMES = {"EDM2Precond": "Precond"}  # sidcore class -> NVIDIA class where the names differ


def _reconstruct_persistent_obj(meta):  # placeholder written as NVIDIA's global; never called
    raise AssertionError


class EasyDict(dict):
    """Written as ``dnnlib.util.EasyDict`` (the top level of EDM2 pickles)."""


GLOBALS = {_reconstruct_persistent_obj: b"torch_utils.persistence\n_reconstruct_persistent_obj\n",
           EasyDict: b"dnnlib.util\nEasyDict\n"}


class PersistenceWriter(pickle._Pickler):
    def __init__(self, file, top: torch.nn.Module, top_class: str, top_kwargs: dict,
                 inner_kwargs: dict[str, dict] | None = None) -> None:
        super().__init__(file, protocol=4)
        self.top, self.top_class, self.top_kwargs = top, top_class, top_kwargs
        self.inner_kwargs = inner_kwargs or {}

    def reducer_override(self, obj):
        if isinstance(obj, torch.nn.Module) and type(obj).__module__.startswith("sidcore.networks"):
            state = dict(obj.__dict__)
            state["_init_args"] = ()
            name = type(obj).__name__
            if obj is self.top:
                state["_init_kwargs"], name = dict(self.top_kwargs), self.top_class
            else:
                state["_init_kwargs"] = dict(self.inner_kwargs.get(name, {}))
            meta = dict(type="class", version=6, module_src=MODULE_SRC, class_name=CLASS_NAMES.get(name, name),
                        state=state)
            return _reconstruct_persistent_obj, (meta,)
        return NotImplemented

    def save(self, obj, save_persistent_id=True):
        if obj is _reconstruct_persistent_obj or obj is EasyDict:  # NVIDIA's globals, by name
            self.write(pickle.GLOBAL + GLOBALS[obj])
        else:
            super().save(obj, save_persistent_id)


def write_network_pickle(path: Path, net: torch.nn.Module, top_class: str, top_kwargs: dict, *,
                         fp16: bool = False, easydict: bool = False, inner_kwargs: dict | None = None,
                         extra: dict | None = None) -> None:
    """Write ``{'ema': net, **extra}`` as NVIDIA's training loops do (fp16 weights and EasyDict for EDM2)."""
    net = copy.deepcopy(net).eval().requires_grad_(False)
    if fp16:
        net = net.half()
    data = (EasyDict if easydict else dict)(ema=net, **(extra or {}))
    with open(path, "wb") as f:
        PersistenceWriter(f, net, top_class, top_kwargs, inner_kwargs).dump(data)
