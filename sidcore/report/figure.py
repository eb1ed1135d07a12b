"""``sidcore figure``: a grid of one-step samples of a distilled generator with fixed seeds and, beside it,
the teacher's samples (EDM's Heun sampler at ``teacher_eval``'s NFE) from the same latents and labels.

Labels follow the training set's label distribution and are drawn, with the latents, from one generator
seeded with ``--seed``: every figure of a dataset shows the same latents and labels.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sidcore import checkpoint
from sidcore.dataset import read_image_zip
from sidcore.latent import load_vae
from sidcore.report.names import method_label
from sidcore.report.plot import save_atomic
from sidcore.sampling import LabelSampler, heun, image_grid, noise, one_step, to_pixels
from sidcore.settings import loads


PAD = 1  # grey pixels around each image of a grid


def load(path: str, device: torch.device) -> torch.nn.Module:
    net, _ = checkpoint.load_network(path)
    return net.to(device).eval().requires_grad_(False)


@torch.no_grad()
def grids(settings: dict, generator: str, teacher: str | None, data: str, vae: str | None, seed: int, rows: int,
          cols: int, device: torch.device) -> list[tuple[str, torch.Tensor]]:
    """(title, [rows·H, cols·W, C] uint8 grid) of the generator and, if given, the teacher."""
    dataset = read_image_zip(data, use_labels=settings["label_dim"] > 0)
    decoder = load_vae(settings, vae, device)
    n, shape = rows * cols, (settings["channels"], settings["resolution"], settings["resolution"])
    gen = torch.Generator().manual_seed(seed)
    labels = LabelSampler(dataset.labels, dataset.label_dim)(n, gen, device)
    z = noise(n, shape, gen, device)
    x = one_step(load(generator, device), z, labels, settings["distill"]["init_sigma"])
    out = [(f"{method_label(settings['method'], settings['alpha'])}, 1 step (ours)", x)]
    if teacher is not None:
        steps = settings["teacher_eval"]["num_steps"]
        out.append((f"Teacher, {2 * steps - 1} NFE", heun(load(teacher, device), z, labels, num_steps=steps)))
    return [(title, image_grid(torch.nn.functional.pad(to_pixels(images, decoder), [PAD] * 4, value=128), rows))
            for title, images in out]


def figure(panels: list[tuple[str, torch.Tensor]], title: str) -> Figure:
    fig = Figure(figsize=(4.2 * len(panels), 4.6))
    FigureCanvasAgg(fig)
    for k, (name, grid) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, len(panels), k)
        gray = grid.shape[2] == 1
        ax.imshow(grid[:, :, 0] if gray else grid, cmap="gray" if gray else None, vmin=0, vmax=255,
                  interpolation="nearest")
        ax.set_title(name, fontsize="medium")
        ax.axis("off")
    fig.suptitle(title)
    return fig


def run(args: argparse.Namespace) -> int:
    settings = loads(args.settings)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    panels = grids(settings, args.generator, args.teacher, args.data, args.vae, args.seed, args.rows, args.cols,
                   device)
    save_atomic(figure(panels, f"{settings['dataset']}: seed {args.seed}"), args.out)
    print(json.dumps({"out": str(args.out), "panels": [name for name, _ in panels]}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "figure", help="sample grid of a generator (and its teacher)",
        description="Draw a grid of one-step samples of a distilled generator with fixed seeds and, with "
                    "--teacher, the teacher's samples from the same latents and labels; write a PNG.")
    parser.add_argument("--settings", required=True, help="the run's resolved settings (JSON)")
    parser.add_argument("--generator", required=True, help="generator.pt of the run")
    parser.add_argument("--teacher", help="the teacher's .pt (needs teacher_eval in the settings)")
    parser.add_argument("--data", required=True, help="the dataset's zip (its label distribution)")
    parser.add_argument("--vae", help="VAE directory (latent-space datasets)")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--cols", type=int, required=True)
    parser.add_argument("--out", required=True, type=Path, help="PNG to write")
    parser.set_defaults(func=run)
