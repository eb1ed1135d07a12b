"""FID / IS machinery: Fréchet distance, reference files, safe unpickling, the digit detector."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity.utils
from sklearn.datasets import load_digits

from sidcore import metrics
from sidcore.detectors import digits


def gaussian_features(seed: int, n: int = 2000, dim: int = 16, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    return rng.normal(size=(n, dim)) @ mixing + shift


def stats_of(features: np.ndarray) -> dict[str, np.ndarray]:
    return {"mu": features.mean(axis=0), "sigma": np.cov(features, rowvar=False)}


def scipy_frechet(a: dict, b: dict) -> float:
    diff = a["mu"] - b["mu"]
    covmean = scipy.linalg.sqrtm(a["sigma"] @ b["sigma"])
    return float(np.real(diff @ diff + np.trace(a["sigma"] + b["sigma"] - 2 * covmean)))


def test_frechet_distance_matches_scipy():
    a, b = stats_of(gaussian_features(0)), stats_of(gaussian_features(1, shift=0.3))
    expected = scipy_frechet(a, b)
    assert expected > 0.5
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    a = stats_of(gaussian_features(2))
    assert abs(metrics.frechet_distance(a, a)) < 1e-8


def test_npz_reference_roundtrip(tmp_path):
    a = stats_of(gaussian_features(3))
    official = tmp_path / "official.npz"
    np.savez(official, mu=a["mu"], sigma=a["sigma"])
    ref = metrics.load_reference(official)
    assert set(ref) == {"fid"}
    assert np.array_equal(ref["fid"]["mu"], a["mu"]) and np.array_equal(ref["fid"]["sigma"], a["sigma"])

    ours = tmp_path / "ours.npz"
    metrics.save_reference(ours, a["mu"], a["sigma"])
    with np.load(ours, allow_pickle=False) as z:
        assert sorted(z.files) == ["mu", "sigma"] and z["mu"].dtype == np.float64
        assert np.array_equal(z["sigma"], a["sigma"])


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pkl_reference_roundtrip(tmp_path, protocol):
    fid, dino = stats_of(gaussian_features(4)), stats_of(gaussian_features(5, dim=8))
    path = tmp_path / "img512.pkl"
    with open(path, "wb") as f:
        pickle.dump({"num_images": 2000, "fid": fid, "fd_dinov2": dino}, f, protocol=protocol)
    ref = metrics.load_reference(path)
    assert set(ref) == {"fid", "fd_dinov2"}
    for key, expected in (("fid", fid), ("fd_dinov2", dino)):
        assert np.array_equal(ref[key]["mu"], expected["mu"])
        assert np.array_equal(ref[key]["sigma"], expected["sigma"])


class _Exploit:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return os.system, (f"echo pwned > {self.target}",)


def test_malicious_pkl_is_refused(tmp_path):
    target = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"fid": {"mu": _Exploit(str(target)), "sigma": np.eye(2)}}, f)
    with pytest.raises(pickle.UnpicklingError, match=r"system") as err:
        metrics.load_reference(path)
    assert str(path) in str(err.value)
    assert not target.exists()


# ------------------------------------------------------------------------------------------------
# Digit detector (the tiny experiment's stand-in for Inception).

@pytest.fixture(scope="module")
def real_digits() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    images = np.round(d.images * 255 / 16).astype(np.uint8)[:, None]
    return torch.from_numpy(images), torch.from_numpy(d.target).long()


@pytest.fixture(scope="module")
def detector_checkpoint(real_digits, tmp_path_factory) -> tuple[str, float]:
    net, accuracy = digits.train_digit_classifier(*real_digits, seed=0, epochs=20)
    path = tmp_path_factory.mktemp("detector") / "digitnet.pt"
    digits.save_digit_classifier(net, accuracy, path)
    return str(path), accuracy


def test_digit_classifier_accuracy(detector_checkpoint):
    path, accuracy = detector_checkpoint
    assert accuracy >= 0.95
    _, stored = digits.load_digit_classifier(path)
    assert stored == pytest.approx(accuracy)


def test_wrong_checkpoint_kind_is_named(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"kind": "something-else", "state_dict": {}}, path)
    with pytest.raises(ValueError, match="other.pt"):
        digits.load_digit_classifier(path)


def test_registered_extractor_shapes(detector_checkpoint, real_digits):
    extractor = torch_fidelity.utils.create_feature_extractor(
        "sidcore-digits", ["256", "64", "logits"], cuda=False, verbose=False,
        feature_extractor_weights_path=detector_checkpoint[0])
    conv, features, logits = extractor(real_digits[0][:32])
    assert conv.shape == (32, 256) and features.shape == (32, 64) and features.dtype == torch.float32
    assert logits.shape == (32, 10)


def test_real_digits_metrics(detector_checkpoint, real_digits):
    images = real_digits[0]
    detector = metrics.create_detector("sidcore-digits", detector_checkpoint[0], "cpu")
    acc = metrics.FeatureAccumulator(detector)
    for start in range(0, len(images), 500):
        acc.add(images[start:start + 500])
    assert len(acc) == len(images)
    assert acc.inception_score() > 5

    reference = metrics.reference_from_batches(images.split(256), detector)
    assert reference["mu"].shape == (256,) and reference["sigma"].dtype == np.float64
    assert abs(metrics.frechet_distance(acc.fid_statistics(), reference)) < 1e-6
    noise = torch.randint(0, 256, images.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert metrics.frechet_distance(metrics.reference_from_batches(noise.split(256), detector), reference) > 1


def test_inception_detector_takes_grayscale(tmp_path, monkeypatch):
    # Randomly initialised Inception weights stand in for the real file (the feature names and the
    # grayscale handling are what is checked here, not the values).
    from torch_fidelity import feature_extractor_inceptionv3 as inception

    cls = inception.FeatureExtractorInceptionV3
    with monkeypatch.context() as m:
        m.setattr(inception, "load_state_dict_from_url", lambda *args, **kwargs: None)
        m.setattr(cls, "load_state_dict", lambda self, state_dict: None)
        weights = tmp_path / "inception.pth"
        torch.save(cls("inception-v3-compat", ["2048"]).state_dict(), weights)
    detector = metrics.create_detector("inception-v3-compat", weights, "cpu")
    acc = metrics.FeatureAccumulator(detector)
    acc.add(torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8))
    stats = acc.fid_statistics()
    assert stats["mu"].shape == (2048,) and stats["sigma"].shape == (2048, 2048)
    assert np.isfinite(acc.inception_score(splits=2))


def test_reference_format_is_recognised_without_a_suffix(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3)
    metrics.save_reference(tmp_path / "r.npz", mu, sigma)
    (tmp_path / "r.npz").rename(tmp_path / "cifar10-32x32")
    loaded = metrics.load_reference(tmp_path / "cifar10-32x32")["fid"]
    assert np.array_equal(loaded["mu"], mu) and np.array_equal(loaded["sigma"], sigma)
    (tmp_path / "junk").write_text("not statistics")
    with pytest.raises(ValueError, match="junk"):
        metrics.load_reference(tmp_path / "junk")
