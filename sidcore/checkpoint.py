"""Our own checkpoint files: written atomically, read with ``weights_only=True`` (no code runs on load).

A *network snapshot* holds everything needed to rebuild a denoiser or generator:
``{"format": "sidcore-network", "network": {constructor settings}, "state_dict": {...}, "meta": {...}}``.
Teachers converted from NVIDIA pickles, teachers trained here, and distilled generators share it.
"""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import torch

from sidcore.atomic import atomic_path
from sidcore.errors import UserError
from sidcore.networks import build_network

SNAPSHOT_FORMAT = "sidcore-network"


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through a temporary file renamed over ``path`` (see ``sidcore.atomic``). Written through a file
    object, whose archive folder is always ``archive``: equal content gives equal bytes (torch names the folder
    after a path it is given, here the temporary one)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def load(path: str | os.PathLike, what: str = "sidcore checkpoint",
         advice: str = "delete it and make or download it again") -> Any:
    """A ``torch.save`` file read as data (tensors and plain containers only: nothing in it runs); an unreadable
    one is a ``UserError`` naming it, with ``advice``."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: a directory where a {what} file should be; {advice}")
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — re-raised with the file named
        raise UserError(f"{path}: not a readable {what} ({_reason(path, e)}); {advice}") from None


def _reason(path: Path, error: Exception) -> str:
    """Why torch could not read ``path``, without its advice to load the file unsafely instead."""
    return "an empty file" if path.stat().st_size == 0 else refusal_reason(error)


def refusal_reason(error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a stream, in a few words: never torch's advice to read it
    with ``weights_only=False`` (which would run what it holds)."""
    text = str(error)
    refused = re.search(r"unsupported GLOBAL (\S+)", text)
    if refused:
        return f"it names {refused.group(1)}, which a checkpoint of weights never does"
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    if detail:
        return detail.group(1).strip()
    if not text or "weights_only" in text:
        return type(error).__name__
    if "failed finding central directory" in text:
        return "not a complete torch.save file: truncated or damaged"
    return re.split(r"(?<=\.) ", text.splitlines()[0])[0]  # torch's first sentence, not its guesses at a cause


def network_snapshot(net: torch.nn.Module, network: dict, **meta: Any) -> dict:
    """Snapshot of ``net`` (CPU float32 copy) built from constructor settings ``network`` (resolution, channels,
    labels). A generator's ``meta`` holds ``init_sigma``, the noise level it samples at (see ``init_sigma``), and
    a latent one's ``vae``, the registry key of the VAE that decodes it."""
    state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in net.state_dict().items()}
    return {"format": SNAPSHOT_FORMAT, "network": copy.deepcopy(network), "state_dict": state, "meta": meta}


def init_sigma(snap: dict, path: str | os.PathLike) -> float:
    """The σ_init a generator snapshot samples at (its network settings give resolution, channels, labels)."""
    if "init_sigma" not in snap["meta"]:
        raise UserError(f"{path}: a network snapshot without init_sigma, so not a one-step generator (or one "
                        "written before generators recorded it): distil or convert it again")
    return float(snap["meta"]["init_sigma"])


def load_snapshot(path: str | os.PathLike) -> dict:
    """Read a network snapshot file (see the module docstring)."""
    snap = load(path)
    if snap.get("format") != SNAPSHOT_FORMAT:
        raise UserError(f"{path}: not a sidcore network snapshot (format={snap.get('format')!r})")
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
        raise UserError(f"{path}: weights do not match the network settings {network}: {e}") from e
    return net, network
