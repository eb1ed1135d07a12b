"""NVIDIA's Inception-v3 TorchScript detector (``inception-2015-12-05.pt``), the one SiD's metric code uses.

The file is a TorchScript archive (a translation of TensorFlow's ``inception-2015-12-05`` graph), read
with TorchScript's own loader :func:`torch.jit.load`, never with Python's pickle or ``torch.load``. The
module takes uint8 NCHW RGB images of any resolution (it resizes internally); called with
``return_features=True`` it returns the [N, 2048] pool features, with ``no_output_bias=True`` the
[N, 1008] class probabilities (softmax without the output bias) that enter the Inception Score. It is
exposed to torch-fidelity as ``inception-2015-12-05`` with features ``"2048"`` and ``"logits_unbiased"``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from sidcore.detectors.local import LocalExtractor
from sidcore.errors import UserError

EXTRACTOR_NAME = "inception-2015-12-05"
PROBABILITY_FLOOR = torch.finfo(torch.float32).tiny  # keeps log() finite where a probability underflowed


def load_torchscript(path: str | os.PathLike) -> torch.jit.ScriptModule:
    """Load a TorchScript archive on the CPU (no Python unpickling of the file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception TorchScript file not found: {path}")
    try:
        net = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as err:
        raise UserError(f"{path}: not a TorchScript archive ({err})") from err
    return net.eval()


class NvidiaInceptionExtractor(LocalExtractor):
    """torch-fidelity wrapper of the TorchScript Inception-v3 at ``feature_extractor_weights_path``.

    Features: ``"2048"`` (pool features, float32) and ``"logits_unbiased"``: the float64 logarithm of the
    bias-free class probabilities, so that the softmax torch-fidelity's Inception Score applies to its
    input gives those probabilities back."""

    weights_file = "inception-2015-12-05.pt"
    load = staticmethod(load_torchscript)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("2048", "logits_unbiased")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"fid": "2048", "kid": "2048", "prc": "2048", "isc": "logits_unbiased"}[metric]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.check_images(images)
        out = {}
        if "2048" in self.features_list:
            out["2048"] = self.net(images, return_features=True).float()
        if "logits_unbiased" in self.features_list:
            probs = self.net(images, no_output_bias=True)
            out["logits_unbiased"] = probs.double().clamp_min(PROBABILITY_FLOOR).log()
        return tuple(out[name] for name in self.features_list)


if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(EXTRACTOR_NAME, NvidiaInceptionExtractor)
