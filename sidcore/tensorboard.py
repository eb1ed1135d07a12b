"""Training curves in TensorBoard (config.yaml ``logging.tensorboard``): each record of a distillation's progress
log (``sidcore.progress_log``) as scalars, one per number, and each sample grid of its model selection as an image,
all against images seen, in ``<run folder>/tensorboard/`` (rank 0 writes).

The switch reaches a distillation as the ``distill`` command's ``--tensorboard`` flag, not in its settings: it
changes what a run records, not what it computes, so switching it reruns no finished distillation. The
``tensorboard`` package is optional (``pip install 'sidcore[tensorboard]'``): ``require`` refuses the switch
without it, at the workflow's config checks and at the start of the ``distill`` command. A resumed run hides the
events written after the training state it continues from, as ``progress_log.truncate`` drops their records; a
run starting over removes the event files of an earlier start.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from sidcore.errors import UserError

DIR = "tensorboard"
POSITION = ("kimg", "tick")  # the step under other names, not curves
GRID = "fakes"  # the tag of the sample grids (as their files, fakes-<kimg>.png)


def require() -> None:
    """Raise a ``UserError`` unless the ``tensorboard`` package can be imported."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise UserError("logging.tensorboard is true but the `tensorboard` package is not installed: "
                        "pip install 'sidcore[tensorboard]' (or set logging.tensorboard: false)") from None


def enabled(config: dict) -> bool:
    """config.yaml's ``logging.tensorboard`` (false unless set)."""
    return config.get("logging", {}).get("tensorboard", False)


class Board:
    """The event files of one run directory, or nothing where ``on`` is false (other ranks, the setting off)."""

    def __init__(self, outdir: Path, nimg: int, on: bool) -> None:
        """Write from ``nimg`` images seen: 0 starts over, more resumes the state saved there."""
        self.writer = None
        if not on:
            return
        from torch.utils.tensorboard import SummaryWriter
        folder = Path(outdir) / DIR
        if nimg == 0:
            shutil.rmtree(folder, ignore_errors=True)
        # The state at nimg was saved after that tick's record, which stays: hide only the events past it.
        self.writer = SummaryWriter(str(folder), purge_step=nimg + 1 if nimg else None)

    def record(self, record: dict, nimg: int) -> None:
        """Every number of a progress-log record (but its position), written to disk."""
        if self.writer is None:
            return
        for key, value in record.items():
            if key not in POSITION and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, nimg)
        self.writer.flush()

    def grid(self, image: np.ndarray, nimg: int) -> None:
        """A sample grid (height × width × channels, uint8); written with the tick's record."""
        if self.writer is not None:
            self.writer.add_image(GRID, image, nimg, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> Board:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
