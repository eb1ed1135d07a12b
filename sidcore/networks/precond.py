"""EDM preconditioning: D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise), Karras et al. 2022, Table 1."""
from __future__ import annotations

import numpy as np
import torch

from sidcore.networks.songunet import SongUNet, check_return_flag

ARCHITECTURES = {
    # EDM's train.py presets; per-dataset values (channel_mult, dropout, …) come from config.yaml.
    "ddpmpp": dict(embedding_type="positional", encoder_type="standard", decoder_type="standard",
                   channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2]),
    "ncsnpp": dict(embedding_type="fourier", encoder_type="residual", decoder_type="standard",
                   channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2]),
}


class EDMPrecond(torch.nn.Module):
    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0, sigma_max: float = float("inf"), sigma_data: float = 0.5,
                 **model_kwargs) -> None:
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16 = use_fp16
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
        self.model = SongUNet(img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels,
                              label_dim=label_dim, **model_kwargs)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None, return_flag: str = "decoder"):
        """Denoised estimate D(x; σ) (and/or the discriminator logits, see ``SongUNet``)."""
        check_return_flag(return_flag)
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = torch.float16 if self.use_fp16 and x.device.type == "cuda" else torch.float32

        s2 = sigma ** 2 + self.sigma_data ** 2
        c_skip = self.sigma_data ** 2 / s2
        c_out = sigma * self.sigma_data / s2.sqrt()
        c_in = 1 / s2.sqrt()
        c_noise = sigma.log() / 4

        out = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels,
                         augment_labels=augment_labels, return_flag=return_flag)
        if return_flag == "encoder":
            return out.to(torch.float32)
        F_x, logits = (out, None) if return_flag == "decoder" else out
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        return D_x if logits is None else (D_x, logits.to(torch.float32))


def build_network(arch: str, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool = False,
                  **overrides) -> EDMPrecond:
    """An EDMPrecond network from an architecture preset plus config.yaml's per-dataset settings."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"network.arch {arch!r} is not available here (known: {sorted(ARCHITECTURES)})")
    kwargs = {**ARCHITECTURES[arch], **overrides}
    return EDMPrecond(img_resolution, img_channels, label_dim, use_fp16=use_fp16, **kwargs)


def count_parameters(net: torch.nn.Module) -> int:
    return int(sum(np.prod(p.shape) for p in net.parameters()))
