"""Where a command's output goes. Plain: the terminal. With ``sidcore --log FILE COMMAND`` (how the workflow's
rules run every command): all of it into FILE, and its narration (progress reports, what it wrote) also on the
console, one line per report under the job's name, so that a person watching Snakemake sees every job move."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TextIO

_console: TextIO | None = None  # the terminal, while stdout and stderr go to the log
_label = ""


def log_to(path: str) -> None:
    """Send this process's stdout and stderr (its own, its libraries' and its children's) to ``path``; keep the
    terminal for ``say`` and ``echo``."""
    global _console, _label
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    _console = os.fdopen(os.dup(2), "w", buffering=1, errors="replace")
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    _label = label(path)


def label(log: str) -> str:
    """The job's name on the console: its log's path without ``logs/`` and the suffix (``train_teacher/tiny``)."""
    path = Path(log).with_suffix("")
    return str(path.relative_to("logs")) if path.parts[0] == "logs" and len(path.parts) > 1 else str(path)


def echo(line: str) -> None:
    """Show ``line`` on the console under ``--log`` (and nowhere otherwise)."""
    if _console is not None:
        _console.write(f"[{_label}] {line}\n")


def say(message: str) -> None:
    """A line of the command's narration: into its output, and on the console under ``--log``."""
    print(message, flush=True)
    echo(message)
