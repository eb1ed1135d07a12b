"""``sidcore ablation``: the α ablation (SiDA paper Fig. 2). Per method, one curve per α of the in-training
FID (and IS where logged) against images seen, and a table of each run at the end of the ablation budget.

The paper ranks α by these curves over the first 20k iterations (CIFAR-10 unconditional, batch 256): α = 1.0
best for SiDA, α = 0 or small α worse, α ≥ 1.2 unstable; SiD²A stable for every α. Its values are not
printed, so the table carries ours only.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sidcore.methods import METHOD_NAMES, METHODS, alpha_text
from sidcore.report import markdown
from sidcore.report.logs import curve, read_log
from sidcore.report.plot import parse_run, save_atomic

METRIC_AXES = {"fid": ("FID", "log"), "is": ("IS", "linear")}


def load_runs(runs: list[tuple[str, float, Path]]) -> list[dict]:
    """Each run's records, checked for an in-training FID, in the order given."""
    out = []
    for method, alpha, path in runs:
        records = read_log(path)
        curve(records, "fid", str(path))
        out.append({"method": method, "alpha": alpha, "records": records})
    return out


def metrics_logged(runs: list[dict]) -> list[str]:
    """The in-training metrics every run logged (FID always; IS where the dataset configures it)."""
    return [m for m in METRIC_AXES if all(any(r.get(m) is not None for r in run["records"]) for run in runs)]


def table(runs: list[dict]) -> pd.DataFrame:
    """One row per (method, α) in method order, then α: the metrics at the last evaluation, and the lowest FID
    and where it was."""
    rows = []
    for run in sorted(runs, key=lambda r: (METHODS.index(r["method"]), r["alpha"])):
        images, fids = curve(run["records"], "fid", run["method"])
        best = min(range(len(fids)), key=fids.__getitem__)
        diverged = not all(math.isfinite(f) for f in fids)
        row = {"method": METHOD_NAMES[run["method"]], "alpha": alpha_text(run["alpha"]),
               "images seen": int(images[-1]), "final FID": round(fids[-1], 3), "best FID": round(fids[best], 3),
               "best at images": int(images[best])}
        if "is" in metrics_logged([run]):
            row["final IS"] = round(curve(run["records"], "is", run["method"])[1][-1], 3)
        row["status"] = "diverged (non-finite FID)" if diverged else "finite"
        rows.append(row)
    return pd.DataFrame(rows)


def figure(runs: list[dict], title: str) -> Figure:
    """Rows: methods; columns: FID (log) and IS against images seen (log)."""
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    metrics = metrics_logged(runs)
    fig = Figure(figsize=(5.0 * len(metrics), 3.6 * len(methods)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(methods), len(metrics), squeeze=False)
    alphas = sorted({r["alpha"] for r in runs})
    for row, method in enumerate(methods):
        for col, metric in enumerate(metrics):
            ax = axes[row][col]
            for run in (r for r in runs if r["method"] == method):
                images, values = curve(run["records"], metric, method)
                ax.plot(images, values, marker="o", markersize=3, linewidth=1.2,
                        color=f"C{alphas.index(run['alpha']) % 10}", label=f"α = {alpha_text(run['alpha'])}")
            name, scale = METRIC_AXES[metric]
            ax.set_xscale("log")
            ax.set_yscale(scale)
            ax.set_xlabel("images seen")
            ax.set_ylabel(name)
            ax.set_title(f"{METHOD_NAMES[method]}: {name}")
            ax.grid(True, which="both", linewidth=0.5, alpha=0.5)
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def write(run_specs: list[tuple[str, str, str]], title: str, csv: Path, md: Path, png: Path, pdf: Path,
          log=print) -> None:
    """The α ablation of the runs ``(method, α, log.jsonl)``: table (CSV, Markdown) and figure (PNG, PDF)."""
    runs = load_runs([parse_run(*values) for values in run_specs])
    frame = table(runs)
    notes = ["Each run is the method at that α for the ablation's budget (config `ablation`); FID and IS are the "
             "in-training evaluations of G_ema. The SiDA paper (Fig. 2, CIFAR-10 unconditional, first 20k "
             "iterations at batch 256) finds α = 1.0 best for SiDA, α = 0 and small α worse, α = 1.2 and 1.5 "
             "unstable, and SiD²A stable for every α; it prints no values."]
    markdown.save(frame, csv, md, f"α ablation: {title}", notes)
    fig = figure(runs, f"α ablation: {title}")
    save_atomic(fig, png)
    save_atomic(fig, pdf)
    for row in frame.itertuples(index=False):
        log(f"{row.method} α={row.alpha}: final FID {row[3]}, best {row[4]} at {row[5]} images")
