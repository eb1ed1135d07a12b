"""``sidcore claims``: the papers' claims tested on one experiment's runs, each against a criterion fixed
in advance (below), with the measured numbers and whether it held.

(a) SiD's FID falls "exponentially fast": its in-training FID against images seen is close to a straight
    line on log-log axes. Fit log10 FID = c + b·log10 images by least squares over the evaluations after
    tick 0 up to the lowest FID; held if b < 0 and R² ≥ 0.90.
(b) SiD in one step reaches the teacher: the 10-run mean FID of the best SiD run (lowest mean over its α)
    is at most the teacher's mean plus the larger of the two standard deviations.
(c) SiDA is faster and ends at or below SiD: with F* = 1.1 × the best SiD run's lowest in-training FID,
    SiDA (α = 1.0) reaches F* after fewer images than that SiD run, and its 10-run mean is at most SiD's
    plus the larger standard deviation.
(d) SiD²A improves on the SiD generator it starts from: for every SiD²A α, its 10-run mean is below the
    starting generator's by more than the larger standard deviation.
(e) The α ablation ranks α as the SiDA paper: among the ablation's SiDA runs, α = 1.0 has the lowest FID at
    the last evaluation of the budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sidcore.errors import UserError
from sidcore.methods import METHODS, alpha_text, checked_run, method_label
from sidcore.report import markdown
from sidcore.report.logs import evaluated, read_log
from sidcore.report.plot import save_atomic
from sidcore.summary import read_summary

R2_MIN = 0.90  # (a)
REACH = 1.1    # (c): F* = REACH × SiD's lowest in-training FID
SIDA_ALPHA = 1.0  # (c), (e): the α the SiDA paper picks
VERDICTS = {True: "held", False: "not held", None: "untestable"}  # untestable: too few evaluations to decide


@dataclass
class Run:
    method: str
    alpha: float
    images: list[float]
    fids: list[float]
    ticks: list[int]
    mean: float | None = None
    std: float | None = None

    @property
    def label(self) -> str:
        return method_label(self.method, self.alpha)


def load_run(method: str, alpha: str, log: str, summary: str | None) -> Run:
    method, alpha = checked_run(method, alpha, f"--run {method} {alpha} {log}")
    points = evaluated(read_log(log), "fid", log)
    run = Run(method, alpha, [r["kimg"] * 1000 for r in points], [float(r["fid"]) for r in points],
              [r["tick"] for r in points])
    if summary is not None:
        fid = read_summary(summary, "fid", ("metrics",))["metrics"]["fid"]
        run.mean, run.std = fid["mean"], fid["std"]
    return run


def loglog_fit(run: Run) -> dict | None:
    """Least squares of log10 FID on log10 images over the evaluations after tick 0 up to the lowest FID; None
    with fewer than 3 such evaluations."""
    last = int(np.argmin(run.fids))
    points = [(i, f) for i, f, t in zip(run.images[: last + 1], run.fids[: last + 1], run.ticks) if t > 0]
    if len(points) < 3:
        return None
    x, y = np.log10([p[0] for p in points]), np.log10([p[1] for p in points])
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    r2 = 1 - float(residual @ residual) / float(((y - y.mean()) ** 2).sum())
    return {"slope": float(slope), "intercept": float(intercept), "r2": r2, "points": len(points),
            "from": points[0][0], "to": points[-1][0]}


def first_reaching(run: Run, level: float) -> float | None:
    """Images seen at the first in-training evaluation with FID ≤ ``level``."""
    return next((i for i, f in zip(run.images, run.fids) if f <= level), None)


def _ms(run: Run) -> str:
    return f"{run.mean:.3f} ± {run.std:.3f}"


def evaluate_claims(teacher: dict, sid: list[Run], sida: Run, sid2a: list[Run], init: Run,
                    ablation: list[Run]) -> tuple[list[dict], dict]:
    """The rows of the claims table and what the plot needs."""
    best = min(sid, key=lambda r: r.mean)
    fit = loglog_fit(best)
    t_mean, t_std = teacher["mean"], teacher["std"]
    rows = [{
        "claim": "a", "statement": "SiD's FID against images seen is a straight line on log-log axes",
        "criterion": f"fit over evaluations after tick 0 up to the lowest FID: slope < 0 and R² ≥ {R2_MIN}",
        "measured": f"{best.label}: log10 FID = {fit['intercept']:.3f} {fit['slope']:+.3f}·log10 images, "
                    f"R² = {fit['r2']:.3f} over {fit['points']} evaluations ({fit['from']:.0f}–{fit['to']:.0f} images)"
        if fit else f"{best.label}: fewer than 3 evaluations after tick 0 up to the lowest FID, too few to fit",
        "held": fit["slope"] < 0 and fit["r2"] >= R2_MIN if fit else None}]
    gap = max(best.std, t_std)
    rows.append({
        "claim": "b", "statement": "SiD in one step reaches the teacher's FID or passes it",
        "criterion": "best SiD mean ≤ teacher mean + the larger std",
        "measured": f"{best.label}: {_ms(best)}; teacher ({teacher['nfe']} NFE): {t_mean:.3f} ± {t_std:.3f}",
        "held": best.mean <= t_mean + gap})
    level = REACH * min(best.fids)
    n_sid, n_sida = first_reaching(best, level), first_reaching(sida, level)
    ends = sida.mean <= best.mean + max(sida.std, best.std)
    faster = n_sida is not None and n_sid is not None and n_sida < n_sid
    speedup = f", {n_sid / n_sida:.1f}× fewer" if faster else ""
    rows.append({
        "claim": "c", "statement": "SiDA needs fewer images than SiD to reach a given FID, and ends at or below it",
        "criterion": f"first in-training FID ≤ F* = {REACH} × SiD's lowest ({level:.3f}) after fewer images; "
                     "SiDA mean ≤ SiD mean + the larger std",
        "measured": f"images to F*: {best.label} {_images(n_sid)}, {sida.label} {_images(n_sida)}{speedup}; "
                    f"10-run FID: {best.label} {_ms(best)}, {sida.label} {_ms(sida)}",
        "held": faster and ends})
    improved = [r for r in sid2a if r.mean < init.mean - max(r.std, init.std)]
    rows.append({
        "claim": "d", "statement": "SiD²A ends below the SiD generator it starts from",
        "criterion": "every SiD²A α: mean < start's mean − the larger std",
        "measured": f"start {init.label}: {_ms(init)}; " + "; ".join(f"{r.label}: {_ms(r)}" for r in sid2a),
        "held": len(improved) == len(sid2a)})
    finals = sorted((r.fids[-1] if math.isfinite(r.fids[-1]) else math.inf, r.alpha) for r in ablation)
    ranking = " < ".join(f"α {alpha_text(a)} ({f:.3f})" for f, a in finals)
    rows.append({
        "claim": "e", "statement": "the α ablation ranks α as the SiDA paper (α = 1.0 best)",
        "criterion": f"among the ablation's SiDA runs, α = {alpha_text(SIDA_ALPHA)} has the lowest FID at the last "
                     "evaluation",
        "measured": f"final in-training FID at {ablation[0].images[-1]:.0f} images: {ranking}",
        "held": finals[0][1] == SIDA_ALPHA and math.isfinite(finals[0][0])})
    return rows, {"best": best, "fit": fit, "level": level}


def _images(n: float | None) -> str:
    return "never" if n is None else f"{n:.0f}"


def figure(teacher: dict, sid: list[Run], sida: Run, sid2a: list[Run], init: Run, extra: dict, title: str) -> Figure:
    """(a) SiD's curve and its fit; (b, c) SiD, SiDA, the teacher and F*; (d) SiD²A against its start."""
    fig = Figure(figsize=(15.0, 4.4))
    FigureCanvasAgg(fig)
    ax_a, ax_c, ax_d = fig.subplots(1, 3)
    best, fit = extra["best"], extra["fit"]
    ax_a.plot(best.images, best.fids, "o-", markersize=3, label=best.label)
    if fit:
        xs = np.array([fit["from"], fit["to"]])
        ax_a.plot(xs, 10 ** (fit["intercept"] + fit["slope"] * np.log10(xs)), "k--",
                  label=f"fit: slope {fit['slope']:.2f}, R² {fit['r2']:.3f}")
    ax_a.set_title("(a) SiD: FID against images seen")
    for r in sid:
        ax_c.plot(r.images, r.fids, "o-", markersize=3, label=r.label)
    ax_c.plot(sida.images, sida.fids, "o-", markersize=3, label=sida.label)
    ax_c.axhline(teacher["mean"], color="black", linestyle="--", linewidth=1,
                 label=f"Teacher, {teacher['nfe']} NFE: {teacher['mean']:.2f} (10 runs)")
    ax_c.axhline(extra["level"], color="grey", linestyle=":", linewidth=1, label=f"F* = {extra['level']:.2f}")
    ax_c.set_title("(b, c) SiD and SiDA")
    for r in sid2a:
        ax_d.plot(r.images, r.fids, "o-", markersize=3, label=r.label)
    ax_d.axhline(init.mean, color="black", linestyle="--", linewidth=1,
                 label=f"start, {init.label}: {init.mean:.2f} (10 runs)")
    ax_d.set_title("(d) SiD²A from SiD")
    for ax in (ax_a, ax_c, ax_d):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("images seen")
        ax.set_ylabel("in-training FID")
        ax.grid(True, which="both", linewidth=0.5, alpha=0.5)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def write(teacher_summary: Path, run_specs: list[tuple[str, str, str, str]], sid2a_init_alpha: float,
          ablation_specs: list[tuple[str, str]], title: str, csv: Path, md: Path, png: Path, log=print) -> None:
    """Claims (a)-(e) on one experiment: table (CSV, Markdown) and figure (PNG)."""
    teacher = read_summary(teacher_summary, "fid", ("metrics", "nfe"))
    teacher = {"nfe": teacher["nfe"], **{k: teacher["metrics"]["fid"][k] for k in ("mean", "std")}}
    runs = [load_run(*values) for values in run_specs]
    by = {m: [r for r in runs if r.method == m] for m in METHODS}
    for method, found in by.items():
        if not found:
            raise UserError(f"claims: no {method} run given (--run {method} ALPHA LOG SUMMARY)")
    sida = next((r for r in by["sida"] if r.alpha == SIDA_ALPHA), None)
    init = next((r for r in by["sid"] if r.alpha == sid2a_init_alpha), None)
    ablation = [load_run("sida", a, log, None) for a, log in ablation_specs]
    if sida is None or init is None or not ablation:
        raise UserError(f"claims: need SiDA at α {SIDA_ALPHA}, the SiD run SiD²A starts from (α "
                         f"{sid2a_init_alpha}) and the SiDA α ablation (--ablation)")
    rows, extra = evaluate_claims(teacher, by["sid"], sida, by["sid2a"], init, ablation)
    frame = pd.DataFrame(rows)
    frame["held"] = frame["held"].map(VERDICTS)
    notes = ["Criteria fixed before the experiment ran (sidcore/report/claims.py). Means ± sample stds are over "
             "the 10 independent evaluation runs; in-training FIDs are single evaluations of G_ema on fewer images."]
    markdown.save(frame, csv, md, f"The papers' claims on {title}", notes)
    save_atomic(figure(teacher, by["sid"], sida, by["sid2a"], init, extra, title), png)
    for row in rows:
        log(f"({row['claim']}) {VERDICTS[row['held']]}: {row['measured']}")
