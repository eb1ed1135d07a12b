"""Metric machinery: Fréchet distance, IS, precision/recall, reference files, safe unpickling, detectors."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
import torch_fidelity.utils
from sklearn.datasets import load_digits
from torch import nn
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

from sidcore import metrics
from sidcore.benchmark import random_detector
from sidcore.detectors import digits, dinov2, nvidia_inception


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


def test_fid_from_features_matches_torch_fidelity_and_scipy():
    feats_a, feats_b = gaussian_features(6, dim=12), gaussian_features(7, dim=12, shift=0.2)
    ours = metrics.frechet_distance(metrics.fid_statistics(torch.from_numpy(feats_a)),
                                    metrics.fid_statistics(torch.from_numpy(feats_b)))
    tf_stats = [fid_features_to_statistics(torch.from_numpy(f)) for f in (feats_a, feats_b)]
    assert ours == pytest.approx(fid_statistics_to_metric(*tf_stats, verbose=False)[KEY_METRIC_FID], rel=1e-6)
    expected = scipy_frechet(stats_of(feats_a), stats_of(feats_b))
    assert expected > 0.2
    assert ours == pytest.approx(expected, rel=1e-6)


def test_fid_statistics_are_float64_with_unbiased_covariance():
    feats = gaussian_features(8, n=50, dim=5).astype(np.float32)
    stats = metrics.fid_statistics(torch.from_numpy(feats))
    assert stats["mu"].dtype == np.float64 and stats["sigma"].dtype == np.float64
    centred = feats.astype(np.float64) - feats.astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(stats["sigma"], centred.T @ centred / (len(feats) - 1), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="N >= 2"):
        metrics.fid_statistics(torch.zeros(1, 5))


def test_frechet_distance_of_a_set_with_itself_is_zero():
    a = stats_of(gaussian_features(2))
    assert abs(metrics.frechet_distance(a, a)) < 1e-8


def test_npz_reference_roundtrip(tmp_path):
    a = stats_of(gaussian_features(3))
    official = tmp_path / "official.npz"
    np.savez(official, mu=a["mu"], sigma=a["sigma"])
    ref = metrics.load_reference(official)
    assert set(ref) == {"fid"}
    for name in ("mu", "sigma"):
        assert ref["fid"][name].dtype == np.float64 and ref["fid"][name].tobytes() == a[name].tobytes()

    ours = tmp_path / "ours.npz"
    metrics.save_reference(ours, a["mu"], a["sigma"])
    with np.load(ours, allow_pickle=False) as z:
        assert sorted(z.files) == ["mu", "sigma"] and z["mu"].dtype == np.float64
        assert np.array_equal(z["sigma"], a["sigma"])


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pkl_reference_roundtrip(tmp_path, protocol):
    # EDM2 layout: {'num_images', 'fid': {'mu', 'sigma'}, 'fd_dinov2': {'mu', 'sigma'}}, float64 arrays.
    fid, dino = stats_of(gaussian_features(4)), stats_of(gaussian_features(5, dim=8))
    path = tmp_path / "img512.pkl"
    with open(path, "wb") as f:
        pickle.dump({"num_images": 2000, "fid": fid, "fd_dinov2": dino}, f, protocol=protocol)
    ref = metrics.load_reference(path)
    assert set(ref) == {"fid", "fd_dinov2"}
    for key, expected in (("fid", fid), ("fd_dinov2", dino)):
        for name in ("mu", "sigma"):
            assert ref[key][name].dtype == np.float64
            assert ref[key][name].tobytes() == expected[name].tobytes()


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
    outputs = [metrics.extract(detector, images[start:start + 500]) for start in range(0, len(images), 500)]
    features, logits = (torch.cat([o[key] for o in outputs]) for key in ("fid", "is"))
    assert len(features) == len(images)
    assert metrics.inception_score(logits) > 5

    reference = metrics.reference_from_batches(images.split(256), detector)
    assert reference["mu"].shape == (256,) and reference["sigma"].dtype == np.float64
    assert abs(metrics.frechet_distance(metrics.fid_statistics(features), reference)) < 1e-6
    noise = torch.randint(0, 256, images.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert metrics.frechet_distance(metrics.reference_from_batches(noise.split(256), detector), reference) > 1


def test_inception_detector_takes_grayscale(tmp_path):
    # Randomly initialised Inception weights stand in for the real file (the feature names and the
    # grayscale handling are what is checked here, not the values).
    detector = random_detector("inception-v3-compat", tmp_path, torch.device("cpu"))
    out = metrics.extract(detector, torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8))
    stats = metrics.fid_statistics(out["fid"])
    assert stats["mu"].shape == (2048,) and stats["sigma"].shape == (2048, 2048)
    assert np.isfinite(metrics.inception_score(out["is"], splits=2))


def test_reference_format_is_recognised_without_a_suffix(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3)
    metrics.save_reference(tmp_path / "r.npz", mu, sigma)
    (tmp_path / "r.npz").rename(tmp_path / "cifar10-32x32")
    loaded = metrics.load_reference(tmp_path / "cifar10-32x32")["fid"]
    assert np.array_equal(loaded["mu"], mu) and np.array_equal(loaded["sigma"], sigma)
    (tmp_path / "junk").write_text("not statistics")
    with pytest.raises(ValueError, match="junk"):
        metrics.load_reference(tmp_path / "junk")


# ------------------------------------------------------------------------------------------------
# Inception Score and precision/recall from features.

def test_inception_score_uses_consecutive_splits():
    rng = np.random.default_rng(9)
    logits = torch.from_numpy(rng.normal(scale=3.0, size=(40, 7)))
    p = torch.softmax(logits, dim=1).numpy()
    per_split = [np.exp(np.mean(np.sum(c * (np.log(c) - np.log(c.mean(axis=0))), axis=1))) for c in np.split(p, 4)]
    assert metrics.inception_score(logits, splits=4) == pytest.approx(np.mean(per_split), rel=1e-12)
    with pytest.raises(ValueError, match="N >= 4"):
        metrics.inception_score(logits[:3], splits=4)


def brute_force_precision_recall(gen: np.ndarray, real: np.ndarray, k: int) -> tuple[float, float]:
    gen, real = (x.astype(np.float16).astype(np.float64) for x in (gen, real))

    def dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    radius_gen, radius_real = np.sort(dist(gen, gen), axis=1)[:, k], np.sort(dist(real, real), axis=1)[:, k]
    precision = np.mean([np.any(row <= radius_real) for row in dist(gen, real)])
    recall = np.mean([np.any(row <= radius_gen) for row in dist(real, gen)])
    return float(precision), float(recall)


@pytest.mark.parametrize("gen_scale, k", [(1.0, 3), (0.3, 3), (2.5, 5)])
def test_precision_recall_matches_brute_force(gen_scale, k):
    rng = np.random.default_rng(10)
    real = rng.normal(size=(300, 6))
    gen = rng.normal(scale=gen_scale, size=(200, 6)) + 0.1
    expected = brute_force_precision_recall(gen, real, k)
    got = metrics.precision_recall(torch.from_numpy(gen), torch.from_numpy(real), k=k)
    assert got == pytest.approx(expected, abs=1e-6)  # torch-fidelity averages in float32; one sample is ≥ 1/300
    if gen_scale == 0.3:  # generated samples huddle inside the real distribution: precise, poor coverage
        assert got[0] - got[1] > 0.5
    if gen_scale == 2.5:  # spread-out samples: broad coverage, many outside the real support
        assert got[1] - got[0] > 0.3


def test_pr_reference_reads_openai_layout(tmp_path):
    rng = np.random.default_rng(11)
    images = rng.integers(0, 256, size=(5, 8, 6, 3), dtype=np.uint8)
    path = tmp_path / "VIRTUAL_imagenet64_labeled.npz"
    np.savez(path, images, rng.integers(0, 1000, size=5))  # stored as arr_0, arr_1
    loaded = metrics.load_pr_reference(path)
    assert loaded.dtype == torch.uint8 and loaded.shape == (5, 3, 8, 6) and loaded.is_contiguous()
    assert np.array_equal(loaded.numpy(), images.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((2, 4, 4, 3), np.uint8)}, "arr_0"),
    ({"arr_0": np.zeros((2, 4, 4, 3), np.float32)}, "float32"),
    ({"arr_0": np.zeros((2, 4, 4), np.uint8)}, r"\(2, 4, 4\)"),
    ({"arr_0": np.zeros((2, 3, 4, 4), np.uint8)}, r"\[N, H, W, 3\]"),
])
def test_pr_reference_errors_name_the_file(tmp_path, arrays, message):
    path = tmp_path / "bad_ref.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=message) as err:
        metrics.load_pr_reference(path)
    assert str(path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        metrics.load_pr_reference(tmp_path / "missing.npz")


# ------------------------------------------------------------------------------------------------
# NVIDIA's TorchScript Inception, with a scripted stand-in of the same call signature.

class FakeInception(nn.Module):
    """Any-resolution uint8 input -> 2048 features, or 1008 probabilities of a softmax without output bias."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3 * 4 * 4, 2048)
        self.head = nn.Linear(2048, 1008)
        with torch.no_grad():
            self.head.weight.mul_(40.0)  # confident predictions, so that the Inception Score is far from 1
            self.head.bias.fill_(5.0)

    def forward(self, x: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        features = torch.relu(self.body(F.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1)))
        if return_features:
            return features
        logits = features @ self.head.weight.t()
        if not no_output_bias:
            logits = logits + self.head.bias
        return torch.softmax(logits, dim=1)


