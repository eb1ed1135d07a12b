"""Progress of a long loop (a download, data preparation, teacher training, distillation, evaluation):
amounts done, rate and time left, and a report at most every so many seconds."""
from __future__ import annotations

import time


def clock(seconds: float) -> str:
    """``h:mm:ss``."""
    minutes, s = divmod(int(max(seconds, 0)), 60)
    h, m = divmod(minutes, 60)
    return f"{h}:{m:02d}:{s:02d}"


class Progress:
    """Counts ``done`` toward ``total`` (None: unknown) from the moment it is made.

    Amounts are printed divided by ``scale`` in ``unit`` (e.g. bytes as MB: scale 1e6; images as kimg:
    scale 1000). ``due()`` is true at most once every ``every`` seconds, and at the end.
    """

    def __init__(self, total: float | None, unit: str, scale: float = 1.0, done: float = 0, every: float = 0.0):
        self.total, self.unit, self.scale, self.every = total, unit, scale, every
        self.first = self.done = done
        self.start = self.last = time.monotonic()

    def update(self, done: float) -> None:
        self.done = done

    def advance(self, done: float) -> bool:
        """``update`` to ``done``; whether a report is due (see ``due``)."""
        self.update(done)
        return self.due()

    def due(self) -> bool:
        """Whether a report is due (``every`` seconds since the last, or finished); marks it made."""
        now = time.monotonic()
        if now - self.last < self.every and not self.finished:
            return False
        self.last = now
        return True

    @property
    def finished(self) -> bool:
        return self.total is not None and self.done >= self.total

    def seconds_per_unit(self) -> float:
        """Seconds per ``scale`` amounts (e.g. s/kimg) since the start."""
        return (time.monotonic() - self.start) / max((self.done - self.first) / self.scale, 1e-12)

    def eta(self) -> float:
        """Seconds left at the rate so far (0 when the total is unknown)."""
        if self.total is None:
            return 0.0
        return self.seconds_per_unit() * (self.total - self.done) / self.scale

    def line(self, rate: str = "per_second") -> str:
        """``12.3 / 45.6 MB (27%), 1.2 MB/s, ETA 0:01:02``; ``rate="seconds_per_unit"`` prints ``3.10 s/kimg``."""
        text = f"{self.done / self.scale:.1f}"
        if self.total:
            text += f" / {self.total / self.scale:.1f} {self.unit} ({100 * self.done / self.total:.0f}%)"
        else:
            text += f" {self.unit}"
        per = self.seconds_per_unit()
        text += f", {per:.2f} s/{self.unit}" if rate == "seconds_per_unit" else f", {1 / per:.1f} {self.unit}/s"
        if self.total:
            text += f", ETA {clock(self.eta())}"
        return text
