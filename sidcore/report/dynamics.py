"""``sidcore dynamics``: the training dynamics of distillation runs from their progress logs
(``sidcore.instruments``), against images seen, one colour per run:

1. the discriminator's accuracy on real (solid) and fake (dashed) images, chance at 0.5;
2. its λ(σ)-free cross-entropy on real and fake images, chance at ln 2;
3. the generator's adversarial gradient over its SiD gradient (norm ratio, log scale) and their cosine;
4. the in-training FID of G_ema (solid) and, where measured, of the raw G (dotted).

The first tick of each SiDA stage is drawn as a vertical line; SiD runs have no discriminator and appear in panel 4
only.
"""
from __future__ import annotations

import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sidcore.methods import method_label
from sidcore.report.logs import read_log
from sidcore.report.plot import Run, save_atomic


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """Images seen and ``key`` of the records that carry it (finite values only)."""
    points = [(r["kimg"] * 1000, float(r[key])) for r in records
              if r.get(key) is not None and math.isfinite(float(r[key])) and r["kimg"] > 0]
    return [p[0] for p in points], [p[1] for p in points]


def stage_starts(records: list[dict]) -> list[float]:
    """Images seen at the first record of each stage after the first."""
    return [r["kimg"] * 1000 for previous, r in zip(records, records[1:]) if r["stage"] != previous["stage"]]


def labels(runs: list[Run]) -> list[str]:
    """Each run's legend label: its method and α, and its folder where two runs share them."""
    plain = [method_label(method, alpha) for method, alpha, _ in runs]
    return [f"{label} ({path.parent.name})" if plain.count(label) > 1 else label
            for label, (_, _, path) in zip(plain, runs)]


def figure(runs: list[Run], title: str) -> Figure:
    logs = [(label, read_log(path)) for label, (_, _, path) in zip(labels(runs), runs)]
    fig = Figure(figsize=(12.0, 8.5), layout="constrained")
    FigureCanvasAgg(fig)
    acc, bce, grad, fid = fig.subplots(2, 2, sharex=True).flatten()
    cos = grad.twinx()
    for number, (label, records) in enumerate(logs):
        colour = f"C{number % 10}"
        for axes, key, style, suffix in ((acc, "D_acc_real", "-", "real"), (acc, "D_acc_fake", "--", "fake"),
                                         (bce, "D_bce_real", "-", "real"), (bce, "D_bce_fake", "--", "fake"),
                                         (grad, "G_grad_ratio", "-", "|∇gan| / |∇sid|"),
                                         (cos, "G_grad_cos", ":", "cos"),
                                         (fid, "fid", "-", "G_ema"), (fid, "fid_raw", ":", "raw G")):
            x, y = series(records, key)
            if x:
                axes.plot(x, y, style, color=colour, marker="." if len(x) < 40 else None, linewidth=1.1,
                          label=f"{label}, {suffix}")
        for start in stage_starts(records):
            for axes in (acc, bce, grad, fid):
                axes.axvline(start, color=colour, linewidth=0.6, alpha=0.4)
    acc.axhline(0.5, color="black", linewidth=0.8, linestyle=":")
    bce.axhline(math.log(2), color="black", linewidth=0.8, linestyle=":")
    acc.set(ylabel="D accuracy (logit sign)", ylim=(-0.02, 1.02), title="Discriminator: accuracy (chance 0.5)")
    bce.set(ylabel="D cross-entropy, λ-free", title="Discriminator: cross-entropy (chance ln 2)")
    grad.set(ylabel="|∇θ adversarial| / |∇θ SiD|", yscale="log", title="Generator: adversarial vs SiD gradient")
    cos.set(ylabel="cosine", ylim=(-1.05, 1.05))
    fid.set(ylabel="in-training FID", yscale="log", title="In-training FID: G_ema and raw G")
    for axes in (acc, bce, grad, fid):
        axes.set_xscale("log")
        axes.grid(True, which="both", linewidth=0.4, alpha=0.5)
    for axes in (grad, fid):
        axes.set_xlabel("images seen")
    for axes, twin in ((acc, None), (bce, None), (grad, cos), (fid, None)):
        handles, names = axes.get_legend_handles_labels()
        if twin is not None:
            more = twin.get_legend_handles_labels()
            handles, names = handles + more[0], names + more[1]
        if handles:
            axes.legend(handles, names, fontsize="x-small")
    fig.suptitle(f"{title}: training dynamics (vertical lines: the first tick of each SiDA stage)" if title else
                 "Training dynamics (vertical lines: the first tick of each SiDA stage)")
    return fig


def write(runs: list[Run], title: str, png: Path, pdf: Path) -> None:
    """The dynamics figure as PNG and PDF."""
    fig = figure(runs, title)
    save_atomic(fig, png)
    save_atomic(fig, pdf)
