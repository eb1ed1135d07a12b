"""The distillation loop on a tiny random teacher: outputs, stages, and resuming where a run stopped."""
import copy
import json
import signal

import numpy as np
import pytest
import torch

from sidcore import checkpoint
from sidcore.dataset import write_image_zip
from sidcore.distill import Distiller
from sidcore.networks import build_network

NETWORK = dict(arch="ddpmpp", img_resolution=8, img_channels=1, label_dim=10, model_channels=16,
               channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], augment_dim=9, dropout=0.0)


def settings(method: str, **distill) -> dict:
    d = dict(batch=16, batch_gpu=8, lr=1e-4, glr=1e-4, g_beta1=0.0, fp16=False, dropout=0.0, augment=0.0,
             ema_halflife_kimg=0.05, ema_rampup=0.05, init_sigma=2.5, tmax=800, P_mean=-1.2, P_std=1.2,
             loss_scaling=1, loss_scaling_G=100, loss_scaling_D=1, loss_scaling_G_gan=0.01, clip_fake_grad=1.0,
             stage_kimg=[0.032, 0.064], duration_kimg=0.16, tick_kimg=0.032, snap_ticks=2, eval_early_ticks=[0],
             eval_first_tick=0, dump_ticks=1, keep_snapshots=2, eval_images=16, seed=3)
    d.update(distill)
    net = {k: v for k, v in NETWORK.items() if k not in ("img_resolution", "img_channels", "label_dim")}
    return {"dataset": "toy", "method": method, "alpha": 1.2, "init": None, "adversarial": method != "sid",
            "network": net, "distill": d, "resolution": 8, "channels": 1, "label_dim": 10}


def make_toy(root):
    """A toy dataset and a random tiny teacher in ``root``."""
    rng = np.random.default_rng(0)
    write_image_zip(root / "data.zip", rng.integers(0, 256, (40, 1, 8, 8), dtype=np.uint8),
                    rng.integers(0, 10, 40))
    torch.manual_seed(0)
    checkpoint.save_atomic(checkpoint.network_snapshot(build_network(**NETWORK), NETWORK), root / "teacher.pt")
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("toy"))


def fake_fid(G):
    """A deterministic stand-in for FID (depends on the weights, consumes no global randomness)."""
    return {"fid": float(sum(p.double().abs().sum() for p in G.parameters()) % 97)}


def weights(run_dir):
    return checkpoint.load(run_dir / "training-state.pt")


@pytest.mark.parametrize("method", ["sid", "sida"])
def test_run_publishes_generator_and_log(files, tmp_path, method):
    out = tmp_path / method
    out.mkdir()
    Distiller(settings(method), files / "teacher.pt", files / "data.zip", out).run(fake_fid, log=lambda m: None)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records[-1]["kimg"] == pytest.approx(0.16)
    assert any("fid" in r for r in records)
    stages = [r["stage"] for r in records]
    assert stages == sorted(stages) and (stages[-1] == 3 if method == "sida" else set(stages) == {2})
    if method == "sida":
        assert stages[0] == 1 and "loss_D" in records[0] and "loss_G_gan" in records[-1]
    snap = checkpoint.load(out / "generator.pt")
    assert snap["meta"]["fid"] == min(r["fid"] for r in records if "fid" in r)
    assert list(out.glob("fakes-*.png"))


def test_stage_one_keeps_generator_frozen(files, tmp_path):
    s = settings("sida", stage_kimg=[10, 20], duration_kimg=0.032)
    dist = Distiller(s, files / "teacher.pt", files / "data.zip", tmp_path)
    before = copy.deepcopy(dist.G.state_dict())
    dist.run(fake_fid, log=lambda m: None)
    assert all(torch.equal(before[k], v) for k, v in dist.G.state_dict().items())
    assert not all(torch.equal(a, b) for a, b in zip(dist.fake_score.parameters(), dist.true_score.parameters()))


class Preempted(Exception):
    pass


