"""Bad input to the `sidcore` commands: each is refused with exit status 2 and one line naming the culprit
(file, flag, key) and what to do, never with a traceback. (Bad configurations and targets of the workflow:
tests/test_workflow.py; bad downloads: tests/test_download*.py.)"""
from __future__ import annotations

import copyreg
import json
import os
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from sidcore import checkpoint, cli, config, jobs
from sidcore.dataset import write_image_zip
from sidcore.detectors import digits
from sidcore.metrics import save_reference
from sidcore.networks import build_network
from sidcore.settings import dumps, resolve

ROOT = Path(__file__).resolve().parents[1]
NETWORK = dict(arch="ddpmpp", img_resolution=8, img_channels=1, label_dim=10, model_channels=16, channel_mult=[1, 2],
               num_blocks=1, attn_resolutions=[4], augment_dim=0, dropout=0.0)


class NewDict:
    """A pickle that asks ``copyreg.__newobj__`` for a class the network reader does not admit."""

    def __reduce__(self):
        return copyreg.__newobj__, (dict,)


class Shell:
    """A pickle whose loading would run a shell command (``os.system``)."""

    def __reduce__(self):
        return os.system, ("echo pwned",)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Good and bad input files of every kind the commands read."""
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    write_image_zip(root / "data.zip", rng.integers(0, 256, (8, 1, 8, 8), dtype=np.uint8), rng.integers(0, 10, 8))
    write_image_zip(root / "unlabelled.zip", rng.integers(0, 256, (8, 1, 8, 8), dtype=np.uint8), None)
    checkpoint.save_atomic(checkpoint.network_snapshot(build_network(**NETWORK), NETWORK), root / "net.pt")
    (root / "not-a-zip.zip").write_text("<!DOCTYPE html><html>Not Found</html>")
    good = pickle.dumps({"fid": {"mu": np.zeros(4), "sigma": np.eye(4)}})
    (root / "truncated.pkl").write_bytes(good[: len(good) // 2])
    (root / "code.pkl").write_bytes(pickle.dumps(Shell()))
    (root / "newobj.pkl").write_bytes(pickle.dumps({"ema": NewDict()}, protocol=1, fix_imports=False))
    torch.save({"hook": Shell()}, root / "code.pt")
    (root / "empty.pt").write_bytes(b"")
    detector, accuracy = digits.train_digit_classifier(torch.from_numpy(rng.integers(0, 256, (64, 1, 8, 8),
                                                                                     dtype=np.uint8)),
                                                       torch.arange(64) % 10, seed=0, epochs=1)
    digits.save_digit_classifier(detector, accuracy, root / "detector.pt")
    save_reference(root / "refs.npz", np.zeros(256), np.eye(256))
    torch.save({"format": "something else"}, root / "wrong-kind.pt")
    for r in range(2):
        (root / f"run{r}.json").write_text(json.dumps({"dataset": "tiny", "method": "sid", "alpha": 1.0 + r,
                                                      "metrics": {"fid": 1.0}, "seeds": [r]}))
    (root / "other-table.json").write_text(json.dumps({"table": "cifar10-uncond", "metrics": {}}))
    (root / "log.jsonl").write_text('{"kimg": 1.0, "fid": 3.0}\n')
    return root


def settings(**extra) -> str:
    """The tiny experiment's settings of SiD α = 1.0 from config.yaml, with ``extra`` changed."""
    base = resolve(config.load(ROOT / "config.yaml", ROOT / config.SCHEMA), "tiny", "sid", 1.0)
    return dumps({**base, "metrics": ["fid"], "evaluation": replace(base["evaluation"], runs=1, num_images=8, batch=8),
                  **extra})


def evaluate(f: Path, *, refs: str = "refs.npz", model: str = "net.pt") -> list[str]:
    return ["evaluate", "--settings", settings(), "--kind", "generator", "--model", str(f / model),
            "--data", str(f / "data.zip"), "--refs", str(f / refs), "--detector-weights", str(f / "detector.pt"),
            "--outdir", str(f / "eval")]


