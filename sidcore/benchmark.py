"""``sidcore benchmark``: speed, peak memory and overhead of one distillation iteration, and evaluation
throughput, with the execution levers of ``sidcore.engine`` off (eager), one at a time, and all together.

A layout is a dataset of config.yaml (its network, losses, augmentation and dropout) at a batch one CPU or
GPU holds; the iteration runs in its method's last stage and never evaluates or saves. Besides a whole
iteration the benchmark times, alone, the network passes the algorithm requires:

- fake-score step: G forward without gradient, fake score forward/backward (SiDA: plus its encoder
  pass on real images);
- generator step: G forward/backward, with the teacher and the fake score forward/backward to their inputs.

The overhead share is the part of an iteration spent outside those passes (data, noise, losses, optimisers,
EMA, bookkeeping). The first iteration is timed apart: beyond the steady state it holds the compilation,
where there is one. Evaluation throughput is images per second through the one-step generator and the
detector at the evaluation batch. Each configuration runs in its own process, so peak memory (RSS on the
CPU, CUDA max allocated on a GPU) is its own. Random weights and data: speed does not depend on them; an
EDM2 layout's latents are random (the VAE takes no part in an iteration, and the throughput stops at the
latents). The detector is the dataset's architecture with random weights (Inception for every paper
dataset), left eager: it defines the metric, so no lever touches it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sidcore import config
from sidcore.errors import UserError
from sidcore.settings import Engine, generator_settings, network_settings, resolve

# layout: (dataset of config.yaml, images per iteration on one process, images per evaluation batch)
LAYOUTS = {
    "tiny": ("tiny", 64, 500),
    "cifar10": ("cifar10-uncond", 8, 50),
    "imagenet64": ("imagenet64-cond", 2, 8),
    "edm2-xs": ("edm2-xs", 4, 16),
}
METHODS = ("sid", "sida")
LEVERS = tuple(f.name for f in dataclasses.fields(Engine))
ENGINES = {"eager": Engine(), **{lever: Engine(**{lever: True}) for lever in LEVERS},
           "all": Engine(**{lever: True for lever in LEVERS})}
CONFIG = "config.yaml"  # read from the repository root, where the benchmark runs


def settings(layout: str, method: str, engine: Engine) -> dict:
    """The layout's dataset settings of ``method`` on one process, in its last stage, never evaluating or
    saving, with ``engine``."""
    dataset, batch, eval_batch = LAYOUTS[layout]
    s = resolve(config.load(CONFIG), dataset, method, 1.0)
    distill = dataclasses.replace(
        s["distill"], batch=batch, batch_gpu=batch, clip_fake_grad=1.0 if method == "sida" else None,
        stage_kimg=(0, 0), duration_kimg=1e9, tick_kimg=1e9, snap_ticks=1 << 30, eval_early_ticks=(),
        dump_ticks=1 << 30, seed=0, engine=engine)
    evaluation = dataclasses.replace(s["evaluation"], batch=eval_batch, engine=engine)
    s.pop("latent", None)  # the loop reads latents; only evaluation decodes them
    return {**s, "dataset": f"benchmark-{layout}", "distill": distill, "evaluation": evaluation, "init": None}


def write_inputs(root: Path, s: dict, images: int) -> tuple[Path, Path]:
    """A random dataset of ``images`` (images, or EDM2 latent statistics) and a random teacher in ``root``."""
    from sidcore import checkpoint
    from sidcore.dataset import write_image_zip, write_latent_zip
    from sidcore.networks import build_network

    rng = np.random.default_rng(0)
    c, r, classes = s["channels"], s["resolution"], s["label_dim"]
    labels = rng.integers(0, classes, images) if classes else None
    data = root / "data.zip"
    if s["data"].get("source") == "vae-latents":
        mean_std = np.concatenate([rng.standard_normal((images, c, r, r)), np.full((images, c, r, r), 0.1)], axis=1)
        write_latent_zip(data, [mean_std.astype(np.float32)], labels)
    else:
        write_image_zip(data, rng.integers(0, 256, (images, c, r, r), dtype=np.uint8), labels)
    torch.manual_seed(0)
    network = network_settings(s)
    teacher = root / "teacher.pt"
    checkpoint.save_atomic(checkpoint.network_snapshot(build_network(**network), network), teacher)
    return data, teacher


def _median_seconds(fns: dict, device: torch.device, repeats: int) -> dict:
    """Median seconds per call of each function, calls interleaved (so drifts in machine speed hit all alike),
    after one warm-up call each."""
    times: dict = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def _device() -> torch.device:
    """The device a job would use here, with the official precision flags."""
    from sidcore.engine import set_precision_flags

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    set_precision_flags(device)
    return device


def _timed(fn, device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(layout: str, method: str, engine_name: str, repeats: int, profile: str | None = None) -> dict:
    """Benchmark one configuration of the distillation iteration in this process."""
    from sidcore.distill import Distiller
    from sidcore.progress_log import peak_memory_mb
    from sidcore.sampling import one_step

    s = settings(layout, method, ENGINES[engine_name])
    batch = s["distill"].batch
    with tempfile.TemporaryDirectory() as tmp:
        data, teacher = write_inputs(Path(tmp), s, 4 * batch)
        _device()
        dist = Distiller(s, teacher, data, Path(tmp) / "run")
        dist.cur_nimg = batch  # past stage_kimg: every iteration is in the method's last stage
        device = dist.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        stats: dict = {}
        shape = dist.shape
        labels = dist.dataset.one_hot(torch.arange(batch) % len(dist.dataset)).to(device)
        z = torch.randn([batch, *shape], device=device)
        x_real = torch.randn([batch, *shape], device=device)
        sigma = torch.full([batch, 1, 1, 1], 1.0, device=device)
        sida = method == "sida"

        def fake_step_passes():
            dist.fake_score.train().requires_grad_(True)
            with torch.no_grad():
                x_g = one_step(dist.G, z, labels, 2.5)
            if sida:
                f_psi, logits = dist.fake_score(x_g + sigma, sigma, labels, return_flag="encoder_decoder")
                logits_real = dist.fake_score(x_real + sigma, sigma, labels, return_flag="encoder")
                (f_psi.sum() + logits.sum() + logits_real.sum()).backward()
            else:
                dist.fake_score(x_g + sigma, sigma, labels).sum().backward()
            dist.fake_score.zero_grad(set_to_none=True)
            dist.fake_score.eval().requires_grad_(False)

        def generator_step_passes():
            dist.G.train().requires_grad_(True)
            x_g = one_step(dist.G, z, labels, 2.5)
            x_t = x_g + sigma
            f_phi = dist.true_score(x_t, sigma, labels)
            if sida:
                f_psi, logits = dist.fake_score(x_t, sigma, labels, return_flag="encoder_decoder")
                (f_phi.sum() + f_psi.sum() + logits.sum()).backward()
            else:
                (f_phi.sum() + dist.fake_score(x_t, sigma, labels).sum()).backward()
            dist.G.zero_grad(set_to_none=True)
            dist.G.eval().requires_grad_(False)

        first = _timed(lambda: dist.iteration(stats), device)
        t = _median_seconds({"iteration": lambda: dist.iteration(stats), "fake": fake_step_passes,
                             "generator": generator_step_passes}, device, repeats)
        if profile:
            write_profile(lambda: dist.iteration(stats), profile)
    t_iter, t_fake, t_gen = t["iteration"], t["fake"], t["generator"]
    return {"kind": "iteration", "layout": layout, "method": method, "engine": engine_name, "device": str(device),
            "batch": batch, "sec_per_kimg": t_iter / batch * 1000, "iteration_sec": t_iter,
            "first_iteration_sec": first, "fake_score_passes_sec": t_fake, "generator_passes_sec": t_gen,
            "overhead_share": (t_iter - t_fake - t_gen) / t_iter, "peak_mem_mb": peak_memory_mb(device)}


def write_profile(fn, path: str) -> None:
    """PyTorch's profiler table of one call of ``fn``: operators by their own time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    Path(path).write_text(prof.key_averages().table(sort_by=sort, row_limit=25) + "\n")


