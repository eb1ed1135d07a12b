"""``sidcore tabulate``: our evaluation summaries next to the paper's numbers (CSV + Markdown).

The table lists every row the paper reports for the chosen table (status ``paper only``), then one
row per evaluation summary. A summary is paired with the paper row of the same method, α and
EDM2 size (NFE breaks ties), which fills its ``(paper)`` and ``Δ`` columns.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pandas as pd

from sidcore.atomic import write_text
from sidcore.report import paper
from sidcore.report.paper import PaperEntry

TABLE_METRICS = {
    "tiny": ("fid", "is"),
    "cifar10-uncond": ("fid", "is"),
    "imagenet64": ("fid", "precision", "recall"),
    "edm2_fd_dinov2": ("fd_dinov2",),
}
DEFAULT_METRICS = ("fid",)
# Report tables fed by the summaries of another table.
SUMMARY_TABLE = {"edm2_fd_dinov2": "edm2"}
METRIC_LABELS = {"fid": "FID", "is": "IS", "precision": "Precision", "recall": "Recall",
                 "fd_dinov2": "FD_DINOv2"}
METRIC_DECIMALS = {"precision": 2, "recall": 2}
DELTA_DECIMALS = 3
METHOD_NAMES = {"teacher": "Teacher", "sid": "SiD", "sida": "SiDA", "sid2a": "SiD²A"}
SIZE_ORDER = ("xs", "s", "m", "l", "xl", "xxl")
BASE_COLUMNS = ("model", "method", "alpha", "size", "CFG", "NFE", "images seen (Mimg)", "runs")
# Dropped when no row fills them (size and CFG exist only in the EDM2 tables).
OPTIONAL_COLUMNS = ("size", "CFG", "paper source")


def metrics_for(table: str) -> tuple[str, ...]:
    """Metrics reported in a table, in column order."""
    return TABLE_METRICS.get(table, DEFAULT_METRICS)


def check_table(summary: dict, table: str, origin: str) -> None:
    """Raise ``ValueError`` naming ``origin`` if ``summary`` belongs to another table."""
    accepted = {table, SUMMARY_TABLE.get(table, table)}
    if summary.get("table") not in accepted:
        raise ValueError(f"{origin}: summary is for table {summary.get('table')!r}, "
                         f"not {table!r}")


def load_summaries(paths: list[Path], table: str) -> list[dict]:
    """Read evaluation summaries, checking that each belongs to ``table``."""
    summaries = []
    for path in paths:
        summary = json.loads(Path(path).read_text())
        check_table(summary, table, str(path))
        summaries.append(summary)
    return summaries


def _number(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}"


def _mean_std(mean: float, std: float | None, decimals: int) -> str:
    """``mean ± std``; a missing or NaN std (a single run) leaves the mean alone."""
    text = _number(mean, decimals)
    return text if std is None or math.isnan(std) else f"{text} ± {_number(std, decimals)}"


def _alpha(alpha: float | None) -> str:
    if alpha is None:
        return ""
    return f"{alpha:.1f}" if round(alpha, 1) == alpha else f"{alpha:g}"


def _mimg(kimg: float | None) -> str:
    if kimg is None:
        return ""
    return f"{kimg / 1000:.3f}".rstrip("0").rstrip(".")


def _same_alpha(a: float | None, b: float | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and math.isclose(a, b))


def _match(summary: dict, candidates: list[PaperEntry]) -> PaperEntry | None:
    """The paper row reporting the same model as ``summary``, if exactly one does."""
    found = [entry for entry in candidates
             if entry.method and entry.method == summary["method"]
             and _same_alpha(entry.alpha, summary.get("alpha"))
             and entry.size == (summary.get("size") or "")]
    if len(found) > 1:
        found = [entry for entry in found if entry.nfe == summary.get("nfe")]
    return found[0] if len(found) == 1 else None


def _summary_order(summary: dict) -> tuple:
    method = summary["method"]
    methods = list(METHOD_NAMES)
    size = summary.get("size") or ""
    return (methods.index(method) if method in methods else len(methods), method,
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


def _metric_cells(metrics: tuple[str, ...], ours: dict, theirs: dict, with_paper: bool) -> dict:
    """``(ours)``, ``(paper)`` and ``Δ`` cells; ``ours``/``theirs`` map metric -> (mean, std)."""
    cells = {}
    for metric in metrics:
        decimals = METRIC_DECIMALS.get(metric, 3)
        mine, published = ours.get(metric), theirs.get(metric)
        texts = ["" if mine is None else _mean_std(*mine, decimals)]
        if with_paper:
            texts.append("" if published is None else _mean_std(*published, decimals))
            texts.append("" if mine is None or published is None
                         else f"{mine[0] - published[0]:+.{DELTA_DECIMALS}f}")
        cells.update(zip(_metric_columns(metric, with_paper), texts))
    return cells


def _paper_row(entry: PaperEntry, metrics: tuple[str, ...]) -> dict:
    return {"model": entry.model, "method": entry.method, "alpha": _alpha(entry.alpha),
            "size": entry.size, "CFG": entry.cfg,
            "NFE": "" if entry.nfe is None else str(entry.nfe),
            "images seen (Mimg)": "", "runs": "",
            **_metric_cells(metrics, {}, entry.values, with_paper=True),
            "paper source": entry.source, "status": "paper only"}


def _our_row(summary: dict, entry: PaperEntry | None, metrics: tuple[str, ...],
             with_paper: bool) -> dict:
    method, alpha = summary["method"], summary.get("alpha")
    name = METHOD_NAMES.get(method, method)
    ours = {metric: (value["mean"], value.get("std"))
            for metric, value in summary.get("metrics", {}).items()}
    return {"model": name if alpha is None else f"{name}, α = {_alpha(alpha)}",
            "method": method, "alpha": _alpha(alpha), "size": summary.get("size") or "",
            "CFG": "" if entry is None else entry.cfg,
            "NFE": "" if summary.get("nfe") is None else str(summary["nfe"]),
            "images seen (Mimg)": _mimg(summary.get("kimg")),
            "runs": "" if summary.get("runs") is None else str(summary["runs"]),
            **_metric_cells(metrics, ours, {} if entry is None else entry.values, with_paper),
            "paper source": "" if entry is None else entry.source,
            "status": "ours" if entry is None else "ours + paper"}


def tabulate(table: str, summaries: list[dict]) -> pd.DataFrame:
    """Paper rows of ``table`` followed by our rows, all cells formatted as text.

    Without paper rows (e.g. ``tiny``) the ``(paper)`` and ``Δ`` columns are left out.
    """
    metrics = metrics_for(table)
    entries = paper.entries(table)
    with_paper = bool(entries)
    for number, summary in enumerate(summaries, start=1):
        check_table(summary, table, f"summary {number}")
    rows = [_paper_row(entry, metrics) for entry in entries]
    rows += [_our_row(summary, _match(summary, entries), metrics, with_paper)
             for summary in sorted(summaries, key=_summary_order)]
    frame = pd.DataFrame(rows, columns=columns(metrics, with_paper))
    unused = [column for column in OPTIONAL_COLUMNS if not frame[column].astype(bool).any()]
    return frame.drop(columns=unused)


def to_markdown(frame: pd.DataFrame, title: str) -> str:
    """A GitHub-flavoured Markdown table of ``frame`` under a heading."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    lines = [f"# {title}", "", line(list(frame.columns)), line(["---"] * len(frame.columns))]
    lines += [line(list(row)) for row in frame.itertuples(index=False)]
    lines += ["", "± is the standard deviation over evaluation runs."]
    if "paper source" in frame.columns:
        lines[-1] += (" Paper values come from the SiD/SiDA papers and READMEs "
                      "(`sidcore/data/paper_results.csv`); Δ = ours − paper.")
    lines.append("")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    frame = tabulate(args.table, load_summaries(args.summaries, args.table))
    write_text(args.out, frame.to_csv(index=False))
    write_text(args.out.with_suffix(".md"), to_markdown(frame, f"Table {args.table}"))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tabulate", help="compare evaluation summaries with the paper's numbers",
        description="Put evaluation summaries next to the paper's numbers; "
                    "write the table as CSV and Markdown.")
    parser.add_argument("--table", required=True, help="table name, e.g. cifar10-uncond or tiny")
    parser.add_argument("--summaries", nargs="*", type=Path, default=[], metavar="FILE",
                        help="eval/summary.json files (may be none)")
    parser.add_argument("--out", required=True, type=Path,
                        help="CSV to write; the Markdown version goes beside it (.md)")
    parser.set_defaults(func=run)
