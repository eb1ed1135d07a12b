"""Mean ± std over evaluation runs (the papers report mean ± std over 10 independent runs)."""
from __future__ import annotations

import json
import os

import numpy as np

from sidcore import atomic
from sidcore.errors import UserError


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
            "nfe": first["nfe"], "kimg": first["kimg"], "runs": len(runs), "num_images": first["num_images"],
            "detector": first["detector"], "detectors": first.get("detectors", {}), "std_ddof": ddof,
            "std": f"{'sample' if ddof == 1 else 'population'} standard deviation (ddof {ddof}) over the runs",
            "seed_base": first.get("seed_base"), "model_sha256": first["model_sha256"],
            "refs_sha256": first["refs_sha256"], "metrics": metrics}


def write_json(obj: dict, path: str | os.PathLike) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    atomic.write_text(path, json.dumps(obj, indent=1) + "\n")
