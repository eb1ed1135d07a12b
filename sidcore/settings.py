"""The resolved settings a job receives: one dataset of config.yaml, merged for one method and alpha.

The workflow resolves them (``resolve``) and passes them as JSON on the command line, so every
job's parameters are explicit and Snakemake reruns exactly the jobs whose settings changed.
"""
from __future__ import annotations

import copy
import json
import math
from typing import Any

METHODS = ("sid", "sida", "sid2a")
AUGMENT_DIM = 9  # EDM's augmentation labels as the SiD scripts configure the pipeline (sidcore.augment)
ADVERSARIAL = {"sid": False, "sida": True, "sid2a": True}


def alpha_key(alpha: float | str) -> str:
    """An alpha as config keys, paths and job names write it: "1.0", "1.2"."""
    return str(float(alpha))


STUDIES = ("main", "ablation")  # a dataset's configured runs, and its α ablation (its own budget)


def resolve(config: dict, dataset: str, method: str | None = None, alpha: float | None = None,
            study: str = "main") -> dict:
    """Settings of ``dataset`` (and of ``method`` at ``alpha``) with the method's overrides applied; in the
    ``ablation`` study, the dataset's ``ablation.distill`` overrides on top."""
    if dataset not in config["datasets"]:
        raise KeyError(f"datasets.{dataset}: no such dataset in config.yaml (known: {sorted(config['datasets'])})")
    entry = copy.deepcopy(config["datasets"][dataset])
    methods = entry.pop("methods")
    entry.pop("cluster", None)  # where jobs run is no setting of theirs (see cluster_job)
    entry.pop("released", None)  # read by the workflow only (which files a job gets)
    ablation = entry.pop("ablation", None)
    out = {"dataset": dataset, **entry}
    out["evaluation"] = {**config["evaluation"], **entry.get("evaluation", {})}
    if method is not None:
        if method not in methods:
            raise KeyError(f"datasets.{dataset}.methods.{method}: method not configured")
        spec = methods[method]
        out["method"] = method
        out["alpha"] = float(alpha)
        out["adversarial"] = ADVERSARIAL[method]
        out["init"] = spec.get("init")  # SiD²A: {from: sid | released, alpha}; else None (the teacher)
        if study == "ablation" and (ablation is None or method not in ablation["methods"]):
            raise KeyError(f"datasets.{dataset}.ablation: no α ablation of {method} configured")
        by_alpha = spec.get("by_alpha", {}).get(alpha_key(alpha), {})
        study_distill = ablation["distill"] if study == "ablation" else {}
        out["distill"] = {**entry["distill"], **spec.get("distill", {}), **by_alpha, **study_distill}
        out["study"] = study
    return out


# What each per-dataset job reads of the settings. Jobs get only these, so that changing, say, a
# distillation hyper-parameter reruns the distillations and not the data preparation or the teacher.
STAGE_KEYS = {
    "prepare": ("dataset", "data", "resolution", "channels", "label_dim", "latent"),
    "train_teacher": ("dataset", "resolution", "channels", "label_dim", "network", "teacher"),
    "evaluate_teacher": ("dataset", "size", "resolution", "channels", "label_dim", "network", "latent", "detector",
                         "metrics", "evaluation", "teacher_eval"),
    "evaluate_released": ("dataset", "size", "resolution", "channels", "label_dim", "network", "latent", "detector",
                          "metrics", "evaluation", "method", "alpha"),
}
# Distillation settings a stage reads besides its STAGE_KEYS.
STAGE_DISTILL_KEYS = {"evaluate_released": ("init_sigma",)}


def batch_arithmetic(batch: int, batch_gpu: int, world_size: int) -> tuple[int, int]:
    """(per-GPU images per iteration B_tot, accumulation rounds R) with the official consistency check."""
    if batch % world_size:
        raise ValueError(f"distill.batch={batch} is not divisible by the {world_size} GPUs")
    total = batch // world_size
    micro = min(batch_gpu, total)
    if total % micro:
        raise ValueError(f"distill.batch_gpu={batch_gpu} does not divide the per-GPU batch {total}")
    return total, total // micro


BLOCK_STRIDE = 1 << 16  # blocks per evaluation run: run r's seeds are base + (r + 1)·2^16 + block, block < 2^16


def num_blocks(num_images: int, batch: int) -> int:
    """Generation blocks of an evaluation run of ``num_images`` images (see ``sidcore.evaluate``)."""
    blocks = math.ceil(num_images / batch)
    if blocks > BLOCK_STRIDE:
        raise ValueError(f"evaluation: {num_images} images in batches of {batch} make {blocks} blocks, more than "
                         f"{BLOCK_STRIDE}; raise evaluation.batch")
    return blocks


GPU_STAGES = ("distill", "evaluate", "encode")


def cluster_job(config: dict, dataset: str, stage: str) -> dict:
    """Resources of ``dataset``'s ``stage`` job: config.yaml's ``cluster.jobs`` with the dataset's overrides.
    GPU stages get ``partition``, the CPU rules (stage ``cpu``) ``cpu_partition``."""
    cluster, own = config["cluster"], config["datasets"][dataset].get("cluster", {})
    job = {**cluster["jobs"][stage], **own.get("jobs", {}).get(stage, {})}
    gpu = stage in GPU_STAGES
    job["partition"] = own.get("partition", cluster["partition"]) if gpu else cluster["cpu_partition"]
    for key in ("account", "qos") + (("signal_delay_s", "max_requeues") if gpu else ()):
        job[key] = cluster[key]
    return job


def for_stage(settings: dict, stage: str) -> dict:
    """The part of ``settings`` a job of ``stage`` reads (see ``STAGE_KEYS``)."""
    out = {k: settings[k] for k in STAGE_KEYS[stage] if k in settings}
    if stage in STAGE_DISTILL_KEYS:
        out["distill"] = {k: settings["distill"][k] for k in STAGE_DISTILL_KEYS[stage]}
    return out


def dumps(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True, separators=(",", ":"))


def loads(text: str) -> dict[str, Any]:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--settings is not valid JSON: {e}") from e


def network_settings(settings: dict) -> dict:
    """Constructor settings of the dataset's teacher / generator network."""
    return {"img_resolution": settings["resolution"], "img_channels": settings["channels"],
            "label_dim": settings["label_dim"], **settings["network"]}


def generator_settings(network: dict) -> dict:
    """Constructor settings of the one-step generator distilled from a teacher with settings ``network``:
    the same network, except that an EDM2 generator has no log-variance head."""
    return {**network, "logvar": False} if network.get("arch") == "edm2" else dict(network)
