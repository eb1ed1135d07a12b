"""EDM networks: NVIDIA's parameter layout, parameter counts, SiDA's return modes, snapshots."""
from pathlib import Path

import pytest
import torch

from sidcore import checkpoint
from sidcore.networks.precond import build_network, count_parameters

KEYS = Path(__file__).parent / "data" / "edm-cifar10-32x32-cond-vp.keys"


def cifar10(label_dim: int):
    return build_network("ddpmpp", 32, 3, label_dim, augment_dim=9, dropout=0.13)


def tiny_net(label_dim: int = 10, **kw):
    return build_network("ddpmpp", 8, 1, label_dim, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                         attn_resolutions=[4], dropout=0.0, **kw)


def test_cifar10_parameter_counts():
    assert count_parameters(cifar10(10)) == 55_735_299
    assert count_parameters(cifar10(0)) == 55_733_891


def test_cifar10_state_dict_layout_matches_nvidia():
    expected = [ln.split() for ln in KEYS.read_text().splitlines() if not ln.startswith("#")]
    sd = cifar10(10).state_dict()
    assert list(sd) == [k for k, _ in expected]
    for key, shape in expected:
        assert list(sd[key].shape) == [int(s) for s in shape.split(",")], key


def test_ffhq_layout_parameter_count():
    net = build_network("ddpmpp", 64, 3, 0, augment_dim=9, channel_mult=[1, 2, 2, 2])
    assert count_parameters(net) == 61_805_571


def test_return_modes_agree_and_encoder_skips_decoder():
    torch.manual_seed(0)
    net = cifar10(10).eval()
    x, sigma = torch.randn(2, 3, 32, 32), torch.tensor([0.3, 7.0])
    labels = torch.eye(10)[:2]
    with torch.no_grad():
        D = net(x, sigma, labels)
        D2, logits = net(x, sigma, labels, return_flag="encoder_decoder")
        called = []
        hook = net.model.dec["32x32_aux_conv"].register_forward_hook(lambda *a: called.append(1))
        logits2 = net(x, sigma, labels, return_flag="encoder")
        hook.remove()
    assert D.shape == (2, 3, 32, 32) and logits.shape == (2, 1, 8, 8)
    assert torch.equal(D, D2) and torch.equal(logits, logits2)
    assert not called
    # The logits are the channel mean of the last encoder block's output.
    feats = []
    hook = net.model.enc["8x8_block3"].register_forward_hook(lambda m, i, o: feats.append(o))
    with torch.no_grad():
        net(x, sigma, labels, return_flag="encoder")
    hook.remove()
    assert torch.allclose(logits, feats[0].mean(dim=1, keepdim=True))
    with pytest.raises(ValueError, match="return_flag"):
        net(x, sigma, labels, return_flag="both")


def test_precond_skip_and_output_scalings():
    """D(x; σ) = c_skip x + c_out F: with F ≡ 0 (zero last conv), D = σ_d²/(σ²+σ_d²) x."""
    net = tiny_net().eval()
    with torch.no_grad():
        net.model.dec["8x8_aux_conv"].weight.zero_()
        net.model.dec["8x8_aux_conv"].bias.zero_()
    x = torch.randn(3, 1, 8, 8)
    sigma = torch.tensor([0.1, 2.5, 40.0])
    D = net(x, sigma, torch.eye(10)[:3])
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    assert torch.allclose(D, c_skip.reshape(-1, 1, 1, 1) * x, atol=1e-6)


def test_snapshot_roundtrip_is_exact(tmp_path):
    torch.manual_seed(1)
    net = tiny_net()
    settings = dict(arch="ddpmpp", img_resolution=8, img_channels=1, label_dim=10, model_channels=16,
                    channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
    checkpoint.save_atomic(checkpoint.network_snapshot(net, settings, kimg=1.0), tmp_path / "n.pt")
    net2, _ = checkpoint.load_network(tmp_path / "n.pt")
    for (k, a), (k2, b) in zip(net.state_dict().items(), net2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert not list(tmp_path.glob(".*tmp*"))


def test_snapshot_with_wrong_settings_is_refused(tmp_path):
    net = tiny_net()
    settings = dict(arch="ddpmpp", img_resolution=8, img_channels=1, label_dim=10, model_channels=32,
                    channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    checkpoint.save_atomic(checkpoint.network_snapshot(net, settings), tmp_path / "n.pt")
    with pytest.raises((ValueError, RuntimeError), match="n.pt"):
        checkpoint.load_network(tmp_path / "n.pt")
