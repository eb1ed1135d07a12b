"""torch.distributed set-up from the environment torchrun or submitit (SLURM) provides.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; under SLURM (``srun`` or
submitit) the same facts come from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, with MASTER_ADDR and
MASTER_PORT set by the launcher. One process per GPU: NCCL on GPUs, gloo on CPUs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sidcore.engine import set_precision_flags


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    cpu_group: object = None  # a gloo group for host-side agreement, so it never waits for the GPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env(*names: str, default: str | None = None) -> str | None:
    for name in names:
        if name in os.environ:
            return os.environ[name]
    return default


def single_process() -> Context:
    """The context of a process that runs alone (on the GPU if there is one)."""
    return Context(0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def init_from_env() -> Context:
    """Join the process group described by the environment (a single process if there is none)."""
    world_size = int(_env("WORLD_SIZE", "SLURM_NTASKS", default="1"))
    rank = int(_env("RANK", "SLURM_PROCID", default="0"))
    local_rank = int(_env("LOCAL_RANK", "SLURM_LOCALID", default="0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        set_precision_flags(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise RuntimeError(f"{var} is not set: a {world_size}-process run needs the launcher's rendezvous")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    cpu_group = dist.new_group(backend="gloo") if world_size > 1 and device.type == "cuda" else None
    return Context(rank, world_size, local_rank, device, cpu_group)


def shutdown(ctx: Context) -> None:
    """Leave the process group (a process that exits without it may abort in gloo's destructor)."""
    if ctx.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: Context) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def any_rank(ctx: Context, flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    if ctx.world_size == 1:
        return flag
    t = torch.tensor([int(flag)])  # on the host: this agreement never synchronises with the GPU
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.cpu_group)
    return bool(t.item())


def gather(ctx: Context, obj):
    """Every rank's ``obj``, in rank order (on every rank)."""
    if ctx.world_size == 1:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def gather_to_main(ctx: Context, obj):
    """Every rank's ``obj`` in rank order on rank 0 (through the host: no GPU memory), None elsewhere."""
    if ctx.world_size == 1:
        return [obj]
    out = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, out, dst=0, group=ctx.cpu_group)
    return out


def broadcast(ctx: Context, obj):
    """Rank 0's ``obj`` on every rank."""
    if ctx.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to ``device`` without making the host wait for the GPU (pinned, non-blocking)."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)
