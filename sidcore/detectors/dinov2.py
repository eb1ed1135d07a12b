"""DINOv2 ViT-L/14 features for FD_DINOv2, following EDM2's protocol.

The network is timm's ``VisionTransformer``, filled from the original facebookresearch checkpoint
(``dinov2_vitl14_pretrain.pth``), read with ``torch.load(weights_only=True)`` so that loading runs no
code. The architecture (width, depth, heads of 64 channels, patch size, MLP ratio) is read off the
state dict. Images are resized to 224×224 as in EDM2, and the network returns the final layer-normed
CLS token. Exposed to torch-fidelity as ``dinov2-vit-l-14-edm2`` with the feature ``"dinov2"``.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from sidcore import checkpoint
from sidcore.detectors.local import LocalExtractor
from sidcore.errors import UserError

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

EXTRACTOR_NAME = "dinov2-vit-l-14-edm2"
INPUT_SIZE = 224
HEAD_DIM = 64
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# The official model keeps its 37×37 position-embedding grid (trained at 518 px) and resamples it on
# every call to the input's grid g (16 at 224 px): bicubic, antialias off, with scale factor
# (g + 0.1) / 37 rather than an output size, so the sampling positions differ slightly from a
# plain resize to g×g. Checked against facebookresearch/dinov2 main (interpolate_pos_encoding in
# dinov2/models/vision_transformer.py; hub defaults interpolate_offset=0.1, interpolate_antialias=False).
POS_EMBED_OFFSET = 0.1
REQUIRED_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight")


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 [B, 3, 224, 224]: antialiased bicubic resize, /255, ImageNet normalisation."""
    x = F.interpolate(images.to(torch.float32), size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", antialias=True)
    x = x / 255
    x = x - torch.tensor(MEAN, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    return x / torch.tensor(STD, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)


def resample_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """[1, 1 + M², D] (class token first) -> [1, 1 + grid², D], the way the official model resamples."""
    dim = pos_embed.shape[-1]
    m = math.isqrt(pos_embed.shape[1] - 1)
    if m * m != pos_embed.shape[1] - 1:
        raise ValueError(f"position embedding of {pos_embed.shape[1] - 1} patches is not a square grid")
    cls_pos, patch_pos = pos_embed[:, :1].float(), pos_embed[:, 1:].float()
    scale = (grid + POS_EMBED_OFFSET) / m
    patch_pos = F.interpolate(patch_pos.reshape(1, m, m, dim).permute(0, 3, 1, 2), scale_factor=(scale, scale),
                              mode="bicubic", antialias=False)
    if patch_pos.shape[-2:] != (grid, grid):
        raise ValueError(f"resampling a {m}x{m} position grid gave {tuple(patch_pos.shape[-2:])}, not {grid}x{grid}")
    return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)], dim=1)


def load_dinov2(path: str | os.PathLike) -> VisionTransformer:
    """Build a timm ViT for 224×224 inputs from a facebookresearch DINOv2 checkpoint (strict key check)."""
    from timm.models.vision_transformer import VisionTransformer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DINOv2 checkpoint not found: {path}")
    state = checkpoint.load(path, "DINOv2 checkpoint")
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise UserError(f"{path}: not a DINOv2 state dict in the facebookresearch layout "
                         f"(needs {', '.join(REQUIRED_KEYS)})")
    dim = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if dim % HEAD_DIM or INPUT_SIZE % patch or depth < 1 or "blocks.0.mlp.fc1.weight" not in state:
        raise UserError(f"{path}: unsupported DINOv2 shape (width {dim}, patch {patch}, {depth} blocks)")
    model = VisionTransformer(
        img_size=INPUT_SIZE, patch_size=patch, embed_dim=dim, depth=depth, num_heads=dim // HEAD_DIM,
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / dim, init_values=1.0, num_classes=0,
        global_pool="token", weight_init="skip")
    state = {k: v for k, v in state.items() if k != "mask_token"}  # only used for masked training
    state["pos_embed"] = resample_pos_embed(state["pos_embed"], INPUT_SIZE // patch)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise UserError(f"{path}: does not match a DINOv2 ViT ({err})") from err
    return model.eval().requires_grad_(False)


class DinoV2Extractor(LocalExtractor):
    """torch-fidelity wrapper of :func:`load_dinov2` (checkpoint at ``feature_extractor_weights_path``)
    with EDM2's pre-processing. Feature ``"dinov2"``: the normed CLS token, float32."""

    weights_file = "dinov2_vitl14_pretrain.pth"
    load = staticmethod(load_dinov2)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("dinov2",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"fid": "dinov2", "kid": "dinov2", "prc": "dinov2"}[metric]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.check_images(images)
        return (self.net(preprocess(images)).float(),)


if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(EXTRACTOR_NAME, DinoV2Extractor)
