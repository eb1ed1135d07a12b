"""EDM2 networks: NVIDIA's layout and sizes for XS … XXL, magnitude preservation, SiDA's return modes."""
import pytest
import torch
from layouts import assert_layout, read_layout

from sidcore.networks.edm2 import (
    EDM2Precond,
    MPConv,
    MPFourier,
    force_weight_normalization_,
    mp_cat,
    mp_silu,
    mp_sum,
    normalize,
    resample,
)

SIZES = {"xs": (128, 124_713_253), "s": (192, 280_212_837), "m": (256, 497_807_781), "l": (320, 777_498_085),
         "xl": (384, 1_119_283_749), "xxl": (448, 1_523_164_773)}
LOGVAR = ("logvar_fourier.freqs", "logvar_fourier.phases", "logvar_linear.weight")


def count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def rms(t: torch.Tensor) -> float:
    return t.square().mean().sqrt().item()


@pytest.mark.parametrize("size", list(SIZES))
def test_img512_layouts_and_parameter_counts(size):
    channels, params = SIZES[size]
    name = f"edm2-img512-{size}"
    with torch.device("meta"):  # the real constructors, without allocating 1.5B weights
        teacher = EDM2Precond(64, 4, 1000, model_channels=channels)
        generator = EDM2Precond(64, 4, 1000, model_channels=channels, logvar=False)
    assert count(teacher) == params
    assert count(generator) == params - 128  # logvar_linear [1, 128]; the Fourier features are buffers
    assert_layout(teacher, name)
    assert tuple(key for key, _, _ in read_layout(name)[-3:]) == LOGVAR
    assert_layout(generator, name, drop=LOGVAR)


def tiny(logvar: bool = True, **kw) -> EDM2Precond:
    torch.manual_seed(0)
    net = EDM2Precond(16, 4, 10, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
                      channels_per_head=8, logvar=logvar, **kw)
    with torch.no_grad():  # non-zero gains, so every path contributes
        for name, p in net.named_parameters():
            if "gain" in name:
                p.fill_(0.7)
    return net.eval()


def inputs(n: int = 3):
    torch.manual_seed(1)
    return torch.randn(n, 4, 16, 16), torch.tensor([0.02, 1.0, 30.0])[:n], torch.eye(10)[:n]


def test_return_modes_agree_and_encoder_skips_decoder():
    net = tiny()
    x, sigma, labels = inputs()
    last_encoder = list(net.unet.enc.values())[-1]  # 8x8_block0, with attention
    with torch.no_grad():
        D = net(x, sigma, labels)
        D2, logits, u = net(x, sigma, labels, return_flag="encoder_decoder", return_logvar=True)
        called, feats = [], []
        hooks = [net.unet.dec.register_forward_pre_hook(lambda *a: called.append(1)),
                 *(m.register_forward_hook(lambda *a: called.append(1)) for m in net.unet.dec.values()),
                 net.unet.out_conv.register_forward_hook(lambda *a: called.append(1)),
                 last_encoder.register_forward_hook(lambda m, i, o: feats.append(o.clone()))]
        logits2, u2 = net(x, sigma, labels, return_flag="encoder", return_logvar=True)
        for hook in hooks:
            hook.remove()
    assert D.shape == x.shape and logits.shape == (3, 1, 8, 8) and u.shape == (3, 1, 1, 1)
    assert torch.equal(D, D2) and torch.equal(logits, logits2) and torch.equal(u, u2)
    assert not called
    assert torch.equal(logits, feats[0].mean(dim=1, keepdim=True))
    with pytest.raises(ValueError, match="return_flag"):
        net(x, sigma, labels, return_flag="logits")


def test_no_fp16_on_cpu():
    net = tiny()  # use_fp16=True by default
    assert net.use_fp16
    seen = []
    net.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    x, sigma, labels = inputs()
    with torch.no_grad():
        D, logits, u = net(x, sigma, labels, return_flag="encoder_decoder", return_logvar=True)
    assert seen == [torch.float32]
    assert D.dtype == logits.dtype == u.dtype == torch.float32


