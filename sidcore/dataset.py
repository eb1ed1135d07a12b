"""Datasets in EDM's zip layout and the infinite shuffled sampler used in distillation.

Layout (as written by EDM's and EDM2's dataset tools): an uncompressed zip holding items at
``NNNNN/img…NNNNNNNN.<ext>`` and ``dataset.json`` = ``{"labels": [[name, class], ...]}`` or
``{"labels": null}``. Items are PNG/JPEG images (returned CHW uint8) or, for EDM2's latent datasets,
``.npy`` float32 arrays holding the VAE posterior mean and standard deviation ([8, 64, 64]).
Items are read on demand, so a dataset of any size opens instantly and uses little memory.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sidcore.atomic import atomic_path
from sidcore.errors import UserError
from sidcore.randomness import Noise

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
ITEM_EXTENSIONS = IMAGE_EXTENSIONS + (".npy",)


class ImageDataset:
    """The items of an EDM-layout zip with their labels; items are decoded when asked for."""

    def __init__(self, path: Path, names: list[str], labels: torch.Tensor | None, label_dim: int) -> None:
        self.path, self.names = path, names
        self.labels = labels  # [N] int64 class indices, None if unlabelled
        self.label_dim = label_dim  # number of classes, 0 if unlabelled
        self.kind = "latent" if names[0].lower().endswith(".npy") else "image"
        self._zip: zipfile.ZipFile | None = None
        self._pid = -1
        first = self.load(torch.tensor([0]))[0]
        self.raw_channels, self.resolution = first.shape[0], first.shape[-1]

    def __len__(self) -> int:
        return len(self.names)

    @property
    def channels(self) -> int:
        """Channels the model sees: an image's, or half a latent item's (mean ‖ std)."""
        return self.raw_channels // 2 if self.kind == "latent" else self.raw_channels

    def _archive(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():  # one handle per process (data loaders fork)
            self._zip, self._pid = zipfile.ZipFile(self.path), os.getpid()
        return self._zip

    def _item(self, i: int) -> np.ndarray:
        data = self._archive().read(self.names[i])
        if self.kind == "latent":
            a = np.load(io.BytesIO(data), allow_pickle=False)
            return a.astype(np.float32).reshape(-1, *a.shape[-2:])
        a = np.array(Image.open(io.BytesIO(data)))
        return (a[:, :, None] if a.ndim == 2 else a).transpose(2, 0, 1)

    def load(self, index: torch.Tensor) -> torch.Tensor:
        """Raw items at ``index``: uint8 images [B, C, H, W] or float32 latent statistics [B, 2C, H, W]."""
        return torch.from_numpy(np.stack([self._item(int(i)) for i in index]))

    def batches(self, size: int) -> Iterator[torch.Tensor]:
        """All raw items in order, ``size`` at a time."""
        for start in range(0, len(self), size):
            yield self.load(torch.arange(start, min(start + size, len(self))))

    def one_hot(self, index: torch.Tensor) -> torch.Tensor:
        """One-hot float32 labels of the items at ``index`` ([B, 0] when unlabelled)."""
        if self.labels is None:
            return torch.zeros(len(index), 0)
        return torch.nn.functional.one_hot(self.labels[index], self.label_dim).float()

    def to_model(self, index: torch.Tensor, noise: Noise | None = None) -> torch.Tensor:
        """Training inputs at ``index``: images in [-1, 1] (uint8 / 127.5 − 1), or scaled latents drawn afresh
        from the stored posterior (ε from ``noise`` if given, see ``sidcore.latent``)."""
        raw = self.load(index)
        if self.kind == "latent":
            from sidcore.latent import sample_latents
            eps = noise.randn("latent", (raw.shape[1] // 2, *raw.shape[2:])) if noise is not None else None
            return sample_latents(raw, eps=eps)
        return raw.float() / 127.5 - 1

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_zip": None, "_pid": -1}


def read_image_zip(path: str | os.PathLike, use_labels: bool = True) -> ImageDataset:
    """Open an EDM-layout zip; ``use_labels=False`` ignores its labels (unconditional training)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset zip not found: {path}")
    try:
        with zipfile.ZipFile(path) as zf:
            names = sorted(n for n in zf.namelist() if n.lower().endswith(ITEM_EXTENSIONS))
            meta = json.loads(zf.read("dataset.json")) if "dataset.json" in zf.namelist() else {}
    except zipfile.BadZipFile as e:
        raise UserError(f"{path}: not a zip archive ({e})") from e
    if not names:
        raise UserError(f"{path}: no images or .npy items in the archive")
    table = meta.get("labels") if use_labels else None
    if table is None:
        return ImageDataset(path, names, None, 0)
    by_name = dict((n, int(c)) for n, c in table)
    missing = [n for n in names if n not in by_name]
    if missing:
        raise UserError(f"{path}: dataset.json has no label for {missing[0]} (and {len(missing) - 1} more)")
    labels = torch.tensor([by_name[n] for n in names], dtype=torch.int64)
    return ImageDataset(path, names, labels, int(labels.max()) + 1)


