"""FID, Inception Score, FD_DINOv2 and precision/recall computed the papers' way, on top of torch-fidelity.

Features come from torch-fidelity feature extractors built from local weights files:
``inception-2015-12-05`` (NVIDIA's TorchScript Inception-v3, used by SiD's metric code),
``inception-v3-compat`` (torch-fidelity's port of the same TF graph), ``dinov2-vit-l-14-edm2``
(DINOv2 ViT-L/14 as in EDM2's FD_DINOv2) and ``sidcore-digits`` (a trained digit classifier for the
tiny experiment). FID statistics are float64 with unbiased covariance, like EDM's reference files; the
Fréchet distance is ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 sqrt(S_a S_b))``.

Reference statistics are read from EDM ``.npz`` files (``mu``, ``sigma``) and from EDM2 ``.pkl``
files (``{'fid': {...}, 'fd_dinov2': {...}}``); the latter are unpickled with a loader that admits
nothing but numpy arrays and plain containers. The precision/recall reference is OpenAI's image batch
(``VIRTUAL_imagenet64_labeled.npz``).
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch_fidelity import FeatureExtractorBase
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric
from torch_fidelity.utils import create_feature_extractor

import sidcore.detectors.digits  # noqa: F401  (registers the extractors under their names)
import sidcore.detectors.dinov2  # noqa: F401
import sidcore.detectors.nvidia_inception  # noqa: F401
from sidcore.atomic import atomic_path
from sidcore.errors import UserError
from sidcore.safe_pickle import RestrictedUnpickler

Stats = dict[str, np.ndarray]  # {"mu": [D] float64, "sigma": [D, D] float64}
PR_BATCH = 10_000  # rows/columns of the pairwise-distance blocks, as in NVIDIA's metric code


@dataclass(frozen=True)
class DetectorSpec:
    fid_feature: str  # feature whose statistics enter the FID (or FD_DINOv2)
    is_feature: str | None  # logits for the Inception Score; None if the detector has no classifier
    channels: int  # input channels the detector expects; grayscale is repeated when this is 3


DETECTORS: dict[str, DetectorSpec] = {
    "inception-2015-12-05": DetectorSpec(fid_feature="2048", is_feature="logits_unbiased", channels=3),
    "inception-v3-compat": DetectorSpec(fid_feature="2048", is_feature="logits_unbiased", channels=3),
    "dinov2-vit-l-14-edm2": DetectorSpec(fid_feature="dinov2", is_feature=None, channels=3),
    "sidcore-digits": DetectorSpec(fid_feature="256", is_feature="logits", channels=1),
}


def detector_spec(name: str) -> DetectorSpec:
    if name not in DETECTORS:
        raise UserError(f"unknown detector {name!r}; known: {', '.join(DETECTORS)}")
    return DETECTORS[name]


def create_detector(name: str, weights_path: str | os.PathLike | None,
                    device: torch.device | str) -> FeatureExtractorBase:
    """Build the named torch-fidelity extractor from a local weights file, requesting its FID and IS features."""
    spec = detector_spec(name)
    if weights_path is None:
        raise UserError(f"detector {name!r} needs a local weights file (nothing is downloaded at run time)")
    if not Path(weights_path).is_file():
        raise FileNotFoundError(f"detector weights not found: {weights_path}")
    features = [spec.fid_feature] + ([spec.is_feature] if spec.is_feature is not None else [])
    detector = create_feature_extractor(name, features, cuda=False, verbose=False,
                                        feature_extractor_weights_path=str(weights_path))
    return detector.to(device)


@torch.no_grad()
def extract(detector: FeatureExtractorBase, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Features of uint8 images [B, C, H, W] from a detector made by :func:`create_detector`.

    Returns {"fid": float64 [B, D]} and, when the detector has a classifier, {"is": logits [B, K]}, on
    the CPU. Grayscale images are repeated to three channels for RGB detectors.
    """
    spec = detector_spec(detector.get_name())
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 [B, C, H, W] images, got {images.dtype} {tuple(images.shape)}")
    param = next(detector.parameters(), None)
    x = images.to(param.device if param is not None else "cpu")
    if x.shape[1] == 1 and spec.channels == 3:
        x = x.repeat(1, 3, 1, 1)
    out = detector.convert_features_tuple_to_dict(detector(x))
    result = {"fid": out[spec.fid_feature].to("cpu", torch.float64)}
    if spec.is_feature is not None:
        result["is"] = out[spec.is_feature].cpu()
    return result


def fid_statistics(features: torch.Tensor) -> Stats:
    """Mean and unbiased covariance (float64) of features [N, D], N ≥ 2."""
    if features.dim() != 2 or len(features) < 2:
        raise ValueError(f"expected features [N >= 2, D], got {tuple(features.shape)}")
    stats = fid_features_to_statistics(features.detach().cpu().double())
    return {"mu": stats["mu"], "sigma": stats["sigma"]}


def inception_score(logits: torch.Tensor, splits: int = 10) -> float:
    """Mean over ``splits`` consecutive splits (arrival order, as SiD) of exp(E KL(p(y|x) || p(y))),
    with p(y|x) = softmax(logits)."""
    if logits.dim() != 2 or len(logits) < splits:
        raise ValueError(f"expected logits [N >= {splits}, K], got {tuple(logits.shape)}")
    return float(isc_features_to_metric(logits.detach().cpu(), splits=splits, shuffle=False)[KEY_METRIC_ISC_MEAN])


