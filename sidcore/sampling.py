"""Image generation: the distilled one-step generator and EDM's deterministic Heun sampler for teachers."""
from __future__ import annotations

import numpy as np
import torch


def one_step(G, z: torch.Tensor, labels: torch.Tensor, init_sigma: float) -> torch.Tensor:
    """x_g = G(σ_init·z, σ_init): the generator is a denoiser evaluated at the fixed level σ_init."""
    sigma = torch.full([z.shape[0], 1, 1, 1], init_sigma, device=z.device)
    return G(init_sigma * z, sigma, labels)


SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0  # EDM's noise levels (Karras et al. 2022), fixed in the official code


def karras_sigma(s: torch.Tensor, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                 rho: float = RHO) -> torch.Tensor:
    """σ(s) = (σ_max^{1/ρ} + s·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ (Karras et al. 2022, eq. 5): s = 0 → σ_max, 1 → σ_min."""
    return (sigma_max ** (1 / rho) + s * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def heun_nfe(num_steps: int) -> int:
    """Network evaluations of ``heun`` with ``num_steps`` steps: two per step but the last."""
    return 2 * num_steps - 1


def heun(net, z: torch.Tensor, labels: torch.Tensor, num_steps: int = 18, sigma_min: float = SIGMA_MIN,
         sigma_max: float = SIGMA_MAX, rho: float = RHO) -> torch.Tensor:
    """EDM's deterministic 2nd-order sampler (Karras et al. 2022, Alg. 1); ``heun_nfe`` evaluations."""
    i = torch.arange(num_steps, dtype=torch.float64, device=z.device)
    t = karras_sigma(i / (num_steps - 1), sigma_min, sigma_max, rho)
    t = torch.cat([t, torch.zeros_like(t[:1])])
    x = z.to(torch.float64) * t[0]
    for k in range(num_steps):
        t_cur, t_next = t[k], t[k + 1]
        d_cur = (x - net(x, t_cur.expand(x.shape[0]), labels).to(torch.float64)) / t_cur
        x_next = x + (t_next - t_cur) * d_cur
        if k < num_steps - 1:
            d_next = (x_next - net(x_next, t_next.expand(x.shape[0]), labels).to(torch.float64)) / t_next
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x.to(torch.float32)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images to uint8 as the official metric code: trunc(clamp(127.5·x + 128, 0, 255))."""
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def to_pixels(x: torch.Tensor, vae=None) -> torch.Tensor:
    """Model outputs to uint8 images: pixels directly, EDM2 latents through the VAE decoder."""
    return to_uint8(x) if vae is None else vae.decode(x)


class LabelSampler:
    """Class labels drawn from the training set's empirical label distribution (one-hot, [B, label_dim])."""

    def __init__(self, labels: torch.Tensor | None, label_dim: int) -> None:
        self.labels, self.label_dim = labels, label_dim

    def __call__(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        if self.labels is None or self.label_dim == 0:
            return torch.zeros(n, 0, device=device)
        idx = torch.randint(len(self.labels), (n,), generator=generator)
        return torch.nn.functional.one_hot(self.labels[idx], self.label_dim).float().to(device)


def noise(n: int, shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Standard normal latents drawn on the CPU from ``generator`` (identical on any device)."""
    return torch.randn([n, *shape], generator=generator).to(device)


def image_grid(images_uint8: torch.Tensor, rows: int) -> np.ndarray:
    """Tile [N, C, H, W] uint8 images into an [rows·H, cols·W, C] array."""
    n, c, h, w = images_uint8.shape
    cols = n // rows
    grid = images_uint8[: rows * cols].reshape(rows, cols, c, h, w).permute(0, 3, 1, 4, 2)
    return grid.reshape(rows * h, cols * w, c).cpu().numpy()
