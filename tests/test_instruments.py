"""The instruments of a run's dynamics: D's λ-free readout, the generator's gradient probe, the raw G's FID."""
import json
import math
from dataclasses import replace

import pytest
import torch
from test_distill import Preempted, dies_at_call, fake_fid, make_toy, settings, weights

from sidcore import cli, distill, instruments
from sidcore.distill import Distiller
from sidcore.progress_log import format_record
from sidcore.report import dynamics


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("toy"))


def test_gradient_probe_is_the_ratio_and_cosine_of_the_two_gradients_and_leaves_grad_alone():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0, -1.0]))
    frozen = torch.zeros(2, requires_grad=False)
    a, b = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([0.0, 1.0, 0.0])
    x = w * 2  # a shared node: the graph must survive both probes for the step's own backward
    S_sid, S_gan = (x * a).sum() / 2, (x * b).sum() / 2  # ∇ = a and b
    probe = instruments.gradient_probe(S_sid, S_gan, [w, frozen])
    assert probe["G_grad_ratio"] == pytest.approx(1 / 5) and probe["G_grad_cos"] == pytest.approx(0.0)
    assert w.grad is None
    (S_sid + S_gan).backward()  # the graph is still there
    assert torch.equal(w.grad, a + b)
    S_sid, S_gan = (w * a).sum(), (w * -2 * a).sum()
    assert instruments.gradient_probe(S_sid, S_gan, [w]) == pytest.approx({"G_grad_ratio": 2.0, "G_grad_cos": -1.0})


def test_masked_mean_leaves_out_the_samples_not_kept():
    values = torch.tensor([[1.0, 3.0], [float("nan"), 0.0], [5.0, 7.0]])
    keep = torch.tensor([True, False, True])
    assert instruments.masked_mean(values, keep).item() == pytest.approx(4.0)
    assert instruments.masked_mean(values, torch.zeros(3, dtype=torch.bool)).item() == 0.0


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


D_KEYS = {"D_bce_real", "D_bce_fake", "D_acc_real", "D_acc_fake", "D_logit_real", "D_logit_fake"}


@pytest.fixture(scope="module")
def sida_run(files, tmp_path_factory):
    """A SiDA run with its instruments, the raw G's FID included."""
    out = tmp_path_factory.mktemp("sida")
    Distiller(settings("sida", eval_raw_generator=True), files / "teacher.pt", files / "data.zip", out).run(
        fake_fid, log=lambda m: None)
    return out


def test_a_sida_run_logs_the_instruments_and_computes_what_it_computes_without_them(files, sida_run, tmp_path,
                                                                                    monkeypatch):
    """D's readout in every stage, one gradient probe in every tick of the third stage, the raw G's FID at every
    in-training evaluation where asked; the weights are the same bit for bit as a run without any of them."""
    on = sida_run
    log = records(on)
    assert all(D_KEYS <= r.keys() for r in log) and {r["stage"] for r in log} == {1, 2, 3}
    assert all(0 <= r["D_acc_real"] <= 1 and 0 <= r["D_acc_fake"] <= 1 and r["D_bce_real"] > 0 for r in log)
    probed = [r for r in log if "G_grad_ratio" in r]
    assert probed and all(r["stage"] == 3 for r in probed)
    assert [r["tick"] for r in probed] == [r["tick"] for r in log if r["stage"] == 3]
    assert all(r["G_grad_ratio"] > 0 and -1 <= r["G_grad_cos"] <= 1 for r in probed)
    assert all(("fid_raw" in r) == ("fid" in r) for r in log)
    assert any(r["fid_raw"] != r["fid"] for r in log if "fid" in r)
    line = format_record(log[-1], math.inf)
    assert "D acc real/fake" in line and "|grad gan|/|grad sid|" in line and "raw-G FID" in line

    monkeypatch.setattr(distill, "gradient_probe", lambda *args: {})
    off = tmp_path / "off"
    Distiller(settings("sida"), files / "teacher.pt", files / "data.zip", off).run(fake_fid, log=lambda m: None)
    assert not any("G_grad_ratio" in r or "fid_raw" in r for r in records(off))
    a, b = weights(on), weights(off)
    for key in ("G", "G_ema", "fake_score"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def test_a_sid_run_has_no_discriminator_to_read(files, tmp_path):
    Distiller(settings("sid"), files / "teacher.pt", files / "data.zip", tmp_path).run(fake_fid, log=lambda m: None)
    assert not any(D_KEYS & r.keys() or "G_grad_ratio" in r for r in records(tmp_path))


def test_a_run_resumes_with_the_raw_generator_evaluation_switched(files, tmp_path):
    """What is measured besides is not a training setting: switching it does not refuse the training state."""
    s = settings("sid")
    with pytest.raises(Preempted):
        Distiller(s, files / "teacher.pt", files / "data.zip", tmp_path).run(dies_at_call(2, fake_fid),
                                                                             log=lambda m: None)
    switched = {**s, "distill": replace(s["distill"], eval_raw_generator=True)}
    resumed = Distiller(switched, files / "teacher.pt", files / "data.zip", tmp_path)
    assert resumed.cur_nimg > 0
    resumed.run(fake_fid, log=lambda m: None)
    assert "fid_raw" in records(tmp_path)[-1]


def test_the_dynamics_plot_draws_every_instrument_of_a_sida_run_and_the_fid_of_a_sid_run(files, sida_run, tmp_path):
    sid = tmp_path / "sid"
    Distiller(settings("sid"), files / "teacher.pt", files / "data.zip", sid).run(fake_fid, log=lambda m: None)
    png = tmp_path / "dynamics.png"
    args = cli.parser().parse_args(["dynamics", "--run", "sida", "1.2", str(sida_run / "log.jsonl"), "--run", "sid",
                                    "1.2", str(sid / "log.jsonl"), "--title", "toy", "--out", str(png),
                                    "--pdf", str(tmp_path / "dynamics.pdf")])
    assert args.func(args) == 0 and png.stat().st_size > 0 and (tmp_path / "dynamics.pdf").exists()
    fig = dynamics.figure([("sida", 1.2, sida_run / "log.jsonl"), ("sid", 1.2, sid / "log.jsonl")], "toy")
    acc, bce, grad, fid = fig.axes[:4]
    legends = [[text.get_text() for text in axes.get_legend().get_texts()] for axes in (acc, bce, grad, fid)]
    assert legends[:3] == [["SiDA, α = 1.2, real", "SiDA, α = 1.2, fake"]] * 2 + [
        ["SiDA, α = 1.2, |∇gan| / |∇sid|", "SiDA, α = 1.2, cos"]]
    assert legends[3] == ["SiDA, α = 1.2, G_ema", "SiDA, α = 1.2, raw G", "SiD, α = 1.2, G_ema"]
    assert len(acc.lines) == 2 + 2 + 1  # real, fake, SiDA's two stage starts, chance
    twice = dynamics.labels([("sida", 1.2, sida_run / "log.jsonl"), ("sida", 1.2, sid / "log.jsonl")])
    assert twice == [f"SiDA, α = 1.2 ({sida_run.name})", "SiDA, α = 1.2 (sid)"]