@pytest.fixture(scope="module")
def fake_inception(tmp_path_factory) -> tuple[str, torch.jit.ScriptModule]:
    torch.manual_seed(0)
    scripted = torch.jit.script(FakeInception().eval())
    path = tmp_path_factory.mktemp("inception") / "inception-2015-12-05.pt"
    torch.jit.save(scripted, str(path))
    return str(path), scripted


def test_nvidia_inception_features_and_logits(fake_inception):
    path, net = fake_inception
    detector = metrics.create_detector("inception-2015-12-05", path, "cpu")
    images = torch.randint(0, 256, (6, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = metrics.extract(detector, images)
    assert out["fid"].shape == (6, 2048) and out["fid"].dtype == torch.float64
    assert out["is"].shape == (6, 1008)
    with torch.no_grad():
        assert torch.equal(out["fid"], net(images, return_features=True).double())
        probs = net(images, no_output_bias=True).double()
    assert torch.allclose(out["is"].exp(), probs, rtol=1e-12, atol=0)
    assert torch.equal(metrics.extract(detector, images[:, :1])["fid"],
                       metrics.extract(detector, images[:, :1].repeat(1, 3, 1, 1))["fid"])


def test_nvidia_inception_score_equals_hand_computation(fake_inception):
    path, net = fake_inception
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    detector = metrics.create_detector("inception-2015-12-05", path, "cpu")
    logits = torch.cat([metrics.extract(detector, batch)["is"] for batch in images.split(16)])
    with torch.no_grad():
        p = net(images, no_output_bias=True).double().numpy()
    scores = [np.exp(np.mean(np.sum(c * (np.log(c) - np.log(c.mean(axis=0))), axis=1))) for c in np.split(p, 4)]
    assert np.mean(scores) > 1.5
    assert metrics.inception_score(logits, splits=4) == pytest.approx(np.mean(scores), rel=1e-6)


def test_nvidia_inception_missing_file_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "inception-2015-12-05.pt"
    with pytest.raises(FileNotFoundError, match="inception-2015-12-05.pt") as err:
        torch_fidelity.utils.create_feature_extractor("inception-2015-12-05", ["2048"], cuda=False, verbose=False,
                                                      feature_extractor_weights_path=str(missing))
    assert str(missing) in str(err.value)
    not_script = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(2)}, not_script)
    with pytest.raises(ValueError, match="state.pt"):
        nvidia_inception.load_torchscript(not_script)


