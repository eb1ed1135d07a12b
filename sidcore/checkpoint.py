"""Our own checkpoint files: written atomically, read with ``weights_only=True`` (no code runs on load).

A *network snapshot* holds everything needed to rebuild a denoiser or generator:
``{"format": "sidcore-network", "network": {constructor settings}, "state_dict": {...}, "meta": {...}}``.
Teachers converted from NVIDIA pickles, teachers trained here, and distilled generators share it.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

from sidcore.atomic import atomic_path
from sidcore.networks import build_network

SNAPSHOT_FORMAT = "sidcore-network"


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through a temporary file renamed over ``path`` (see ``sidcore.atomic``)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load(path: str | os.PathLike) -> dict:
    """Load one of our checkpoints (tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — re-raised with the file named
        raise ValueError(f"{path}: not a readable sidcore checkpoint ({e})") from e


def network_snapshot(net: torch.nn.Module, network: dict, **meta: Any) -> dict:
    """Snapshot of ``net`` (CPU float32 copy) built from constructor settings ``network``."""
    state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in net.state_dict().items()}
    return {"format": SNAPSHOT_FORMAT, "network": copy.deepcopy(network), "state_dict": state, "meta": meta}


def load_snapshot(path: str | os.PathLike) -> dict:
    """Read a network snapshot file (see the module docstring)."""
    snap = load(path)
    if snap.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"{path}: not a sidcore network snapshot (format={snap.get('format')!r})")
    return snap


def load_network(path: str | os.PathLike, snap: dict | None = None, **overrides: Any) -> tuple[torch.nn.Module, dict]:
    """Rebuild the network of a snapshot file (or of ``snap``, already read from it), loading every weight
    strictly.

    ``overrides`` change constructor settings that are not weights (e.g. ``dropout``, ``use_fp16``).
    Returns the network and the snapshot's ``network`` settings (with the overrides applied).
    """
    snap = snap if snap is not None else load_snapshot(path)
    network = {**snap["network"], **overrides}
    net = build_network(**network)
    try:
        net.load_state_dict(snap["state_dict"], strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not match the network settings {network}: {e}") from e
    return net, network