def precision_recall(gen_features: torch.Tensor, real_features: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with neighbourhood size ``k``.

    A sample's k-NN radius is the distance to its (k+1)-th nearest neighbour counting itself. Precision
    is the fraction of generated samples inside some real sample's ball, recall the fraction of real
    samples inside some generated sample's ball. As in NVIDIA's metric code the features are first
    rounded to float16; the distances are then computed in float32 (NVIDIA's GPU code keeps them in
    float16), in blocks of 10,000, on the device of ``gen_features``.
    """
    if gen_features.dim() != 2 or real_features.dim() != 2 or gen_features.shape[1] != real_features.shape[1]:
        raise ValueError(f"expected features [N, D] of equal D, got {tuple(gen_features.shape)} "
                         f"and {tuple(real_features.shape)}")
    if min(len(gen_features), len(real_features)) <= k:
        raise ValueError(f"need more than k={k} samples in each set")
    gen = gen_features.detach().to(torch.float16).float()
    real = real_features.detach().to(gen.device, torch.float16).float()
    out = prc_features_to_metric(gen, real, prc_neighborhood=k, prc_batch_size=PR_BATCH, save_cpu_ram=True,
                                 verbose=False)
    return float(out[KEY_METRIC_PRECISION]), float(out[KEY_METRIC_RECALL])


def _as_stats(stats: dict, where: str) -> Stats:
    mu, sigma = (np.asarray(stats[k], dtype=np.float64) for k in ("mu", "sigma"))
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise UserError(f"{where}: inconsistent statistics shapes mu {mu.shape}, sigma {sigma.shape}")
    return {"mu": mu, "sigma": sigma}


def frechet_distance(stats_a: dict, stats_b: dict) -> float:
    """Fréchet distance between two {"mu", "sigma"} Gaussians (computed in float64)."""
    a, b = _as_stats(stats_a, "first statistics"), _as_stats(stats_b, "second statistics")
    if a["mu"].shape != b["mu"].shape:
        raise ValueError(f"feature dimensions differ: {a['mu'].size} vs {b['mu'].size}")
    return float(fid_statistics_to_metric(a, b, verbose=False)[KEY_METRIC_FID])


def reference_from_batches(batches: Iterable[torch.Tensor], detector: FeatureExtractorBase) -> Stats:
    """FID statistics (unbiased covariance, like EDM's reference files) of uint8 image batches [B, C, H, W]."""
    return fid_statistics(torch.cat([extract(detector, images)["fid"] for images in batches]))


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
                raise UserError(f"{path}: missing arrays {sorted(missing)}")
            entries = {"fid": {"mu": z["mu"], "sigma": z["sigma"]}}
    elif magic[:1] == b"\x80":  # pickle protocol ≥ 2
        with open(path, "rb") as f:
            data = RestrictedUnpickler(f, path).load()
        if not isinstance(data, dict) or not isinstance(data.get("fid"), dict):
            raise UserError(f"{path}: expected a dict with a 'fid' entry")
        entries = {k: data[k] for k in ("fid", "fd_dinov2") if k in data}
    else:
        raise UserError(f"{path}: unknown reference format (expected an EDM .npz or an EDM2 .pkl)")
    return {k: _as_stats(v, f"{path}[{k}]") for k, v in entries.items()}


def save_reference(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write EDM's npz layout (``mu``, ``sigma`` as float64) atomically."""
    stats = _as_stats({"mu": mu, "sigma": sigma}, str(path))
    with atomic_path(path) as tmp:
        np.savez(tmp, mu=stats["mu"], sigma=stats["sigma"])


def load_pr_reference(path: str | os.PathLike) -> torch.Tensor:
    """Images of OpenAI's reference batch (``VIRTUAL_imagenet64_labeled.npz``) as uint8 [N, 3, H, W].

    The archive holds ``arr_0``, uint8 [N, H, W, 3] (NHWC), and optionally ``arr_1`` (labels, unused).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"precision/recall reference not found: {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not an npz archive ({err})") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise UserError(f"{path}: expected an npz archive with 'arr_0', found a single array")
    with archive:
        if "arr_0" not in archive.files:
            raise UserError(f"{path}: no 'arr_0' image array (arrays: {', '.join(archive.files) or 'none'})")
        images = archive["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f"{path}: 'arr_0' must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


# ------------------------------------------------------------------------------------------------
# Command line.


def write_reference(data_path: str, detector_name: str, detector_weights: str, out: str, batch: int = 256,
                    log=print) -> None:
    """FID reference statistics (EDM's npz layout) of the images of a dataset zip."""
    from sidcore.dataset import read_image_zip
    data = read_image_zip(data_path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    detector = create_detector(detector_name, detector_weights, device)
    stats = reference_from_batches(data.batches(batch), detector)
    save_reference(out, stats["mu"], stats["sigma"])
    log(f"{len(data)} images, {stats['mu'].size}-d {detector_name} features -> {out}")
