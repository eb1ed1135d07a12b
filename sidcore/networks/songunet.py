"""Song et al.'s U-Net in EDM's DDPM++ / NCSN++ configurations, with SiDA's encoder read-out.

``return_flag`` selects what a forward pass returns:
``'decoder'`` the network output F (the original behaviour), ``'encoder'`` the discriminator
logits only (channel mean of the last encoder block's output, [B, 1, H', W']; the decoder is
skipped), ``'encoder_decoder'`` both (F, logits) from one pass. ``'encoder'`` is refused for the
'residual' (NCSN++) and 'skip' encoders: their input pyramid writes into the stored skips, which
SiDA's encoder-only pass does not keep (it fails there too).
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn.functional import silu

from sidcore.networks.layers import Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock

RETURN_FLAGS = ("decoder", "encoder", "encoder_decoder")


def check_return_flag(return_flag: str) -> None:
    if return_flag not in RETURN_FLAGS:
        raise ValueError(f"return_flag must be one of {RETURN_FLAGS}, got {return_flag!r}")


def discriminator_logits(x: torch.Tensor) -> torch.Tensor:
    """SiDA's discriminator map: mean over channels of the last encoder output."""
    return x.mean(dim=1, keepdim=True)


def augment_embedding(map_augment: Linear, augment_labels: torch.Tensor | None, emb: torch.Tensor) -> torch.Tensor:
    """map_augment(augment labels). No labels means no augmentation: zeros, which add exactly nothing but let
    the weights take part in every pass (DDP requires it, as the official code passing zeros does)."""
    if augment_labels is None:
        augment_labels = emb.new_zeros(emb.shape[0], map_augment.in_features)
    return map_augment(augment_labels)


def drop_labels(class_labels: torch.Tensor, p: float, batch_size: int) -> torch.Tensor:
    """Zero each sample's class labels with probability ``p`` (training for classifier-free guidance)."""
    if not p:
        return class_labels
    keep = torch.rand([batch_size, 1], device=class_labels.device) >= p
    return class_labels * keep.to(class_labels.dtype)


class SongUNet(torch.nn.Module):
    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult: list[int] = (1, 2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4, attn_resolutions: list[int] = (16,),
                 dropout: float = 0.10, label_dropout: float = 0, embedding_type: str = "positional",
                 channel_mult_noise: int = 1, encoder_type: str = "standard", decoder_type: str = "standard",
                 resample_filter: list[int] = (1, 1)) -> None:
        assert embedding_type in ("fourier", "positional")
        assert encoder_type in ("standard", "skip", "residual")
        assert decoder_type in ("standard", "skip")
        super().__init__()
        self.label_dropout, self.encoder_type = label_dropout, encoder_type
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=np.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5),
                            eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                            init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping.
        self.map_noise = (PositionalEmbedding(noise_channels, endpoint=True) if embedding_type == "positional"
                          else FourierEmbedding(noise_channels))
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, 0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, 1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, 3, down=True,
                                                                   resample_filter=resample_filter,
                                                                   fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin = cout
                cout = model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=(res in attn_resolutions),
                                                                **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if "aux" not in name]

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
                cin = cout + skips.pop()
                cout = model_channels * mult
                attention = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attention, **block_kwargs)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, 0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3, **init_zero)

    def embed(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
              augment_labels: torch.Tensor | None) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # swap to [sin, cos]
        if self.map_label is not None:
            labels = drop_labels(class_labels, self.label_dropout, len(noise_labels)) if self.training else class_labels
            emb = emb + self.map_label(labels * np.sqrt(self.map_label.in_features))
        if self.map_augment is not None:
            emb = emb + augment_embedding(self.map_augment, augment_labels, emb)
        return silu(self.map_layer1(silu(self.map_layer0(emb))))

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                augment_labels: torch.Tensor | None = None, return_flag: str = "decoder"):
        check_return_flag(return_flag)
        if return_flag == "encoder" and self.encoder_type != "standard":
            raise ValueError(f"return_flag='encoder' is not supported with encoder_type={self.encoder_type!r} "
                             "(e.g. NCSN++): SiDA's encoder-only pass is defined for DDPM++ and ADM only")
        emb = self.embed(noise_labels, class_labels, augment_labels)
        x, skips = run_encoder(self.enc, x, emb)
        logits = discriminator_logits(x)
        if return_flag == "encoder":
            return logits
        _, aux = run_decoder(self.dec, x, emb, skips)
        return aux if return_flag == "decoder" else (aux, logits)


def run_encoder(enc: torch.nn.ModuleDict, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Walk EDM's encoder (SongUNet or DhariwalUNet); returns the last output and the skip list.

    ``aux_*`` modules (NCSN++'s input pyramid) update the auxiliary path and the last stored skip.
    """
    skips = []
    aux = x
    for name, block in enc.items():
        if "aux_down" in name:
            aux = block(aux)
        elif "aux_skip" in name:
            x = skips[-1] = x + block(aux)
        elif "aux_residual" in name:
            x = skips[-1] = aux = (x + block(aux)) / np.sqrt(2)
        else:
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
    return x, skips


def run_decoder(dec: torch.nn.ModuleDict, x: torch.Tensor, emb: torch.Tensor,
                skips: list) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Walk EDM's decoder, concatenating the skips a block expects (LIFO); returns (x, SongUNet's aux output)."""
    aux = None
    tmp = None
    for name, block in dec.items():
        if "aux_up" in name:
            aux = block(aux)
        elif "aux_norm" in name:
            tmp = block(x)
        elif "aux_conv" in name:
            tmp = block(silu(tmp))
            aux = tmp if aux is None else tmp + aux
        else:
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
    return x, aux
