"""Dataset zips: lazy reading, CIFAR-10 from its archive (read safely), image folders, EDM2 latents."""
import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from sidcore import cli, prepare
from sidcore.dataset import read_image_zip, write_image_zip, zip_writer
from sidcore.safe_pickle import UnsafePickleError


def cifar_archive(path, batches: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in batches.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def cifar_batches(rng, n: int = 4) -> tuple[dict[str, bytes], np.ndarray, list[int]]:
    images, labels, out = [], [], {}
    for i in range(1, 6):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, n)]
        out[f"data_batch_{i}"] = pickle.dumps({b"batch_label": b"x", b"data": data, b"labels": y}, protocol=2)
        images.append(data)
        labels += y
    return out, np.concatenate(images), labels


def test_cifar10_archive_to_zip(tmp_path):
    batches, data, labels = cifar_batches(np.random.default_rng(0))
    cifar_archive(tmp_path / "cifar.tar.gz", {**batches, "test_batch": batches["data_batch_1"]})
    assert prepare.cifar10_from_archive(tmp_path / "cifar.tar.gz", tmp_path / "c.zip", log=lambda m: None) == 20
    ds = read_image_zip(tmp_path / "c.zip")
    assert (len(ds), ds.channels, ds.resolution, ds.label_dim) == (20, 3, 32, max(labels) + 1)
    images = ds.load(torch.arange(20))
    assert torch.equal(images, torch.from_numpy(data.reshape(20, 3, 32, 32)))  # rows are channel-major
    assert ds.labels.tolist() == labels


class Exploit:
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def test_cifar10_batch_that_runs_code_is_refused(tmp_path):
    batches, _, _ = cifar_batches(np.random.default_rng(0))
    batches["data_batch_3"] = pickle.dumps({b"data": Exploit(tmp_path / "pwned")}, protocol=2)
    cifar_archive(tmp_path / "cifar.tar.gz", batches)
    with pytest.raises(UnsafePickleError, match=r"data_batch_3: refusing to load global (posix|os)\.system"):
        prepare.cifar10_from_archive(tmp_path / "cifar.tar.gz", tmp_path / "c.zip", log=lambda m: None)
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "c.zip").exists()


def test_cifar10_archive_missing_a_batch_is_named(tmp_path):
    batches, _, _ = cifar_batches(np.random.default_rng(0))
    del batches["data_batch_4"]
    cifar_archive(tmp_path / "cifar.tar.gz", batches)
    with pytest.raises(ValueError, match="missing cifar-10-batches-py/data_batch_4"):
        prepare.cifar10_from_archive(tmp_path / "cifar.tar.gz", tmp_path / "c.zip", log=lambda m: None)


