"""The resolved settings a job receives: one dataset of config.yaml, merged for one method and alpha.

The workflow resolves them (``resolve``) and passes them as JSON on the command line, so every
job's parameters are explicit and Snakemake reruns exactly the jobs whose settings changed. The blocks a
stage reads by name (``distill``, ``evaluation``, ``teacher.train``) are frozen dataclasses, built once
(``resolve``, ``loads``) and holding the only defaults of the optional settings.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from typing import Any, TypeVar

from sidcore.config import check_settings
from sidcore.errors import UserError
from sidcore.methods import ADVERSARIAL, alpha_text

AUGMENT_DIM = 9  # EDM's augmentation labels as the SiD scripts configure the pipeline (sidcore.augment)


STUDIES = ("main", "ablation")  # a dataset's configured runs, and its α ablation (its own budget)


@dataclasses.dataclass(frozen=True)
class Engine:
    """How a stage executes its networks (``sidcore.engine``): levers that change rounding only, all off by
    default (the official computation, operation for operation)."""

    compile: bool = False  # torch.compile every network (Inductor kernels; random ops drawn as in eager mode)
    channels_last: bool = False  # convolution weights and activations in NHWC layout
    fused_attention: bool = False  # PyTorch's scaled_dot_product_attention for the explicit softmax attention
    fused_adam: bool = False  # Adam's fused multi-tensor update (distillation)


@dataclasses.dataclass(frozen=True)
class Distill:
    """``datasets.<d>.distill`` with the method's and the study's overrides (config.yaml documents each)."""

    batch: int
    batch_gpu: int
    lr: float  # fake score ψ
    glr: float  # generator θ
    g_beta1: float
    fp16: bool
    dropout: float
    augment: float
    ema_halflife_kimg: float
    ema_rampup: float | None
    init_sigma: float
    tmax: int
    P_mean: float
    P_std: float
    loss_scaling: float
    loss_scaling_G: float
    loss_scaling_D: float
    loss_scaling_G_gan: float
    clip_fake_grad: float | None
    stage_kimg: tuple[float, float]
    duration_kimg: float
    tick_kimg: float
    snap_ticks: int
    eval_early_ticks: tuple[int, ...]
    eval_first_tick: int
    dump_ticks: int
    keep_snapshots: int
    eval_images: int
    seed: int
    bf16: bool = False  # bfloat16 activations instead of float16 (with fp16)
    force_normalization: bool = True  # EDM2's forced weight normalisation (SiDA may switch it off)
    return_logvar: bool = False  # EDM2: the losses use the teacher's log-variance head
    eval_raw_generator: bool = False  # in-training metrics of the raw G too, beside G_ema's (log keys *_raw)
    engine: Engine = Engine()


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """``evaluation`` with the dataset's overrides: the independent runs of the final evaluation."""

    runs: int
    num_images: int
    batch: int
    seed: int
    std_ddof: int
    fd_dinov2_detector: str
    released: bool
    engine: Engine = Engine()  # of the networks that generate (fused_adam has no use here)


@dataclasses.dataclass(frozen=True)
class TeacherTraining:
    """``datasets.<d>.teacher.train``: EDM training of a teacher (the tiny experiments)."""

    kimg: float
    batch: int
    lr: float
    ema_halflife_kimg: float
    P_mean: float
    P_std: float
    seed: int


Block = TypeVar("Block")
BLOCKS = {"distill": Distill, "evaluation": Evaluation}
NESTED = {"engine": Engine}  # blocks within blocks


def block(kind: type[Block], values: dict, key: str) -> Block:
    """``values`` as ``kind``: a key it does not know, or a required one missing, is an error naming it."""
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"{key}.{unknown[0]}: unknown setting (known: {', '.join(sorted(names))})")
    required = [f.name for f in dataclasses.fields(kind)
                if f.default is dataclasses.MISSING and f.name not in values]
    if required:
        raise UserError(f"{key}.{required[0]}: required")
    nested = {f.name: NESTED[f.name] for f in dataclasses.fields(kind) if f.name in NESTED and f.name in values}
    return kind(**{k: block(nested[k], v, f"{key}.{k}") if k in nested else tuple(v) if isinstance(v, list) else v
                   for k, v in values.items()})


def typed(settings: dict) -> dict:
    """``settings`` (plain, as in config.yaml or JSON) with their blocks as dataclasses."""
    out = dict(settings)
    where = f"datasets.{settings['dataset']}"
    for name, kind in BLOCKS.items():
        if name in out:
            out[name] = block(kind, out[name], name if kind is Evaluation else f"{where}.{name}")
    if "train" in out.get("teacher", {}):
        out["teacher"] = {**out["teacher"], "train": block(TeacherTraining, out["teacher"]["train"],
                                                           f"{where}.teacher.train")}
    return out


