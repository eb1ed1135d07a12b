"""Published numbers of the SiD / SiDA papers and READMEs, from ``sidcore/data/paper_results.csv``.

The file is in long format: one line per (table row, metric). Table numbers in its ``source``
column follow the order of appearance in the SiDA paper; ``note`` flags every value that needed
interpretation (inferred α, ambiguous column, README-only number). Table 8's training costs are table
``cost``: per (dataset table in ``model``, method) its GPUs, batch, memory and speed, ``family`` naming the
hardware.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

DATA_FILE = Path(__file__).resolve().parent.parent / "data" / "paper_results.csv"
NUMERIC_COLUMNS = ("alpha", "nfe", "mean", "std")


@dataclass(frozen=True)
class PaperEntry:
    """One row of a paper table with all its metrics: ``values[metric] = (mean, std or None)``, printed
    with ``decimals[metric]`` decimals as in the paper."""

    model: str
    family: str
    method: str
    alpha: float | None
    size: str
    cfg: str
    nfe: int | None
    source: str
    values: dict[str, tuple[float, float | None]] = field(default_factory=dict)
    decimals: dict[str, int] = field(default_factory=dict)


def load(path: Path = DATA_FILE) -> pd.DataFrame:
    """All paper values; text columns hold ``""`` when empty, numeric columns ``NaN``; ``decimals`` is the
    number of decimals the mean is printed with."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame["decimals"] = frame["mean"].str.partition(".")[2].str.len()
    for column in NUMERIC_COLUMNS:
        frame[column] = pd.to_numeric(frame[column].where(frame[column] != "")).astype(float)
    return frame


def select(table: str, frame: pd.DataFrame | None = None) -> pd.DataFrame:
    """The long-format lines of one table, in file order."""
    frame = load() if frame is None else frame
    return frame[frame["table"] == table].reset_index(drop=True)


def _optional(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def entries(table: str, frame: pd.DataFrame | None = None) -> list[PaperEntry]:
    """The rows of one table, each gathering its metrics, in file order."""
    grouped: dict[tuple, PaperEntry] = {}
    for line in select(table, frame).itertuples(index=False):
        alpha, nfe = _optional(line.alpha), _optional(line.nfe)
        key = (line.model, line.family, line.method, alpha, line.size, line.cfg, nfe)
        entry = grouped.setdefault(key, PaperEntry(
            model=line.model, family=line.family, method=line.method, alpha=alpha,
            size=line.size, cfg=line.cfg, nfe=None if nfe is None else int(nfe),
            source=line.source))
        entry.values[line.metric] = (float(line.mean), _optional(line.std))
        entry.decimals[line.metric] = int(line.decimals)
    return list(grouped.values())
