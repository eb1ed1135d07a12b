"""EDM networks: NVIDIA's parameter layouts and counts, SiDA's return modes, the preconditionings, snapshots."""
import math

import pytest
import torch
from layouts import assert_layout
from torch.nn.functional import silu

from sidcore import checkpoint
from sidcore.networks import build_network, count_parameters
from sidcore.networks.layers import PositionalEmbedding
from sidcore.networks.songunet import drop_labels

# Released EDM teachers: build_network settings, trainable parameters, reference layout (minus keys),
# last encoder module and its channels (SiDA's logits are their channel mean at 8×8).
NO_LABEL = ("model.map_label.weight", "model.map_label.bias")
TEACHERS = {
    "cifar10-cond": (dict(arch="ddpmpp", img_resolution=32, img_channels=3, label_dim=10, augment_dim=9, dropout=0.13),
                     55_735_299, "edm-cifar10-32x32-cond-vp", (), "8x8_block3", 256),
    "cifar10-uncond": (dict(arch="ddpmpp", img_resolution=32, img_channels=3, label_dim=0, augment_dim=9,
                            dropout=0.13), 55_733_891, "edm-cifar10-32x32-cond-vp", NO_LABEL, "8x8_block3", 256),
    "ffhq-afhqv2-64": (dict(arch="ddpmpp", img_resolution=64, img_channels=3, label_dim=0, augment_dim=9,
                            channel_mult=[1, 2, 2, 2]), 61_805_571, "edm-ffhq-afhqv2-64x64-uncond-vp", (),
                       "8x8_block3", 256),
    "imagenet-64-adm": (dict(arch="adm", img_resolution=64, img_channels=3, label_dim=1000), 295_899_267,
                        "edm-imagenet-64x64-cond-adm", (), "8x8_block2", 768),
}


@pytest.mark.parametrize("name", TEACHERS)
def test_released_teacher_layout_parameter_count_and_logits_shape(name):
    settings, params, layout, drop, last, channels = TEACHERS[name]
    with torch.device("meta"):  # shapes only: no weight initialisation, no arithmetic
        net = build_network(**settings).eval()
        x = torch.empty(2, 3, settings["img_resolution"], settings["img_resolution"])
        D, logits = net(x, torch.ones(2), torch.zeros(2, settings["label_dim"]), return_flag="encoder_decoder")
    assert count_parameters(net) == params
    assert_layout(net, layout, drop=drop)
    assert list(net.model.enc)[-1] == last and net.model.enc[last].out_channels == channels
    assert D.shape == x.shape and logits.shape == (2, 1, 8, 8)


