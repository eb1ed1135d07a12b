"""Dhariwal & Nichol's ADM U-Net in EDM's formulation (the ImageNet-64 teacher), with SiDA's encoder read-out.

``return_flag`` works as in ``SongUNet``.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn.functional import silu

from sidcore.networks.layers import Conv2d, GroupNorm, Linear, PositionalEmbedding, UNetBlock
from sidcore.networks.songunet import (
    augment_embedding,
    check_return_flag,
    discriminator_logits,
    drop_labels,
    run_decoder,
    run_encoder,
)


class DhariwalUNet(torch.nn.Module):
    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 192, channel_mult: list[int] = (1, 2, 3, 4),
                 channel_mult_emb: int = 4, num_blocks: int = 3, attn_resolutions: list[int] = (32, 16, 8),
                 dropout: float = 0.10, label_dropout: float = 0) -> None:
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=np.sqrt(1 / 3), init_bias=np.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init,
                            init_zero=init_zero)

        # Mapping.
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                 init_weight=np.sqrt(label_dim)) if label_dim else None)

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block_kwargs)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3, **init_zero)

    def embed(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
              augment_labels: torch.Tensor | None) -> torch.Tensor:
        emb = self.map_noise(noise_labels)  # [cos, sin], no swap (unlike SongUNet)
        if self.map_augment is not None:
            emb = emb + augment_embedding(self.map_augment, augment_labels, emb)
        emb = self.map_layer1(silu(self.map_layer0(emb)))
        if self.map_label is not None:
            labels = drop_labels(class_labels, self.label_dropout, len(noise_labels)) if self.training else class_labels
            emb = emb + self.map_label(labels)  # no √label_dim scaling, unlike SongUNet
        return silu(emb)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                augment_labels: torch.Tensor | None = None, return_flag: str = "decoder"):
        check_return_flag(return_flag)
        emb = self.embed(noise_labels, class_labels, augment_labels)
        x, skips = run_encoder(self.enc, x, emb)
        logits = discriminator_logits(x)
        if return_flag == "encoder":
            return logits
        x, _ = run_decoder(self.dec, x, emb, skips)
        F_x = self.out_conv(silu(self.out_norm(x)))
        return F_x if return_flag == "decoder" else (F_x, logits)
