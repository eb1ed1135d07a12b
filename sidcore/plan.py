"""The GPU jobs of a table, described for its bill (``sidcore plan``, ``sidcore.report.bill``): built by the
workflow from each job's resolved settings, light enough to import where Snakemake parses the workflow."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sidcore.settings import network_settings


def _common(settings: dict, stage: str, gpus: int, outputs: list[str]) -> dict:
    """What every job's bill reads: its networks, its evaluation's detectors and where its outputs go."""
    return {"stage": stage, "dataset": settings["dataset"], "table": settings["table"], "gpus": gpus,
            "outputs": outputs, "network": network_settings(settings), "detector": settings["detector"]["name"],
            "metrics": list(settings["metrics"]), "latent": "latent" in settings}


def distill_job(settings: dict, gpus: int, run_dir: str) -> dict:
    """A distillation into ``run_dir``: its budget and the schedule of its in-training evaluations."""
    d = settings["distill"]
    return {**_common(settings, "distill", gpus, [f"{run_dir}/generator.pt"]), "run_dir": run_dir,
            "method": settings["method"], "alpha": settings["alpha"], "duration_kimg": d.duration_kimg,
            "tick_kimg": d.tick_kimg, "batch": d.batch, "eval_images": d.eval_images, "snap_ticks": d.snap_ticks,
            "eval_early_ticks": list(d.eval_early_ticks), "eval_first_tick": d.eval_first_tick}


def evaluation_job(settings: dict, gpus: int, model: str, outputs: list[str]) -> dict:
    """The evaluation runs ``outputs`` of ``model`` (``teacher``: sampled in ``teacher_eval.num_steps`` steps, or a
    one-step generator's name)."""
    steps = settings["teacher_eval"]["num_steps"] if model == "teacher" else None
    return {**_common(settings, "evaluate", gpus, outputs), "model": model, "teacher_steps": steps,
            "num_images": settings["evaluation"].num_images}


def encode_job(settings: dict, gpus: int, output: str) -> dict:
    """The VAE encoding of a latent dataset's image folder into ``output``."""
    return {**_common(settings, "encode", gpus, [output]), "source": settings["data"]["path"]}


def dumps(jobs: list[dict]) -> str:
    """The jobs as ``sidcore plan --jobs`` takes them."""
    return json.dumps({"jobs": jobs}, sort_keys=True, separators=(",", ":"))


def state(jobs: list[dict]) -> str:
    """A digest of what the bill reads from disk (outputs present, progress logs' sizes): it changes when a
    job progresses, so that Snakemake writes the bill again."""
    from sidcore.progress_log import FILE  # imports torch: only when a bill is planned
    seen = [(p, Path(p).exists()) for job in jobs for p in job["outputs"]]
    logs = [Path(job["run_dir"]) / FILE for job in jobs if "run_dir" in job]
    seen += [(str(log), log.stat().st_size if log.exists() else -1) for log in logs]
    return hashlib.sha256(json.dumps(seen).encode()).hexdigest()[:16]
