"""``sidcore tabulate``: our evaluation summaries next to the paper's numbers (CSV + Markdown).

Rows follow the paper's table. A paper row that one of our summaries reproduces (same method, α, EDM2 size
and a compatible NFE) is one row with our numbers, the paper's and their difference; a paper row we have not
run shows the paper's numbers only. A released generator we evaluated gets a row of its own, right after the
paper row it is paired with. Summaries that match no paper row (a new α or dataset) come last.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import pandas as pd

from sidcore import tables
from sidcore.errors import UserError
from sidcore.methods import METHOD_NAMES, alpha_text, method_label, model_label
from sidcore.report import markdown, paper
from sidcore.report.paper import PaperEntry
from sidcore.summary import read_summary

METRIC_LABELS = {"fid": "FID", "is": "IS", "precision": "Precision", "recall": "Recall",
                 "fd_dinov2": "FD_DINOv2"}
METRIC_DECIMALS = {"precision": 2, "recall": 2}
SIZE_ORDER = ("xs", "s", "m", "l", "xl", "xxl")
SOURCES = ("ours", "released")
STATUS = {
    "paper only": "the paper's row, not run here",
    "ours + paper": "our run of the paper's row",
    "ours": "our run of a model the paper does not report",
    "released": "a generator released by the authors, evaluated here",
}
BASE_COLUMNS = ("model", "family", "method", "alpha", "size", "CFG", "NFE", "images seen (Mimg)", "runs")
# Dropped when no row fills them (family, size and CFG come from the paper; size and CFG exist only in EDM2).
OPTIONAL_COLUMNS = ("family", "size", "CFG", "paper source")
STD_NAMES = {0: "population standard deviation", 1: "sample standard deviation"}


def is_released(summary: dict) -> bool:
    """Whether a summary evaluates a released generator (summaries without ``source`` are ours)."""
    return summary.get("source", "ours") == "released"


def check_summary(summary: dict, table: str, origin: str) -> None:
    """Raise ``ValueError`` naming ``origin`` if ``summary`` belongs to another table or has an unknown source."""
    accepted = {table, tables.table(table).summaries_of}
    if summary.get("table") not in accepted:
        raise UserError(f"{origin}: summary is for table {summary.get('table')!r}, "
                         f"not {table!r}")
    if summary.get("source", "ours") not in SOURCES:
        raise UserError(f"{origin}: unknown source {summary['source']!r} (known: {', '.join(SOURCES)})")


def load_summaries(paths: list[Path], table: str) -> list[dict]:
    """Read evaluation summaries, checking that each belongs to ``table``."""
    summaries = []
    for path in paths:
        summary = read_summary(path)
        check_summary(summary, table, str(path))
        summaries.append(summary)
    return summaries


def _mean_std(mean: float, std: float | None, decimals: int) -> str:
    """``mean ± std``; a missing or NaN std (a single run) leaves the mean alone."""
    text = f"{mean:.{decimals}f}"
    return text if std is None or math.isnan(std) else f"{text} ± {std:.{decimals}f}"


def _text(value: int | None) -> str:
    return "" if value is None else str(value)


def _images_seen(summary: dict) -> str:
    """Images the generator has seen, its start's included: SiD²A's cell reads ``0.024 (start 0.02)``."""
    kimg, start = summary.get("kimg"), summary.get("start_kimg")
    if kimg is None or not start:
        return _mimg(kimg)
    return f"{_mimg(kimg + start)} (start {_mimg(start)})"


def _mimg(kimg: float | None) -> str:
    if kimg is None:
        return ""
    return f"{kimg / 1000:.3f}".rstrip("0").rstrip(".")


def _same_alpha(a: float | None, b: float | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and math.isclose(a, b))


def _match(summary: dict, entries: list[PaperEntry]) -> int | None:
    """Index of the paper row reporting the same model as ``summary``, if exactly one does.

    The NFE must agree where both sides state it (the paper may list a teacher at several NFEs).
    """
    nfe = summary.get("nfe")
    found = [index for index, entry in enumerate(entries)
             if entry.method and entry.method == summary["method"]
             and _same_alpha(entry.alpha, summary.get("alpha"))
             and entry.size == (summary.get("size") or "")
             and (entry.nfe is None or nfe is None or entry.nfe == nfe)]
    return found[0] if len(found) == 1 else None


def _summary_order(summary: dict) -> tuple:
    method = summary["method"]
    methods = list(METHOD_NAMES)
    size = summary.get("size") or ""
    return (is_released(summary), methods.index(method) if method in methods else len(methods), method,
            summary.get("alpha") or 0.0,
            SIZE_ORDER.index(size) if size in SIZE_ORDER else len(SIZE_ORDER),
            summary.get("nfe") or 0)


def _metric_columns(metric: str, with_paper: bool) -> list[str]:
    label = METRIC_LABELS.get(metric, metric)
    if not with_paper:
        return [f"{label} (ours)"]
    return [f"{label} (ours)", f"{label} (paper)", f"Δ{label}"]


def columns(metrics: tuple[str, ...], with_paper: bool) -> list[str]:
    """Column names of a table reporting ``metrics``."""
    return [*BASE_COLUMNS,
            *(name for metric in metrics for name in _metric_columns(metric, with_paper)),
            "paper source", "status"]


def _metric_cells(metrics: tuple[str, ...], ours: dict, entry: PaperEntry | None, with_paper: bool) -> dict:
    """``(ours)``, ``(paper)`` and ``Δ`` cells; ``ours`` maps metric -> (mean, std).

    Paper values keep the paper's decimals; ours and Δ have ``METRIC_DECIMALS`` (default 3).
    """
    cells = {}
    for metric in metrics:
        decimals = METRIC_DECIMALS.get(metric, 3)
        mine = ours.get(metric)
        published = None if entry is None else entry.values.get(metric)
        texts = ["" if mine is None else _mean_std(*mine, decimals)]
        if with_paper:
            texts.append("" if published is None else _mean_std(*published, entry.decimals[metric]))
            texts.append("" if mine is None or published is None
                         else f"{mine[0] - published[0]:+.{decimals}f}")
        cells.update(zip(_metric_columns(metric, with_paper), texts))
    return cells


def _row(model: str, family: str, status: str, entry: PaperEntry | None, summary: dict | None,
         metrics: tuple[str, ...], with_paper: bool) -> dict:
    """One table row: the model's identity from ``summary`` (else ``entry``), numbers from both."""
    model_id = summary if summary is not None else {
        "method": entry.method, "alpha": entry.alpha, "size": entry.size, "nfe": entry.nfe}
    summary = summary or {}
    ours = {metric: (value["mean"], value.get("std")) for metric, value in summary.get("metrics", {}).items()}
    return {"model": model, "family": family, "method": model_id["method"],
            "alpha": alpha_text(model_id.get("alpha")), "size": model_id.get("size") or "",
            "CFG": "" if entry is None else entry.cfg, "NFE": _text(model_id.get("nfe")),
            "images seen (Mimg)": _images_seen(summary), "runs": _text(summary.get("runs")),
            **_metric_cells(metrics, ours, entry, with_paper),
            "paper source": "" if entry is None else entry.source, "status": status}