def random_detector(name: str, root: Path, device: torch.device) -> torch.nn.Module:
    """The detector ``name``'s architecture with random weights (the Inception port for every paper detector)."""
    from sidcore import metrics

    weights = root / "detector.pt"
    if name == "sidcore-digits":
        from sidcore.detectors.digits import DigitNet, save_digit_classifier
        save_digit_classifier(DigitNet(), 0.0, weights)
        return metrics.create_detector(name, weights, device)
    from torch_fidelity import feature_extractor_inceptionv3 as inception

    cls = inception.FeatureExtractorInceptionV3
    load_from_url, load_state = inception.load_state_dict_from_url, cls.load_state_dict
    inception.load_state_dict_from_url, cls.load_state_dict = (lambda *a, **k: None), (lambda self, sd: None)
    try:
        torch.save(cls("inception-v3-compat", ["2048"]).state_dict(), weights)
    finally:
        inception.load_state_dict_from_url, cls.load_state_dict = load_from_url, load_state
    return metrics.create_detector("inception-v3-compat", weights, device)


def measure_evaluation(layout: str, engine_name: str, repeats: int) -> dict:
    """Images per second through the one-step generator and the detector, at the evaluation batch."""
    from sidcore import engine, metrics
    from sidcore.networks import build_network
    from sidcore.progress_log import peak_memory_mb
    from sidcore.sampling import one_step, to_uint8

    s = settings(layout, "sid", ENGINES[engine_name])
    device = _device()
    batch = s["evaluation"].batch
    shape = (s["channels"], s["resolution"], s["resolution"])
    with tempfile.TemporaryDirectory() as tmp:
        detector = random_detector(s["detector"]["name"], Path(tmp), device)
        torch.manual_seed(0)
        G = build_network(**generator_settings(network_settings(s))).to(device)
        engine.prepare(G.eval().requires_grad_(False), s["evaluation"].engine)
        z = torch.randn([batch, *shape], device=device)
        labels = torch.zeros([batch, s["label_dim"]], device=device)
        latent = "vae-latents" == s["data"].get("source")

        @torch.no_grad()
        def generate_and_detect():
            images = one_step(G, z, labels, s["distill"].init_sigma)
            if not latent:
                metrics.extract(detector, to_uint8(images))

        first = _timed(generate_and_detect, device)
        t = _median_seconds({"evaluation": generate_and_detect}, device, repeats)["evaluation"]
    return {"kind": "evaluation", "layout": layout, "engine": engine_name, "device": str(device), "batch": batch,
            "images_per_sec": batch / t, "first_batch_sec": first, "detector": not latent,
            "peak_mem_mb": peak_memory_mb(device)}