# ------------------------------------------------------------------------------------------------
# DINOv2 (timm ViT filled from a checkpoint in the facebookresearch layout).

def fake_dinov2_state(dim: int = 64, depth: int = 2, patch: int = 14, grid: int = 37) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)

    def r(*shape: int, scale: float = 0.05) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    state = {"cls_token": r(1, 1, dim, scale=1.0), "pos_embed": r(1, 1 + grid * grid, dim, scale=1.0),
             "mask_token": r(1, dim), "patch_embed.proj.weight": r(dim, 3, patch, patch),
             "patch_embed.proj.bias": r(dim), "norm.weight": 1 + r(dim), "norm.bias": r(dim)}
    for i in range(depth):
        b = f"blocks.{i}."
        state.update({
            b + "norm1.weight": 1 + r(dim), b + "norm1.bias": r(dim),
            b + "attn.qkv.weight": r(3 * dim, dim), b + "attn.qkv.bias": r(3 * dim),
            b + "attn.proj.weight": r(dim, dim), b + "attn.proj.bias": r(dim), b + "ls1.gamma": 1 + r(dim),
            b + "norm2.weight": 1 + r(dim), b + "norm2.bias": r(dim),
            b + "mlp.fc1.weight": r(4 * dim, dim), b + "mlp.fc1.bias": r(4 * dim),
            b + "mlp.fc2.weight": r(dim, 4 * dim), b + "mlp.fc2.bias": r(dim), b + "ls2.gamma": 1 + r(dim),
        })
    return state


