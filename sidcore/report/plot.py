"""``sidcore plot``: in-training FID against images seen, log–log, one curve per distillation run.

Optional horizontal reference lines: the teacher's evaluated FID (dashed, labelled with its NFE)
and the paper's final numbers (dotted).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sidcore.atomic import atomic_path


def split_pair(text: str) -> tuple[str, str]:
    """Split ``LABEL=VALUE`` at the last ``=`` (labels such as ``SiD α=1.2`` contain one)."""
    label, sep, value = text.rpartition("=")
    if not sep or not label or not value:
        raise argparse.ArgumentTypeError(f"expected LABEL=VALUE, got {text!r}")
    return label, value


def label_fid(text: str) -> tuple[str, float]:
    """``LABEL=VALUE`` with a numeric value."""
    label, value = split_pair(text)
    try:
        return label, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number in {text!r}") from None


def fid_curve(path: Path) -> tuple[list[float], list[float]]:
    """Images seen and FID of every log line carrying an in-training FID."""
    images, fids = [], []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if record.get("fid") is not None and record["kimg"] > 0:
            images.append(record["kimg"] * 1000)
            fids.append(float(record["fid"]))
    if not fids:
        raise ValueError(f"{path}: no in-training FID values (at images seen > 0)")
    return images, fids


def figure(logs: list[tuple[str, Path]], teacher_summary: Path | None,
           paper_fids: list[tuple[str, float]], title: str) -> Figure:
    """Build the plot; each curve is checked before anything is drawn."""
    curves = [(label, *fid_curve(path)) for label, path in logs]
    fig = Figure(figsize=(6.4, 4.8))
    FigureCanvasAgg(fig)
    axes = fig.add_subplot()
    for label, images, fids in curves:
        axes.plot(images, fids, marker="o", markersize=3, linewidth=1.2, label=label)
    if teacher_summary is not None:
        teacher = json.loads(Path(teacher_summary).read_text())
        fid = teacher["metrics"]["fid"]["mean"]
        axes.axhline(fid, color="black", linestyle="--", linewidth=1,
                     label=f"Teacher, {teacher['nfe']} NFE ({fid:.3f})")
    for number, (label, value) in enumerate(paper_fids, start=len(curves)):
        axes.axhline(value, linestyle=":", linewidth=1.2, color=f"C{number % 10}",
                     label=f"{label} ({value:g})")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("images seen")
    axes.set_ylabel("FID")
    if title:
        axes.set_title(title)
    axes.grid(True, which="both", linewidth=0.5, alpha=0.5)
    axes.legend(fontsize="small")
    fig.tight_layout()
    return fig


def save_atomic(fig: Figure, path: Path) -> None:
    """Save ``fig`` in the format given by ``path``'s suffix through a temporary file."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip("."), dpi=150)


def run(args: argparse.Namespace) -> int:
    logs = [(label, Path(path)) for label, path in args.log]
    fig = figure(logs, args.teacher_summary, args.paper_fid, args.title)
    save_atomic(fig, args.out)
    save_atomic(fig, args.out.with_suffix(".pdf"))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plot", help="plot in-training FID against images seen",
        description="Plot in-training FID against images seen (log-log), one curve per run; "
                    "write PNG and PDF.")
    parser.add_argument("--log", action="append", type=split_pair, required=True,
                        metavar="LABEL=PATH", help="a run's log.jsonl (repeatable)")
    parser.add_argument("--teacher-summary", type=Path, metavar="PATH",
                        help="teacher eval/summary.json: dashed line at its mean FID")
    parser.add_argument("--paper-fid", action="append", type=label_fid, default=[],
                        metavar="LABEL=VALUE", help="dotted line at a paper FID (repeatable)")
    parser.add_argument("--title", default="")
    parser.add_argument("--out", required=True, type=Path,
                        help="PNG to write; a PDF goes beside it")
    parser.set_defaults(func=run)
