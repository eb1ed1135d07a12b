"""Mean ± std over evaluation runs (the papers report mean ± std over 10 independent runs)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from sidcore import atomic
from sidcore.errors import UserError
from sidcore.settings import loads

# What the readers of each file need: an evaluation run (``sidcore evaluate``) and a summary (``summarize``).
RUN_KEYS = ("run", "seeds", "metrics", "dataset", "method", "alpha", "source", "nfe", "kimg", "num_images",
            "detector", "model_sha256", "refs_sha256")
SUMMARY_KEYS = ("table", "method", "metrics", "nfe")  # what a table row reads


def read_json(path: str | os.PathLike, what: str, keys: tuple[str, ...]) -> dict:
    """The JSON object in ``path``, ``what`` (e.g. "an evaluation run") with ``keys``; anything else is a
    ``UserError`` naming the file."""
    value = loads(Path(path).read_text(encoding="utf-8", errors="replace"), str(path))
    missing = [key for key in keys if key not in value]
    if missing:
        raise UserError(f"{path}: {what} without {', '.join(map(repr, missing))}; write it again with the command "
                        "that makes it")
    return value


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_run(path: str | os.PathLike) -> dict:
    """An evaluation run record (``run{r}.json``): its metrics are numbers."""
    run = read_json(path, "an evaluation run", RUN_KEYS)
    if not isinstance(run["metrics"], dict) or not all(map(_number, run["metrics"].values())):
        raise UserError(f"{path}: an evaluation run whose metrics are not all numbers")
    return run


def read_summary(path: str | os.PathLike, metric: str | None = None,
                 keys: tuple[str, ...] = SUMMARY_KEYS) -> dict:
    """An evaluation summary (``summary.json``) with ``keys``: each metric a mean and a std (and ``metric``
    among them)."""
    summary = read_json(path, "an evaluation summary", keys)
    metrics = summary["metrics"]
    if not isinstance(metrics, dict) or not all(isinstance(m, dict) and _number(m.get("mean")) and
                                                _number(m.get("std")) for m in metrics.values()):
        raise UserError(f"{path}: an evaluation summary whose metrics are not each a mean and a std")
    if metric is not None and (metric not in metrics or not math.isfinite(metrics[metric]["mean"])):
        raise UserError(f"{path}: an evaluation summary without a {metric} (it has: {', '.join(metrics)})")
    return summary


def summarize(runs: list[dict], table: str, ddof: int) -> dict:
    """Mean ± std over runs of every metric (std with ``ddof``: 1 = sample standard deviation)."""
    if not runs:
        raise UserError("no evaluation runs to summarise")
    first = runs[0]
    for r in runs[1:]:
        for key in ("dataset", "method", "alpha", "source", "model_sha256", "refs_sha256", "num_images", "detector"):
            if r.get(key) != first.get(key):
                raise UserError(f"evaluation runs disagree on {key}: {first.get(key)!r} vs {r.get(key)!r}")
    seen: dict[int, int] = {}
    for r in runs:
        for seed in r["seeds"]:
            if seed in seen:
                raise UserError(f"evaluation runs {seen[seed]} and {r['run']} share seed {seed}")
            seen[seed] = r["run"]
    metrics = {}
    for name in first["metrics"]:
        values = np.array([r["metrics"][name] for r in runs], dtype=np.float64)
        std = float(values.std(ddof=ddof)) if len(values) > ddof else float("nan")
        metrics[name] = {"mean": float(values.mean()), "std": std, "values": values.tolist()}
    return {"dataset": first["dataset"], "table": table, "size": first.get("size"), "method": first["method"],
            "alpha": first["alpha"], "source": first["source"], "released_key": first.get("released_key"),
            "nfe": first["nfe"], "kimg": first["kimg"], "start_kimg": first.get("start_kimg"), "runs": len(runs),
            "num_images": first["num_images"],
            "detector": first["detector"], "detectors": first.get("detectors", {}), "std_ddof": ddof,
            "std": f"{'sample' if ddof == 1 else 'population'} standard deviation (ddof {ddof}) over the runs",
            "seed_base": first.get("seed_base"), "model_sha256": first["model_sha256"],
            "refs_sha256": first["refs_sha256"], "metrics": metrics}


def write_json(obj: dict, path: str | os.PathLike) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    atomic.write_text(path, json.dumps(obj, indent=1) + "\n")