def framed(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """A white image with a red border of 1/4 of the short side on the long side's ends."""
    w, h = size
    a = np.full((h, w, 3), 255, np.uint8)
    if w > h:
        a[:, : (w - h) // 2] = a[:, w - (w - h) // 2:] = (255, 0, 0)
    return Image.fromarray(a).convert(mode)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "train"
    for cls, sizes in {"n02": [(48, 32), (32, 32)], "n01": [(40, 24)]}.items():
        (root / cls).mkdir(parents=True)
        for i, size in enumerate(sizes):
            framed(size, mode="L" if i == 1 else "RGBA" if cls == "n01" else "RGB").save(root / cls / f"{i}.png")
    (root / "n01" / "notes.txt").write_text("not an image")
    return root


@pytest.mark.parametrize("transform", ["center-crop", "center-crop-dhariwal", "resize"])
def test_image_folder_transforms_and_labels(folder, tmp_path, transform):
    n = prepare.images_from_folder(folder, tmp_path / "f.zip", 16, transform, labels=True, workers=1,
                                   log=lambda m: None)
    ds = read_image_zip(tmp_path / "f.zip")
    assert n == len(ds) == 3 and (ds.channels, ds.resolution) == (3, 16)
    assert ds.labels.tolist() == [0, 1, 1]  # n01 < n02 in sorted order
    images = ds.load(torch.arange(3)).float()
    centre_is_white = bool((images[:, :, 6:10, 6:10] > 240).all())
    has_red = bool(((images[:, 0] > 200) & (images[:, 1] < 60)).any())
    if transform == "resize":
        assert centre_is_white and has_red  # the whole frame, squeezed
    else:
        assert centre_is_white and not has_red  # the central square only


def test_image_folder_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        prepare.images_from_folder(tmp_path / "nowhere", tmp_path / "x.zip", 8, "resize", labels=False)
    (tmp_path / "flat").mkdir()
    framed((8, 8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(ValueError, match="one folder per class"):
        prepare.images_from_folder(tmp_path / "flat", tmp_path / "x.zip", 8, "resize", labels=True)


def test_prepare_data_command_for_an_image_folder(folder, tmp_path):
    settings = {"dataset": "toy", "resolution": 8, "channels": 3, "label_dim": 0,
                "data": {"source": "image-folder", "path": str(folder), "transform": "resize", "labels": False}}
    assert cli.main(["prepare-data", "--settings", json.dumps(settings), "--out", str(tmp_path / "t.zip")]) == 0
    ds = read_image_zip(tmp_path / "t.zip")
    assert len(ds) == 3 and ds.labels is None and ds.resolution == 8


def test_items_are_decoded_on_demand(tmp_path, monkeypatch):
    write_image_zip(tmp_path / "d.zip", np.zeros((50, 1, 4, 4), np.uint8), np.arange(50) % 3)
    opened = []
    original = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(1) or original(*a, **k))
    ds = read_image_zip(tmp_path / "d.zip")
    assert len(opened) == 1  # only the first item, for its shape
    ds.to_model(torch.tensor([7, 9]))
    assert len(opened) == 3
    assert read_image_zip(tmp_path / "d.zip", use_labels=False).labels is None


def test_writer_rejects_mixed_labels_and_bad_items(tmp_path):
    with pytest.raises(ValueError, match="every item or for none"), zip_writer(tmp_path / "m.zip") as add:
        add(np.zeros((3, 4, 4), np.uint8), 1)
        add(np.zeros((3, 4, 4), np.uint8), None)
    with pytest.raises(ValueError, match="float32"), zip_writer(tmp_path / "b.zip") as add:
        add(np.zeros((3, 4, 4), np.int64), None)
    assert not (tmp_path / "m.zip").exists() and not (tmp_path / "b.zip").exists()


def test_latents_from_folder_with_a_tiny_vae(folder, tmp_path):
    from diffusers import AutoencoderKL

    from sidcore.latent import StabilityVAE, scale_bias
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  layers_per_block=1).save_pretrained(tmp_path / "vae")
    vae = StabilityVAE(tmp_path / "vae")
    n = prepare.latents_from_folder(folder, tmp_path / "l.zip", vae.encode, 16, labels=True, batch=2, workers=1,
                                    log=lambda m: None)
    ds = read_image_zip(tmp_path / "l.zip")
    assert n == 3 and (ds.kind, ds.channels, ds.resolution) == ("latent", 4, 8) and ds.labels.tolist() == [0, 1, 1]
    raw = ds.load(torch.arange(3))
    assert raw.shape == (3, 8, 8, 8) and raw.dtype == torch.float32
    a, b = ds.to_model(torch.arange(3)), ds.to_model(torch.arange(3))
    assert a.shape == (3, 4, 8, 8) and not torch.equal(a, b)  # a fresh posterior draw each time
    scale, bias = scale_bias()
    mean, std = raw.chunk(2, dim=1)
    draws = torch.stack([ds.to_model(torch.arange(3)) for _ in range(200)])
    assert torch.allclose(draws.mean(0), mean * scale + bias, atol=6 * float((std * scale).max()) / 200 ** 0.5)
