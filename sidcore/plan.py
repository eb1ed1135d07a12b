"""The long jobs of a table (its GPU stages and the CPU teacher training), described for its bill (``sidcore
plan``, ``sidcore.report.bill``): built by the workflow from each job's resolved settings, with the files it
waits for (``after``: other jobs' outputs), light enough to import where Snakemake parses the workflow."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sidcore.errors import UserError
from sidcore.settings import loads, network_settings

COMMON_KEYS = ("stage", "dataset", "table", "gpus", "local", "outputs", "after", "network", "detector", "metrics",
               "latent")
STAGE_KEYS = {"distill": ("run_dir", "method", "alpha", "duration_kimg", "tick_kimg", "batch", "eval_images",
                          "snap_ticks", "eval_early_ticks", "eval_first_tick"),
              "evaluate": ("model", "teacher_steps", "num_images"),
              "encode": ("source",),
              "train_teacher": ("kimg", "batch")}
CPU_STAGES = ("train_teacher",)  # run on CPU cores wherever they run; the others on the GPUs they are given


def _common(settings: dict, stage: str, gpus: int, local: bool, outputs: list[str], after: list[str]) -> dict:
    """What every job's bill reads: its networks, its evaluation's detectors, where it runs (``local``: on this
    machine), where its outputs go and what it waits for."""
    return {"stage": stage, "dataset": settings["dataset"], "table": settings["table"], "gpus": gpus,
            "local": local, "outputs": outputs, "after": after, "network": network_settings(settings),
            "detector": settings["detector"]["name"], "metrics": list(settings["metrics"]),
            "latent": "latent" in settings}


def teacher_training_job(settings: dict, output: str) -> dict:
    """The training of a teacher from scratch (``teacher.train``: the tiny experiments), a CPU job that waits
    for no other job of the bill."""
    t = settings["teacher"]["train"]
    return {**_common(settings, "train_teacher", 0, False, [output], []), "kimg": t.kimg, "batch": t.batch}


def distill_job(settings: dict, gpus: int, local: bool, run_dir: str, after: list[str]) -> dict:
    """A distillation into ``run_dir``: its budget and the schedule of its in-training evaluations."""
    d = settings["distill"]
    return {**_common(settings, "distill", gpus, local, [f"{run_dir}/generator.pt"], after), "run_dir": run_dir,
            "method": settings["method"], "alpha": settings["alpha"], "duration_kimg": d.duration_kimg,
            "tick_kimg": d.tick_kimg, "batch": d.batch, "eval_images": d.eval_images, "snap_ticks": d.snap_ticks,
            "eval_early_ticks": list(d.eval_early_ticks), "eval_first_tick": d.eval_first_tick}


def evaluation_job(settings: dict, gpus: int, local: bool, model: str, outputs: list[str], after: list[str]) -> dict:
    """The evaluation runs ``outputs`` of ``model`` (``teacher``: sampled in ``teacher_eval.num_steps`` steps, or a
    one-step generator's name)."""
    steps = settings["teacher_eval"]["num_steps"] if model == "teacher" else None
    return {**_common(settings, "evaluate", gpus, local, outputs, after), "model": model, "teacher_steps": steps,
            "num_images": settings["evaluation"].num_images}


def encode_job(settings: dict, gpus: int, local: bool, output: str) -> dict:
    """The VAE encoding of a latent dataset's image folder into ``output``."""
    return {**_common(settings, "encode", gpus, local, [output], []), "source": settings["data"]["path"]}


def loads_jobs(text: str, flag: str) -> list[dict]:
    """The jobs of ``dumps``, each with the keys its stage's description has."""
    jobs = loads(text, flag).get("jobs")
    if not isinstance(jobs, list):
        raise UserError(f"{flag}: a JSON object with a list 'jobs' (the workflow writes it), not {text[:60]!r}")
    for number, job in enumerate(jobs):
        stage = job.get("stage") if isinstance(job, dict) else None
        if stage not in STAGE_KEYS:
            raise UserError(f"{flag}: jobs[{number}] is not a job of a stage {', '.join(STAGE_KEYS)}")
        missing = [key for key in COMMON_KEYS + STAGE_KEYS[stage] if key not in job]
        if missing:
            raise UserError(f"{flag}: jobs[{number}] ({stage}) without {', '.join(map(repr, missing))}")
    return jobs


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