def plain(value: Any) -> Any:
    """``value`` with every dataclass as a dict and tuple as a list (JSON's types)."""
    if dataclasses.is_dataclass(value):
        return plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def resolve(config: dict, dataset: str, method: str | None = None, alpha: float | None = None,
            study: str = "main") -> dict:
    """Settings of ``dataset`` (and of ``method`` at ``alpha``) with the method's overrides applied; in the
    ``ablation`` study, the dataset's ``ablation.distill`` overrides on top."""
    if dataset not in config["datasets"]:
        raise UserError(f"datasets.{dataset}: no such dataset in config.yaml (known: {sorted(config['datasets'])})")
    entry = copy.deepcopy(config["datasets"][dataset])
    methods = entry.pop("methods")
    entry.pop("cluster", None)  # where jobs run is no setting of theirs (see cluster_job)
    entry.pop("released", None)  # read by the workflow only (which files a job gets)
    ablation = entry.pop("ablation", None)
    out = {"dataset": dataset, "size": None, "study": study, **entry}  # size: the EDM2 model size
    out["evaluation"] = {**config["evaluation"], **entry.get("evaluation", {})}
    if method is not None:
        if method not in methods:
            raise UserError(f"datasets.{dataset}.methods.{method}: method not configured")
        spec = methods[method]
        out["method"] = method
        out["alpha"] = float(alpha)
        out["adversarial"] = ADVERSARIAL[method]
        out["init"] = spec.get("init")  # SiD²A: {from: sid | released, alpha}; else None (the teacher)
        if study == "ablation" and (ablation is None or method not in ablation["methods"]):
            raise UserError(f"datasets.{dataset}.ablation: no α ablation of {method} configured")
        by_alpha = spec.get("by_alpha", {}).get(alpha_text(alpha), {})
        study_distill = ablation["distill"] if study == "ablation" else {}
        out["distill"] = {**entry["distill"], **spec.get("distill", {}), **by_alpha, **study_distill}
    return typed(out)


# What each per-dataset job reads of the settings. Jobs get only these, so that changing, say, a
# distillation hyper-parameter reruns the distillations and not the data preparation, the teacher or the
# evaluations (a generator snapshot carries how to sample it).
STAGE_KEYS = {
    "prepare": ("dataset", "data", "resolution", "channels", "label_dim", "latent"),
    "train_teacher": ("dataset", "resolution", "channels", "label_dim", "network", "teacher"),
    "evaluate_teacher": ("dataset", "size", "resolution", "channels", "label_dim", "latent", "detector", "metrics",
                         "evaluation", "teacher_eval"),
    "evaluate_generator": ("dataset", "size", "resolution", "channels", "label_dim", "latent", "detector", "metrics",
                           "evaluation", "method", "alpha"),
    "figure": ("dataset", "resolution", "channels", "label_dim", "latent", "teacher_eval", "method", "alpha"),
}


def batch_arithmetic(batch: int, batch_gpu: int, world_size: int) -> tuple[int, int]:
    """(per-GPU images per iteration B_tot, accumulation rounds R) with the official consistency check."""
    if batch % world_size:
        raise UserError(f"distill.batch={batch} is not divisible by the {world_size} GPUs")
    total = batch // world_size
    micro = min(batch_gpu, total)
    if total % micro:
        raise UserError(f"distill.batch_gpu={batch_gpu} does not divide the per-GPU batch {total}")
    return total, total // micro


BLOCK_STRIDE = 1 << 16  # blocks per evaluation run: run r's seeds are base + (r + 1)·2^16 + block, block < 2^16


def num_blocks(num_images: int, batch: int) -> int:
    """Generation blocks of an evaluation run of ``num_images`` images (see ``sidcore.evaluate``)."""
    blocks = math.ceil(num_images / batch)
    if blocks > BLOCK_STRIDE:
        raise UserError(f"evaluation: {num_images} images in batches of {batch} make {blocks} blocks, more than "
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
    return {k: settings[k] for k in STAGE_KEYS[stage] if k in settings}


def dumps(settings: dict) -> str:
    return json.dumps(plain(settings), sort_keys=True, separators=(",", ":"))


# The settings each command reads (what ``resolve`` and ``for_stage`` give its job; optional ones aside).
NEEDS = {
    "prepare-data": ("dataset", "data", "resolution", "channels", "label_dim"),
    "train-teacher": ("dataset", "resolution", "channels", "label_dim", "network", "teacher"),
    "distill": ("dataset", "study", "method", "alpha", "adversarial", "init", "resolution", "channels", "label_dim",
                "network", "distill", "evaluation", "metrics", "detector"),
    "evaluate": ("dataset", "resolution", "channels", "label_dim", "detector", "metrics", "evaluation"),
    "figure": ("dataset", "resolution", "channels", "label_dim"),
}


def from_json(text: str, command: str) -> dict[str, Any]:
    """The settings ``command`` is given with ``--settings``: with what it reads (``NEEDS``), held to
    config.yaml's schema, their blocks typed."""
    value = loads(text, "--settings")
    missing = [key for key in NEEDS[command] if key not in value]
    if missing:
        raise UserError(f"--settings: without {', '.join(map(repr, missing))}, which {command} reads (the workflow "
                        "gives each job its resolved settings)")
    check_settings(value)
    return typed(value)


def loads(text: str, flag: str) -> dict[str, Any]:
    """The JSON object given with ``flag``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{flag} is not valid JSON ({e.msg} at character {e.pos}): {text[:60]!r}") from None
    if not isinstance(value, dict):
        raise UserError(f"{flag} must be a JSON object, not {type(value).__name__}: {text[:60]!r}")
    return value


def sampling(settings: dict) -> dict:
    """What a generator snapshot records of how to sample it: σ_init, and the VAE key of a latent dataset."""
    vae = {"vae": settings["latent"]["vae"]} if "latent" in settings else {}
    return {"init_sigma": settings["distill"].init_sigma, **vae}


def network_settings(settings: dict) -> dict:
    """Constructor settings of the dataset's teacher / generator network."""
    return {"img_resolution": settings["resolution"], "img_channels": settings["channels"],
            "label_dim": settings["label_dim"], **settings["network"]}


def generator_settings(network: dict) -> dict:
    """Constructor settings of the one-step generator distilled from a teacher with settings ``network``:
    the same network, except that an EDM2 generator has no log-variance head."""
    return {**network, "logvar": False} if network.get("arch") == "edm2" else dict(network)
