"""EDM2's magnitude-preserving U-Net (Karras et al., CVPR 2024) with SiDA's encoder read-out.

Module names and registration order follow NVIDIA's ``networks_edm2.py``, so released weights load by key.
No layer has a bias; every weight is normalised to unit RMS per output unit on the fly. EDM2 also
*forces* that normalisation on the stored weights during training; here that is the separate
:func:`force_weight_normalization_`, applied once per optimiser step, so that a network may run
several forward passes before one backward.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.nn.functional import conv2d, conv_transpose2d, silu

from sidcore.networks.layers import fused_attention
from sidcore.networks.precond import Output, Precond, edm_coefficients
from sidcore.networks.songunet import check_return_flag, discriminator_logits

# ------------------------------------------------------------------------------------------------
# Magnitude-preserving primitives.


def normalize(x: torch.Tensor, dim: int | Sequence[int] | None = None, eps: float = 1e-4) -> torch.Tensor:
    """x / (eps + RMS of x over ``dim`` (default: all but the first)), the norm taken in float32."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))  # eps + ‖x‖·√(n_norm/n_x)
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU rescaled to unit magnitude for unit-variance input."""
    return silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """((1 − t)·a + t·b) / √((1 − t)² + t²)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenation [a, b] weighting a by (1 − t) and b by t while preserving the overall magnitude."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (c / math.sqrt(na) * (1 - t)), b * (c / math.sqrt(nb) * t)], dim=dim)


def resample(x: torch.Tensor, f: Sequence[int] = (1, 1), mode: str = "keep") -> torch.Tensor:
    """2× ``'down'``/``'up'``-sampling with the separable filter ``f`` (box filter by default); ``'keep'``
    is the identity."""
    if mode == "keep":
        return x
    f = torch.as_tensor(f, dtype=torch.float32, device=x.device)
    pad = (len(f) - 1) // 2
    f = (torch.outer(f, f) / f.sum().square()).to(x.dtype)
    c = x.shape[1]
    if mode == "down":
        return conv2d(x, f.tile([c, 1, 1, 1]), groups=c, stride=2, padding=pad)
    if mode == "up":
        return conv_transpose2d(x, (f * 4).tile([c, 1, 1, 1]), groups=c, stride=2, padding=pad)
    raise ValueError(f"resample mode must be 'keep', 'down' or 'up', got {mode!r}")


