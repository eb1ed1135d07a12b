"""``sidcore benchmark``: speed, peak memory and bookkeeping overhead of one distillation iteration.

For each layout (the tiny CPU configuration; EDM's full-width CIFAR-10 DDPM++) and method (SiD, SiDA in
its third stage) it times a whole iteration and, alone, the network passes the algorithm requires:

- fake-score step: G forward without gradient, fake score forward/backward (SiDA: plus its encoder
  pass on real images);
- generator step: G forward/backward, with the teacher and the fake score forward/backward to their inputs.

The overhead share is the part of an iteration spent outside those passes (data, noise, losses,
optimisers, EMA, bookkeeping). Each configuration runs in its own process, so peak memory (RSS on the
CPU, CUDA max allocated on a GPU) is its own. Random weights and data: speed does not depend on them.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from sidcore import config
from sidcore.errors import UserError
from sidcore.settings import resolve

LAYOUTS = {
    "tiny": dict(arch="ddpmpp", img_resolution=8, img_channels=1, label_dim=10, model_channels=16,
                 channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], augment_dim=0, dropout=0.0),
    "cifar10": dict(arch="ddpmpp", img_resolution=32, img_channels=3, label_dim=10, model_channels=128,
                    channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], augment_dim=0, dropout=0.0),
}
BATCH = {"tiny": 64, "cifar10": 8}
CONFIG = "config.yaml"  # read from the repository root, where the benchmark runs


def _settings(layout: str, method: str, batch: int) -> dict:
    """The tiny experiment's settings (config.yaml) with the layout's network, at ``batch`` on one process, in
    the method's last stage and never evaluating or saving."""
    net = LAYOUTS[layout]
    tiny = resolve(config.load(CONFIG), "tiny", method, 1.2)
    distill = replace(tiny["distill"], batch=batch, batch_gpu=batch, clip_fake_grad=1.0 if method == "sida" else None,
                      stage_kimg=(0, 0), duration_kimg=1e9, tick_kimg=1e9, snap_ticks=1 << 30, eval_early_ticks=(),
                      dump_ticks=1 << 30, seed=0)
    network = {k: v for k, v in net.items() if k not in ("img_resolution", "img_channels", "label_dim")}
    return {**tiny, "dataset": f"benchmark-{layout}", "network": network, "distill": distill,
            "resolution": net["img_resolution"], "channels": net["img_channels"], "label_dim": net["label_dim"]}


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


def measure(layout: str, method: str, repeats: int) -> dict:
    """Benchmark one configuration in this process."""
    from sidcore import checkpoint
    from sidcore.dataset import write_image_zip
    from sidcore.distill import Distiller
    from sidcore.networks import build_network
    from sidcore.progress_log import peak_memory_mb
    from sidcore.sampling import one_step

    batch = BATCH[layout]
    settings = _settings(layout, method, batch)
    net = LAYOUTS[layout]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        shape = (net["img_channels"], net["img_resolution"], net["img_resolution"])
        write_image_zip(tmp / "data.zip", rng.integers(0, 256, (4 * batch, *shape), dtype=np.uint8),
                        rng.integers(0, net["label_dim"], 4 * batch))
        torch.manual_seed(0)
        checkpoint.save_atomic(checkpoint.network_snapshot(build_network(**net), net), tmp / "teacher.pt")
        dist = Distiller(settings, tmp / "teacher.pt", tmp / "data.zip", tmp / "run")
        device = dist.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        stats: dict = {}
        classes = net["label_dim"]
        labels = torch.nn.functional.one_hot(torch.arange(batch) % classes, classes).float().to(device)
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

        t = _median_seconds({"iteration": lambda: dist.iteration(stats), "fake": fake_step_passes,
                             "generator": generator_step_passes}, device, repeats)
        t_iter, t_fake, t_gen = t["iteration"], t["fake"], t["generator"]
    return {"layout": layout, "method": method, "device": str(device), "batch": batch,
            "sec_per_kimg": t_iter / batch * 1000, "iteration_sec": t_iter, "fake_score_passes_sec": t_fake,
            "generator_passes_sec": t_gen, "overhead_share": (t_iter - t_fake - t_gen) / t_iter,
            "peak_mem_mb": peak_memory_mb(device)}


def run(layouts: list[str], repeats: int, out: str | None, log=print) -> list[dict]:
    """Measure every layout and method, each in a process of its own; print a line per configuration."""
    unknown = sorted(set(layouts) - set(LAYOUTS))
    if unknown:
        raise UserError(f"benchmark --layouts: unknown {', '.join(unknown)} (known: {', '.join(LAYOUTS)})")
    rows = []
    for layout in layouts:
        for method in ("sid", "sida"):
            child = subprocess.run([sys.executable, "-m", "sidcore.cli", "benchmark", "--only", f"{layout}:{method}",
                                    "--repeats", str(repeats)], capture_output=True, text=True, check=True)
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            log(f"{r['layout']:<8} {r['method']:<5} {r['device']:<6} batch {r['batch']:<3} "
                f"{r['sec_per_kimg']:9.2f} s/kimg  iteration {r['iteration_sec'] * 1000:8.1f} ms  "
                f"passes {1000 * (r['fake_score_passes_sec'] + r['generator_passes_sec']):8.1f} ms  "
                f"overhead {100 * r['overhead_share']:5.1f} %  peak {r['peak_mem_mb']:7.0f} MB")
    if out:
        Path(out).write_text(json.dumps(rows, indent=2) + "\n")
    return rows
