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
from sidcore.settings import dumps, plain, resolve

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


class CodeStorage:
    """A tensor storage whose bytes are a pickle that would run a shell command."""

    def __reduce__(self):
        return torch.storage._load_from_bytes, (pickle.dumps(Shell(), protocol=self.protocol),)

    def __init__(self, protocol: int) -> None:
        self.protocol = protocol


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
    (root / "storage.pkl").write_bytes(pickle.dumps({"ema": CodeStorage(2)}))
    (root / "storage4.pkl").write_bytes(pickle.dumps({"ema": CodeStorage(4)}))
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
        (root / f"run{r}.json").write_text(json.dumps({
            "run": r, "seeds": [r], "metrics": {"fid": 1.0}, "dataset": "tiny", "method": "sid", "alpha": 1.0 + r,
            "source": "ours", "nfe": 1, "kimg": 20.0, "num_images": 8, "detector": "sidcore-digits",
            "model_sha256": "0" * 64, "refs_sha256": "0" * 64}))
    (root / "other-table.json").write_text(json.dumps({"table": "cifar10-uncond", "method": "sid", "metrics": {},
                                                       "nfe": 1}))
    (root / "log.jsonl").write_text('{"tick": 1, "kimg": 1.0, "fid": 3.0}\n')
    (root / "no-kimg.jsonl").write_text('{"tick": 1, "fid": 3.0}\n')
    (root / "bad.json").write_text("{not json")
    run0 = json.loads((root / "run0.json").read_text())
    (root / "no-seeds.json").write_text(json.dumps({k: v for k, v in run0.items() if k != "seeds"}))
    (root / "no-metrics.json").write_text(json.dumps({"table": "tiny", "method": "sid", "nfe": 1}))
    (root / "adir.json").mkdir()
    return root


def settings(**extra) -> str:
    """The tiny experiment's settings of SiD α = 1.0 from config.yaml, with ``extra`` changed."""
    base = resolve(config.load(ROOT / "config.yaml", ROOT / config.SCHEMA), "tiny", "sid", 1.0)
    return dumps({**base, "metrics": ["fid"], "evaluation": replace(base["evaluation"], runs=1, num_images=8, batch=8),
                  **extra})


