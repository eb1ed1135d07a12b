"""The sidcore command line: every command is reachable, data preparation checks its input."""
import argparse
import importlib
import json
import os
import zipfile

import numpy as np
import pytest
import torch

from sidcore import cli
from sidcore.dataset import read_image_zip, write_image_zip


def test_command_table_matches_the_modules():
    for name, module in cli.COMMANDS.items():
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        importlib.import_module(module).register(sub)
        assert name in sub.choices, f"{module} does not register {name}"
    registered = set()
    for module in set(cli.COMMANDS.values()):
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module).register(sub)
        registered |= set(sub.choices)
    assert registered == set(cli.COMMANDS)


def settings(tmp_path, data, channels=3, resolution=4, label_dim=3):
    return json.dumps({"dataset": "toy", "data": data, "channels": channels, "resolution": resolution,
                       "label_dim": label_dim})


def test_prepare_digits(tmp_path):
    out = tmp_path / "digits.zip"
    assert cli.main(["prepare-data", "--settings", settings(tmp_path, {"source": "sklearn-digits"}, 1, 8, 10),
                     "--out", str(out)]) == 0
    ds = read_image_zip(out)
    images = ds.load(torch.arange(len(ds)))
    assert images.shape == (1797, 1, 8, 8) and ds.label_dim == 10
    assert images.max() == 255 and images.min() == 0


def test_prepare_edm_zip_checks_layout(tmp_path):
    good = tmp_path / "good.zip"
    write_image_zip(good, np.zeros((3, 3, 4, 4), np.uint8), np.array([0, 1, 2]))
    out = tmp_path / "out.zip"
    assert cli.main(["prepare-data", "--settings", settings(tmp_path, {"source": "edm-zip", "path": str(good)}),
                     "--out", str(out)]) == 0
    assert read_image_zip(out).labels.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match=r"datasets.toy.data.path: \S*missing.zip is not an existing EDM zip"):
        cli.main(["prepare-data", "--settings",
                  settings(tmp_path, {"source": "edm-zip", "path": str(tmp_path / "missing.zip")}),
                  "--out", str(out)])
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("readme.txt", "no images")
    with pytest.raises(ValueError, match="bad.zip"):
        cli.main(["prepare-data", "--settings", settings(tmp_path, {"source": "edm-zip", "path": str(bad)}),
                  "--out", str(out)])
    with pytest.raises(ValueError, match="datasets.toy.data.path"):
        cli.main(["prepare-data", "--settings", settings(tmp_path, {"source": "edm-zip"}), "--out", str(out)])
    with pytest.raises(ValueError, match=r"datasets.toy: config says channels/resolution/label_dim = \(3, 8, 3\)"):
        cli.main(["prepare-data", "--settings", settings(tmp_path, {"source": "edm-zip", "path": str(good)},
                                                         resolution=8), "--out", str(tmp_path / "other.zip")])
    assert not (tmp_path / "other.zip").exists()


def test_compute_commands_switch_network_libraries_offline(monkeypatch, tmp_path):
    """Every command but `download` runs with the Hugging Face libraries offline (jobs read local files)."""
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in cli.OFFLINE_ENV})
    with pytest.raises(SystemExit):
        cli.main(["download", "--help"])
    assert "HF_HUB_OFFLINE" not in os.environ
    with pytest.raises(ValueError, match="--settings is not valid JSON"):
        cli.main(["prepare-data", "--settings", "{", "--out", str(tmp_path / "x.zip")])
    assert all(os.environ[k] == v for k, v in cli.OFFLINE_ENV.items())
