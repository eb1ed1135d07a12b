"""A small digit classifier that plays Inception's role for the 8x8 "tiny" experiment.

The penultimate activations (64-d) are the FID features and the logits feed the Inception Score,
exactly as Inception's pool features and logits do for the paper datasets. The trained network is
exposed to torch-fidelity as the feature extractor ``sidcore-digits``.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch import nn
from torch_fidelity import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from sidcore import checkpoint
from sidcore.atomic import atomic_path
from sidcore.errors import UserError

EXTRACTOR_NAME = "sidcore-digits"
CHECKPOINT_KIND = "digitnet"
FEATURE_DIM = 64
NUM_CLASSES = 10
RESOLUTION = 8


class DigitNet(nn.Module):
    """CNN for [B, 1, 8, 8] uint8 digits: 64-d penultimate features and 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),  # 2x2
        )
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(64 * 2 * 2, FEATURE_DIM), nn.SiLU())
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def all_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Conv features [B, 256], penultimate features [B, 64] and logits [B, 10] of uint8 images
        (or floats in [-1, 1])."""
        x = images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images
        c = self.conv(x)
        f = self.features(c)
        return c.flatten(1), f, self.head(f)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.all_features(images)[2]


def random_shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each [B, 1, H, W] image by an independent random offset in {-1, 0, 1}^2, zero fill."""
    b, _, h, w = images.shape
    padded = F.pad(images[:, 0], (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2, b), generator=generator)
    rows = dy[:, None] + torch.arange(h)
    cols = dx[:, None] + torch.arange(w)
    return padded[torch.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]].unsqueeze(1)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one intra-op thread: for a net this small, more threads only add synchronisation,
    and they slow training down by orders of magnitude when other processes compete for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def accuracy(net: DigitNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    net.eval()
    return float((net(images).argmax(dim=1) == labels).float().mean())


def train_digit_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    seed: int = 0,
    epochs: int = 20,
    batch: int = 64,
    lr: float = 3e-3,
    test_fraction: float = 0.2,
) -> tuple[DigitNet, float]:
    """Train on a stratified split of uint8 [N, 1, 8, 8] digits; return the net and its held-out accuracy.

    Augmentation: random one-pixel shifts. Adam with a cosine learning-rate decay, on one CPU thread.
    The returned net is the one trained on the training part only, so the accuracy is an honest
    estimate for it.
    """
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (1, RESOLUTION, RESOLUTION):
        raise ValueError(f"expected uint8 [N, 1, {RESOLUTION}, {RESOLUTION}] images, "
                         f"got {images.dtype} {tuple(images.shape)}")
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=labels.numpy(), random_state=seed)
    x_train, y_train = images[train_idx], labels[train_idx]
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitNet()
    steps_per_epoch = -(-len(train_idx) // batch)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    with single_thread():
        for _ in range(epochs):
            net.train()
            order = torch.randperm(len(train_idx), generator=generator)
            for start in range(0, len(order), batch):
                idx = order[start:start + batch]
                loss = F.cross_entropy(net(random_shift(x_train[idx], generator)), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        test_accuracy = accuracy(net, images[test_idx], labels[test_idx])
    net.eval().requires_grad_(False)
    return net, test_accuracy


def save_digit_classifier(net: DigitNet, test_accuracy: float, path: str | os.PathLike) -> None:
    """Write the classifier checkpoint atomically."""
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"kind": CHECKPOINT_KIND, "state_dict": state, "test_accuracy": float(test_accuracy),
                    "feature_dim": FEATURE_DIM}, tmp)


def load_digit_classifier(path: str | os.PathLike) -> tuple[DigitNet, float]:
    """Load a checkpoint written by :func:`save_digit_classifier`; returns (net in eval mode, held-out accuracy)."""
    ckpt = checkpoint.load(path, "digit classifier checkpoint")
    kind = ckpt.get("kind") if isinstance(ckpt, dict) else None
    if kind != CHECKPOINT_KIND or ckpt.get("feature_dim") != FEATURE_DIM:
        raise UserError(f"{path}: not a {CHECKPOINT_KIND} checkpoint (kind={kind!r})")
    net = DigitNet()
    net.load_state_dict(ckpt["state_dict"], strict=True)
    net.eval().requires_grad_(False)
    return net, float(ckpt["test_accuracy"])


class DigitFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity wrapper of a trained :class:`DigitNet`.

    Features: ``"256"``, the last convolution block's output (the FID feature: less dominated by the
    class identity than the penultimate layer, so FID over 2,000 images varies less with the sampled
    class proportions), ``"64"`` the penultimate layer, ``"logits"`` (IS)."""

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 **kwargs) -> None:
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(f"feature extractor {name!r} needs feature_extractor_weights_path "
                             f"(a {CHECKPOINT_KIND} checkpoint)")
        self.net = load_digit_classifier(feature_extractor_weights_path)[0]
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("256", "64", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"fid": "256", "kid": "256", "prc": "256", "isc": "logits"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (1, RESOLUTION, RESOLUTION):
            raise ValueError(f"expected uint8 [B, 1, {RESOLUTION}, {RESOLUTION}] images, "
                             f"got {images.dtype} {tuple(images.shape)}")
        conv, features, logits = self.net.all_features(images)
        out = {"256": conv.float(), "64": features.float(), "logits": logits.float()}
        return tuple(out[name] for name in self.features_list)


if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(EXTRACTOR_NAME, DigitFeatureExtractor)


def train_detector(data_path: str, out: str, seed: int = 0, epochs: int = 20, log=print) -> None:
    """Train the digit classifier on a labelled zip of 8×8 digits and save it to ``out``."""
    from sidcore.dataset import read_image_zip
    data = read_image_zip(data_path)
    if data.labels is None:
        raise UserError(f"{data_path}: the classifier needs a labelled dataset")
    counts = torch.bincount(data.labels, minlength=data.label_dim)
    if int(counts.min()) < 2:
        raise UserError(f"{data_path}: the classifier's held-out split needs at least 2 images of every class; "
                        f"class {int(counts.argmin())} has {int(counts.min())}")
    start = time.perf_counter()
    net, test_accuracy = train_digit_classifier(data.load(torch.arange(len(data))), data.labels, seed=seed,
                                                epochs=epochs)
    save_digit_classifier(net, test_accuracy, out)
    log(f"held-out accuracy {test_accuracy:.4f} ({time.perf_counter() - start:.1f} s) -> {out}")
