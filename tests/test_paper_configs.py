"""Every configured paper run passes the preflight on its real settings and runs a distillation iteration of
them on CPU at reduced width: the same architecture, augmentation, stages, log-variance weighting and
normalisation, a VAE stand-in for latent datasets. So no configured run can fail on a setting once it starts."""
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from configured import without_compile

from sidcore import checkpoint, config, preflight, strict_yaml
from sidcore.dataset import write_image_zip, write_latent_zip
from sidcore.distill import Distiller
from sidcore.methods import METHODS
from sidcore.networks import build_network
from sidcore.settings import cluster_job, generator_settings, network_settings, plain, resolve

ROOT = Path(__file__).resolve().parents[1]
CONFIG = config.load(ROOT / "config.yaml", ROOT / config.SCHEMA)
RUNS = [(name, method, alpha) for name, d in CONFIG["datasets"].items() if not name.startswith("tiny")
        for method, spec in d["methods"].items() for alpha in spec["alphas"]]
WIDTH = {"adm": 64, "edm2": 32}  # the narrowest each architecture's attention heads allow; others 16


def reduced(settings: dict) -> dict:
    """``settings`` with a narrow network (one block per level) and a batch of 2 on one process, and the
    configured execution levers but compilation."""
    net = {**settings["network"], "model_channels": WIDTH.get(settings["network"]["arch"], 16), "num_blocks": 1}
    small = without_compile(settings)
    return {**small, "network": net, "distill": replace(small["distill"], batch=2, batch_gpu=2)}


def write_data(path: Path, settings: dict) -> None:
    """Two random items of the dataset's shape; labels 0 and label_dim − 1 give the label count."""
    c, r, k = settings["channels"], settings["resolution"], settings["label_dim"]
    labels = np.array([0, k - 1]) if k else None
    rng = np.random.default_rng(0)
    if "latent" in settings:  # EDM2: posterior mean and std of the SD VAE's latents
        stats = np.concatenate([rng.standard_normal((2, c, r, r)), np.full((2, c, r, r), 0.1)], axis=1)
        write_latent_zip(path, [stats.astype(np.float32)], labels)
    else:
        write_image_zip(path, rng.integers(0, 256, (2, c, r, r), dtype=np.uint8), labels)


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> Path:
    from diffusers import AutoencoderKL
    root = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  layers_per_block=1, norm_num_groups=4).save_pretrained(root)
    return root


def test_every_dataset_and_method_of_the_papers_is_configured():
    runs = {(name, method) for name, method, _ in RUNS}
    datasets = {"cifar10-uncond", "cifar10-cond", "imagenet64-cond", "ffhq64", "afhq64-v2",
                *(f"edm2-{s}" for s in ("xs", "s", "m", "l", "xl", "xxl"))}
    assert runs == {(d, m) for d in datasets for m in ("sid", "sida", "sid2a")}


def test_cifar10_ablation_runs_the_papers_alphas_for_its_first_20k_iterations():
    ablation = CONFIG["datasets"]["cifar10-uncond"]["ablation"]
    assert ablation["methods"] == ["sida", "sid2a"] and ablation["alphas"] == [0.0, 0.5, 1.0, 1.2, 1.5]
    for method in ablation["methods"]:
        for alpha in ablation["alphas"]:
            study = resolve(CONFIG, "cifar10-uncond", method, alpha, "ablation")["distill"]
            assert study.duration_kimg * 1000 / study.batch == 20_000
            main = resolve(CONFIG, "cifar10-uncond", method, alpha)["distill"]
            assert replace(main, duration_kimg=study.duration_kimg) == study  # only the budget differs


def test_an_ablation_of_a_method_not_configured_is_refused():
    config = {"datasets": {"x": {"methods": {"sid": {"alphas": [1.0]}},
                                 "ablation": {"methods": ["sida"], "alphas": [0.0], "distill": {}}}}}
    with pytest.raises(ValueError, match="datasets.x.ablation.methods: sida is not configured under methods"):
        preflight.check_config(config)
    with pytest.raises(ValueError, match="datasets.x.ablation: no α ablation of sid configured"):
        resolve({**config, "evaluation": {}}, "x", "sid", 1.0, "ablation")


def distinct(runs: list[tuple]) -> list[tuple]:
    """The first of each group of runs whose reduced settings differ only in α (a coefficient of the loss, not
    a path through the code)."""
    seen, out = set(), []
    for run in runs:
        small = plain(reduced(resolve(CONFIG, *run)))
        key = json.dumps({k: v for k, v in small.items() if k not in ("dataset", "table", "alpha")}, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(run)
    return out


ITERATED = distinct(RUNS)


@pytest.mark.parametrize("name, method, alpha", RUNS, ids=[f"{n}-{m}-{a}" for n, m, a in RUNS])
def test_configured_run_passes_preflight(name, method, alpha):
    settings = resolve(CONFIG, name, method, alpha)
    job = cluster_job(CONFIG, name, "distill")
    preflight.check_distill(settings, job["nodes"] * job["gpus_per_node"])  # the real batch on the real GPUs
    preflight.check_evaluation(settings)


@pytest.mark.slow
@pytest.mark.parametrize("name, method, alpha", ITERATED, ids=[f"{n}-{m}-{a}" for n, m, a in ITERATED])
def test_configured_run_iterates_at_reduced_width(name, method, alpha, tmp_path, vae):
    settings = resolve(CONFIG, name, method, alpha)
    small = reduced(settings)
    network = network_settings(small)
    if network["arch"] == "edm2":
        network["logvar"] = True  # EDM2 teachers carry the log-variance head
    torch.manual_seed(0)
    checkpoint.save_atomic(checkpoint.network_snapshot(build_network(**network), network), tmp_path / "teacher.pt")
    write_data(tmp_path / "data.zip", small)
    init = None
    if small["init"] is not None:  # SiD²A: a SiD generator of the same network to start from
        gen = generator_settings(network)
        init = tmp_path / "sid.pt"
        checkpoint.save_atomic(checkpoint.network_snapshot(build_network(**gen), gen), init)
    out = tmp_path / "run"
    out.mkdir()
    distiller = Distiller(small, tmp_path / "teacher.pt", tmp_path / "data.zip", out, init_path=init,
                          vae_path=str(vae) if "latent" in small else None)
    assert (distiller.loss.augment is not None) == (settings["distill"].augment > 0)
    start = [p.clone() for p in distiller.fake_score.parameters()]
    stages = []
    starts = sorted({0, *settings["distill"].stage_kimg}) if settings["adversarial"] else [0]
    for kimg in starts:  # an iteration in every stage the run goes through
        distiller.cur_nimg = int(kimg * 1000) + (kimg > 0) * 2
        stats: dict = {}
        stages.append(distiller.iteration(stats))
        losses = {k: float(v) for k, v in stats.items() if k.startswith("loss")}
        assert losses and all(np.isfinite(v) for v in losses.values()), (stages[-1], losses)
    assert stages == ([1, 2, 3] if settings["adversarial"] else [2])
    assert any(not torch.equal(a, b) for a, b in zip(start, distiller.fake_score.parameters()))


def test_the_schema_names_exactly_the_methods_sidcore_defines():
    """The schema validates each method's block by name; the names are sidcore.methods.METHODS."""
    dataset = strict_yaml.load(ROOT / config.SCHEMA)["$defs"]["dataset"]["properties"]
    assert tuple(dataset["methods"]["properties"]) == METHODS
    assert tuple(dataset["released"]["properties"]) == METHODS
    assert tuple(dataset["ablation"]["properties"]["methods"]["items"]["enum"]) == METHODS
