"""The distillation loop on a tiny random teacher: outputs, stages, and resuming where a run stopped."""
import copy
import json
import os
import signal

import numpy as np
import pytest
import torch
from configured import job

from sidcore import checkpoint, stopping
from sidcore.dataset import write_image_zip
from sidcore.distill import Distiller
from sidcore.model_selection import ModelSelection
from sidcore.networks import build_network

NETWORK = dict(arch="ddpmpp", img_resolution=8, img_channels=1, label_dim=10, model_channels=16,
               channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], augment_dim=9, dropout=0.0)


def settings(method: str, **distill) -> dict:
    """The tiny experiment's settings of ``method`` at α = 1.2 with a toy network and budget (and ``distill``)."""
    toy = dict(batch=16, batch_gpu=8, ema_halflife_kimg=0.05, clip_fake_grad=1.0, stage_kimg=[0.032, 0.064],
               duration_kimg=0.16, tick_kimg=0.032, snap_ticks=2, eval_early_ticks=[0], dump_ticks=1,
               keep_snapshots=2, eval_images=16, seed=3)
    net = {k: v for k, v in NETWORK.items() if k not in ("img_resolution", "img_channels", "label_dim")}
    return job("tiny", method, 1.2, distill={**toy, **distill}, network=net, init=None)


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


def dies_at_call(n: int, evaluate):
    """``evaluate``, raising ``Preempted`` at its ``n``-th call instead: a run killed during that evaluation."""
    calls = []

    def wrapped(G):
        calls.append(1)
        if len(calls) == n:
            raise Preempted
        return evaluate(G)
    return wrapped


