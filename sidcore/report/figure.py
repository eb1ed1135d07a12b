"""``sidcore figure``: a grid of one-step samples of a distilled generator with fixed seeds and, beside it,
the teacher's samples (EDM's Heun sampler at ``teacher_eval``'s NFE) from the same latents and labels.

Labels follow the training set's label distribution and are drawn, with the latents, from one generator
seeded with ``--seed``: every figure of a dataset shows the same latents and labels.
"""
from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sidcore import checkpoint
from sidcore.dataset import read_image_zip
from sidcore.latent import load_vae
from sidcore.methods import method_label
from sidcore.report.plot import save_atomic
from sidcore.sampling import LabelSampler, heun, image_grid, noise, one_step, to_pixels

PAD = 1  # grey pixels around each image of a grid


def load(path: str, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The network of a snapshot, ready to sample, and the snapshot."""
    snap = checkpoint.load_snapshot(path)
    net, _ = checkpoint.load_network(path, snap)
    return net.to(device).eval().requires_grad_(False), snap


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
    G, snap = load(generator, device)
    x = one_step(G, z, labels, checkpoint.init_sigma(snap, generator))
    out = [(f"{method_label(settings['method'], settings['alpha'])}, 1 step (ours)", x)]
    if teacher is not None:
        steps = settings["teacher_eval"]["num_steps"]
        out.append((f"Teacher, {2 * steps - 1} NFE", heun(load(teacher, device)[0], z, labels, num_steps=steps)))
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


def write(settings: dict, generator: str, teacher: str | None, data: str, vae: str | None, seed: int, rows: int,
          cols: int, png: Path, log=print) -> None:
    """The sample grid(s) of a generator (and of its teacher) from fixed latents, as one PNG."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    panels = grids(settings, generator, teacher, data, vae, seed, rows, cols, device)
    save_atomic(figure(panels, f"{settings['dataset']}: seed {seed}"), png)
    log(f"{', '.join(name for name, _ in panels)} -> {png}")
