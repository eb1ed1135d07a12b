"""The training state of a distillation run (``training-state.pt``): networks, optimisers, progress and every
process's random state, all a restart needs to continue bit-identically (see ``sidcore.randomness``).

``save`` writes it atomically from rank 0, with a digest of its content. ``load`` checks that the state is
exactly what was written (the digest: ``torch.load`` does not check its tensor records) and that a restart
continues the same run (same settings, same number of processes), restores this process's random state
and trims the progress log to the state; without a state the run starts over, and the live files of an
earlier start are removed.
"""
from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

from sidcore import checkpoint, progress_log
from sidcore.distributed import Context, barrier, gather
from sidcore.errors import UserError
from sidcore.settings import plain

STATE_FILE = "training-state.pt"
FORMAT = "sidcore-training-state"
SETTINGS = ("dataset", "method", "alpha", "init", "network", "distill", "resolution", "channels", "label_dim")
RECORDING_ONLY = ("engine", "eval_raw_generator")  # distill settings that leave the computed weights as they are
UNSET = object()


def rng_state(device: torch.device) -> dict:
    """This process's random states (python, numpy, torch CPU and CUDA) as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def training_settings(settings: dict) -> dict:
    """The settings a resumed run must share with the run that wrote the state (as stored: through JSON). How
    the networks execute and what is measured besides are not among them: a run may resume with other
    ``RECORDING_ONLY`` settings."""
    kept = plain({k: settings[k] for k in SETTINGS})
    for key in RECORDING_ONLY:
        kept["distill"].pop(key, None)
    return json.loads(json.dumps(kept, sort_keys=True))


def changes(old: object, new: object, key: str = "") -> list[str]:
    """``key old -> new`` for every value that differs between two nested settings, keys as dotted paths."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [change for k in sorted(set(old) | set(new))
                for change in changes(old.get(k, UNSET), new.get(k, UNSET), f"{key}.{k}" if key else k)]
    if old == new:
        return []
    old, new = ("(unset)" if v is UNSET else json.dumps(v) for v in (old, new))
    return [f"{key} {old} -> {new}"]


def digest(value: object) -> str:
    """sha256 of a state's content in order: every tensor's dtype, shape and bytes, every plain value's repr."""
    h = hashlib.sha256()

    def visit(x: object) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(x, dict):
            h.update(f"D{len(x)}".encode())
            for k, v in x.items():
                visit(k)
                visit(v)
        elif isinstance(x, (list, tuple)):
            h.update(f"{type(x).__name__}{len(x)}".encode())
            for v in x:
                visit(v)
        else:
            h.update(f"V{x!r};".encode())

    visit(value)
    return h.hexdigest()


def save(outdir: Path, ctx: Context, settings: dict, state: dict) -> None:
    """Write rank 0's ``state`` with every process's random state and the run's settings (a collective)."""
    rng = gather(ctx, rng_state(ctx.device))
    if ctx.is_main:
        state = {**state, "format": FORMAT, "rng": rng,
                 "settings_json": json.dumps(training_settings(settings), sort_keys=True)}
        checkpoint.save_atomic({**state, "digest": digest(state)}, outdir / STATE_FILE)
    barrier(ctx)


def load(outdir: Path, ctx: Context, settings: dict) -> dict | None:
    """The state to continue from, with this process's random state restored and the log trimmed to it; None
    if the run starts over (a collective)."""
    path = outdir / STATE_FILE
    if ctx.is_main:
        for stale in outdir.glob(".*.tmp*"):  # temporary files of writes a crash interrupted
            stale.unlink()
    if not path.exists():
        if ctx.is_main:
            for stale in (progress_log.FILE, "best-snapshot.pt", *outdir.glob("snapshot-*.pt")):
                (outdir / stale).unlink(missing_ok=True)
        barrier(ctx)
        return None
    state = read(path, ctx.world_size, settings)
    set_rng_state(state["rng"][ctx.rank], ctx.device)
    if ctx.is_main:
        progress_log.truncate(outdir, state["cur_tick"])
    barrier(ctx)
    return state


def read(path: Path, world_size: int, settings: dict) -> dict:
    """The state in ``path``, refused unless it continues this run: same settings, ``world_size`` processes."""
    restart = "delete it to restart the run from its beginning"
    state = checkpoint.load(path, advice=restart)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path}: not a training state of this sidcore version; {restart}")
    if "digest" not in state:  # written before states carried one
        print(f"{path}: a state without a digest (written by an earlier sidcore); resumed unchecked", file=sys.stderr)
    elif state.pop("digest") != digest(state):
        raise UserError(f"{path}: its content is not what was written (its digest differs: the file was damaged "
                        f"or edited); {restart}, or put back a good copy")
    changed = changes(json.loads(state["settings_json"]), training_settings(settings))
    if changed:
        raise UserError(f"{path}: the run was started with different settings: {', '.join(changed)}; "
                        "delete the run directory to start over (or restore the settings)")
    if len(state["rng"]) != world_size:
        raise UserError(f"{path}: the run was started with {len(state['rng'])} processes and is resumed with "
                        f"{world_size}; resume it with {len(state['rng'])} (each process has its own random "
                        "streams) or delete the run directory to start over")
    return state
