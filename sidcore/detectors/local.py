"""The common part of the detectors whose network comes from a local file (nothing is downloaded at run time)."""
from __future__ import annotations

import os

import torch
from torch_fidelity import FeatureExtractorBase

from sidcore.errors import UserError


class LocalExtractor(FeatureExtractorBase):
    """A torch-fidelity extractor built by ``load`` from ``feature_extractor_weights_path``; takes uint8 RGB."""

    weights_file = "weights file"  # what the file is, for the error when none is given

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 **kwargs) -> None:
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise UserError(f"feature extractor {name!r} needs feature_extractor_weights_path "
                             f"(a local {self.weights_file})")
        self.net = self.load(feature_extractor_weights_path)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def load(path: str | os.PathLike) -> torch.nn.Module:
        raise NotImplementedError

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def check_images(images: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 [B, 3, H, W] images, got {images.dtype} {tuple(images.shape)}")