def distill(f: Path, top: dict | None = None, **changes) -> list[str]:
    """``sidcore distill`` of the tiny SiD run with settings ``top`` and its distill settings changed."""
    base = resolve(config.load(ROOT / "config.yaml", ROOT / config.SCHEMA), "tiny", "sid", 1.0)
    text = dumps({**base, **(top or {}), "distill": replace(base["distill"], **changes)})
    inputs = {"--teacher": "net.pt", "--data": "data.zip", "--refs": "refs.npz", "--detector-weights": "detector.pt"}
    return ["distill", "--settings", text, *[x for flag, name in inputs.items() for x in (flag, str(f / name))],
            "--outdir", str(f / "run")]


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
     "--settings: data: 'path' is a required property"),
    ("data zip is an HTML page", lambda f: ["prepare-data", "--settings",
                                            settings(data={"source": "edm-zip", "path": str(f / "not-a-zip.zip")}),
                                            "--out", str(f / "x.zip")], "not-a-zip.zip: not a zip archive"),
    ("unknown data source", lambda f: ["prepare-data", "--settings", settings(data={"source": "ftp"}),
                                       "--out", str(f / "x.zip")],
     "--settings: data.source: 'ftp' is not one of ['sklearn-digits'"),
    ("truncated NVIDIA pickle", lambda f: ["convert-network", "--src", str(f / "truncated.pkl"),
                                           "--out", str(f / "o.pt")], "truncated.pkl: not a readable"),
    ("pickle that runs code", lambda f: ["convert-network", "--src", str(f / "code.pkl"), "--out", str(f / "o.pt")],
     "code.pkl: refusing to load global posix.system"),
    ("storage that runs code", lambda f: ["convert-network", "--src", str(f / "storage.pkl"), "--out", str(f / "o.pt")],
     "storage.pkl: a tensor storage that is not plain data (it names posix.system"),
    ("storage in another protocol", lambda f: ["convert-network", "--src", str(f / "storage4.pkl"),
                                               "--out", str(f / "o.pt")],
     "storage4.pkl: a tensor storage that is not plain data (Unsupported operand 149)"),
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
    # outputs that cannot be written: named, before any work is lost
    ("output folder cannot be made", lambda f: summarize(f, out=Path("/proc/sidcore/s.json")),
     "/proc/sidcore/s.json: No such file or directory"),
    ("download onto a directory", lambda f: ["download", (f / "bad.json").as_uri(), "--kind", "json",
                                             "--out", str(f / "adir.json")], "a directory is in the way"),
    ("output folder is a file", lambda f: evaluate(f)[:-1] + [str(f / "run0.json")], "run0.json: File exists"),
    # inputs: missing, not JSON, without what the command reads
    ("input missing", lambda f: summarize(f, runs=[f / "none.json"]), "none.json: No such file or directory"),
    ("run record not JSON", lambda f: summarize(f, runs=[f / "bad.json"]),
     "bad.json is not valid JSON (Expecting property name"),
    ("run record without seeds", lambda f: summarize(f, runs=[f / "no-seeds.json"]),
     "no-seeds.json: an evaluation run without 'seeds'"),
    ("summary without metrics", lambda f: ["tabulate", "--table", "tiny", "--summaries", str(f / "no-metrics.json"),
                                           "--out", str(f / "t.csv"), "--markdown", str(f / "t.md")],
     "no-metrics.json: an evaluation summary without 'metrics'"),
    ("log record without kimg", lambda f: ["plot", "--run", "sid", "1.0", str(f / "no-kimg.jsonl"), "--table", "tiny",
                                           "--out", str(f / "p.png"), "--pdf", str(f / "p.pdf")],
     "no-kimg.jsonl, line 1: not a tick record (it needs tick and kimg)"),
    ("α NaN in a plot", lambda f: ["plot", "--run", "sid", "nan", str(f / "log.jsonl"), "--table", "tiny",
                                   "--out", str(f / "p.png"), "--pdf", str(f / "p.pdf")],
     "α 'nan' is not in [0, 10] or not writable as digits"),
    ("α too small to name", lambda f: ["dynamics", "--run", "sida", "1e-05", str(f / "log.jsonl"),
                                       "--out", str(f / "p.png"), "--pdf", str(f / "p.pdf")], "α '1e-05' is not in"),
    ("α a word in the cost table", lambda f: ["cost", "--run", "tiny", "tiny", "sid", "one", str(f / "log.jsonl"),
                                              str(f / "b.tsv"), "--out", str(f / "c.csv"),
                                              "--markdown", str(f / "c.md")],
     "--run tiny tiny sid one: α 'one' is not a number"),
    ("an unknown table with nothing in it", lambda f: ["tabulate", "--table", "edm3", "--out", str(f / "t.csv"),
                                                       "--markdown", str(f / "t.md")],
     "table 'edm3': no summaries given and no paper numbers for it"),
    # --settings held to config.yaml's schema
    ("settings lr NaN", lambda f: distill(f, lr=float("nan")), "--settings: distill.lr: NaN or infinity"),
    ("settings batch 0", lambda f: distill(f, batch=0), "--settings: distill.batch: 0 is less than the minimum of 1"),
    ("settings batch a string", lambda f: distill(f, batch="64"), "distill.batch: '64' is not of type 'integer'"),
    ("settings batch a float", lambda f: distill(f, batch=64.0), "distill.batch: 64.0 is not of type 'integer'"),
    ("settings seed past 2^31", lambda f: distill(f, seed=2 ** 70), "distill.seed: 1180591620717411303424 is greater"),
    ("settings stage past the end", lambda f: distill(f, {"method": "sida", "adversarial": True},
                                                      stage_kimg=(30.0, 40.0)), "so it would never train"),
    ("settings method unknown", lambda f: distill(f, {"method": "dmd"}),
     "--settings: method: 'dmd' is not one of sid, sida, sid2a"),
    ("settings evaluation runs -1", lambda f: ["evaluate", "--settings", settings(evaluation={
        **plain(resolve(config.load(ROOT / "config.yaml"), "tiny")["evaluation"]), "runs": -1})] + evaluate(f)[3:],
     "--settings: evaluation.runs: -1 is less than the minimum of 1"),
]