def test_interrupted_run_resumes_bit_identically(files, tmp_path):
    s = settings("sida")
    ref = tmp_path / "ref"
    ref.mkdir()
    Distiller(s, files / "teacher.pt", files / "data.zip", ref).run(fake_fid, log=lambda m: None)

    out = tmp_path / "resumed"
    out.mkdir()
    calls = []

    def dies_at_second_eval(G):
        calls.append(1)
        if len(calls) == 2:
            raise Preempted
        return fake_fid(G)

    with pytest.raises(Preempted):
        Distiller(s, files / "teacher.pt", files / "data.zip", out).run(dies_at_second_eval, log=lambda m: None)
    assert (out / "training-state.pt").exists() and not (out / "generator.pt").exists()
    Distiller(s, files / "teacher.pt", files / "data.zip", out).run(fake_fid, log=lambda m: None)

    a, b = weights(ref), weights(out)
    for key in ("G", "G_ema", "fake_score"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert (ref / "log.jsonl").read_text().count("\n") == (out / "log.jsonl").read_text().count("\n")


class StoppedAtTheEnd(Distiller):
    """Receives a stop signal during its last iteration."""

    def iteration(self, stats):
        stage = super().iteration(stats)
        if self.cur_nimg >= self.d["duration_kimg"] * 1000:
            self.stop_signal = (signal.SIGUSR2, self.cur_nimg)
        return stage


def test_a_run_stopped_after_its_last_iteration_resumes_without_another(files, tmp_path):
    s = settings("sid")
    ref, out = tmp_path / "ref", tmp_path / "stopped"
    for d in (ref, out):
        d.mkdir()
    Distiller(s, files / "teacher.pt", files / "data.zip", ref).run(fake_fid, log=lambda m: None)
    assert StoppedAtTheEnd(s, files / "teacher.pt", files / "data.zip", out).run(fake_fid, log=lambda m: None) is False
    assert not (out / "generator.pt").exists()
    resumed = Distiller(s, files / "teacher.pt", files / "data.zip", out)
    assert resumed.run(fake_fid, log=lambda m: None) is True
    assert resumed.cur_nimg == s["distill"]["duration_kimg"] * 1000  # no iteration past the end
    a, b = weights(ref), weights(out)
    for key in ("G", "G_ema", "fake_score"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert (out / "generator.pt").exists()


def test_resume_with_changed_settings_is_refused(files, tmp_path):
    Distiller(settings("sid"), files / "teacher.pt", files / "data.zip", tmp_path).run(fake_fid, log=lambda m: None)
    with pytest.raises(ValueError, match="distill"):
        Distiller(settings("sid", glr=3e-4), files / "teacher.pt", files / "data.zip", tmp_path)


def test_bf16_switches_every_network_to_bfloat16_compute(files, tmp_path):
    dist = Distiller(settings("sida", fp16=True, bf16=True), files / "teacher.pt", files / "data.zip", tmp_path)
    assert {net.half_dtype for net in (dist.true_score, dist.fake_score, dist.G, dist.G_ema)} == {torch.bfloat16}
    assert Distiller(settings("sid"), files / "teacher.pt", files / "data.zip", tmp_path / "b").G.half_dtype == torch.float16


@pytest.mark.parametrize("first_tick, evaluated", [(0, [0, 1, 2, 4, 5]), (3, [4, 5])])
def test_in_training_evaluation_cadence_as_the_official_loops(files, tmp_path, first_tick, evaluated):
    """Ticks 0–5 (the run ends at tick 5): every 2nd tick and ticks 0, 1; none before eval_first_tick (EDM2's
    loop: 20, so a SiD²A run cannot publish its starting generator); always the last."""
    s = settings("sid", snap_ticks=2, eval_early_ticks=[0, 1], eval_first_tick=first_tick)
    Distiller(s, files / "teacher.pt", files / "data.zip", tmp_path).run(fake_fid, log=lambda m: None)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["tick"] for r in records] == [0, 1, 2, 3, 4, 5]
    assert [r["tick"] for r in records if "fid" in r] == evaluated
    published = checkpoint.load(tmp_path / "generator.pt")["meta"]
    assert published["fid"] == min(r["fid"] for r in records if "fid" in r)
    assert published["kimg"] * 1000 >= (first_tick > 0) * 4 * 32  # never the tick-0 generator when it is skipped
