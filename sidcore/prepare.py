"""Building the training zips (EDM layout) from raw data: CIFAR-10's archive, image folders, EDM2 latents.

Image transforms are those of EDM's and ADM's dataset tools: ``center-crop`` (ImageNet-64: central
square, Lanczos resize), ``center-crop-dhariwal`` (ImageNet-512 for EDM2: box-filter halvings, bicubic
resize of the short side, central crop), ``resize`` (FFHQ, AFHQv2: Lanczos resize of the whole image).
Folders are read in sorted path order; with ``labels`` an image's class is the index of its top-level
folder in sorted order (ImageNet's ``train/<wnid>/*.JPEG``).
"""
from __future__ import annotations

import os
import tarfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sidcore import safe_pickle
from sidcore.dataset import IMAGE_EXTENSIONS, zip_writer
from sidcore.progress import Progress

CIFAR10_BATCHES = [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)]
Log = Callable[[str], None]


def cifar10_from_archive(archive: str | os.PathLike, out: str | os.PathLike, log: Log = print) -> int:
    """The 50,000 CIFAR-10 training images with labels, in the archive's order, as an EDM zip."""
    archive = Path(archive)
    with tarfile.open(archive, "r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        missing = [name for name in CIFAR10_BATCHES if name not in members]
        if missing:
            raise ValueError(f"{archive}: not the CIFAR-10 python archive (missing {', '.join(missing)})")
        with zip_writer(out) as add:
            count = 0
            for name in CIFAR10_BATCHES:
                where = f"{archive}:{name}"
                batch = safe_pickle.loads(tar.extractfile(members[name]).read(), where, encoding="latin1")
                data, labels = (batch.get(k, batch.get(k.encode())) for k in ("data", "labels"))
                if data is None or labels is None or len(data) != len(labels):
                    raise ValueError(f"{where}: expected 'data' and 'labels' of equal length")
                images = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32)  # channel-major rows
                for image, label in zip(images, labels):
                    add(image, int(label))
                count += len(images)
    log(f"{archive}: {count} images -> {out}")
    return count


# ------------------------------------------------------------------------------------------------
# Image folders.

