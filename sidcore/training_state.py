"""The training state of a distillation run (``training-state.pt``): networks, optimisers, progress and every
process's random state, all a restart needs to continue bit-identically (see ``sidcore.randomness``).

``begin`` decides, before the networks are built, whether the job continues the run in its directory or
starts it over with the earlier run kept aside (``sidcore.run_record``). ``save`` writes the state atomically
from rank 0, with a digest of its content. ``load`` checks that the state is exactly what was written (the
digest: ``torch.load`` does not check its tensor records) and that a restart continues the same run (same
settings, same number of processes), restores this process's random state and trims the progress log to the
state; without a state the run starts from image 0, and the live files of an earlier start are removed.
"""
from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

from sidcore import checkpoint, progress_log, run_record
from sidcore.distributed import Context, barrier, broadcast, gather
from sidcore.download import sha256_file
from sidcore.errors import UserError
from sidcore.run_record import STATE_FILE, changes, training_settings

FORMAT = "sidcore-training-state"


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


def begin(outdir: Path, ctx: Context, settings: dict, inputs: dict[str, str | None], start: str | None = None,
          on_change: str = "stop", log=print) -> None:
    """Prepare ``outdir`` for the job (a collective): keep an earlier run aside if this job starts it over
    (``run_record.decide``), and record how a run that starts from image 0 was started. ``inputs``: the
    networks the run starts from, by name (their files are hashed)."""
    error = None
    if ctx.is_main:
        try:
            digests = {name: sha256_file(Path(path)) for name, path in inputs.items() if path is not None}
            record = run_record.read(outdir)
            why = run_record.decide(outdir, record, settings, digests, start, on_change)
            if why is not None:
                log(f"starting {outdir} over ({why}): the earlier run is kept as {run_record.keep_aside(outdir, why)}")
            if why is not None or record is None:
                run_record.write(outdir, settings, digests, start)
        except UserError as e:
            error = str(e)
    error = broadcast(ctx, error)
    if error is not None:
        raise UserError(error)


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
        raise UserError(f"{path}: the run was started with other settings: {', '.join(changed)}; restore them, or "
                        "start it over with the earlier run kept aside (config on_changed_settings: start-over)")
    if len(state["rng"]) != world_size:
        raise UserError(f"{path}: the run was started with {len(state['rng'])} processes and is resumed with "
                        f"{world_size}; resume it with {len(state['rng'])} (each process has its own random "
                        "streams) or delete the run directory to start over")
    return state