def summarize(f: Path, runs: list[Path] | None = None, out: Path | None = None) -> list[str]:
    return ["summarize", "--table", "tiny", "--std-ddof", "1", "--runs", *map(str, runs or [f / "run0.json"]),
            "--out", str(out or f / "s.json")]


@pytest.mark.parametrize("what, argv, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_the_culprit(files, capsys, what, argv, message):
    assert cli.main(argv(files)) == cli.USER_ERROR_EXIT
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err, err
    assert "Traceback" not in err and "weights_only" not in err


FLAGS = [  # refused by the parser, naming the flag, before any work
    (["ref-stats", "--data", "d.zip", "--detector", "sidcore-digits", "--detector-weights", "w.pt", "--out", "r.npz",
      "--batch", "0"], "argument --batch: 0 is not in [1, ∞]"),
    (["figure", "--settings", "{}", "--generator", "g.pt", "--data", "d.zip", "--seed", "0", "--rows", "2", "--cols",
      "100000000", "--out", "f.png"], "argument --cols: 100000000 is not in [1, 64]"),
    (["figure", "--settings", "{}", "--generator", "g.pt", "--data", "d.zip", "--seed", "-1", "--rows", "2", "--cols",
      "2", "--out", "f.png"], "argument --seed: -1 is not in [0, 2147483647]"),
    (["download", "file:///x.pkl", "--out", "x.pkl", "--timeout", "nan"], "argument --timeout: nan is not a finite"),
    (["benchmark", "--repeats", "0"], "argument --repeats: 0 is not in [1, ∞]"),
    (["train-detector", "--data", "d.zip", "--out", "d.pt", "--epochs", "-5"], "argument --epochs: -5 is not in [1"),
    (["plot", "--run", "sid", "1.0", "log.jsonl", "--table", "tiny", "--out", "plotfile", "--pdf", "p.pdf"],
     "argument --out: 'plotfile': a PNG file's name ends in .png"),
    (["summarize", "--table", "tiny", "--std-ddof", "1", "--runs", "r.json", "--out", "s.csv"],
     "argument --out: 's.csv': a JSON file's name ends in .json"),
    (["distill", "--settings", "{}", "--teacher", "t.pt", "--data", "d.zip", "--refs", "r.npz", "--detector-weights",
      "w.pt", "--outdir", "out", "--start-over", "x;y"], "argument --start-over: 'x;y' is not 1 to 64 letters"),
    (["distill", "--settings", "{}", "--teacher", "t.pt", "--data", "d.zip", "--refs", "r.npz", "--detector-weights",
      "w.pt", "--outdir", "out", "--on-changed-settings", "delete"], "argument --on-changed-settings: invalid choice"),
]


@pytest.mark.parametrize("argv, message", FLAGS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in FLAGS])
def test_a_bad_flag_is_refused_by_the_parser_naming_it(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == cli.USER_ERROR_EXIT and message in err.splitlines()[-1] and "Traceback" not in err, err


def test_an_output_a_command_cannot_write_is_refused_by_the_parser(files, capsys):
    for out, message in [(files / "adir.json", "adir.json' is a directory; name the JSON file to write"),
                         (files / ("x" * 300 + ".json"), "a file name of more than 255 bytes")]:
        with pytest.raises(SystemExit) as e:
            cli.main(summarize(files, out=out))
        err = capsys.readouterr().err
        assert e.value.code == cli.USER_ERROR_EXIT and message in err.splitlines()[-1], err


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
