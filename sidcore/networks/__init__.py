"""sidcore's networks, built from the settings in config.yaml or recorded in a converted pickle."""
from __future__ import annotations

import numpy as np
import torch

from sidcore.networks.edm2 import EDM2Precond
from sidcore.networks.precond import EDMPrecond, VEPrecond, VPPrecond, iDDPMPrecond

ARCHITECTURES = {
    # EDM's train.py presets; per-dataset values (channel_mult, dropout, …) come from config.yaml.
    "ddpmpp": dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard",
                   decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
                   channel_mult=[2, 2, 2]),
    "ncsnpp": dict(model_type="SongUNet", embedding_type="fourier", encoder_type="residual",
                   decoder_type="standard", channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128,
                   channel_mult=[2, 2, 2]),
    "adm": dict(model_type="DhariwalUNet", model_channels=192, channel_mult=[1, 2, 3, 4]),
    "edm2": {},  # EDM2's U-Net; its size is model_channels (XS 128 … XXL 448)
}
PRECONDITIONERS = {"edm": EDMPrecond, "vp": VPPrecond, "ve": VEPrecond, "iddpm": iDDPMPrecond}


def build_network(arch: str, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool = False,
                  precond: str = "edm", **overrides) -> torch.nn.Module:
    """A preconditioned network from an architecture preset and per-dataset settings.

    ``precond`` picks EDM's (default), VP, VE or iDDPM preconditioning for EDM's U-Nets; ``edm2`` always
    uses EDM preconditioning (with the log-variance head unless ``logvar=False``).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"network.arch {arch!r} is not available (known: {sorted(ARCHITECTURES)})")
    if precond not in PRECONDITIONERS or (arch == "edm2" and precond != "edm"):
        raise ValueError(f"network.precond {precond!r} is not available for arch {arch!r}")
    cls = EDM2Precond if arch == "edm2" else PRECONDITIONERS[precond]
    return cls(img_resolution, img_channels, label_dim, use_fp16=use_fp16, **{**ARCHITECTURES[arch], **overrides})


def count_parameters(net: torch.nn.Module) -> int:
    return int(sum(np.prod(p.shape) for p in net.parameters()))
