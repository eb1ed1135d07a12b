"""Training curves in TensorBoard (config.yaml ``logging.tensorboard``): the event files hold each progress-log
record and sample grid at its images seen, also across a resume; the switch, and the optional package it needs,
are checked before any work, and it reaches the distillations only, as a flag."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import test_workflow
from configured import CONFIG, ROOT, job
from test_distill import Preempted, dies_at_call, fake_fid, make_toy
from test_distill import settings as toy_settings
from test_workflow import SNAKEMAKE, assert_refused, overlay, snakemake

from sidcore import cli, config, tensorboard
from sidcore.distill import Distiller
from sidcore.errors import UserError
from sidcore.settings import dumps

SCHEMA = ROOT / config.SCHEMA
workdir = test_workflow.workdir  # the fixture: a copy of the workflow to plan in


def fid_and_is(G) -> dict:
    """The in-training metrics of a dataset measuring FID and IS (stand-ins, see test_distill.fake_fid)."""
    fid = fake_fid(G)["fid"]
    return {"fid": fid, "is": 1 + fid / 10}


needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason="the optional tensorboard package is not installed")


def events(run_dir):
    """The run's event files as TensorBoard shows them: every event, but those a later start purged."""
    from tensorboard.backend.event_processing import event_accumulator as ea
    return ea.EventAccumulator(str(run_dir / tensorboard.DIR), size_guidance={ea.SCALARS: 0, ea.IMAGES: 0}).Reload()


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def nimg(record: dict) -> int:
    return round(record["kimg"] * 1000)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("toy"))