@pytest.fixture(scope="module")
def fake_dinov2(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    state = fake_dinov2_state()
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vitl14_pretrain.pth"
    torch.save(state, path)
    return str(path), state


def test_dinov2_checkpoint_loads_strictly(fake_dinov2):
    path, state = fake_dinov2
    model = dinov2.load_dinov2(path)
    assert len(model.blocks) == 2 and model.blocks[0].attn.num_heads == 1 and model.patch_embed.patch_size == (14, 14)
    loaded = model.state_dict()
    assert set(loaded) == set(state) - {"mask_token"}
    for key in set(state) - {"mask_token", "pos_embed"}:
        assert torch.equal(loaded[key], state[key]), key
    assert torch.equal(loaded["pos_embed"], dinov2.resample_pos_embed(state["pos_embed"], 16))


def test_dinov2_pos_embed_resampling_follows_the_official_model(fake_dinov2):
    pos = fake_dinov2[1]["pos_embed"]
    resampled = dinov2.resample_pos_embed(pos, 16)
    assert resampled.shape == (1, 1 + 16 * 16, 64)
    assert torch.equal(resampled[:, 0], pos[:, 0])
    grid = pos[:, 1:].reshape(1, 37, 37, 64).permute(0, 3, 1, 2)
    direct = F.interpolate(grid, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic", antialias=False)
    assert torch.equal(resampled[:, 1:], direct.permute(0, 2, 3, 1).reshape(1, 256, 64))
    by_size = F.interpolate(grid, size=(16, 16), mode="bicubic", antialias=False)  # not what the official code does
    assert not torch.allclose(resampled[:, 1:], by_size.permute(0, 2, 3, 1).reshape(1, 256, 64), atol=1e-3)


def test_dinov2_preprocessing_matches_edm2():
    images = torch.randint(0, 256, (2, 3, 37, 50), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    x = F.interpolate(images.float(), size=(224, 224), mode="bicubic", antialias=True) / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected = (x - mean) / std
    got = dinov2.preprocess(images)
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    unaliased = F.interpolate(images.float(), size=(224, 224), mode="bicubic", antialias=False) / 255
    assert not torch.equal(got * 0.229 + 0.485, unaliased)


def test_dinov2_extractor_returns_normed_cls_token(fake_dinov2):
    path, _ = fake_dinov2
    detector = metrics.create_detector("dinov2-vit-l-14-edm2", path, "cpu")
    images = torch.randint(0, 256, (3, 1, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    out = metrics.extract(detector, images)
    assert set(out) == {"fid"} and out["fid"].shape == (3, 64) and out["fid"].dtype == torch.float64
    with torch.no_grad():  # timm's forward_features ends with the final LayerNorm
        tokens = detector.net.forward_features(dinov2.preprocess(images.repeat(1, 3, 1, 1)))
    assert torch.equal(out["fid"], tokens[:, 0].double())


def test_dinov2_checkpoint_errors_name_the_file(tmp_path):
    state = fake_dinov2_state(depth=1, grid=4)
    del state["blocks.0.mlp.fc2.bias"]
    path = tmp_path / "broken_dinov2.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="broken_dinov2.pth") as err:
        dinov2.load_dinov2(path)
    assert "blocks.0.mlp.fc2.bias" in str(err.value)
    del state["cls_token"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="broken_dinov2.pth.*cls_token"):
        dinov2.load_dinov2(path)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        dinov2.load_dinov2(tmp_path / "absent.pth")
