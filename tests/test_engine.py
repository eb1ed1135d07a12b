"""The execution levers of sidcore.engine: one distillation iteration with each lever (and with all of them)
against the eager iteration, on the tiny layout and on a narrow CIFAR-10 DDPM++ (dropout and augmentation on).

Bound: relative difference (global norm over a network's parameters) ≤ 1e-5 of the losses and of the
gradients of both optimiser steps. Every lever computes the same sums in another order (or layout), so fp32
rounding is all that may differ: a few units of 1e-7 per operation, grown by the depth of the networks.
Parameter updates are not compared after a step with different gradients: Adam divides each gradient element
by its own magnitude, so the relative rounding error of elements near zero passes into the update whole.
The fused Adam is compared on equal gradients instead: its parameter updates after five steps, same bound.

Compilation takes minutes on a CPU, so the compiled cases are few (the tiny layout's SiD with compile alone,
each layout's SiDA with every lever) and marked slow.
"""
import dataclasses
import json

import numpy as np
import pytest
import torch
from configured import job

from sidcore import checkpoint, engine
from sidcore.dataset import write_image_zip
from sidcore.distill import Distiller
from sidcore.networks import build_network
from sidcore.settings import Engine, network_settings

TOLERANCE = 1e-5
LAYOUTS = {
    "tiny": dict(network={}, distill=dict(batch=16, batch_gpu=16)),
    "cifar10-narrow": dict(  # cifar10-uncond's DDPM++ at a quarter of its width and depth
        resolution=32, channels=3, label_dim=0,
        network=dict(arch="ddpmpp", model_channels=32, channel_mult=[2, 2, 2], num_blocks=1, attn_resolutions=[16],
                     augment_dim=9, dropout=0.13),
        distill=dict(batch=4, batch_gpu=4, dropout=0.13, augment=0.12)),
}
LEVERS = [f.name for f in dataclasses.fields(Engine)]


def levers(lever: str | None) -> list[str]:
    return LEVERS if lever == "all" else [lever] if lever else []