def generates_differently(engine: Engine) -> bool:
    """Whether ``engine`` changes how an evaluation generates (Adam's lever does not)."""
    return dataclasses.replace(engine, fused_adam=False) != Engine()


def _child(args: list[str]) -> dict:
    """One configuration measured in a process of its own (its peak memory and compilation its own)."""
    child = subprocess.run([sys.executable, "-m", "sidcore.cli", "benchmark", *args], capture_output=True, text=True)
    if child.returncode:
        raise RuntimeError(f"benchmark {' '.join(args)} failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def load_warning() -> str | None:
    """A warning when the machine's 1-minute load average exceeds the cores this process may use: the timings
    then measure the other work too (idle spinning threads slow a loaded CPU run several-fold)."""
    load, cores = os.getloadavg()[0], len(os.sched_getaffinity(0))
    if load <= cores:
        return None
    return (f"warning: load average {load:.1f} on {cores} cores: other work shares them, so the next timing "
            "is of a busy machine; compare timings taken at the same load only")


def format_row(r: dict) -> str:
    head = f"{r['layout']:<10} {r.get('method', 'eval'):<5} {r['engine']:<15} {r['device']:<6} batch {r['batch']:<3}"
    if r["kind"] == "evaluation":
        return (f"{head} {r['images_per_sec']:9.2f} images/s  first batch {r['first_batch_sec']:7.1f} s  "
                f"peak {r['peak_mem_mb']:7.0f} MB")
    return (f"{head} {r['sec_per_kimg']:9.2f} s/kimg  iteration {r['iteration_sec'] * 1000:8.1f} ms  "
            f"first {r['first_iteration_sec']:7.1f} s  overhead {100 * r['overhead_share']:5.1f} %  "
            f"peak {r['peak_mem_mb']:7.0f} MB")


def run(layouts: list[str], methods: list[str], engines: list[str], repeats: int, out: str | None,
        evaluation: bool = True, profiles: str | None = None, log=print) -> list[dict]:
    """Measure every layout, method and engine, each in a process of its own; print a line per configuration."""
    for flag, given, known in (("--layouts", layouts, LAYOUTS), ("--methods", methods, METHODS),
                               ("--engines", engines, ENGINES)):
        unknown = [x for x in given if x not in known]
        if unknown:
            raise UserError(f"benchmark {flag}: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    if profiles:
        Path(profiles).mkdir(parents=True, exist_ok=True)
    rows = []
    for layout in layouts:
        for engine_name in engines:
            jobs = [["--only", f"{layout}:{method}:{engine_name}"]
                    + (["--profile", f"{profiles}/{layout}-{method}-{engine_name}.txt"] if profiles else [])
                    for method in methods]
            if evaluation and (engine_name == "eager" or generates_differently(ENGINES[engine_name])):
                jobs.append(["--only", f"{layout}:evaluation:{engine_name}"])
            for job in jobs:
                if (warning := load_warning()) is not None:
                    log(warning)
                rows.append(_child([*job, "--repeats", str(repeats)]))
                log(format_row(rows[-1]))
    if out:
        Path(out).write_text(json.dumps(rows, indent=2) + "\n")
    return rows
