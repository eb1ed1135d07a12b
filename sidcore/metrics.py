"""FID and Inception Score computed the papers' way, on top of torch-fidelity.

Features come from a torch-fidelity feature extractor: ``inception-v3-compat`` (the TF Inception
graph used by EDM/EDM2/SiD, loaded from a local weights file) for the paper datasets, and
``sidcore-digits`` (a trained digit classifier) for the tiny experiment. FID statistics are float64
with unbiased covariance, like EDM's reference files; the Fréchet distance is
``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 sqrt(S_a S_b))``.

Reference statistics are read from EDM ``.npz`` files (``mu``, ``sigma``) and from EDM2 ``.pkl``
files (``{'fid': {...}, 'fd_dinov2': {...}}``); the latter are unpickled with a loader that admits
nothing but numpy arrays and plain containers.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch_fidelity import FeatureExtractorBase
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric
from torch_fidelity.utils import create_feature_extractor

from sidcore.atomic import atomic_path
from sidcore.safe_pickle import RestrictedUnpickler
import sidcore.detectors.digits  # noqa: F401  (registers the "sidcore-digits" extractor)

Stats = dict[str, np.ndarray]  # {"mu": [D] float64, "sigma": [D, D] float64}


@dataclass(frozen=True)
class DetectorSpec:
    fid_feature: str  # feature whose statistics enter the FID
    is_feature: str  # logits for the Inception Score
    channels: int  # input channels the detector expects; grayscale is repeated when this is 3


DETECTORS: dict[str, DetectorSpec] = {
    "inception-v3-compat": DetectorSpec(fid_feature="2048", is_feature="logits_unbiased", channels=3),
    "sidcore-digits": DetectorSpec(fid_feature="256", is_feature="logits", channels=1),
}


def detector_spec(name: str) -> DetectorSpec:
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; known: {', '.join(DETECTORS)}")
    return DETECTORS[name]


def create_detector(name: str, weights_path: str | os.PathLike | None, device: torch.device | str) -> FeatureExtractorBase:
    """Build the named torch-fidelity extractor from a local weights file, requesting its FID and IS features."""
    spec = detector_spec(name)
    if weights_path is None:
        raise ValueError(f"detector {name!r} needs a local weights file (nothing is downloaded at run time)")
    if not Path(weights_path).is_file():
        raise FileNotFoundError(f"detector weights not found: {weights_path}")
    detector = create_feature_extractor(name, [spec.fid_feature, spec.is_feature], cuda=False, verbose=False,
                                        feature_extractor_weights_path=str(weights_path))
    return detector.to(device)


class FeatureAccumulator:
    """Feeds uint8 image batches through a detector made by :func:`create_detector` and keeps, on the CPU,
    the FID features (float64) and the IS logits."""

    def __init__(self, detector: FeatureExtractorBase) -> None:
        self.detector = detector
        self.spec = detector_spec(detector.get_name())
        self._features: list[torch.Tensor] = []
        self._logits: list[torch.Tensor] = []

    def __len__(self) -> int:
        return sum(len(f) for f in self._features)

    @torch.no_grad()
    def add(self, images: torch.Tensor) -> None:
        """Add a batch of uint8 images [B, C, H, W]."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected uint8 [B, C, H, W] images, got {images.dtype} {tuple(images.shape)}")
        x = images.to(next(self.detector.parameters()).device)
        if x.shape[1] == 1 and self.spec.channels == 3:
            x = x.repeat(1, 3, 1, 1)
        out = self.detector.convert_features_tuple_to_dict(self.detector(x))
        self._features.append(out[self.spec.fid_feature].double().cpu())
        self._logits.append(out[self.spec.is_feature].cpu())

    def _stacked(self, parts: list[torch.Tensor]) -> torch.Tensor:
        if not parts:
            raise ValueError("no images were added")
        return torch.cat(parts)

    def fid_statistics(self) -> Stats:
        """Mean and unbiased covariance of the FID features, float64."""
        stats = fid_features_to_statistics(self._stacked(self._features))
        return {"mu": stats["mu"].astype(np.float64), "sigma": stats["sigma"].astype(np.float64)}

    def inception_score(self, splits: int = 10) -> float:
        """Mean over ``splits`` consecutive splits (arrival order, as SiD) of exp(E KL(p(y|x) || p(y)))."""
        return float(isc_features_to_metric(self._stacked(self._logits), splits=splits, shuffle=False)[KEY_METRIC_ISC_MEAN])


