"""Stop signals of a resumable command: SIGUSR2 (SLURM's warning before the time limit) and SIGTERM
(preemption, ``scontrol requeue``).

The launcher starts commands with these signals blocked, so one that comes while the interpreter starts
stays pending. ``watch()`` runs first thing in ``main`` and unblocks them: a resumable command records a
signal, any other command gets the default action back. The work polls ``requested()`` at points where it
can stop cleanly (the distillation loop after each iteration, the evaluation before each block of images);
a signal that came while the command was loading is seen at the first such point.
"""
from __future__ import annotations

import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sidcore.distributed import Context

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
_received: list[int] = []


def block() -> None:
    """In a child before it starts the command (inherited across exec)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def watch(resumable: bool) -> None:
    """Take the stop signals over: recorded for ``requested()`` if ``resumable``, else their default action."""
    if resumable:
        for signum in STOP_SIGNALS:
            signal.signal(signum, lambda signum, frame: _received.append(signum))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def ignore() -> None:
    """Once the command has returned: its exit status already answers any stop signal that comes later."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def received() -> int | None:
    """The first stop signal this process recorded, if any."""
    return _received[0] if _received else None


def requested(ctx: Context) -> signal.Signals | None:
    """The stop signal any process of the job received (the highest number if several), or None.

    A collective: every process calls it at the same point, and all get the same answer.
    """
    signum = received() or 0
    if ctx.world_size > 1:
        import torch
        import torch.distributed as dist
        agreed = torch.tensor([signum])  # on the host: the agreement never waits for the GPU
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=ctx.cpu_group)
        signum = int(agreed.item())
    return signal.Signals(signum) if signum else None
