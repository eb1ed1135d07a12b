"""``sidcore plot``: in-training FID against images seen, log–log, one curve per distillation run.

Horizontal reference lines: the teacher (dashed; our evaluated teacher if given, else the paper's) and the
paper's final FIDs of the SiD family for the same table and EDM2 size (dotted, coloured like the curve of
the same method and α), both looked up in ``sidcore/data/paper_results.csv``.
"""
from __future__ import annotations

from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from sidcore.atomic import atomic_path
from sidcore.methods import METHODS, checked_run, method_label
from sidcore.report import paper
from sidcore.report.logs import curve, read_log
from sidcore.report.paper import PaperEntry
from sidcore.summary import read_summary

Run = tuple[str, float, Path]  # method, α, log.jsonl
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
LINES = ("-", "--", "-.", ":")


def parse_run(method: str, alpha: str, log: str) -> Run:
    """Check one ``--run METHOD ALPHA LOG``."""
    return (*checked_run(method, alpha, f"--run {method} {alpha} {log}"), Path(log))


def paper_fids(table: str, size: str) -> tuple[list[PaperEntry], list[PaperEntry]]:
    """The paper's teacher rows and SiD-family rows reporting an FID for ``table`` and EDM2 ``size``."""
    rows = [entry for entry in paper.entries(table) if entry.size == size and "fid" in entry.values]
    return ([entry for entry in rows if entry.method == "teacher"],
            [entry for entry in rows if entry.method in METHODS])


def _printed(entry: PaperEntry) -> str:
    """The paper's FID as printed there."""
    return f"{entry.values['fid'][0]:.{entry.decimals['fid']}f}"


def _teacher_lines(axes: Axes, summary: Path | None, entries: list[PaperEntry]) -> None:
    """Dashed teacher lines: ours from its evaluation summary, else the paper's (one per NFE it reports)."""
    if summary is not None:
        teacher = read_summary(summary, "fid", ("metrics", "nfe", "runs", "num_images"))
        fid = teacher["metrics"]["fid"]["mean"]
        lines = [(fid, f"Teacher, {teacher['nfe']} NFE (ours, mean of {teacher['runs']} × "
                       f"{teacher['num_images']:,} images): {fid:.3f}")]
    else:
        lines = [(entry.values["fid"][0], f"Teacher, {entry.nfe} NFE (paper): {_printed(entry)}")
                 for entry in entries]
    for number, (fid, label) in enumerate(lines):
        axes.axhline(fid, color="black", alpha=1.0 - 0.4 * number, linestyle="--", linewidth=1, label=label)


def from_start(records: list[dict], where: str) -> tuple[float, list[float], list[float]]:
    """The in-training FID curve against the images the generator has seen, those before the run included
    (a SiD²A run continues its SiD start's count), and that start."""
    images, fids = curve(records, "fid", where)
    start = 1000 * records[0].get("start_kimg", 0.0)
    return start, [start + x for x in images], fids


def figure(runs: list[Run], teacher_summary: Path | None, table: str, size: str, title: str) -> Figure:
    """Build the plot; each curve is checked before anything is drawn."""
    curves = [(method, alpha, *from_start(read_log(path), str(path))) for method, alpha, path in runs]
    teachers, finals = paper_fids(table, size)
    fig = Figure(figsize=(8.0, 4.8))
    FigureCanvasAgg(fig)
    axes = fig.add_subplot()
    colours: dict[tuple[str, float], str] = {}
    for number, (method, alpha, start, images, fids) in enumerate(curves):
        colour = colours.setdefault((method, alpha), f"C{len(colours) % 10}")
        # Hollow markers of their own shape and size, line styles in turn: curves that coincide stay visible.
        axes.plot(images, fids, marker=MARKERS[number % len(MARKERS)], markersize=7 - 4 * number / len(curves),
                  fillstyle="none", linestyle=LINES[number % len(LINES)], linewidth=1.2, color=colour,
                  label=f"{method_label(method, alpha)}: in-training FID"
                        + (f", from its start at {start:,.0f} images" if start else ""))
    _teacher_lines(axes, teacher_summary, teachers)
    for entry in finals:
        colour = colours.setdefault((entry.method, entry.alpha), f"C{len(colours) % 10}")
        axes.axhline(entry.values["fid"][0], linestyle=":", linewidth=1.4, color=colour,
                     label=f"{method_label(entry.method, entry.alpha)} (paper): {_printed(entry)}")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))  # FID 2, 3, 10 rather than 2×10⁰
    axes.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    axes.set_xlabel("images seen by the generator")
    axes.set_ylabel("FID")
    if title:
        axes.set_title(title)
    axes.grid(True, which="both", linewidth=0.5, alpha=0.5)
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return fig


def save_atomic(fig: Figure, path: Path) -> None:
    """Save ``fig`` in the format given by ``path``'s suffix through a temporary file."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip("."), dpi=150, bbox_inches="tight")


def write(runs: list[tuple[str, float, Path]], teacher_summary: Path | None, table: str, size: str, title: str,
          png: Path, pdf: Path) -> None:
    """The FID-against-images-seen figure as PNG and PDF."""
    fig = figure(runs, teacher_summary, table, size, title)
    save_atomic(fig, png)
    save_atomic(fig, pdf)