def test_logvar_depends_on_sigma_only_and_generator_has_none():
    net = tiny()
    x, sigma, labels = inputs()
    with torch.no_grad():
        _, u = net(x, sigma, labels, return_logvar=True)
        _, u_other = net(torch.randn_like(x), sigma, labels.flip(0), return_logvar=True)
        _, u_first = net(x[:1], sigma[:1], labels[:1], return_logvar=True)
    assert torch.equal(u, u_other) and torch.allclose(u[:1], u_first)
    assert not torch.allclose(u[0], u[1])
    with pytest.raises(ValueError, match="log-variance head"):
        tiny(logvar=False)(x, sigma, labels, return_logvar=True)


def test_denoiser_is_exact_at_small_sigma_and_labels_matter():
    net = tiny()
    x, _, labels = inputs()
    with torch.no_grad():
        D = net(x, torch.full([3], 1e-4), labels)
        a, b = net(x, torch.ones(3), labels), net(x, torch.ones(3), labels.roll(1, 0))
        unlabelled = net(x, torch.ones(3))  # None → zero labels
    assert torch.allclose(D, x, atol=1e-3)  # c_skip → 1, c_out → 0
    assert not torch.allclose(a, b)
    assert unlabelled.shape == x.shape


def test_magnitude_preserving_primitives():
    torch.manual_seed(0)
    a, b = torch.randn(64, 96, 8, 8), torch.randn(64, 32, 8, 8)
    assert rms(normalize(a * 5)) == pytest.approx(1, abs=1e-3)
    assert rms(normalize(a * 5, dim=1)) == pytest.approx(1, abs=1e-3)
    assert rms(mp_sum(a, torch.randn_like(a), t=0.3)) == pytest.approx(1, abs=0.02)
    assert rms(mp_cat(a, b, t=0.5)) == pytest.approx(1, abs=0.02)
    assert rms(mp_silu(a)) == pytest.approx(1, abs=0.05)
    assert rms(MPFourier(256)(torch.randn(512))) == pytest.approx(1, abs=0.05)
    assert rms(MPConv(96, 48, [3, 3])(a)) == pytest.approx(1, abs=0.1)
    assert rms(MPConv(96, 48, [])(torch.randn(512, 96))) == pytest.approx(1, abs=0.05)


def test_resample_box_filter():
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(resample(x), x)
    assert torch.allclose(resample(x, mode="down"), torch.nn.functional.avg_pool2d(x, 2))
    assert torch.allclose(resample(x, mode="up"), torch.nn.functional.interpolate(x, scale_factor=2.0))


def test_forced_weight_normalization_keeps_outputs_and_allows_two_forwards_per_backward():
    net = tiny()
    x, sigma, labels = inputs()
    mpconvs = [m for m in net.modules() if isinstance(m, MPConv)]
    with torch.no_grad():
        before = net(x, sigma, labels)
        for m in mpconvs:
            m.weight.mul_(3)
    force_weight_normalization_(net)
    for m in mpconvs:
        unit_rms = m.weight.flatten(1).square().mean(dim=1).sqrt()
        assert torch.allclose(unit_rms, torch.ones_like(unit_rms), atol=1e-4)
    with torch.no_grad():
        after = net(x, sigma, labels)
    assert torch.allclose(before, after, atol=1e-3)

    net.train()
    weights = [m.weight.detach().clone() for m in mpconvs]
    D_fake, logits_fake = net(x, sigma, labels, return_flag="encoder_decoder")
    logits_real = net(x, sigma, labels, return_flag="encoder")
    (D_fake.square().mean() + logits_fake.mean() - logits_real.mean()).backward()
    assert all(torch.equal(w, m.weight) for w, m in zip(weights, mpconvs))  # forward never rewrites weights
    assert all(p.grad is not None for n, p in net.named_parameters() if not n.startswith("logvar"))