def assert_events_are_the_log(run_dir) -> None:
    """Every number of every record, at its images seen, once; a grid at each evaluation."""
    log, acc = records(run_dir), events(run_dir)
    numbers = {k for r in log for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert set(acc.Tags()["scalars"]) == numbers - set(tensorboard.POSITION)
    assert {"loss_fake_score", "loss_G", "sec_per_kimg", "peak_mem_mb", "eta_sec", "stage", "fid", "is"} <= numbers
    for tag in acc.Tags()["scalars"]:
        written = [(e.step, e.value) for e in acc.Scalars(tag)]
        expected = [(nimg(r), r[tag]) for r in log if tag in r]
        assert [s for s, _ in written] == [s for s, _ in expected], tag
        assert [v for _, v in written] == pytest.approx([v for _, v in expected], rel=1e-6), tag
    evaluated = [nimg(r) for r in log if "fid" in r]
    assert acc.Tags()["images"] == [tensorboard.GRID]
    assert [e.step for e in acc.Images(tensorboard.GRID)] == evaluated
    assert (acc.Images(tensorboard.GRID)[0].width, acc.Images(tensorboard.GRID)[0].height) == (64, 64)


@needs_tensorboard
def test_event_files_hold_every_record_and_grid_at_its_images_seen(files, tmp_path):
    Distiller(toy_settings("sid"), files / "teacher.pt", files / "data.zip", tmp_path).run(
        fid_and_is, log=lambda m: None, tensorboard=True)
    assert len(records(tmp_path)) == 6
    assert_events_are_the_log(tmp_path)


@needs_tensorboard
def test_a_resumed_run_hides_the_events_written_after_its_state(files, tmp_path):
    """States at 80 and 160 images (dump_ticks 2); the run dies at its evaluation at 144, after the records of 112
    and 144 reached TensorBoard: the restart continues from 80, and TensorBoard shows each record once."""
    s = toy_settings("sid", dump_ticks=2)
    (tmp_path / tensorboard.DIR).mkdir()
    (tmp_path / tensorboard.DIR / "events.out.tfevents.0.earlier-start").write_bytes(b"")
    with pytest.raises(Preempted):
        Distiller(s, files / "teacher.pt", files / "data.zip", tmp_path).run(dies_at_call(3, fid_and_is),
                                                                             log=lambda m: None, tensorboard=True)
    assert not (tmp_path / tensorboard.DIR / "events.out.tfevents.0.earlier-start").exists()  # a start removes them
    assert [e.step for e in events(tmp_path).Scalars("loss_G")] == [16, 48, 80, 112]
    resumed = Distiller(s, files / "teacher.pt", files / "data.zip", tmp_path)
    assert resumed.cur_nimg == 80
    resumed.run(fid_and_is, log=lambda m: None, tensorboard=True)
    assert len(list((tmp_path / tensorboard.DIR).glob("events.out.tfevents.*"))) == 2
    assert_events_are_the_log(tmp_path)


def test_no_event_files_unless_asked(files, tmp_path):
    s = toy_settings("sid", duration_kimg=0.016)
    Distiller(s, files / "teacher.pt", files / "data.zip", tmp_path).run(fake_fid, log=lambda m: None)
    assert (tmp_path / "log.jsonl").exists() and not (tmp_path / tensorboard.DIR).exists()


MISSING = ("logging.tensorboard is true but the `tensorboard` package is not installed: "
           "pip install 'sidcore[tensorboard]' (or set logging.tensorboard: false)")


@pytest.fixture
def no_tensorboard(monkeypatch):
    """The ``tensorboard`` package made unimportable (as where the extra is not installed)."""
    for name in [m for m in sys.modules if m == "tensorboard" or m.startswith("tensorboard.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", None)


def test_without_the_package_the_setting_is_refused_naming_it(no_tensorboard):
    with pytest.raises(UserError) as e:
        tensorboard.require()
    assert str(e.value) == MISSING


def test_the_distill_command_refuses_it_before_any_work(no_tensorboard, tmp_path, capsys):
    s = dumps(job("tiny", "sid", 1.0))
    argv = ["distill", "--tensorboard", "--settings", s, "--outdir", str(tmp_path / "run"),
            *(a for flag in ("teacher", "data", "refs", "detector-weights") for a in (f"--{flag}", str(tmp_path)))]
    assert cli.run(argv) == cli.USER_ERROR_EXIT
    assert capsys.readouterr().err == f"sidcore distill: error: {MISSING}\n"
    assert not (tmp_path / "run").exists()


def test_the_switch_is_off_unless_set():
    without = {k: v for k, v in CONFIG.items() if k != "logging"}
    config.validate(without, SCHEMA)
    assert not tensorboard.enabled(without) and not tensorboard.enabled(CONFIG)
    assert tensorboard.enabled({**CONFIG, "logging": {"tensorboard": True}})


@pytest.mark.parametrize("value", [1, "yes", None, {}])
def test_schema_refuses_a_tensorboard_that_is_not_a_boolean(value):
    with pytest.raises(UserError, match=re.escape(f"logging.tensorboard: {value!r} is not of type 'boolean'")):
        config.validate({**CONFIG, "logging": {"tensorboard": value}}, SCHEMA)


def test_schema_refuses_an_unknown_logging_key():
    with pytest.raises(UserError, match=r"^unknown key 'wandb' in logging \(known: tensorboard\)"):
        config.validate({**CONFIG, "logging": {"wandb": True}}, SCHEMA)


def test_the_plan_refuses_it_without_the_package(workdir, monkeypatch):
    """`snakemake -n` ends at the config checks, naming the setting, where `tensorboard` cannot be imported."""
    hidden = workdir / "hidden" / "tensorboard"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('not installed here')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(workdir / "hidden"), os.environ.get("PYTHONPATH", "")]))
    assert_refused(snakemake(workdir, "--configfile", overlay(workdir, "logging: {tensorboard: true}")), MISSING)


@pytest.mark.parametrize("on", [True, False])
def test_the_distill_jobs_get_the_flag_and_no_setting(workdir, on):
    """``--tensorboard`` on the distill commands only, and nothing in any job's settings (so that switching it
    reruns no finished distillation)."""
    r = subprocess.run([*SNAKEMAKE, "-n", "-p", "results/tiny/sid/alpha1.0/generator.pt", "--configfile",
                        overlay(workdir, f"logging: {{tensorboard: {str(on).lower()}}}")], cwd=workdir,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    commands = [line for line in r.stdout.splitlines() if "--settings " in line]
    distill = [c for c in commands if " -- distill --settings " in c]
    logged = "sidcore --log logs/distill/tiny-sid-alpha1.0.log launch "
    assert distill and all((" --tensorboard " in c) == on and logged in c for c in distill)
    assert len(commands) > len(distill) and not any("tensorboard" in c for c in commands if c not in distill)