def settings(layout: str, method: str, lever: str | None, dropout: bool = True) -> dict:
    """The layout's settings with ``lever`` (or every lever: ``all``) on, and without dropout if not ``dropout``."""
    spec = LAYOUTS[layout]
    s = job("tiny", method, 1.2, distill=dict(stage_kimg=[0, 0], duration_kimg=1, seed=5, **spec["distill"]),
            init=None, **{k: v for k, v in spec.items() if k not in ("network", "distill")})
    s["network"] = {**s["network"], **spec["network"]}
    s["distill"] = dataclasses.replace(s["distill"], engine=Engine(**{name: True for name in levers(lever)}))
    if not dropout:
        s["network"]["dropout"] = 0.0
        s["distill"] = dataclasses.replace(s["distill"], dropout=0.0)
    return s


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Per layout: a random dataset and a random teacher."""
    out = {}
    for layout in LAYOUTS:
        root = tmp_path_factory.mktemp(layout)
        s = settings(layout, "sid", None)
        rng = np.random.default_rng(0)
        c, r = s["channels"], s["resolution"]
        write_image_zip(root / "data.zip", rng.integers(0, 256, (32, c, r, r), dtype=np.uint8),
                        rng.integers(0, 10, 32) if s["label_dim"] else None)
        torch.manual_seed(0)
        network = network_settings(s)
        checkpoint.save_atomic(checkpoint.network_snapshot(build_network(**network), network), root / "teacher.pt")
        out[layout] = root
    return out


def iteration(root, tmp_path, layout: str, method: str, lever: str | None, dropout: bool) -> dict:
    """Losses and the gradients each optimiser step used in one iteration (in the method's last stage)."""
    s = settings(layout, method, lever, dropout)
    dist = Distiller(s, root / "teacher.pt", root / "data.zip", tmp_path / str(lever))
    dist.cur_nimg = s["distill"].batch  # past stage_kimg: SiDA's third stage
    grads = {}
    for name, net, opt in (("fake_score", dist.fake_score, dist.opt_psi), ("G", dist.G, dist.opt_G)):
        def capture(*args, name=name, net=net, step=opt.step, **kwargs):
            grads[name] = [p.grad.clone() for p in net.parameters()]
            return step(*args, **kwargs)
        opt.step = capture
    stats: dict = {}
    assert dist.iteration(stats) == (3 if method == "sida" else 2)
    return {"losses": {k: float(v) for k, v in stats.items() if k.startswith("loss")}, "grads": grads}


def relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """‖a − b‖ / ‖b‖ over all tensors."""
    num = sum(float((x.double() - y.double()).square().sum()) for x, y in zip(a, b))
    den = sum(float(y.double().square().sum()) for y in b)
    return (num / den) ** 0.5


_eager: dict = {}


SLOW = pytest.mark.slow
CASES = [(layout, method, lever) for layout in LAYOUTS for method in ("sid", "sida")
         for lever in LEVERS if lever != "compile"]
CASES += [pytest.param("tiny", "sid", "compile", marks=SLOW)]  # the narrow CIFAR-10 compiles in its "all" case
CASES += [pytest.param(layout, "sida", "all", marks=SLOW) for layout in LAYOUTS]


@pytest.mark.parametrize("layout, method, lever", CASES)
def test_a_lever_changes_an_iteration_by_rounding_only(inputs, tmp_path, layout, method, lever):
    # Dropout draws its mask in memory order, so in NHWC each element gets another (equally distributed) draw:
    # with channels_last the comparison is made without dropout.
    dropout = "channels_last" not in levers(lever)
    if (layout, method, dropout) not in _eager:
        _eager[layout, method, dropout] = iteration(inputs[layout], tmp_path, layout, method, None, dropout)
    eager = _eager[layout, method, dropout]
    fast = iteration(inputs[layout], tmp_path, layout, method, lever, dropout)
    assert fast["losses"].keys() == eager["losses"].keys() and len(eager["losses"]) == (4 if method == "sida" else 2)
    for key, value in eager["losses"].items():
        assert fast["losses"][key] == pytest.approx(value, rel=TOLERANCE, abs=0), key
    for name in ("fake_score", "G"):
        assert relative(fast["grads"][name], eager["grads"][name]) <= TOLERANCE, name


NETWORKS = {  # the other architectures' attention and convolution paths, at toy width
    "adm": dict(arch="adm", img_resolution=16, img_channels=3, label_dim=10, model_channels=32, channel_mult=[1, 2],
                num_blocks=1, attn_resolutions=[16, 8], dropout=0.0),
    "edm2": dict(arch="edm2", img_resolution=8, img_channels=4, label_dim=10, model_channels=32, channel_mult=[1, 2],
                 num_blocks=1, attn_resolutions=[8, 4], dropout=0.0, use_fp16=False),
}


@pytest.mark.parametrize("arch", list(NETWORKS))
@pytest.mark.parametrize("lever", ["channels_last", "fused_attention"])
def test_a_lever_changes_adm_and_edm2_by_rounding_only(arch, lever):
    """D(x; σ) and its gradients to x and to the weights, in every return mode, with the lever and without."""
    kw = NETWORKS[arch]
    torch.manual_seed(0)
    eager = build_network(**kw)
    with torch.no_grad():  # no zero-initialised layer: every path (attention included) reaches the output
        for p in eager.parameters():
            p.copy_(torch.randn_like(p) * (p.std() if p.numel() > 1 and p.std() > 0 else 0.1))
    fast = engine.prepare(build_network(**kw), Engine(**{lever: True}))
    fast.load_state_dict(eager.state_dict())
    x = torch.randn(3, kw["img_channels"], kw["img_resolution"], kw["img_resolution"])
    sigma = torch.tensor([0.5, 2.0, 20.0])
    labels = torch.nn.functional.one_hot(torch.tensor([0, 3, 9]), 10).float()
    for flag in ("decoder", "encoder_decoder", "encoder"):
        results = []
        for net in (eager, fast):
            net.zero_grad(set_to_none=True)
            x_in = x.clone().requires_grad_(True)
            out = net(x_in, sigma, labels, return_flag=flag)
            out = out if isinstance(out, tuple) else (out,)
            sum(o.square().sum() for o in out).backward()
            results.append([*(o.detach() for o in out), x_in.grad] + [p.grad for p in net.parameters()
                                                                         if p.grad is not None])
        assert len(results[0]) == len(results[1])
        for a, b in zip(results[1], results[0]):
            assert relative([a], [b]) <= TOLERANCE, flag


def test_each_lever_reaches_the_networks(inputs, tmp_path):
    s = settings("cifar10-narrow", "sida", "all")  # compile is lazy: building the Distiller compiles nothing
    dist = Distiller(s, inputs["cifar10-narrow"] / "teacher.pt", inputs["cifar10-narrow"] / "data.zip", tmp_path)
    for net in (dist.true_score, dist.fake_score, dist.G, dist.G_ema):
        assert net._compiled_call_impl is not None
        assert net.memory_format == torch.channels_last
        convs = [m.weight for m in net.modules() if getattr(m, "weight", None) is not None and m.weight.ndim == 4]
        assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
        assert all(b.fused_attention for b in net.modules() if hasattr(b, "num_heads") and b.num_heads)
    assert all(group["fused"] for opt in (dist.opt_G, dist.opt_psi) for group in opt.param_groups)
    eager = Distiller(settings("cifar10-narrow", "sida", None), inputs["cifar10-narrow"] / "teacher.pt",
                      inputs["cifar10-narrow"] / "data.zip", tmp_path / "eager")
    assert eager.G._compiled_call_impl is None and not eager.G.memory_format == torch.channels_last
    assert not any(group["fused"] for group in eager.opt_G.param_groups)


def test_precision_flags_are_the_official_ones_on_a_gpu():
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    flags = [(cudnn, "benchmark", False), (cudnn, "allow_tf32", True), (matmul, "allow_tf32", True),
             (matmul, "allow_fp16_reduced_precision_reduction", True)]  # each the opposite of the official setting
    saved = [getattr(owner, flag) for owner, flag, _ in flags]
    try:
        for owner, flag, value in flags:
            setattr(owner, flag, value)
        engine.set_precision_flags(torch.device("cuda"))
        assert [getattr(owner, flag) for owner, flag, _ in flags] == [not value for _, _, value in flags]
    finally:
        for (owner, flag, _), value in zip(flags, saved):
            setattr(owner, flag, value)


def test_fused_adam_takes_the_same_steps():
    torch.manual_seed(0)
    params = [torch.randn(64, 32, 3, 3), torch.randn(64), torch.randn(()), torch.zeros(5)]
    runs = []
    for lever in (Engine(), Engine(fused_adam=True)):
        p = [torch.nn.Parameter(t.clone()) for t in params]
        opt = engine.adam(p, lever, lr=1e-4, betas=(0.0, 0.999), eps=1e-8)
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            for x in p:
                x.grad = torch.randn(x.shape, generator=g) * 10.0 ** torch.randint(-9, 1, x.shape, generator=g)
            opt.step()
        runs.append([x.detach() - t for x, t in zip(p, params)])
    assert relative(runs[1], runs[0]) <= TOLERANCE


@pytest.mark.slow
def test_a_200_iteration_tiny_run_with_every_lever_keeps_its_fid(tmp_path):
    """The tiny experiment's SiD (α = 1.2, its teacher trained briefly) for 200 iterations, eager and with every
    lever in distillation and evaluation: the 10-run mean FIDs differ by at most the eager runs' std."""
    from sidcore.detectors.digits import train_detector
    from sidcore.evaluate import evaluate_runs
    from sidcore.jobs import distill
    from sidcore.metrics import write_reference
    from sidcore.prepare import prepare_data
    from sidcore.teacher import train_teacher

    quiet = dict(log=lambda message: None)
    s = job("tiny", "sid", 1.2, evaluation=dict(runs=10, num_images=1000, batch=500))
    data, teacher, detector, refs = (tmp_path / name for name in ("data.zip", "teacher.pt", "digits.pt", "refs.npz"))
    prepare_data(s, data, **quiet)
    s["teacher"] = {**s["teacher"], "train": dataclasses.replace(s["teacher"]["train"], kimg=8)}
    train_teacher(s, data, teacher, **quiet)
    train_detector(data, detector, epochs=3, **quiet)
    write_reference(data, "sidcore-digits", detector, refs, **quiet)
    fids = {}
    for lever in (None, "all"):
        on = {name: True for name in levers(lever)}
        run = {**s, "distill": dataclasses.replace(s["distill"], batch=16, batch_gpu=16, duration_kimg=3.2,
                                                   tick_kimg=3.2, snap_ticks=100, eval_early_ticks=(),
                                                   eval_images=1000, engine=Engine(**on)),
               "evaluation": dataclasses.replace(s["evaluation"], engine=Engine(**{**on, "fused_adam": False}))}
        out = tmp_path / str(lever)
        assert distill(run, teacher=str(teacher), data=str(data), refs=str(refs), detector_weights=str(detector),
                       outdir=str(out), **quiet) == 0
        assert json.loads((out / "progress.jsonl").read_text().splitlines()[-1])["kimg"] == pytest.approx(3.2)
        records = evaluate_runs(run, str(out / "generator.pt"), "generator", str(data), str(refs), str(detector),
                                10, out / "eval", **quiet)
        fids[lever] = [r["metrics"]["fid"] for r in records]
    weights = [checkpoint.load(tmp_path / str(lever) / "generator.pt")["state_dict"] for lever in (None, "all")]
    differ = relative(list(weights[1].values()), list(weights[0].values()))
    eager, fast = np.array(fids[None]), np.array(fids["all"])
    print(f"FID eager {eager.mean():.6f} ± {eager.std(ddof=1):.6f}, every lever {fast.mean():.6f} ± "
          f"{fast.std(ddof=1):.6f}; generators differ by {differ:.2e} (relative)")
    assert differ > 0  # the levers were on
    assert abs(fast.mean() - eager.mean()) <= eager.std(ddof=1)
