"""Image datasets in EDM's zip layout and the infinite shuffled sampler used in distillation.

Layout (as written by EDM's dataset_tool): an uncompressed zip holding PNGs at
``NNNNN/imgNNNNNNNN.png`` and ``dataset.json`` = ``{"labels": [[name, class], ...]}`` or
``{"labels": null}``. Images are returned CHW uint8; labels as integer class indices.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sidcore.atomic import atomic_path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass
class ImageDataset:
    """All images of a dataset held in memory (the small datasets we train on fit easily)."""

    images: torch.Tensor  # [N, C, H, W] uint8
    labels: torch.Tensor | None  # [N] int64 class indices, None if unlabelled
    label_dim: int  # number of classes, 0 if unlabelled

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def resolution(self) -> int:
        return self.images.shape[-1]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def one_hot(self, index: torch.Tensor) -> torch.Tensor:
        """One-hot float32 labels of the items at ``index`` ([B, 0] when unlabelled)."""
        if self.labels is None:
            return torch.zeros(len(index), 0)
        return torch.nn.functional.one_hot(self.labels[index], self.label_dim).float()

    def to_model(self, index: torch.Tensor) -> torch.Tensor:
        """Images at ``index`` scaled to [-1, 1] float32 (uint8 / 127.5 - 1)."""
        return self.images[index].float() / 127.5 - 1


def read_image_zip(path: str | os.PathLike) -> ImageDataset:
    """Read an EDM-layout image zip."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset zip not found: {path}")
    with zipfile.ZipFile(path) as zf:
        names = sorted(n for n in zf.namelist() if n.lower().endswith(IMAGE_EXTENSIONS))
        if not names:
            raise ValueError(f"{path}: no images in the archive")
        arrays = []
        for name in names:
            with zf.open(name) as f:
                a = np.array(Image.open(io.BytesIO(f.read())))
            arrays.append(a[:, :, None] if a.ndim == 2 else a)
        meta = json.loads(zf.read("dataset.json")) if "dataset.json" in zf.namelist() else {}
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    table = meta.get("labels")
    if table is None:
        return ImageDataset(images, None, 0)
    by_name = dict((n, int(c)) for n, c in table)
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"{path}: dataset.json has no label for {missing[0]} (and {len(missing) - 1} more)")
    labels = torch.tensor([by_name[n] for n in names], dtype=torch.int64)
    return ImageDataset(images, labels, int(labels.max()) + 1)


def write_image_zip(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray | None) -> None:
    """Write uint8 images [N, C, H, W] (C = 1 or 3) and optional integer labels as an EDM zip, atomically."""
    path = Path(path)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 [N, 1|3, H, W] images, got {images.dtype} {images.shape}")
    table = []
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for i, img in enumerate(images):
            name = f"{i // 1000:05d}/img{i:08d}.png"
            hwc = img.transpose(1, 2, 0)
            buf = io.BytesIO()
            Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc).save(buf, format="png", compress_level=0)
            zf.writestr(name, buf.getvalue())
            if labels is not None:
                table.append([name, int(labels[i])])
        zf.writestr("dataset.json", json.dumps({"labels": table if labels is not None else None}))


def link_image_zip(src: str | os.PathLike, dst: str | os.PathLike) -> int:
    """Check that ``src`` is an EDM-layout zip (images + dataset.json) and hard-link (or copy) it to ``dst``.

    Returns the number of images. The archive's members are listed, not decoded.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"dataset zip not found: {src}")
    try:
        with zipfile.ZipFile(src) as zf:
            names = zf.namelist()
    except zipfile.BadZipFile as e:
        raise ValueError(f"{src}: not a zip archive ({e})") from e
    n = sum(name.lower().endswith(IMAGE_EXTENSIONS) for name in names)
    if n == 0 or "dataset.json" not in names:
        raise ValueError(f"{src}: expected images and a dataset.json at the archive root (EDM layout)")
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
    return n


class InfiniteSampler:
    """Endless stream of dataset indices: a fresh seeded permutation per epoch.

    The position (epoch, offset) is plain state, so a resumed run continues the exact stream.
    Each rank takes every ``world_size``-th index starting at ``rank``.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.epoch, self.offset = 0, rank
        self._order = self._permutation()

    def _permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=g)

    def next(self, n: int) -> torch.Tensor:
        out = []
        for _ in range(n):
            if self.offset >= self.size:
                self.epoch += 1
                self.offset -= self.size
                self._order = self._permutation()
            out.append(int(self._order[self.offset]))
            self.offset += self.world_size
        return torch.tensor(out, dtype=torch.int64)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._permutation()