@contextlib.contextmanager
def zip_writer(path: str | os.PathLike) -> Iterator[Callable[[np.ndarray, int | None], None]]:
    """Stream items into an EDM-layout zip written atomically: yields ``add(item, label)``.

    Items are uint8 images [C, H, W] (C = 1 or 3, stored as PNG) or float32 latent statistics
    [2C, H, W] (stored as .npy, EDM2's naming). Labels must be given for all items or for none.
    """
    table: list[list] = []
    count = 0
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        def add(item: np.ndarray, label: int | None = None) -> None:
            nonlocal count
            if item.dtype == np.uint8 and item.ndim == 3 and item.shape[0] in (1, 3):
                name = f"{count // 1000:05d}/img{count:08d}.png"
                hwc = item.transpose(1, 2, 0)
                buf = io.BytesIO()
                Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc).save(buf, format="png", compress_level=0)
            elif item.dtype == np.float32 and item.ndim == 3:
                name = f"{count // 1000:05d}/img-mean-std-{count:08d}.npy"
                buf = io.BytesIO()
                np.save(buf, item)
            else:
                raise ValueError(f"expected uint8 [1|3, H, W] images or float32 [C, H, W] latents, "
                                 f"got {item.dtype} {item.shape}")
            if count and (label is not None) != bool(table):
                raise UserError(f"{path}: labels must be given for every item or for none")
            zf.writestr(name, buf.getvalue())
            if label is not None:
                table.append([name, int(label)])
            count += 1

        yield add
        zf.writestr("dataset.json", json.dumps({"labels": table if table else None}))


def write_image_zip(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray | None) -> None:
    """Write uint8 images [N, C, H, W] (C = 1 or 3) and optional integer labels as an EDM zip, atomically."""
    with zip_writer(path) as add:
        for i, img in enumerate(images):
            add(img, None if labels is None else int(labels[i]))


def write_latent_zip(path: str | os.PathLike, batches: Iterable[np.ndarray], labels: np.ndarray | None) -> None:
    """Write float32 latent statistics (batches of [B, 2C, H, W]) and optional labels as an EDM2 zip."""
    with zip_writer(path) as add:
        i = 0
        for batch in batches:
            for item in batch:
                add(np.ascontiguousarray(item, dtype=np.float32), None if labels is None else int(labels[i]))
                i += 1


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
        raise UserError(f"{src}: not a zip archive ({e})") from e
    n = sum(name.lower().endswith(ITEM_EXTENSIONS) for name in names)
    if n == 0 or "dataset.json" not in names:
        raise UserError(f"{src}: expected images and a dataset.json at the archive root (EDM layout)")
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
    return n


class ShuffledOrder:
    """Dataset index of every global sample position: epoch e visits a fresh seeded permutation.

    Position p maps to ``perm(p // N)[p % N]``; nothing but the position is needed to continue a stream.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)

    def __call__(self, positions: range) -> torch.Tensor:
        pos = torch.arange(positions.start, positions.stop, dtype=torch.int64)
        epochs = pos // self.size
        out = torch.empty_like(pos)
        for epoch in epochs.unique().tolist():  # one, or two where a batch straddles an epoch
            if epoch != self._epoch:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._epoch, self._perm = epoch, torch.randperm(self.size, generator=g)
            mask = epochs == epoch
            out[mask] = self._perm[pos[mask] % self.size]
        return out