def test_interrupted_run_resumes_bit_identically(files, tmp_path):
    s = settings("sida")
    ref = tmp_path / "ref"
    ref.mkdir()
    Distiller(s, files / "teacher.pt", files / "data.zip", ref).run(fake_fid, log=lambda m: None)

    out = tmp_path / "resumed"
    out.mkdir()
    with pytest.raises(Preempted):
        Distiller(s, files / "teacher.pt", files / "data.zip", out).run(dies_at_call(2, fake_fid), log=lambda m: None)
    assert (out / "training-state.pt").exists() and not (out / "generator.pt").exists()
    Distiller(s, files / "teacher.pt", files / "data.zip", out).run(fake_fid, log=lambda m: None)

    a, b = weights(ref), weights(out)
    for key in ("G", "G_ema", "fake_score"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert (ref / "log.jsonl").read_text().count("\n") == (out / "log.jsonl").read_text().count("\n")


@pytest.fixture
def stop_signals(monkeypatch):
    """This process takes the stop signals as a resumable command does (``stopping.watch``), for one test."""
    monkeypatch.setattr(stopping, "_received", [])
    previous = {signum: signal.getsignal(signum) for signum in stopping.STOP_SIGNALS}
    stopping.watch(resumable=True)
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


class SignalledAt(Distiller):
    """Sends itself SIGUSR2 during the iteration that reaches ``stop_nimg`` images seen."""

    def __init__(self, stop_nimg: int, *args, **kwargs):
        self.stop_nimg = stop_nimg
        super().__init__(*args, **kwargs)

    def iteration(self, stats):
        stage = super().iteration(stats)
        if self.cur_nimg == self.stop_nimg:
            os.kill(os.getpid(), signal.SIGUSR2)
        return stage


def log_records(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def timeless(run_dir):
    """The log's records without what depends on the clock and the process (pace, peak memory)."""
    return [{k: v for k, v in r.items() if k not in ("sec_per_kimg", "eta_sec", "peak_mem_mb", "eval_sec")}
            for r in log_records(run_dir)]


def schedule(run_dir):
    """What the log says independently of the clock and of where a run was interrupted."""
    return [(r["tick"], r["kimg"], r["stage"], r.get("fid")) for r in log_records(run_dir)]


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    """A SiD run that nothing interrupted."""
    out = tmp_path_factory.mktemp("reference")
    Distiller(settings("sid"), files / "teacher.pt", files / "data.zip", out).run(fake_fid, log=lambda m: None)
    return out


@pytest.mark.parametrize("stop_nimg", [64, 80, 160])  # mid-tick, at the end of tick 2, after the last iteration
def test_a_stop_signal_saves_and_the_restart_keeps_the_ticks(files, reference, tmp_path, stop_signals, stop_nimg):
    """Ticks end at 16, 48, 80, 112, 144 and 160 images (tick_kimg 0.032; tick 0 after one iteration). A run
    stopped anywhere, resumed, has the same ticks, evaluations and weights as the run that was not stopped."""
    s, ref, out = settings("sid"), reference, tmp_path
    said = []
    stopped = SignalledAt(stop_nimg, s, files / "teacher.pt", files / "data.zip", out)
    assert stopped.run(fake_fid, log=said.append) is False
    assert said[-1] == (f"SIGUSR2 received at {(stop_nimg - 16) / 1000:.3f} kimg: state saved at "
                        f"{stop_nimg / 1000:.3f} kimg; exiting for requeue")
    assert weights(out)["cur_nimg"] == stop_nimg and not (out / "generator.pt").exists()
    stopping._received.clear()
    resumed = Distiller(s, files / "teacher.pt", files / "data.zip", out)
    assert resumed.run(fake_fid, log=lambda m: None) is True
    assert resumed.cur_nimg == s["distill"].duration_kimg * 1000  # no iteration past the end
    a, b = weights(ref), weights(out)
    for key in ("G", "G_ema", "fake_score"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert schedule(out) == schedule(ref)
    assert checkpoint.load(out / "generator.pt")["meta"] == checkpoint.load(ref / "generator.pt")["meta"]


def test_a_run_killed_before_publishing_publishes_on_restart_what_it_would_have(files, reference, tmp_path,
                                                                               monkeypatch):
    """Killed after its last training state, before ``generator.pt`` and ``log.jsonl``: the restart neither
    trains nor evaluates, and publishes the log as the run wrote it, line for line."""
    s, ref, out = settings("sid"), reference, tmp_path

    def killed(selection):
        raise Preempted

    with monkeypatch.context() as m:
        m.setattr(ModelSelection, "publish", killed)
        with pytest.raises(Preempted):
            Distiller(s, files / "teacher.pt", files / "data.zip", out).run(fake_fid, log=lambda m: None)
    written = (out / "progress.jsonl").read_text()
    assert weights(out)["cur_nimg"] == 160 and not (out / "generator.pt").exists()

    def evaluations_refused(G):
        raise AssertionError("evaluated again")

    resumed = Distiller(s, files / "teacher.pt", files / "data.zip", out)
    assert resumed.run(evaluations_refused, log=lambda m: None) is True and resumed.cur_nimg == 160
    assert (out / "log.jsonl").read_text() == written
    assert timeless(out) == timeless(ref)
    a, b = (checkpoint.load(d / "generator.pt") for d in (ref, out))
    assert a["meta"] == b["meta"] and all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_bf16_switches_every_network_to_bfloat16_compute(files, tmp_path):
    dist = Distiller(settings("sida", fp16=True, bf16=True), files / "teacher.pt", files / "data.zip", tmp_path)
    assert {net.half_dtype for net in (dist.true_score, dist.fake_score, dist.G, dist.G_ema)} == {torch.bfloat16}
    sid = Distiller(settings("sid"), files / "teacher.pt", files / "data.zip", tmp_path / "b")
    assert sid.G.half_dtype == torch.float16


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


def sid_start(files, root):
    """A one-step generator snapshot made from the toy teacher's weights: a SiD²A run's starting generator."""
    snap = checkpoint.load(files / "teacher.pt")
    snap["meta"] = {"init_sigma": 2.5}
    checkpoint.save_atomic(snap, root / "sid.pt")
    return root / "sid.pt"


class ModeRecorder:
    """Each network's mode (train or eval, gradients on or off) at every forward call, by the step running it.

    Also checks, at every call of G with gradients off (the fake-score step's samples), that its output equals
    that of a copy of G in eval mode: the samples the fake score (and D) learn from are G's deterministic ones."""

    NETS = ("G", "G_ema", "true_score", "fake_score")

    def __init__(self, dist: Distiller) -> None:
        self.calls, self.step, self.mismatches = [], "outside", 0
        for name in self.NETS:
            getattr(dist, name).register_forward_hook(self.hook(name))
        for step in ("fake_score_step", "generator_step"):
            setattr(dist, step, self.within(step, getattr(dist, step)))
        self.dist = dist

    def hook(self, name: str):
        def record(net, args, output):
            grads = any(p.requires_grad for p in net.parameters())
            self.calls.append((self.step, self.dist.stage(), name, net.training, grads))
            if name == "G" and not torch.is_grad_enabled():
                frozen = copy.deepcopy(net).eval()
                frozen._forward_hooks.clear()
                with torch.no_grad():
                    self.mismatches += not torch.equal(frozen(*args), output)
        return record

    def within(self, step: str, method):
        def wrapped(*args, **kwargs):
            assert self.modes_outside_steps_are_eval(), f"a network left in train mode before {step}"
            self.step = step
            try:
                return method(*args, **kwargs)
            finally:
                self.step = "outside"
        return wrapped

    def modes_outside_steps_are_eval(self) -> bool:
        return all(not getattr(self.dist, n).training and not any(p.requires_grad for p in
                   getattr(self.dist, n).parameters()) for n in self.NETS)

    def check_official_order(self, stages: set[int]) -> None:
        """G trains only inside its own step, the fake score only inside its own; the teacher and G_ema never;
        the fake-score steps seen ran in ``stages``."""
        assert self.calls and self.mismatches == 0
        for step, stage, name, training, grads in self.calls:
            trains = (name, step) in {("G", "generator_step"), ("fake_score", "fake_score_step")}
            assert (training, grads) == (trains, trains), (step, stage, name, training, grads)
        assert self.modes_outside_steps_are_eval()
        assert {stage for step, stage, *_ in self.calls if step == "fake_score_step"} == stages


def test_a_sid2a_start_samples_in_eval_mode_and_every_network_keeps_the_official_modes(files, tmp_path):
    """With dropout, a SiD²A generator loaded from a snapshot (fresh and resumed) gives the fake score and D its
    eval-mode samples: G is in train mode, with gradients, only inside its own step, as in the official loop."""
    s = settings("sid2a", dropout=0.5)
    init = sid_start(files, tmp_path)
    fresh = Distiller(s, files / "teacher.pt", files / "data.zip", tmp_path / "fresh", init_path=init)
    recorder = ModeRecorder(fresh)
    fresh.run(fake_fid, log=lambda m: None)
    recorder.check_official_order({1, 2, 3})

    out = tmp_path / "resumed"
    with pytest.raises(Preempted):
        Distiller(s, files / "teacher.pt", files / "data.zip", out, init_path=init).run(
            dies_at_call(2, fake_fid), log=lambda m: None)
    resumed = Distiller(s, files / "teacher.pt", files / "data.zip", out, init_path=init)
    assert resumed.cur_nimg == 48 and resumed.stage() == 2  # resumed before its first G step of this process
    recorder = ModeRecorder(resumed)
    resumed.run(fake_fid, log=lambda m: None)
    recorder.check_official_order({2, 3})


def test_a_sid2a_run_counts_the_images_its_start_had_seen(files, tmp_path):
    """Its progress records and its snapshots carry the SiD generator's images seen (the plot and the table
    count from there)."""
    init = sid_start(files, tmp_path)
    snap = checkpoint.load_snapshot(init)
    start = 0.048  # the SiD generator's images seen
    checkpoint.save_atomic({**snap, "meta": {**snap["meta"], "kimg": start}}, init)
    out = tmp_path / "sid2a"
    out.mkdir()
    Distiller(settings("sid2a"), files / "teacher.pt", files / "data.zip", out, init_path=init).run(
        fake_fid, log=lambda m: None)
    assert {r["start_kimg"] for r in log_records(out)} == {start}
    assert checkpoint.load_snapshot(out / "generator.pt")["meta"]["start_kimg"] == start
    sid = tmp_path / "sid"
    sid.mkdir()
    Distiller(settings("sid", duration_kimg=0.032), files / "teacher.pt", files / "data.zip", sid).run(
        fake_fid, log=lambda m: None)
    assert not any("start_kimg" in r for r in log_records(sid))
    assert "start_kimg" not in checkpoint.load_snapshot(sid / "generator.pt")["meta"]
