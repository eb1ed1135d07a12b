"""The sidcore command line: every command is reachable, data preparation checks its input."""
import json
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from sidcore import cli, config
from sidcore.dataset import read_image_zip, write_image_zip


def test_every_command_is_registered_and_the_parser_imports_no_library():
    """The CLI layer builds its parser from argparse alone (a job imports only what its command uses)."""
    code = ("import sys; from sidcore import cli; cli.parser(); "
            "print(sorted(m for m in ('torch', 'pandas', 'numpy', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    commands = set(cli.parser()._subparsers._group_actions[0].choices)
    assert commands == {"prepare-data", "train-teacher", "distill", "ddp-check", "evaluate", "download",
                        "convert-network", "train-detector", "ref-stats", "summarize", "tabulate", "plot", "dynamics",
                        "ablation", "cost", "plan", "figure", "claims", "benchmark", "launch", "check-config"}


def test_the_flags_bounds_are_the_schemas():
    """The flag types' limits that config.yaml's schema also states (a job's flags come from config.yaml)."""
    from sidcore import strict_yaml
    from sidcore.cli import checks
    defs = strict_yaml.load(config.SCHEMA)["$defs"]
    assert defs["seed"]["maximum"] == checks.SEED_LIMIT - 1 and defs["grid_side"]["maximum"] == checks.GRID_MAX


def assert_user_error(capsys, pattern: str, argv: list[str]) -> None:
    """``argv`` fails with exit status 2 and one message matching ``pattern`` on stderr, no traceback."""
    assert cli.main(argv) == cli.USER_ERROR_EXIT
    err = capsys.readouterr().err
    assert re.search(pattern, err) and "Traceback" not in err and len(err.splitlines()) == 1, err


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


def test_prepare_edm_zip_checks_layout(tmp_path, capsys):
    good = tmp_path / "good.zip"
    write_image_zip(good, np.zeros((3, 3, 4, 4), np.uint8), np.array([0, 1, 2]))
    out = tmp_path / "out.zip"
    assert cli.main(["prepare-data", "--settings", settings(tmp_path, {"source": "edm-zip", "path": str(good)}),
                     "--out", str(out)]) == 0
    assert read_image_zip(out).labels.tolist() == [0, 1, 2]
    missing = settings(tmp_path, {"source": "edm-zip", "path": str(tmp_path / "missing.zip")})
    assert_user_error(capsys, r"datasets.toy.data.path: \S*missing.zip is not an existing EDM zip",
                      ["prepare-data", "--settings", missing, "--out", str(out)])
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("readme.txt", "no images")
    bad_settings = settings(tmp_path, {"source": "edm-zip", "path": str(bad)})
    assert_user_error(capsys, "bad.zip", ["prepare-data", "--settings", bad_settings, "--out", str(out)])
    assert_user_error(capsys, "--settings: data: 'path' is a required property",
                      ["prepare-data", "--settings", settings(tmp_path, {"source": "edm-zip"}), "--out", str(out)])
    other = settings(tmp_path, {"source": "edm-zip", "path": str(good)}, resolution=8)
    assert_user_error(capsys, r"datasets.toy: config says channels/resolution/label_dim = \(3, 8, 3\)",
                      ["prepare-data", "--settings", other, "--out", str(tmp_path / "other.zip")])
    assert not (tmp_path / "other.zip").exists()


def test_compute_commands_switch_network_libraries_offline(monkeypatch, tmp_path, capsys):
    """Every command but `download` runs with the Hugging Face libraries offline (jobs read local files)."""
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in cli.OFFLINE_ENV})
    with pytest.raises(SystemExit):
        cli.main(["download", "--help"])
    assert "HF_HUB_OFFLINE" not in os.environ
    assert_user_error(capsys, "--settings is not valid JSON", ["prepare-data", "--settings", "{", "--out",
                                                               str(tmp_path / "x.zip")])
    assert all(os.environ[k] == v for k, v in cli.OFFLINE_ENV.items())


def sidcore(*argv: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sidcore.cli", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_log_takes_the_output_and_the_console_gets_the_narration_under_the_jobs_name(tmp_path):
    """How every rule runs a command: ``sidcore --log logs/<rule>/<job>.log COMMAND``."""
    (tmp_path / "logs/check").mkdir(parents=True)
    (tmp_path / "c.yaml").write_text("a: 1\n")
    r = sidcore("--log", "logs/check/good.log", "check-config", "c.yaml", cwd=tmp_path)
    said = "c.yaml: plain values, readable as a configuration or an overlay"
    assert r.returncode == 0 and r.stdout == "" and r.stderr == f"[check/good] {said}\n"
    assert (tmp_path / "logs/check/good.log").read_text() == said + "\n"

    r = sidcore("--log", "logs/check/bad.log", "check-config", "missing.yaml", cwd=tmp_path)
    log = (tmp_path / "logs/check/bad.log").read_text()
    assert r.returncode == cli.USER_ERROR_EXIT and log.startswith("sidcore check-config: error: ")
    assert r.stderr == "[check/bad] error: " + log.split("error: ", 1)[1]  # the refusal on the console too
    r = sidcore("--log", "logs/check/flag.log", "check-config", "c.yaml", "--no-such-flag", cwd=tmp_path)
    assert r.returncode == 2 and "unrecognized arguments" in (tmp_path / "logs/check/flag.log").read_text()
    r = sidcore("--log", "no/such/folder.log", "check-config", "c.yaml", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("sidcore: error: --log no/such/folder.log: ")


def test_the_command_is_found_after_the_global_options():
    assert cli.command_of(["--log", "logs/distill/x.log", "distill", "--settings", "{}"]) == "distill"
    assert cli.command_of(["--debug", "--log=x.log", "evaluate"]) == "evaluate"
    assert cli.logged_to(["--log=x.log", "evaluate"]) == "x.log" and cli.logged_to(["evaluate", "--log", "y"]) is None