def _as_stats(stats: dict, where: str) -> Stats:
    mu, sigma = (np.asarray(stats[k], dtype=np.float64) for k in ("mu", "sigma"))
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ValueError(f"{where}: inconsistent statistics shapes mu {mu.shape}, sigma {sigma.shape}")
    return {"mu": mu, "sigma": sigma}


def frechet_distance(stats_a: dict, stats_b: dict) -> float:
    """Fréchet distance between two {"mu", "sigma"} Gaussians (computed in float64)."""
    a, b = _as_stats(stats_a, "first statistics"), _as_stats(stats_b, "second statistics")
    if a["mu"].shape != b["mu"].shape:
        raise ValueError(f"feature dimensions differ: {a['mu'].size} vs {b['mu'].size}")
    return float(fid_statistics_to_metric(a, b, verbose=False)[KEY_METRIC_FID])


def reference_from_batches(batches: Iterable[torch.Tensor], detector: FeatureExtractorBase) -> Stats:
    """FID statistics (unbiased covariance, like EDM's reference files) of uint8 image batches [B, C, H, W]."""
    acc = FeatureAccumulator(detector)
    for images in batches:
        acc.add(images)
    return acc.fid_statistics()


# ------------------------------------------------------------------------------------------------
# Reference statistics files.

def load_reference(path: str | os.PathLike) -> dict[str, Stats]:
    """Read reference statistics: EDM ``.npz`` -> {"fid"}; EDM2 ``.pkl`` -> {"fid"[, "fd_dinov2"]}.

    The format is recognised from the content (downloaded files are stored under their registry key).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"PK":  # an npz is a zip archive
        with np.load(path, allow_pickle=False) as z:
            missing = {"mu", "sigma"} - set(z.files)
            if missing:
                raise ValueError(f"{path}: missing arrays {sorted(missing)}")
            entries = {"fid": {"mu": z["mu"], "sigma": z["sigma"]}}
    elif magic[:1] == b"\x80":  # pickle protocol ≥ 2
        with open(path, "rb") as f:
            data = RestrictedUnpickler(f, path).load()
        if not isinstance(data, dict) or not isinstance(data.get("fid"), dict):
            raise ValueError(f"{path}: expected a dict with a 'fid' entry")
        entries = {k: data[k] for k in ("fid", "fd_dinov2") if k in data}
    else:
        raise ValueError(f"{path}: unknown reference format (expected an EDM .npz or an EDM2 .pkl)")
    return {k: _as_stats(v, f"{path}[{k}]") for k, v in entries.items()}


def save_reference(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write EDM's npz layout (``mu``, ``sigma`` as float64) atomically."""
    stats = _as_stats({"mu": mu, "sigma": sigma}, str(path))
    with atomic_path(path) as tmp:
        np.savez(tmp, mu=stats["mu"], sigma=stats["sigma"])


# ------------------------------------------------------------------------------------------------
# Command line.

def _ref_stats(args: argparse.Namespace) -> int:
    from sidcore.dataset import read_image_zip

    data = read_image_zip(args.data)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    detector = create_detector(args.detector, args.detector_weights, device)
    stats = reference_from_batches(data.batches(args.batch), detector)
    save_reference(args.out, stats["mu"], stats["sigma"])
    print(f"{len(data)} images, {stats['mu'].size}-d {args.detector} features -> {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ref-stats", help="FID reference statistics (EDM npz layout) of a dataset zip")
    p.add_argument("--data", required=True, help="EDM-layout image zip")
    p.add_argument("--detector", required=True, choices=sorted(DETECTORS))
    p.add_argument("--detector-weights", required=True, help="local weights file of the detector")
    p.add_argument("--out", required=True, help="output .npz path")
    p.add_argument("--batch", type=int, default=256)
    p.set_defaults(func=_ref_stats)