def _label(summary: dict) -> str:
    label = method_label(summary["method"], summary.get("alpha"))
    return f"{label} (released)" if is_released(summary) else label


def tabulate(table: str, summaries: list[dict]) -> pd.DataFrame:
    """The rows of ``table`` (see the module docstring), all cells formatted as text.

    Without paper rows (e.g. ``tiny``) the ``(paper)`` and ``Δ`` columns are left out.
    """
    metrics = tables.table(table).metrics
    entries = paper.entries(table)
    with_paper = bool(entries)
    for number, summary in enumerate(summaries, start=1):
        check_summary(summary, table, f"summary {number}")
    families: dict[str, str] = {}
    for entry in entries:
        families.setdefault(entry.method, entry.family)
    paired: dict[int, list[dict]] = defaultdict(list)
    unpaired = []
    for summary in sorted(summaries, key=_summary_order):
        index = _match(summary, entries)
        (unpaired if index is None else paired[index]).append(summary)

    def own_row(summary: dict, entry: PaperEntry | None) -> dict:
        status = "released" if is_released(summary) else "ours" if entry is None else "ours + paper"
        family = families.get(summary["method"], "") if entry is None else entry.family
        return _row(_label(summary), family, status, entry, summary, metrics, with_paper)

    rows = []
    for index, entry in enumerate(entries):
        mine = next((summary for summary in paired[index] if not is_released(summary)), None)
        rows.append(_row(model_label(entry.model, entry.alpha), entry.family,
                         "paper only" if mine is None else "ours + paper", entry, mine, metrics, with_paper))
        rows += [own_row(summary, entry) for summary in paired[index] if summary is not mine]
    rows += [own_row(summary, None) for summary in unpaired]
    frame = pd.DataFrame(rows, columns=columns(metrics, with_paper))
    unused = [column for column in OPTIONAL_COLUMNS if not frame[column].astype(bool).any()]
    return frame.drop(columns=unused)


def _protocol(ddof: int | None, runs: int | None, num_images: int | None, detector: str | None) -> str:
    """How our ± was computed, e.g. ``sample standard deviation (ddof = 1) over 10 runs of 50,000 images``."""
    name = STD_NAMES.get(ddof, "standard deviation")
    images = "?" if num_images is None else f"{num_images:,}"
    return f"{name} (ddof = {ddof}) over {runs} runs of {images} images each, detector {detector}"


def notes(summaries: list[dict], with_paper: bool) -> list[str]:
    """The paragraphs under a table: our std convention and detector, the paper's values, the status."""
    protocols: dict[tuple, list[str]] = defaultdict(list)
    for summary in sorted(summaries, key=_summary_order):
        key = tuple(summary.get(name) for name in ("std_ddof", "runs", "num_images", "detector"))
        protocols[key].append(_label(summary))
    if len(protocols) == 1:
        lines = [f"Ours: mean ± {_protocol(*next(iter(protocols)))}."]
    else:  # none (nothing evaluated yet) or several conventions
        lines = [f"Ours ({', '.join(labels)}): mean ± {_protocol(*key)}." for key, labels in protocols.items()]
    if with_paper:
        lines.append("Paper: the published numbers, from `sidcore/data/paper_results.csv` (SiD/SiDA papers "
                     "and READMEs; see `paper source`). For the SiD family ± is the std over the paper's 10 runs "
                     "of 50,000 images (ddof not stated); teacher and baseline rows are quoted from the "
                     "literature. Δ = ours − paper, on the means.")
    lines.append("Status: " + "; ".join(f"*{status}*: {meaning}" for status, meaning in STATUS.items()) + ".")
    return lines


def write(table: str, summary_paths: list[Path], csv: Path, md: Path) -> None:
    """The comparison table of ``table`` from its summaries, as CSV and Markdown."""
    summaries = load_summaries(summary_paths, table)
    frame = tabulate(table, summaries)
    if frame.empty:
        raise UserError(f"table {table!r}: no summaries given and no paper numbers for it (tables with paper "
                        f"numbers: {', '.join(sorted(tables.TABLES))}); nothing to tabulate")
    with_paper = "paper source" in frame.columns
    markdown.save(frame, csv, md, tables.table(table).heading, notes(summaries, with_paper=with_paper))
