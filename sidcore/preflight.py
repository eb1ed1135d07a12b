"""What a job would refuse, refused before any job starts.

The workflow runs ``check_config`` on config.yaml when Snakemake loads it, and the checks of one run's
resolved settings (``check_distill``, ``check_schedule``, ``check_evaluation``, ``check_data_source``,
``check_data_shape``) both there, for every configured run, and in the commands themselves, so the two cannot
drift. Every error names the config key. Nothing here imports torch: Snakemake runs it on the login node at
every call.
"""
from __future__ import annotations

import math
import os
from typing import Any

from sidcore.config import non_finite
from sidcore.errors import UserError
from sidcore.methods import alpha_text
from sidcore.settings import AUGMENT_DIM, batch_arithmetic, num_blocks

LOCAL_SOURCES = ("image-folder", "vae-latents", "edm-zip")  # data sources read from data.path


def where(settings: dict) -> str:
    """The config key of a run: ``datasets.<name>.methods.<method> (alpha a)``, or of its dataset."""
    key = f"datasets.{settings['dataset']}"
    if settings["study"] == "ablation":
        key += f".ablation ({settings['method']}, alpha {settings['alpha']})"
    elif "method" in settings:
        key += f".methods.{settings['method']} (alpha {settings['alpha']})"
    return key


def check_config(config: dict) -> None:
    """Values of config.yaml that the schema cannot refuse: non-finite numbers, by_alpha keys, SiD²A's start."""
    bad = sorted(set(non_finite({k: v for k, v in config.items() if not k.startswith("_")})))
    if bad:
        raise UserError(f"{bad[0]}: NaN or infinity is not a usable value" +
                         (f" (also: {', '.join(bad[1:])})" if len(bad) > 1 else ""))
    for name, d in config["datasets"].items():
        for method, spec in d["methods"].items():
            key = f"datasets.{name}.methods.{method}"
            alphas = [alpha_text(a) for a in spec["alphas"]]
            if len(set(alphas)) != len(alphas):
                raise UserError(f"{key}.alphas: {spec['alphas']} names an alpha twice")
            for k in spec.get("by_alpha", {}):
                if not isinstance(k, str):
                    raise UserError(f"{key}.by_alpha: key {k!r} is read as a number, and by_alpha's keys are the "
                                     f"alphas' text: quote it (\"{alpha_text(k)}\": ...)")
                if alpha_text(k) != k:
                    raise UserError(f"{key}.by_alpha: key {k!r} is not written as the alpha is ({alpha_text(k)!r}); "
                                     f"it would never apply: write \"{alpha_text(k)}\"")
                if k not in alphas:
                    raise UserError(f"{key}.by_alpha: alpha {k} is not run (alphas: {', '.join(alphas)})")
        if "sid2a" in d["methods"]:
            check_init(config, name)
        if "ablation" in d:
            check_ablation(d["ablation"], d["methods"], f"datasets.{name}.ablation")


def check_ablation(ablation: dict, methods: dict, key: str) -> None:
    """An α ablation runs configured methods: their settings apply."""
    for method in ablation["methods"]:
        if method not in methods:
            raise UserError(f"{key}.methods: {method} is not configured under methods (configured: "
                             f"{', '.join(methods)})")


def check_init(config: dict, dataset: str) -> None:
    """SiD²A's starting generator must be made by this config: a SiD run of the dataset, or a released file."""
    d = config["datasets"][dataset]
    init = d["methods"]["sid2a"]["init"]
    key = f"datasets.{dataset}.methods.sid2a.init"
    alpha = alpha_text(init["alpha"])
    if init["from"] == "sid":
        alphas = [alpha_text(a) for a in d["methods"].get("sid", {}).get("alphas", [])]
        if alpha not in alphas:
            raise UserError(f"{key}: starts from SiD alpha {alpha}, which datasets.{dataset}.methods.sid does not "
                             f"run (alphas: {', '.join(alphas) or 'none'})")
    else:
        released = {alpha_text(a) for a in d.get("released", {}).get("sid", {})}
        if alpha not in released:
            raise UserError(f"{key}: starts from the released SiD generator of alpha {alpha}, which "
                             f"datasets.{dataset}.released.sid does not list (it has: "
                             f"{', '.join(sorted(released)) or 'none'})")


def check_network(settings: dict) -> None:
    """A network its constructor can build for the data: each level of ``channel_mult`` halves the resolution, so
    the resolution must divide by 2 per level; an attention resolution must be one of the levels'."""
    net, res, key = settings["network"], settings["resolution"], f"datasets.{settings['dataset']}"
    levels = len(net.get("channel_mult", ()))
    if levels and res % 2 ** (levels - 1):
        raise UserError(f"{key}.network.channel_mult: {levels} levels halve the resolution {levels - 1} times, "
                        f"which resolution {res} does not allow (it must divide by {2 ** (levels - 1)})")
    sizes = [res >> level for level in range(levels)]
    unused = [r for r in net.get("attn_resolutions", ()) if levels and r not in sizes]
    if unused:
        raise UserError(f"{key}.network.attn_resolutions: {unused} is not among the network's resolutions "
                        f"{sizes}, so it would never apply")


