"""``sidcore cost``: what each distillation cost, from its own progress log and Snakemake benchmark, beside
the SiDA paper's Table 8 (GPUs, batch per GPU, peak memory per GPU, seconds per 1k images, hours per 10M).

Speed is the median ``sec_per_kimg`` of the log's ticks after the first (the first holds start-up); it
excludes in-training evaluations, as Table 8's does. Peak memory is rank 0's: CUDA's max allocated on a GPU
(Table 8's "max memory allocated"), the resident set size on a CPU. The job's wall time comes from the
rule's benchmark file and covers its last attempt, evaluations included.
"""
from __future__ import annotations

import statistics
from pathlib import Path

import pandas as pd

from sidcore.errors import UserError
from sidcore.methods import METHOD_NAMES, alpha_text, checked_run
from sidcore.report import markdown, paper
from sidcore.report.logs import read_log

HOURS_PER_10M = 10_000 / 3600  # hours per 10M images at 1 s/kimg
PAPER_SOURCE = "SiDA paper Table 8"


def speed(records: list[dict]) -> float:
    """Median seconds per 1k images over the ticks after the first (or the first, if it is the only one)."""
    ticks = [r["sec_per_kimg"] for r in records if r["tick"] > 0] or [records[0]["sec_per_kimg"]]
    return statistics.median(ticks)


def wall_hours(benchmark: Path) -> float:
    """The job's wall time (column ``s`` of Snakemake's benchmark file) in hours."""
    frame = pd.read_csv(benchmark, sep="\t")
    if "s" not in frame.columns or frame.empty:
        raise UserError(f"{benchmark}: not a Snakemake benchmark file (no `s` column)")
    return float(frame["s"].iloc[-1]) / 3600


def paper_costs() -> dict[tuple[str, str], dict]:
    """Table 8 by (dataset table, method): hardware and metric values."""
    out: dict[tuple[str, str], dict] = {}
    for line in paper.select("cost").itertuples(index=False):
        entry = out.setdefault((line.model, line.method), {"hardware": line.family})
        entry[line.metric] = line.mean
    return out


def row(dataset: str, table: str, method: str, alpha: float, log: Path, benchmark: Path,
        papers: dict[tuple[str, str], dict]) -> dict:
    records = read_log(log)
    last = records[-1]
    for key in ("device", "processes", "batch_gpu", "peak_mem_mb", "sec_per_kimg"):
        if key not in last:
            raise UserError(f"{log}: tick records lack {key!r} (written by an older sidcore; rerun the distillation)")
    sec = speed(records)
    ours = {"dataset": dataset, "method": METHOD_NAMES[method], "alpha": alpha_text(alpha), "device": last["device"],
            "GPUs": last["processes"], "batch per GPU": last["batch_gpu"],
            "peak memory per GPU (GB)": round(max(r["peak_mem_mb"] for r in records) / 1024, 2),
            "s / 1k images": round(sec, 3), "hours per 10M images": round(sec * HOURS_PER_10M, 2),
            "job wall time (h)": round(wall_hours(benchmark), 3), "images seen": round(last["kimg"] * 1000)}
    # Table 8 gives SiD and SiDA; SiD²A runs the SiDA iteration.
    p = papers.get((table, "sida" if method == "sid2a" else method))
    ours.update({"paper: hardware": p["hardware"] if p else "",
                 "paper: batch per GPU": _int(p, "batch_gpu"), "paper: memory per GPU (GB)": _get(p, "mem_alloc_gb"),
                 "paper: s / 1k images": _get(p, "sec_per_kimg"),
                 "paper: hours per 10M images": _get(p, "hours_per_10m")})
    return ours


def _get(entry: dict | None, key: str) -> float | str:
    return entry[key] if entry and key in entry else ""


def _int(entry: dict | None, key: str) -> int | str:
    return int(entry[key]) if entry and key in entry else ""


def write(run_specs: list[tuple[str, str, str, str, str, str]], csv: Path, md: Path, log=print) -> None:
    """The cost table of the runs ``(dataset, table, method, α, log.jsonl, benchmark)`` (CSV, Markdown)."""
    papers = paper_costs()
    rows = [row(d, t, *checked_run(m, a, f"--run {d} {t} {m} {a}"), Path(log), Path(bench), papers)
            for d, t, m, a, log, bench in run_specs]
    frame = pd.DataFrame(rows)
    notes = ["Ours: s / 1k images is the median over the log's ticks after the first, without in-training "
             "evaluations; memory is rank 0's peak (CUDA max allocated, or the resident set size on a CPU); "
             "the job's wall time (Snakemake benchmark, last attempt) includes evaluations and start-up.",
             f"Paper: {PAPER_SOURCE}, max memory allocated per GPU; SiD²A is compared with its SiDA column (the "
             "same iteration). Table 8 has one CIFAR-10 column for both CIFAR-10 tables."]
    markdown.save(frame, csv, md, "Training cost", notes)
    for r in rows:
        log(f"{r['dataset']} {r['method']} α={r['alpha']}: {r['s / 1k images']} s/kimg, "
              f"{r['peak memory per GPU (GB)']} GB, {r['GPUs']} × {r['device']}")