def tiny(arch: str, precond: str = "edm", label_dim: int = 10, **kw):
    """A small network of EDM's architecture ``arch`` on 8×8×3 images (ADM needs ≥ 64 channels for a head)."""
    width = dict(model_channels=64 if arch == "adm" else 16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    return build_network(arch, 8, 3, label_dim, precond=precond, dropout=0.0, **{**width, **kw})


def inputs(batch: int = 2):
    torch.manual_seed(0)
    return torch.randn(batch, 3, 8, 8), torch.tensor([0.3, 7.0, 0.02, 60.0])[:batch], torch.eye(10)[:batch]


@pytest.mark.parametrize("arch", ["ddpmpp", "ncsnpp", "adm"])
@pytest.mark.parametrize("precond", ["edm", "vp", "ve", "iddpm"])
def test_tiny_instances_of_every_architecture_and_preconditioning(arch, precond):
    torch.manual_seed(0)
    net = tiny(arch, precond).eval()
    x, sigma, labels = inputs()
    with torch.no_grad():
        D = net(x, sigma, labels)
        D2, logits = net(x, sigma, labels, return_flag="encoder_decoder")
    assert D.shape == x.shape and logits.shape == (2, 1, 4, 4)
    assert D.dtype == logits.dtype == torch.float32
    assert torch.equal(D, D2) and torch.isfinite(D).all()


@pytest.mark.parametrize("arch", ["ddpmpp", "adm"])
def test_return_modes_agree_and_encoder_skips_decoder(arch):
    torch.manual_seed(0)
    net = tiny(arch).eval()
    if arch == "adm":
        assert net.model.enc["4x4_block0"].num_heads == net.model.dec["4x4_block1"].num_heads == 2
    x, sigma, labels = inputs()
    feats, called = [], []
    last = list(net.model.enc.values())[-1]
    decoder = [*net.model.dec.values(), *([net.model.out_norm, net.model.out_conv] if arch == "adm" else [])]
    last.register_forward_hook(lambda m, i, o: feats.append(o))
    with torch.no_grad():
        D = net(x, sigma, labels)
        D2, logits = net(x, sigma, labels, return_flag="encoder_decoder")
        hooks = [m.register_forward_hook(lambda *a: called.append(1)) for m in decoder]
        logits2 = net(x, sigma, labels, return_flag="encoder")
    for hook in hooks:
        hook.remove()
    assert torch.equal(D, D2) and torch.equal(logits, logits2) and not called
    # The logits are the channel mean of the last encoder module's output.
    assert len(feats) == 3 and torch.allclose(logits, feats[2].mean(dim=1, keepdim=True))
    with pytest.raises(ValueError, match="return_flag"):
        net(x, sigma, labels, return_flag="both")


def test_ncsnpp_refuses_encoder_only_mode():
    net = tiny("ncsnpp").eval()
    x, sigma, labels = inputs()
    with torch.no_grad():
        D, logits = net(x, sigma, labels, return_flag="encoder_decoder")
        assert torch.equal(D, net(x, sigma, labels)) and logits.shape == (2, 1, 4, 4)
        with pytest.raises(ValueError, match="encoder_type='residual'"):
            net(x, sigma, labels, return_flag="encoder")


def test_adm_embedding():
    """ADM: [cos, sin] noise features → layer0 → SiLU → layer1, + unscaled label projection, → SiLU."""
    model = tiny("adm").model
    noise, labels = torch.randn(3), torch.eye(10)[:3]
    e = model.map_layer1(silu(model.map_layer0(PositionalEmbedding(64)(noise))))
    assert torch.allclose(model.embed(noise, labels, None), silu(e + model.map_label(labels)))


def test_label_dropout_zeroes_whole_samples():
    torch.manual_seed(0)
    labels = drop_labels(torch.ones(1000, 10), 0.25, 1000)
    assert set(labels.sum(dim=1).tolist()) == {0.0, 10.0} and 0.2 < (labels[:, 0] == 0).float().mean() < 0.3
    assert drop_labels(labels, 0, 1000) is labels


class Recorder(torch.nn.Module):
    """Stands in for the U-Net: F has value c on channel c; records the inputs the preconditioning gives it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels, self.calls = channels, []

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, return_flag="decoder"):
        self.calls.append((x, noise_labels, class_labels))
        F = torch.arange(self.channels, dtype=x.dtype).reshape(1, -1, 1, 1).expand(x.shape[0], -1, *x.shape[2:])
        return F if return_flag == "decoder" else (F, x.mean(dim=1, keepdim=True))


def with_recorder(precond: str, label_dim: int = 0):
    net = tiny("adm", precond, label_dim)
    net.model = Recorder(6 if precond == "iddpm" else 3)
    return net


def coefficients_seen(net, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(c_skip, c_out, c_in, c_noise) recovered from one forward pass with x = 1 and the recording U-Net."""
    D = net(torch.ones(len(sigma), 3, 8, 8), sigma)
    x_in, c_noise, _ = net.model.calls[-1]
    return D[:, 0, 0, 0], D[:, 1, 0, 0] - D[:, 0, 0, 0], x_in[:, 0, 0, 0], c_noise


def iddpm_levels(M: int = 1000, C_1: float = 0.001, C_2: float = 0.008) -> torch.Tensor:
    """iDDPM's noise levels u_0 > … > u_M = 0, in float64."""
    alpha_bar = [math.sin(0.5 * math.pi * j / M / (C_2 + 1)) ** 2 for j in range(M + 1)]
    u = [0.0] * (M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(alpha_bar[j - 1] / alpha_bar[j], C_1) - 1)
    return torch.tensor(u, dtype=torch.float64)


@pytest.mark.parametrize("precond", ["edm", "vp", "ve", "iddpm"])
def test_preconditioning_coefficients(precond):
    net = with_recorder(precond)
    sigma = torch.tensor([0.01, 0.5, 3.0, 60.0])
    c_skip, c_out, c_in, c_noise = coefficients_seen(net, sigma)
    ones = torch.ones(4)
    if precond == "edm":
        s = (sigma ** 2 + 0.25).sqrt()
        expected = (0.25 / s ** 2, 0.5 * sigma / s, 1 / s, sigma.log() / 4)
    elif precond == "ve":
        expected = (ones, sigma, ones, (sigma / 2).log())
    elif precond == "vp":
        t = ((0.1 ** 2 + 2 * 19.9 * (1 + sigma ** 2).log()).sqrt() - 0.1) / 19.9
        expected = (ones, -sigma, 1 / (sigma ** 2 + 1).sqrt(), 999 * t)
    else:
        u = iddpm_levels()
        expected = (ones, -sigma, 1 / (sigma ** 2 + 1).sqrt(),
                    999 - (sigma.double()[:, None] - u[None]).abs().argmin(dim=1).float())
    for got, want in zip((c_skip, c_out, c_in, c_noise), expected):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (precond, got, want)


def test_vp_sigma_schedule_round_trip():
    net = tiny("ddpmpp", "vp")
    t = torch.tensor([1e-5, 0.1, 0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(net.sigma_inv(net.sigma(t)), t, rtol=1e-6)
    # σ(ε_t) is evaluated in float32, as by NVIDIA (exp(≈1e-6) − 1 loses digits): 0.000977 for 0.001000.
    exact = math.sqrt(math.expm1(0.5 * 19.9 * 1e-10 + 0.1 * 1e-5))
    assert net.sigma_min == float(net.sigma(1e-5)) == pytest.approx(exact, rel=0.03)
    assert net.sigma_max == pytest.approx(math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1))


def test_iddpm_noise_levels_and_output_channels():
    net = with_recorder("iddpm")
    u = net.u
    assert u.shape == (1001,) and u[1000] == 0 and bool((u[:-1] > u[1:]).all())
    assert torch.allclose(u.double(), iddpm_levels(), rtol=1e-3)
    assert net.sigma_max == float(u[0]) and net.sigma_min == float(u[999])
    # σ on a level u_j → c_noise = M − 1 − j.
    _, _, _, c_noise = coefficients_seen(net, u[[999, 500, 10, 0]])
    assert c_noise.tolist() == [0, 499, 989, 999]
    # The model predicts 2·C channels; D = x − σ·F uses the first C.
    assert tiny("adm", "iddpm").model.out_conv.weight.shape[0] == 6
    D, logits = net(torch.zeros(1, 3, 8, 8), torch.tensor([1.0]), return_flag="encoder_decoder")
    assert torch.allclose(D[0, :, 0, 0], -torch.tensor([0.0, 1.0, 2.0])) and logits.shape == (1, 1, 8, 8)
    assert torch.equal(net(torch.zeros(1, 3, 8, 8), torch.tensor([1.0])), D)


def test_precond_input_handling():
    net = with_recorder("edm", label_dim=10)
    D = net(torch.ones(2, 3, 8, 8, dtype=torch.float64), 2.0)  # σ may be a number; labels default to zeros
    x_in, c_noise, labels = net.model.calls[-1]
    assert D.dtype == x_in.dtype == c_noise.dtype == torch.float32 and c_noise.shape == (1,)
    assert torch.equal(labels, torch.zeros(1, 10))
    net(torch.ones(2, 3, 8, 8), torch.ones(2), torch.eye(10)[[3, 4]].reshape(2, 1, 10).double())
    assert torch.equal(net.model.calls[-1][2], torch.eye(10)[[3, 4]])
    net = with_recorder("edm")
    net(torch.ones(2, 3, 8, 8), torch.ones(2), torch.eye(10)[:2])
    assert net.model.calls[-1][2] is None  # unconditional networks ignore labels


def test_precond_skip_and_output_scalings():
    """D(x; σ) = c_skip x + c_out F: with F ≡ 0 (zero last conv), D = σ_d²/(σ²+σ_d²) x."""
    net = tiny("ddpmpp").eval()
    with torch.no_grad():
        net.model.dec["8x8_aux_conv"].weight.zero_()
        net.model.dec["8x8_aux_conv"].bias.zero_()
    x, sigma, labels = inputs(3)
    D = net(x, sigma, labels)
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    assert torch.allclose(D, c_skip.reshape(-1, 1, 1, 1) * x, atol=1e-6)


def test_unknown_model_type_is_refused():
    with pytest.raises(ValueError, match="model_type"):
        build_network("ddpmpp", 8, 3, 0, model_type="SongUNet_EncoderDecoder")


SNAPSHOT = dict(arch="ddpmpp", img_resolution=8, img_channels=1, label_dim=10, model_channels=16,
                channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)


def test_snapshot_roundtrip_is_exact(tmp_path):
    torch.manual_seed(1)
    net = build_network(**SNAPSHOT)
    checkpoint.save_atomic(checkpoint.network_snapshot(net, SNAPSHOT, kimg=1.0), tmp_path / "n.pt")
    net2, _ = checkpoint.load_network(tmp_path / "n.pt")
    for (k, a), (k2, b) in zip(net.state_dict().items(), net2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert not list(tmp_path.glob(".*tmp*"))


def test_snapshot_with_wrong_settings_is_refused(tmp_path):
    net = build_network(**SNAPSHOT)
    checkpoint.save_atomic(checkpoint.network_snapshot(net, {**SNAPSHOT, "model_channels": 32}), tmp_path / "n.pt")
    with pytest.raises((ValueError, RuntimeError), match="n.pt"):
        checkpoint.load_network(tmp_path / "n.pt")


@pytest.mark.parametrize("arch", ["ddpmpp", "adm"])
def test_no_augmentation_labels_mean_zeros_and_still_use_the_weights(arch):
    """As the official code passing zeros(B, 9): the same output bit for bit, and map_augment takes part in
    the pass (a zero gradient), as DDP requires of every parameter."""
    torch.manual_seed(0)
    net = tiny(arch, augment_dim=9).eval()
    with torch.no_grad():  # away from the zero initialisation, so that the embedding reaches the output
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, sigma, labels = inputs()
    assert torch.equal(net(x, sigma, labels), net(x, sigma, labels, augment_labels=torch.zeros(2, 9)))
    assert not torch.equal(net(x, sigma, labels), net(x, sigma, labels, augment_labels=torch.ones(2, 9)))
    net(x, sigma, labels).sum().backward()
    assert net.model.map_augment.weight.grad is not None and not net.model.map_augment.weight.grad.any()