def check_distill(settings: dict, world_size: int) -> tuple[int, int]:
    """Settings ``sidcore distill`` cannot run with ``world_size`` processes; returns (per-process batch,
    accumulation rounds)."""
    check_network(settings)
    d, net, key = settings["distill"], settings["network"], where(settings)
    arch = net["arch"]
    g_start, gan_start = d.stage_kimg
    if gan_start < g_start:
        raise UserError(f"{key}: distill.stage_kimg={list(d.stage_kimg)} must not decrease (generator start, then "
                        "adversarial start)")
    if d.bf16 and not d.fp16:
        raise UserError(f"{key}: distill.bf16 needs distill.fp16: true (bf16 only picks the half type)")
    if d.augment > 0:
        if arch == "edm2":
            raise UserError(f"{key}: distill.augment={d.augment}: EDM2 networks take no augmentation labels; "
                            "set it to 0")
        if net.get("augment_dim") != AUGMENT_DIM:
            raise UserError(f"{key}: distill.augment={d.augment} needs network.augment_dim: {AUGMENT_DIM} "
                            "(the augmentation labels the networks are conditioned on)")
    if d.return_logvar and arch != "edm2":
        raise UserError(f"{key}: distill.return_logvar needs an EDM2 teacher (network.arch is {arch})")
    if settings["adversarial"] and arch == "ncsnpp":
        raise UserError(f"{key}: {settings['method']} needs the fake score's encoder output, which NCSN++ "
                        "(network.arch ncsnpp) does not provide")
    try:
        return batch_arithmetic(d.batch, d.batch_gpu, world_size)
    except ValueError as e:
        raise UserError(f"{key} with {world_size} processes (cluster.jobs.distill: nodes × gpus_per_node): "
                        f"{e}") from None


def check_schedule(settings: dict) -> None:
    """A configured run whose schedule ends before it matters: SiDA's / SiD²A's generator or adversarial stage
    starting at or after the run's end (SiD has no stages), or in-training evaluation starting after the last
    tick. (The library runs such a schedule, e.g. to watch the discriminator against a frozen generator; the
    workflow and ``sidcore distill`` do not.)"""
    d, key = settings["distill"], where(settings)
    if settings["adversarial"] and max(d.stage_kimg) >= d.duration_kimg:
        what = "the generator" if d.stage_kimg[0] >= d.duration_kimg else "the adversarial loss"
        raise UserError(f"{key}: distill.stage_kimg={list(d.stage_kimg)} starts {what} at or after the run's end "
                        f"(duration_kimg {d.duration_kimg}), so it would never train")
    ticks = math.ceil(d.duration_kimg / d.tick_kimg)
    if d.eval_first_tick > ticks:
        raise UserError(f"{key}: distill.eval_first_tick={d.eval_first_tick} is past the run's last tick ({ticks} "
                        f"ticks of {d.tick_kimg} kimg): only the end would be evaluated")


def check_evaluation(settings: dict) -> None:
    """Evaluation settings no run can use: too many generation blocks per run (final, and in-training)."""
    evaluation = settings["evaluation"]
    counts = [evaluation.num_images]
    if "distill" in settings:  # a distillation's in-training evaluation
        counts.append(settings["distill"].eval_images)
    for n in counts:
        try:
            num_blocks(n, evaluation.batch)
        except ValueError as e:
            raise UserError(f"datasets.{settings['dataset']}.{e}") from None


def check_data_source(settings: dict) -> None:
    """A data source read from a local path needs that path to exist (``prepare-data`` reads it)."""
    data, key = settings["data"], f"datasets.{settings['dataset']}.data"
    if data["source"] not in LOCAL_SOURCES:
        return
    if "path" not in data:
        raise UserError(f"{key}.path: required for source {data['source']}")
    path = data["path"]
    want_file = data["source"] == "edm-zip"
    if not (os.path.isfile(path) if want_file else os.path.isdir(path)):
        kind = "EDM zip" if want_file else "image folder"
        raise UserError(f"{key}.path: {path} is not an existing {kind} (source {data['source']}); download the "
                         "data and point this key at it")


def check_data_shape(settings: dict, data: Any) -> None:
    """The data (an ``ImageDataset``) must have the channels, resolution and classes config.yaml gives the
    networks."""
    want = (settings["channels"], settings["resolution"], settings["label_dim"])
    have = (data.channels, data.resolution, data.label_dim)
    if have != want:
        raise UserError(f"datasets.{settings['dataset']}: config says channels/resolution/label_dim = {want}, "
                         f"the data has {have}")
