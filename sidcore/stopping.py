"""Stop signals of a resumable command: SIGUSR2 (SLURM's warning before the time limit) and SIGTERM
(preemption, ``scontrol requeue``).

The launcher starts commands with these signals blocked, so one that comes while the interpreter starts
stays pending. ``watch()`` runs first thing in ``main`` and unblocks them: a resumable command records a
signal (the distillation loop takes it as if it had come during its first iteration); any other command
gets the default action back.
"""
from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
_received: list[int] = []


def block() -> None:
    """In a child before it starts the command (inherited across exec)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def watch(resumable: bool) -> None:
    if resumable:
        for signum in STOP_SIGNALS:
            signal.signal(signum, lambda signum, frame: _received.append(signum))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def ignore() -> None:
    """Once the command has returned: its exit status already answers any stop signal that comes later."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def received() -> int | None:
    """The first stop signal ``watch`` recorded, if any."""
    return _received[0] if _received else None