class MPFourier(torch.nn.Module):
    """Random Fourier features √2·cos(x·freqs + phases); ``freqs`` and ``phases`` are stored buffers."""

    def __init__(self, num_channels: int, bandwidth: float = 1) -> None:
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(torch.nn.Module):
    """Magnitude-preserving convolution (``kernel`` [k, k]) or linear layer (``kernel`` []), no bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1) -> torch.Tensor:
        w = normalize(self.weight.to(torch.float32))  # unit RMS per output unit
        w = (w * (gain / math.sqrt(w[0].numel()))).to(x.dtype)  # · gain/√fan_in
        if w.ndim == 2:
            return x @ w.t()
        return conv2d(x, w, padding=w.shape[-1] // 2)


@torch.no_grad()
def force_weight_normalization_(net: torch.nn.Module) -> None:
    """EDM2's forced weight normalisation: rewrite every MPConv weight of ``net`` in place to unit RMS
    per output unit. Call once per optimiser step, before the first forward pass."""
    for module in net.modules():
        if isinstance(module, MPConv):
            module.weight.copy_(normalize(module.weight.to(torch.float32)))


# ------------------------------------------------------------------------------------------------
# U-Net.


class Block(torch.nn.Module):
    """Residual block: optional resampling, two 3×3 convolutions modulated by the embedding,
    optional self-attention, activation clipping. ``'enc'`` blocks pixel-normalise their input."""

    fused_attention = False  # set by sidcore.engine

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample_mode: str = "keep", resample_filter: Sequence[int] = (1, 1), attention: bool = False,
                 channels_per_head: int = 64, dropout: float = 0, res_balance: float = 0.3,
                 attn_balance: float = 0.3, clip_act: float | None = 256) -> None:
        if flavor not in ("enc", "dec"):
            raise ValueError(f"flavor must be 'enc' or 'dec', got {flavor!r}")
        super().__init__()
        self.out_channels, self.flavor = out_channels, flavor
        self.resample_filter, self.resample_mode = list(resample_filter), resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, [3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, [])
        self.conv_res1 = MPConv(out_channels, out_channels, [3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, [1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, [1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, [1, 1]) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm

        # Residual branch.
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout != 0:
            y = torch.nn.functional.dropout(y, p=self.dropout)
        y = self.conv_res1(y)

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        # Self-attention; qkv channels are ordered (head, channel, {q,k,v}), each normalised per head.
        if self.num_heads:
            y = self.attn_qkv(x).reshape(x.shape[0], self.num_heads, -1, 3, x.shape[2] * x.shape[3])
            q, k, v = normalize(y, dim=2).unbind(3)
            if self.fused_attention:
                y = fused_attention(q, k, v)
            else:
                w = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
                y = torch.einsum("nhqk,nhck->nhcq", w, v)
            x = mp_sum(x, self.attn_proj(y.reshape(*x.shape)), t=self.attn_balance)

        if self.clip_act is not None:
            x = x.clip_(-self.clip_act, self.clip_act)
        return x


class UNet(torch.nn.Module):
    """EDM2's U-Net F(x; c_noise, labels). ``return_flag`` as in ``SongUNet``: ``'encoder'`` gives SiDA's
    discriminator logits (channel mean of the last encoder block's output) without running the decoder,
    ``'encoder_decoder'`` gives (F, logits)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, model_channels: int = 192,
                 channel_mult: Sequence[int] = (1, 2, 3, 4), channel_mult_noise: int | None = None,
                 channel_mult_emb: int | None = None, num_blocks: int = 3, attn_resolutions: Sequence[int] = (16, 8),
                 label_balance: float = 0.5, concat_balance: float = 0.5, **block_kwargs) -> None:
        super().__init__()
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_balance, self.concat_balance = label_balance, concat_balance
        self.out_gain = torch.nn.Parameter(torch.zeros([]))

        # Embedding.
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, [])
        self.emb_label = MPConv(label_dim, cemb, []) if label_dim else None

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = img_channels + 1  # + a constant channel of ones
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, [3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, cemb, flavor="enc", resample_mode="down",
                                                      **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = Block(cin, cout, cemb, flavor="enc",
                                                            attention=res in attn_resolutions, **block_kwargs)

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, flavor="dec", attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, flavor="dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, cemb, flavor="dec", resample_mode="up",
                                                    **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = Block(cin, cout, cemb, flavor="dec",
                                                            attention=res in attn_resolutions, **block_kwargs)
        self.out_conv = MPConv(cout, img_channels, [3, 3])

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                return_flag: str = "decoder") -> Output:
        check_return_flag(return_flag)
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            labels = class_labels * math.sqrt(class_labels.shape[1])
            emb = mp_sum(emb, self.emb_label(labels), t=self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if "conv" in name else block(x, emb)
            skips.append(x)
        logits = discriminator_logits(x)
        if return_flag == "encoder":
            return logits

        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        F_x = self.out_conv(x, gain=self.out_gain)
        return F_x if return_flag == "decoder" else (F_x, logits)


class EDM2Precond(Precond):
    """EDM preconditioning around the EDM2 U-Net (attribute ``unet``), with the log-variance head u(σ) of
    EDM2's uncertainty-weighted loss (``logvar=True``: teachers and fake scores; SiD generators have none)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool = True,
                 sigma_data: float = 0.5, logvar_channels: int = 128, logvar: bool = True, **unet_kwargs) -> None:
        super().__init__(img_resolution, img_channels, label_dim, use_fp16)
        self.sigma_data = sigma_data
        self.unet = UNet(img_resolution, img_channels, label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels) if logvar else None
        self.logvar_linear = MPConv(logvar_channels, 1, []) if logvar else None

    def coefficients(self, sigma):
        return edm_coefficients(sigma, self.sigma_data)

    def network(self, x, c_noise, class_labels, augment_labels, return_flag):
        return self.unet(x, c_noise, class_labels, return_flag=return_flag)  # EDM2 has no augmentation labels

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None, return_flag: str = "decoder",
                return_logvar: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """As ``Precond.forward`` (``augment_labels`` is ignored), followed by u(σ) [B, 1, 1, 1] (float32)
        if ``return_logvar``."""
        if return_logvar and self.logvar_linear is None:
            raise ValueError("return_logvar=True, but this network was built without the log-variance head "
                             "(logvar=False, e.g. a SiD generator)")
        out = super().forward(x, sigma, class_labels, augment_labels, return_flag)
        if not return_logvar:
            return out
        sigma_4d = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        c_noise = self.coefficients(sigma_4d)[3]
        u = self.logvar_linear(self.logvar_fourier(c_noise.flatten())).reshape(-1, 1, 1, 1)
        return (*out, u) if isinstance(out, tuple) else (out, u)
