"""Preconditionings D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ)) (Karras et al. 2022, Table 1).

``EDMPrecond`` is the one all SiD / SiDA teachers use; ``VPPrecond``, ``VEPrecond`` and ``iDDPMPrecond``
load EDM's other released teachers. Constructor arguments carry NVIDIA's names and defaults, so the
constructor keywords recorded in a released pickle build the same network here.
"""
from __future__ import annotations

import numpy as np
import torch

from sidcore.networks.dhariwal import DhariwalUNet
from sidcore.networks.songunet import SongUNet, check_return_flag

MODELS = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}  # NVIDIA's ``model_type`` names

Output = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class Precond(torch.nn.Module):
    """Input handling shared by every preconditioning; subclasses give the coefficients and the network F.

    ``return_flag``: ``'decoder'`` → D(x; σ); ``'encoder'`` → SiDA's discriminator logits;
    ``'encoder_decoder'`` → (D, logits); all float32. With ``use_fp16`` on a GPU the network runs in
    ``half_dtype`` (float16, or bfloat16 where a run asks for it).
    """

    half_dtype = torch.float16
    memory_format = torch.contiguous_format  # of the network's input (sidcore.engine: channels_last)

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False) -> None:
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16 = use_fp16

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(c_skip, c_out, c_in, c_noise) for σ of shape [B, 1, 1, 1]."""
        raise NotImplementedError

    def network(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None,
                augment_labels: torch.Tensor | None, return_flag: str) -> Output:
        """F(x; c_noise) and/or the logits, as selected by ``return_flag``, in x's dtype."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None, return_flag: str = "decoder") -> Output:
        check_return_flag(return_flag)
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = self.half_dtype if self.use_fp16 and x.device.type == "cuda" else torch.float32

        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        x_in = (c_in * x).to(dtype).contiguous(memory_format=self.memory_format)
        out = self.network(x_in, c_noise.flatten(), class_labels, augment_labels, return_flag)
        if return_flag == "encoder":
            return out.to(torch.float32)
        F_x, logits = (out, None) if return_flag == "decoder" else out
        assert F_x.dtype == dtype
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        return D_x if logits is None else (D_x, logits.to(torch.float32))


class EDMModelPrecond(Precond):
    """A preconditioning around one of EDM's U-Nets: attribute ``model``, an instance of ``MODELS[model_type]``."""

    out_channel_mult = 1  # the model predicts out_channel_mult·img_channels channels

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 model_type: str = "DhariwalUNet", **model_kwargs) -> None:
        super().__init__(img_resolution, img_channels, label_dim, use_fp16)
        if model_type not in MODELS:
            raise ValueError(f"model_type {model_type!r} unknown (known: {sorted(MODELS)})")
        self.model = MODELS[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                        out_channels=img_channels * self.out_channel_mult, label_dim=label_dim,
                                        **model_kwargs)

    def network(self, x, c_noise, class_labels, augment_labels, return_flag):
        return self.model(x, c_noise, class_labels=class_labels, augment_labels=augment_labels,
                          return_flag=return_flag)


def edm_coefficients(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, ...]:
    """EDM's (c_skip, c_out, c_in, c_noise) for data of standard deviation ``sigma_data``."""
    s2 = sigma ** 2 + sigma_data ** 2
    return sigma_data ** 2 / s2, sigma * sigma_data / s2.sqrt(), 1 / s2.sqrt(), sigma.log() / 4


class EDMPrecond(EDMModelPrecond):
    """EDM: c_skip = σ_d²/(σ²+σ_d²), c_out = σσ_d/√(σ²+σ_d²), c_in = 1/√(σ²+σ_d²), c_noise = ln(σ)/4."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0, sigma_max: float = float("inf"), sigma_data: float = 0.5,
                 model_type: str = "DhariwalUNet", **model_kwargs) -> None:
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data

    def coefficients(self, sigma):
        return edm_coefficients(sigma, self.sigma_data)


class VPPrecond(EDMModelPrecond):
    """Variance preserving (Song et al. 2021): c_skip = 1, c_out = −σ, c_in = 1/√(σ²+1),
    c_noise = (M−1)·t(σ) with the inverse t(σ) of the schedule σ(t)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000, epsilon_t: float = 1e-5,
                 model_type: str = "SongUNet", **model_kwargs) -> None:
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1))

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """σ(t) = √(exp(½β_d t² + β_min t) − 1)."""
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * t ** 2 + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """t(σ) = (√(β_min² + 2β_d ln(1+σ²)) − β_min) / β_d."""
        sigma = torch.as_tensor(sigma)
        beta_min, beta_d = self.beta_min, self.beta_d
        return ((beta_min ** 2 + 2 * beta_d * (1 + sigma ** 2).log()).sqrt() - beta_min) / beta_d

    def coefficients(self, sigma):
        return torch.ones_like(sigma), -sigma, 1 / (sigma ** 2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma)


class VEPrecond(EDMModelPrecond):
    """Variance exploding (Song et al. 2021): c_skip = 1, c_out = σ, c_in = 1, c_noise = ln(σ/2)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0.02, sigma_max: float = 100, model_type: str = "SongUNet",
                 **model_kwargs) -> None:
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def coefficients(self, sigma):
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma), (0.5 * sigma).log()


class iDDPMPrecond(EDMModelPrecond):
    """Improved DDPM (Nichol & Dhariwal 2021): c_skip = 1, c_out = −σ, c_in = 1/√(σ²+1),
    c_noise = M − 1 − argmin_j |u_j − σ| over the discrete noise levels ``u``.

    The model predicts 2·img_channels channels (mean and variance); F is the first img_channels.
    """

    out_channel_mult = 2

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 C_1: float = 0.001, C_2: float = 0.008, M: int = 1000, model_type: str = "DhariwalUNet",
                 **model_kwargs) -> None:
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        self.C_1, self.C_2, self.M = C_1, C_2, M
        u = torch.zeros(M + 1)
        for j in range(M, 0, -1):  # u_M = 0, u_{j−1} = √((u_j² + 1)/max(ᾱ(j−1)/ᾱ(j), C_1) − 1)
            u[j - 1] = ((u[j] ** 2 + 1) / (self.alpha_bar(j - 1) / self.alpha_bar(j)).clip(min=C_1) - 1).sqrt()
        self.register_buffer("u", u)
        self.sigma_min, self.sigma_max = float(u[M - 1]), float(u[0])

    def alpha_bar(self, j: int) -> torch.Tensor:
        """ᾱ(j) = sin²(½π j / (M(C_2+1)))."""
        return (0.5 * np.pi * torch.as_tensor(j) / self.M / (self.C_2 + 1)).sin() ** 2

    def coefficients(self, sigma):
        index = (sigma.reshape(-1, 1) - self.u.reshape(1, -1)).abs().argmin(dim=1)
        return torch.ones_like(sigma), -sigma, 1 / (sigma ** 2 + 1).sqrt(), self.M - 1 - index.to(torch.float32)

    def network(self, x, c_noise, class_labels, augment_labels, return_flag):
        out = super().network(x, c_noise, class_labels, augment_labels, return_flag)
        if return_flag == "decoder":
            return out[:, :self.img_channels]
        if return_flag == "encoder_decoder":
            return out[0][:, :self.img_channels], out[1]
        return out
