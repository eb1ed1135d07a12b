"""The resolved settings a job receives: one dataset of config.yaml, merged for one method and alpha.

The workflow resolves them (``resolve``) and passes them as JSON on the command line, so every
job's parameters are explicit and Snakemake reruns exactly the jobs whose settings changed.
"""
from __future__ import annotations

import copy
import json
from typing import Any

METHODS = ("sid", "sida", "sid2a")
ADVERSARIAL = {"sid": False, "sida": True, "sid2a": True}


def resolve(config: dict, dataset: str, method: str | None = None, alpha: float | None = None) -> dict:
    """Settings of ``dataset`` (and of ``method`` at ``alpha``) with the method's overrides applied."""
    if dataset not in config["datasets"]:
        raise KeyError(f"datasets.{dataset}: no such dataset in config.yaml (known: {sorted(config['datasets'])})")
    entry = copy.deepcopy(config["datasets"][dataset])
    methods = entry.pop("methods")
    out = {"dataset": dataset, **entry}
    out["evaluation"] = {**config["evaluation"], **entry.get("evaluation", {})}
    if method is not None:
        if method not in methods:
            raise KeyError(f"datasets.{dataset}.methods.{method}: method not configured")
        spec = methods[method]
        out["method"] = method
        out["alpha"] = float(alpha)
        out["adversarial"] = ADVERSARIAL[method]
        out["init"] = spec.get("init", "teacher")
        by_alpha = spec.get("by_alpha", {}).get(str(float(alpha)), {})
        out["distill"] = {**entry["distill"], **spec.get("distill", {}), **by_alpha}
    return out


# What each per-dataset job reads of the settings. Jobs get only these, so that changing, say, a
# distillation hyper-parameter reruns the distillations and not the data preparation or the teacher.
STAGE_KEYS = {
    "prepare": ("dataset", "data", "resolution", "channels", "label_dim", "latent"),
    "train_teacher": ("dataset", "resolution", "channels", "label_dim", "network", "teacher"),
    "evaluate_teacher": ("dataset", "size", "resolution", "channels", "label_dim", "network", "latent", "detector",
                         "metrics", "evaluation", "teacher_eval"),
}


def for_stage(settings: dict, stage: str) -> dict:
    """The part of ``settings`` a job of ``stage`` reads (see ``STAGE_KEYS``)."""
    return {k: settings[k] for k in STAGE_KEYS[stage] if k in settings}


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