def transform_image(img: Image.Image, resolution: int, transform: str) -> np.ndarray:
    """An RGB uint8 [3, R, R] array from a PIL image, by one of the dataset tools' transforms."""
    img = img.convert("RGB")
    if transform == "resize":
        img = img.resize((resolution, resolution), Image.LANCZOS)
    elif transform == "center-crop":
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.LANCZOS)
    elif transform == "center-crop-dhariwal":
        while min(img.size) >= 2 * resolution:
            img = img.resize((img.width // 2, img.height // 2), Image.BOX)
        scale = resolution / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
        left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
    else:
        raise ValueError(f"unknown transform {transform!r} (center-crop, center-crop-dhariwal, resize)")
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def _load(path: Path, resolution: int, transform: str) -> np.ndarray:
    with Image.open(path) as img:
        return transform_image(img, resolution, transform)


def list_images(root: str | os.PathLike, labels: bool) -> tuple[list[Path], list[int] | None]:
    """Image files under ``root`` in sorted order and, with ``labels``, their top-level folder's class index."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root} (set datasets.<name>.data.path in config.yaml)")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"{root}: no images found")
    if not labels:
        return files, None
    top = [p.relative_to(root).parts for p in files]
    if any(len(parts) < 2 for parts in top):
        raise ValueError(f"{root}: labels need one folder per class, but some images lie directly in {root}")
    classes = {name: i for i, name in enumerate(sorted({parts[0] for parts in top}))}
    return files, [classes[parts[0]] for parts in top]


def _transformed(files: list[Path], resolution: int, transform: str, workers: int) -> Iterator[np.ndarray]:
    """Decoded and transformed images in order, decoded in ``workers`` processes."""
    load = partial(_load, resolution=resolution, transform=transform)
    if workers <= 1:
        yield from map(load, files)
        return
    with ProcessPoolExecutor(workers) as pool:
        yield from pool.map(load, files, chunksize=64)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def images_from_folder(root: str | os.PathLike, out: str | os.PathLike, resolution: int, transform: str,
                       labels: bool, workers: int | None = None, log: Log = print) -> int:
    """An EDM zip of every image under ``root``, transformed to ``resolution``×``resolution`` RGB."""
    files, classes = list_images(root, labels)
    progress = Progress(len(files), "images", every=30.0)
    with zip_writer(out) as add:
        for i, image in enumerate(_transformed(files, resolution, transform, workers or default_workers())):
            add(image, None if classes is None else classes[i])
            if progress.advance(i + 1):
                log(progress.line())
    log(f"{root}: {len(files)} images{f', {max(classes) + 1} classes' if classes else ''} -> {out}")
    return len(files)


def latents_from_folder(root: str | os.PathLike, out: str | os.PathLike, encode: Callable[[torch.Tensor], torch.Tensor],
                        resolution: int, labels: bool, transform: str = "center-crop-dhariwal", batch: int = 32,
                        workers: int | None = None, log: Log = print) -> int:
    """An EDM2 latent zip: each image transformed to ``resolution`` pixels and encoded by ``encode``
    (uint8 [B, 3, R, R] -> posterior mean ‖ std [B, 2C, R/8, R/8], e.g. ``StabilityVAE.encode``)."""
    files, classes = list_images(root, labels)
    progress = Progress(len(files), "images", every=30.0)
    done = 0
    with zip_writer(out) as add:
        pending: list[np.ndarray] = []
        images = _transformed(files, resolution, transform, workers or default_workers())
        for i, image in enumerate(images):
            pending.append(image)
            if len(pending) == batch or i == len(files) - 1:
                stats = encode(torch.from_numpy(np.stack(pending))).cpu().numpy().astype(np.float32)
                for item in stats:
                    add(item, None if classes is None else classes[done])
                    done += 1
                pending = []
                if progress.advance(done):
                    log(progress.line())
    log(f"{root}: {done} images encoded to latents {tuple(stats.shape[1:])} -> {out}")
    return done


def prepare_data(settings: dict, out: str | os.PathLike, archive: str | None = None, vae: str | None = None,
                 log: Log = print) -> None:
    """The dataset zip of ``settings`` (its ``data.source``) in EDM's layout; ``archive`` / ``vae`` are the
    downloaded inputs the sources ``cifar10-archive`` / ``vae-latents`` need."""
    from sidcore.dataset import link_image_zip, read_image_zip, write_image_zip
    from sidcore.errors import UserError
    from sidcore.preflight import check_data_shape, check_data_source
    data, source = settings["data"], settings["data"]["source"]
    check_data_source(settings)

    def required(value: str | None, flag: str) -> str:
        if value is None:
            raise UserError(f"prepare-data: data source {source} needs {flag}")
        return value

    if source == "sklearn-digits":
        from sklearn.datasets import load_digits
        digits = load_digits()
        images = np.round(digits.images * (255 / 16)).astype(np.uint8)[:, None]  # 0..16 → 0..255, [N, 1, 8, 8]
        write_image_zip(out, images, digits.target)
        log(f"{len(images)} digits ({images.shape[-1]}x{images.shape[-1]}, 10 classes) -> {out}")
    elif source == "edm-zip":
        check_data_shape(settings, read_image_zip(data["path"], use_labels=settings["label_dim"] > 0))
        log(f"{data['path']}: {link_image_zip(data['path'], out)} items -> {out}")
    elif source == "cifar10-archive":
        cifar10_from_archive(required(archive, "--archive"), out, log=log)
    elif source == "image-folder":
        images_from_folder(data["path"], out, settings["resolution"], data["transform"], data["labels"], log=log)
    elif source == "vae-latents":
        from sidcore.latent import StabilityVAE
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        encoder = StabilityVAE(required(vae, "--vae"), device)
        latents_from_folder(data["path"], out, encoder.encode, settings["latent"]["resolution"], data["labels"],
                            transform=data["transform"], log=log)
    else:
        raise UserError(f"datasets.{settings['dataset']}.data.source={source!r} is not a known data source")
