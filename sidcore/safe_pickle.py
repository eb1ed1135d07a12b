"""Restricted unpickling: a pickle may only name the globals a caller admits; nothing else is imported.

Used for every pickle that comes from outside (reference statistics, dataset archives, NVIDIA network
files). A refused global raises :class:`UnsafePickleError` naming the file and the global.
"""
from __future__ import annotations

import io
import os
import pickle
from typing import Any, BinaryIO

import numpy as np

from sidcore.errors import UserError


class UnsafePickleError(UserError, pickle.UnpicklingError):
    """A pickle asked for something outside the admitted globals."""


def numpy_array_globals() -> dict[tuple[str, str], Any]:
    """Globals needed to rebuild numpy arrays and scalars and plain Python containers."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    import _codecs

    table: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                         ("_codecs", "encode"): _codecs.encode}
    for package in ("numpy.core", "numpy._core"):
        table[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        table[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        table[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    for container in (dict, list, tuple, set, frozenset):
        table[("builtins", container.__name__)] = container
    return table


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler resolving globals from ``admitted`` only (default: numpy arrays and containers)."""

    what = "numpy arrays and plain containers"

    def __init__(self, file: BinaryIO, path: str | os.PathLike,
                 admitted: dict[tuple[str, str], Any] | None = None, encoding: str = "ASCII") -> None:
        super().__init__(file, encoding=encoding)
        self.path = path
        self.admitted = admitted if admitted is not None else numpy_array_globals()

    def load(self) -> Any:
        """The pickle's content; a truncated or foreign file is a ``UserError`` naming it."""
        try:
            return super().load()
        except UnsafePickleError as e:  # a refusal raised while rebuilding an object: name the file too
            if str(e).startswith(str(self.path)):
                raise
            raise UnsafePickleError(f"{self.path}: {e}") from None
        except Exception as e:  # noqa: BLE001 — whatever the bytes make the unpickler raise
            raise UserError(f"{self.path}: not a readable pickle ({type(e).__name__}: {e}); the file is damaged or "
                            "not what it should be: delete it and download it again") from None

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.admitted[module, name]
        except KeyError:
            raise UnsafePickleError(f"{self.path}: refusing to load global {module}.{name} "
                                    f"(only {self.what} are admitted)") from None


def loads(data: bytes, path: str | os.PathLike, encoding: str = "ASCII") -> Any:
    """Read a pickle of numpy arrays and plain containers; ``path`` names it in errors.

    ``encoding='latin1'`` reads Python 2 pickles holding numpy arrays.
    """
    return RestrictedUnpickler(io.BytesIO(data), path, encoding=encoding).load()
