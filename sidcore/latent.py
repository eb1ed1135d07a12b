"""EDM2's latent space: Stable Diffusion's VAE (``stabilityai/sd-vae-ft-mse``) with per-channel scaling.

A latent dataset stores, per image, the VAE posterior mean and standard deviation ([8, 64, 64] for
512×512 pixels). A training latent is a fresh posterior draw scaled to σ_data = 0.5 per channel:
x = (mean + ε·std)·scale + bias. Decoding inverts the scaling, runs the VAE decoder on [0, 1] pixels
and quantises as EDM2 does: uint8 = trunc(clamp(decoded, 0, 1)·255).
"""
from __future__ import annotations

import os

import torch

from sidcore.errors import UserError

# Statistics of the raw SD-VAE latents of ImageNet-512 (EDM2's StabilityVAEEncoder defaults).
RAW_MEAN = (5.81, 3.25, 0.12, -2.15)
RAW_STD = (4.17, 4.62, 3.71, 3.28)
SIGMA_DATA = 0.5


def scale_bias(device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``scale = σ_data / raw_std`` and ``bias = −raw_mean·scale``, shaped [1, 4, 1, 1]."""
    mean = torch.tensor(RAW_MEAN, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
    std = torch.tensor(RAW_STD, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
    scale = SIGMA_DATA / std
    return scale, -mean * scale


def sample_latents(mean_std: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled latents from stored posterior statistics [B, 2C, H, W] (mean ‖ std): (mean + ε·std)·scale + bias,
    ε given or drawn afresh."""
    mean, std = mean_std.to(torch.float32).chunk(2, dim=1)
    if eps is None:
        eps = torch.randn(mean.shape, device=mean.device)
    scale, bias = scale_bias(mean.device)
    return (mean + eps * std) * scale + bias


class StabilityVAE:
    """The SD VAE loaded from a local diffusers directory (``config.json`` + weights); never downloads."""

    def __init__(self, path: str | os.PathLike, device: torch.device | str = "cpu") -> None:
        from diffusers import AutoencoderKL
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path}: no config.json; expected a diffusers AutoencoderKL directory")
        self.vae = AutoencoderKL.from_pretrained(path, local_files_only=True).to(device).eval().requires_grad_(False)
        self.device = torch.device(device)

    @torch.no_grad()
    def encode(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 pixels [B, 3, H, W] → posterior mean ‖ std [B, 8, H/8, W/8] (float32, unscaled)."""
        x = images_uint8.to(self.device, torch.float32) / 255  # EDM2 feeds the VAE [0, 1] pixels
        dist = self.vae.encode(x).latent_dist
        return torch.cat([dist.mean, dist.std], dim=1).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, 4, h, w] → uint8 pixels [B, 3, 8h, 8w]."""
        scale, bias = scale_bias(latents.device)
        x = self.vae.decode(((latents.to(torch.float32) - bias) / scale).to(self.device)).sample
        return (x.clamp(0, 1) * 255).to(torch.uint8)


def load_vae(settings: dict, path: str | os.PathLike | None, device: torch.device | str) -> StabilityVAE | None:
    """The VAE of a latent-space dataset (``latent`` in its settings), None for pixel datasets."""
    if "latent" not in settings:
        return None
    if path is None:
        raise UserError(f"datasets.{settings['dataset']}.latent: this dataset lives in latent space; "
                         "pass the VAE directory with --vae")
    return StabilityVAE(path, device)