# (what is wrong, the command line given the fixture folder, what the one line must say)
CASES = [
    ("--settings not JSON", lambda f: ["prepare-data", "--settings", "{bad", "--out", str(f / "x.zip")],
     "--settings is not valid JSON (Expecting property name enclosed in double quotes at character 1): '{bad'"),
    ("--settings not an object", lambda f: ["prepare-data", "--settings", "[1]", "--out", str(f / "x.zip")],
     "--settings must be a JSON object, not list"),
    ("--network not JSON", lambda f: ["convert-network", "--src", str(f / "truncated.pkl"), "--out", str(f / "o.pt"),
                                      "--network", "{bad"], "--network is not valid JSON"),
    ("data source path missing", lambda f: ["prepare-data", "--settings", settings(data={"source": "edm-zip"}),
                                            "--out", str(f / "x.zip")],
     "datasets.tiny.data.path: required for source edm-zip"),
    ("data zip is an HTML page", lambda f: ["prepare-data", "--settings",
                                            settings(data={"source": "edm-zip", "path": str(f / "not-a-zip.zip")}),
                                            "--out", str(f / "x.zip")], "not-a-zip.zip: not a zip archive"),
    ("unknown data source", lambda f: ["prepare-data", "--settings", settings(data={"source": "ftp"}),
                                       "--out", str(f / "x.zip")], "datasets.tiny.data.source='ftp' is not a known"),
    ("truncated NVIDIA pickle", lambda f: ["convert-network", "--src", str(f / "truncated.pkl"),
                                           "--out", str(f / "o.pt")], "truncated.pkl: not a readable"),
    ("pickle that runs code", lambda f: ["convert-network", "--src", str(f / "code.pkl"), "--out", str(f / "o.pt")],
     "code.pkl: refusing to load global posix.system"),
    ("pickle that builds an object it may not", lambda f: ["convert-network", "--src", str(f / "newobj.pkl"),
                                                           "--out", str(f / "o.pt")],
     "newobj.pkl: copyreg.__newobj__ on <class 'dict'> refused"),
    ("network pickle missing", lambda f: ["convert-network", "--src", str(f / "none.pkl"), "--out", str(f / "o.pt")],
     "network pickle not found: "),
    ("truncated reference .pkl", lambda f: evaluate(f, refs="truncated.pkl"),
     "truncated.pkl: not a readable pickle (UnpicklingError: pickle data was truncated)"),
    ("reference statistics missing", lambda f: evaluate(f, refs="none.npz"), "reference statistics not found: "),
    ("reference is an HTML page", lambda f: evaluate(f, refs="not-a-zip.zip"),
     "not-a-zip.zip: unknown reference format (expected an EDM .npz or an EDM2 .pkl)"),
    ("generator without its σ_init", lambda f: evaluate(f, model="net.pt"),
     "net.pt: a network snapshot without init_sigma, so not a one-step generator"),
    ("model is not a snapshot", lambda f: evaluate(f, model="wrong-kind.pt"),
     "wrong-kind.pt: not a sidcore network snapshot (format='something else')"),
    ("checkpoint that runs code", lambda f: ["figure", "--settings", settings(),
                                             "--generator", str(f / "code.pt"), "--data", str(f / "data.zip"),
                                             "--seed", "0", "--rows", "1", "--cols", "1", "--out", str(f / "g.png")],
     "code.pt: not a readable sidcore checkpoint"),
    ("empty checkpoint", lambda f: ["figure", "--settings", settings(),
                                    "--generator", str(f / "empty.pt"), "--data", str(f / "data.zip"),
                                    "--seed", "0", "--rows", "1", "--cols", "1", "--out", str(f / "g.png")],
     "empty.pt: "),
    ("detector needs labels", lambda f: ["train-detector", "--data", str(f / "unlabelled.zip"),
                                         "--out", str(f / "d.pt")], "unlabelled.zip: the classifier needs a labelled"),
    ("unknown detector", lambda f: ["ref-stats", "--data", str(f / "data.zip"), "--detector", "resnet",
                                    "--detector-weights", str(f / "net.pt"), "--out", str(f / "r.npz")],
     "unknown detector 'resnet'; known: "),
    ("detector weights missing", lambda f: ["ref-stats", "--data", str(f / "data.zip"), "--detector",
                                            "sidcore-digits", "--detector-weights", str(f / "none.pt"),
                                            "--out", str(f / "r.npz")], "detector weights not found: "),
    ("summary of another table", lambda f: ["tabulate", "--table", "tiny", "--summaries", str(f / "other-table.json"),
                                            "--out", str(f / "t.csv"), "--markdown", str(f / "t.md")],
     "other-table.json: summary is for table 'cifar10-uncond', not 'tiny'"),
    ("evaluation runs of different models", lambda f: ["summarize", "--table", "tiny", "--std-ddof", "1", "--runs",
                                                       str(f / "run0.json"), str(f / "run1.json"),
                                                       "--out", str(f / "s.json")],
     "evaluation runs disagree on alpha: 1.0 vs 2.0"),
    ("unknown method in a plot", lambda f: ["plot", "--run", "dmd", "1.0", str(f / "log.jsonl"), "--table", "tiny",
                                            "--out", str(f / "p.png"), "--pdf", str(f / "p.pdf")],
     "--run dmd 1.0 "),
    ("unknown benchmark layout", lambda f: ["benchmark", "--layouts", "imagenet"],
     "benchmark --layouts: unknown imagenet (known: tiny, cifar10, imagenet64, edm2-xs)"),
    ("launch without a command", lambda f: ["launch", "--executor", "local", "--name", "x", "--logdir", str(f / "l")],
     "launch: give the sidcore command to run after `--`"),
    ("unknown artifact key", lambda f: ["download", "teacher/edm-cifar10-32x32-uncond", "--out", str(f / "t.pkl")],
     "unknown artifact key 'teacher/edm-cifar10-32x32-uncond' (sidcore/data/artifacts.yaml); close matches: "),
]


@pytest.mark.parametrize("what, argv, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_the_culprit(files, capsys, what, argv, message):
    assert cli.main(argv(files)) == cli.USER_ERROR_EXIT
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err, err
    assert "Traceback" not in err and "weights_only" not in err


def test_the_program_exits_with_status_2_and_debug_shows_the_traceback(files):
    argv = [sys.executable, "-m", "sidcore.cli", "convert-network", "--src", str(files / "code.pkl"), "--out",
            str(files / "o.pt")]
    r = subprocess.run(argv, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("sidcore convert-network: error: ") and "Traceback" not in r.stderr
    r = subprocess.run([*argv[:3], "--debug", *argv[3:]], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" in r.stderr and "UnsafePickleError" in r.stderr


def test_an_internal_error_keeps_its_traceback(monkeypatch):
    def broken(out, log):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(jobs, "ddp_check", broken)
    with pytest.raises(ZeroDivisionError):
        cli.main(["ddp-check", "--out", "x.json"])
