"""NVIDIA persistence pickles: every architecture round-trips through the safe loader; nothing in a file runs."""
from __future__ import annotations

import collections
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from nvidia_pickle import SENTINEL, write_network_pickle

from sidcore import checkpoint, persistence
from sidcore.networks import build_network
from sidcore.safe_pickle import UnsafePickleError

SONG = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
ADM = dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
EDM2 = dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)

# (sidcore settings, NVIDIA top-level class, the constructor keywords NVIDIA's trainer records, EDM2 layout)
CASES = {
    "edm-ddpmpp": (dict(arch="ddpmpp", augment_dim=9, **SONG), "EDMPrecond",
                   dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard",
                        decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1], augment_dim=9,
                        **SONG), False),
    "sida-ddpmpp": (dict(arch="ddpmpp", **SONG), "EDMPrecond_EncoderDecoder",
                    dict(model_type="SongUNet_EncoderDecoder", embedding_type="positional", encoder_type="standard",
                         decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1], **SONG), False),
    "vp-ddpmpp": (dict(arch="ddpmpp", precond="vp", **SONG), "VPPrecond",
                  dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard",
                       decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1], **SONG), False),
    "ve-ncsnpp": (dict(arch="ncsnpp", precond="ve", **SONG), "VEPrecond",
                  dict(model_type="SongUNet", embedding_type="fourier", encoder_type="residual",
                       decoder_type="standard", channel_mult_noise=2, resample_filter=[1, 3, 3, 1], **SONG), False),
    "edm-adm": (dict(arch="adm", **ADM), "EDMPrecond", dict(model_type="DhariwalUNet", **ADM), False),
    "iddpm-adm": (dict(arch="adm", precond="iddpm", **ADM), "iDDPMPrecond", dict(model_type="DhariwalUNet", **ADM),
                  False),
    "edm2-teacher": (dict(arch="edm2", logvar=True, **EDM2), "Precond", dict(**EDM2), True),
    "edm2-sid-generator": (dict(arch="edm2", logvar=False, **EDM2), "EDM_2_Precond_Generator",
                           dict(force_normalization=True, use_gan=True, **EDM2), False),
}


def interface(case: str) -> dict:
    edm2 = case.startswith("edm2")
    return dict(img_resolution=8, img_channels=4 if edm2 else 3, label_dim=10)


def make(case: str, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    settings, _, _, _ = CASES[case]
    torch.manual_seed(seed)
    net = build_network(**interface(case), **settings)
    with torch.no_grad():  # weights away from their (partly zero) initialisation, so outputs tell them apart
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.eval(), settings


def write(case: str, net: torch.nn.Module, path: Path) -> None:
    _, top_class, kwargs, edm2_raw = CASES[case]
    write_network_pickle(path, net, top_class, {**interface(case), **kwargs}, fp16=edm2_raw, easydict=edm2_raw)


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty directory, so a module_src that ran would leave its sentinel file here."""
    monkeypatch.chdir(tmp_path)
    yield
    assert not (tmp_path / SENTINEL).exists(), "code stored in a pickle was executed"


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_gives_identical_weights_and_outputs(case, tmp_path):
    net, settings = make(case)
    write(case, net, tmp_path / "net.pkl")
    loaded, loaded_settings = persistence.convert(tmp_path / "net.pkl")
    assert type(loaded) is type(net)
    assert {k: v for k, v in loaded_settings.items() if k in settings} == settings
    fp16 = CASES[case][3]
    reference = net.half().float() if fp16 else net  # EDM2 pickles hold fp16 weights, upcast on load
    ref_state, state = reference.state_dict(), loaded.state_dict()
    assert list(state) == list(ref_state)
    for k in state:
        assert state[k].dtype == ref_state[k].dtype and torch.equal(state[k], ref_state[k]), k
    torch.manual_seed(1)
    x = torch.randn(3, interface(case)["img_channels"], 8, 8)
    sigma, labels = torch.tensor([0.05, 1.0, 20.0]), torch.eye(10)[[1, 4, 7]]
    with torch.no_grad():
        for flag in ("decoder", "encoder_decoder") if case != "ve-ncsnpp" else ("decoder",):
            out, expected = loaded(x, sigma, labels, return_flag=flag), reference(x, sigma, labels, return_flag=flag)
            for a, b in zip(out if isinstance(out, tuple) else [out], expected if isinstance(expected, tuple)
                            else [expected]):
                assert torch.equal(a, b), (case, flag)


def test_converted_snapshot_loads_without_pickled_code(tmp_path):
    """The pipeline converts into the network config.yaml describes; the snapshot loads with weights_only."""
    net, settings = make("edm2-teacher")
    write("edm2-teacher", net, tmp_path / "teacher.pkl")
    network = json.dumps({**interface("edm2-teacher"), **settings})
    r = subprocess.run([sys.executable, "-m", "sidcore.cli", "convert-network", "--src", "teacher.pkl",
                        "--out", "teacher.pt", "--network", network], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    snap = checkpoint.load_snapshot(tmp_path / "teacher.pt")  # weights_only=True
    assert snap["meta"]["source"] == "teacher.pkl" and len(snap["meta"]["source_sha256"]) == 64
    loaded, network = checkpoint.load_network(tmp_path / "teacher.pt", snap)
    assert network["arch"] == "edm2" and network["logvar"] is True
    for k, v in net.half().float().state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with pytest.raises(ValueError, match="teacher.pt: a network snapshot without init_sigma"):
        checkpoint.init_sigma(snap, tmp_path / "teacher.pt")


def test_a_converted_generator_says_how_to_sample_it(tmp_path):
    net, settings = make("edm2-sid-generator")
    write("edm2-sid-generator", net, tmp_path / "sid.pkl")
    network = json.dumps({**interface("edm2-sid-generator"), **settings})
    r = subprocess.run([sys.executable, "-m", "sidcore.cli", "convert-network", "--src", "sid.pkl", "--out", "sid.pt",
                        "--network", network, "--sampling", '{"init_sigma": 2.5, "vae": "vae/sd-vae-ft-mse"}'],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    snap = checkpoint.load_snapshot(tmp_path / "sid.pt")
    assert checkpoint.init_sigma(snap, tmp_path / "sid.pt") == 2.5 and snap["meta"]["vae"] == "vae/sd-vae-ft-mse"


class Exploit:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def test_reduce_calling_os_system_is_refused_and_nothing_runs(tmp_path):
    net, _ = make("edm-ddpmpp")
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    write_network_pickle(path, net, "EDMPrecond", interface("edm-ddpmpp"), extra={"payload": Exploit(target)})
    with pytest.raises(UnsafePickleError, match=r"evil\.pkl.*(posix|os)\.system"):
        persistence.convert(path)
    assert not target.exists()


@pytest.mark.parametrize("payload, name", [
    (collections.Counter(a=1), "collections.Counter"),
    (torch.nn.Linear(2, 2), "torch.nn.modules.linear.Linear"),
])
def test_unknown_global_is_refused_by_name(tmp_path, payload, name):
    path = tmp_path / "foreign.pkl"
    path.write_bytes(pickle.dumps({"ema": payload}))
    with pytest.raises(UnsafePickleError, match=rf"foreign\.pkl: refusing to load global {name}"):
        persistence.read_pickle(path)


def test_truncated_pickle_names_the_file(tmp_path):
    net, _ = make("edm-ddpmpp")
    write("edm-ddpmpp", net, tmp_path / "net.pkl")
    data = (tmp_path / "net.pkl").read_bytes()
    (tmp_path / "cut.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.pkl: not a readable pickle \(UnpicklingError: "):
        persistence.convert(tmp_path / "cut.pkl")


def test_config_settings_that_do_not_fit_the_file_are_refused(tmp_path):
    net, settings = make("edm-ddpmpp")
    write("edm-ddpmpp", net, tmp_path / "net.pkl")
    network = {**interface("edm-ddpmpp"), **settings, "num_blocks": 2}
    with pytest.raises(ValueError, match=r"net\.pkl: weights do not match the network settings .*'num_blocks': 2.*"
                                         r"the file records EDMPrecond.*missing \['model\.enc\.8x8_block1"):
        persistence.convert(tmp_path / "net.pkl", network=network)
    assert not (tmp_path / "net.pt").exists()


def test_weights_that_do_not_fit_are_named(tmp_path):
    net, _ = make("edm-ddpmpp")
    _, top_class, kwargs, _ = CASES["edm-ddpmpp"]
    wrong = {**interface("edm-ddpmpp"), **kwargs, "model_channels": 32}  # recorded settings disagree with weights
    write_network_pickle(tmp_path / "net.pkl", net, top_class, wrong)
    with pytest.raises(ValueError, match=r"net\.pkl: weights do not match .*wrong shapes "
                                         r"\['model\.map_label\.weight \[16, 10\] != \[32, 10\]"):
        persistence.convert(tmp_path / "net.pkl")


def test_registered_hook_bound_method_is_recorded_not_called(tmp_path):
    """SiD's EDM2 generators pickle a forward pre-hook (a bound method, i.e. a getattr call)."""
    net, _ = make("edm2-sid-generator")
    conv = net.unet.out_conv
    conv.register_forward_pre_hook(conv.forward)  # any bound method of a persistent module
    write("edm2-sid-generator", net, tmp_path / "net.pkl")
    record = persistence.load_records(tmp_path / "net.pkl")
    hooks = record.state["_modules"]["unet"].state["_modules"]["out_conv"].state["_forward_pre_hooks"]
    (hook,) = hooks.values()
    assert isinstance(hook, persistence.BoundMethod) and hook.name == "forward"
    loaded, _ = persistence.convert(tmp_path / "net.pkl")
    assert not loaded.unet.out_conv._forward_pre_hooks


def test_equal_content_is_saved_as_equal_bytes(tmp_path):
    """Snapshots do not carry the temporary name they were written under (a republished generator is the same
    file, byte for byte)."""
    snapshot = checkpoint.network_snapshot(torch.nn.Linear(2, 2), {"arch": "toy"})
    for name in ("a.pt", "b.pt"):
        checkpoint.save_atomic(snapshot, tmp_path / name)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
