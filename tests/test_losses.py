"""SiD / SiDA loss terms against numbers worked out by hand, and the gradient paths of the official code."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch.nn.functional import softplus

from sidcore import losses
from sidcore.augment import AugmentPipe
from sidcore.distill import Distiller, sanitize_grads
from sidcore.ema import ema_beta
from sidcore.randomness import Noise, SampleNoise
from sidcore.settings import batch_arithmetic


class TorchNoise(Noise):
    """Draws from torch's global generator, in call order (so a test can replay them)."""

    def __init__(self, batch: int, device: torch.device | str = "cpu") -> None:
        self.batch, self.device = batch, device

    def randn(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn([self.batch, *shape], device=self.device)

    def rand(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.rand([self.batch, *shape], device=self.device)


def test_generator_sigma_schedule_endpoints():
    t = torch.tensor([0.0, 0.5, 0.8, 1.0])
    sigma = losses.sigma_from_t(t)
    assert sigma[0].item() == pytest.approx(0.002, rel=1e-5)
    assert sigma[1].item() == pytest.approx(2.515, abs=1e-3)
    assert sigma[2].item() == pytest.approx(24.408, abs=1e-3)
    assert sigma[3].item() == pytest.approx(80.0, rel=1e-5)
    torch.manual_seed(0)
    s = losses.sigma_generator(torch.rand(10_000, 1, 1, 1), tmax=800)
    assert s.shape == (10_000, 1, 1, 1) and s.min() >= 0.002 and s.max() <= 24.41


def test_lognormal_sigma_and_edm_weight():
    torch.manual_seed(0)
    s = losses.sigma_lognormal(torch.randn(200_000, 1, 1, 1), -1.2, 1.2)
    assert s.log().mean().item() == pytest.approx(-1.2, abs=0.01)
    assert s.log().std().item() == pytest.approx(1.2, abs=0.01)
    # λ(σ) = (σ² + σ_d²)/(σ σ_d)²: σ = σ_d = 0.5 → 0.5 / 0.0625 = 8; σ = 1 → 1.25 / 0.25 = 5.
    assert losses.edm_weight(torch.tensor([0.5, 1.0]), 0.5).tolist() == [8.0, 5.0]


def test_sid_objective_by_hand():
    x_g = torch.tensor([[1.0, 2.0]]).reshape(1, 2, 1, 1)
    f_phi = torch.tensor([[0.5, 1.0]]).reshape(1, 2, 1, 1)
    f_psi = torch.tensor([[0.0, 0.5]]).reshape(1, 2, 1, 1)
    # w = mean|x_g − f_φ| = 0.75; ℓ = (f_φ−f_ψ)[(f_φ−x_g) − 1.2(f_φ−f_ψ)]/w = [0.5(−1.1), 0.5(−1.6)]/0.75
    value = losses.sid_objective(x_g, f_phi, f_psi, alpha=1.2)
    assert value.item() == pytest.approx(-1.35 / 0.75)
    # α = 0: only the L2 term (f_φ−f_ψ)ᵀ(f_φ−x_g)/w = (0.5·−0.5 + 0.5·−1)/0.75
    assert losses.sid_objective(x_g, f_phi, f_psi, alpha=0.0).item() == pytest.approx(-0.75 / 0.75)


def test_weight_factor_floor_and_no_gradient():
    x = torch.zeros(2, 1, 2, 2, requires_grad=True)
    w = losses.weight_factor(x, torch.zeros(2, 1, 2, 2))
    assert w.flatten().tolist() == pytest.approx([1e-5, 1e-5])
    assert not w.requires_grad


def test_sid_objective_gradient_flows_through_both_scores():
    """f_φ = a·x and f_ψ = b·x: ℓ = (a−b)((a−1) − α(a−b))x²/w, so dℓ/dx = 2(a−b)((a−1) − α(a−b))x/w."""
    a, b, alpha = 0.7, 0.2, 1.2
    x = torch.tensor([0.3, -1.1, 2.0, 0.4]).reshape(1, 4, 1, 1).requires_grad_(True)
    w = ((1 - a) * x.detach().abs()).mean()
    losses.sid_objective(x, a * x, b * x, alpha).sum().backward()
    expected = 2 * (a - b) * ((a - 1) - alpha * (a - b)) * x.detach() / w
    assert torch.allclose(x.grad, expected, rtol=1e-5)


def test_bce_terms_by_hand():
    zeros = torch.zeros(3, 1, 2, 2)
    assert losses.discriminator_bce(zeros, zeros).item() == pytest.approx(math.log(2))
    real, fake = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), -1.0)
    expected = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-1.0))) / 2
    assert losses.discriminator_bce(real, fake).item() == pytest.approx(expected)
    # The generator side clamps logits to ±10 before −log σ(logit); the pooled value is one scalar.
    logits = torch.tensor([30.0, -30.0, 0.0, 1.0]).reshape(1, 1, 2, 2)
    pooled = [math.log1p(math.exp(-10)), math.log1p(math.exp(10)), math.log(2), math.log1p(math.exp(-1))]
    assert losses.generator_fakeness(logits).item() == pytest.approx(sum(pooled) / 4, rel=1e-6)


def test_nan_samples_are_dropped():
    x = torch.ones(3, 1, 2, 2)
    bad = x.clone()
    bad[1, 0, 0, 0] = float("nan")
    assert losses.nan_free(x, bad).tolist() == [True, False, True]


def test_a_nan_sample_counts_zero_and_leaves_the_others_as_if_it_were_absent():
    class NaNOnSample1(torch.nn.Module):
        def forward(self, x, sigma, labels, augment_labels=None, return_flag="decoder"):
            out = 0.3 * x
            out[1] = float("nan")
            return out

    torch.manual_seed(0)
    x_g = torch.randn(3, 1, 4, 4, requires_grad=True)
    noise = TorchNoise(3)
    torch.manual_seed(1)
    loss, _, keep = losses.SiDLoss(alpha=1.2).generator(NaNOnSample1(), Recorder(0.2), x_g, torch.zeros(3, 0),
                                                        noise, adversarial=False)
    assert keep.tolist() == [True, False, True] and loss[1] == 0 and torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(x_g.grad[[0, 2]]).all()
    # The kept samples' losses equal those computed on the kept samples alone, with the same draws.
    torch.manual_seed(1)
    sigma = losses.sigma_generator(torch.rand(3, 1, 1, 1), 800)
    x_t = x_g.detach() + sigma * torch.randn_like(x_g)
    kept = [0, 2]
    expected = losses.sid_objective(x_g.detach()[kept], 0.3 * x_t[kept], 0.2 * x_t[kept], 1.2)
    assert torch.allclose(loss.detach()[kept], expected, rtol=1e-6)


class Recorder(torch.nn.Module):
    """A score network f(x) = scale·x that records whether its input carries gradient."""

    def __init__(self, scale: float, logits: bool = False) -> None:
        super().__init__()
        self.scale, self.logits, self.seen = scale, logits, []

    def forward(self, x, sigma, labels, augment_labels=None, return_flag="decoder"):
        self.seen.append((x.requires_grad, return_flag))
        logits = x.mean(dim=1, keepdim=True)[:, :, ::2, ::2]
        if return_flag == "encoder":
            return logits
        return (self.scale * x, logits) if return_flag == "encoder_decoder" else self.scale * x


def test_generator_loss_gradient_reaches_g_through_both_networks():
    torch.manual_seed(0)
    true_score, fake_score = Recorder(0.7), Recorder(0.2)
    x_g = torch.randn(4, 2, 4, 4, requires_grad=True)
    torch.manual_seed(1)
    loss_sid, loss_gan, keep = losses.SiDLoss(alpha=1.2).generator(true_score, fake_score, x_g, torch.zeros(4, 0),
                                                                   TorchNoise(4), adversarial=False)
    assert keep.all()
    assert loss_gan is None and loss_sid.shape == (4,)
    assert true_score.seen == [(True, "decoder")] and fake_score.seen == [(True, "decoder")]
    loss_sid.sum().backward()

    def replay(detach: bool) -> torch.Tensor:
        torch.manual_seed(1)
        x = x_g.detach().clone().requires_grad_(True)
        x_t = x + losses.sigma_generator(torch.rand(4, 1, 1, 1), 800) * torch.randn_like(x)
        f_phi, f_psi = 0.7 * x_t, 0.2 * x_t
        if detach:
            f_phi, f_psi = f_phi.detach(), f_psi.detach()
        losses.sid_objective(x, f_phi, f_psi, 1.2).sum().backward()
        return x.grad

    assert torch.allclose(x_g.grad, replay(detach=False), rtol=1e-5)
    # Stopping the gradient at the networks' outputs would change it: the official loss has no stop-gradient.
    assert not torch.allclose(x_g.grad, replay(detach=True), rtol=1e-2)


def test_sida_generator_loss_pools_fakeness_and_divides_by_w():
    torch.manual_seed(0)
    fake_score = Recorder(0.2)
    x_g = torch.randn(3, 1, 4, 4, requires_grad=True)
    torch.manual_seed(1)
    loss_sid, loss_gan, _ = losses.SiDLoss(alpha=1.0).generator(Recorder(0.7), fake_score, x_g, torch.zeros(3, 0),
                                                                TorchNoise(3), adversarial=True)
    assert fake_score.seen == [(True, "encoder_decoder")]
    assert loss_gan.shape == (3,)
    # loss_gan(i) = b / w_i with one pooled b: the products loss_gan(i)·w_i all agree.
    torch.manual_seed(1)
    sigma = losses.sigma_generator(torch.rand(3, 1, 1, 1), 800)
    x_t = x_g.detach() + sigma * torch.randn_like(x_g)
    w = losses.weight_factor(x_g.detach(), 0.7 * x_t).flatten()
    b = losses.generator_fakeness(x_t.mean(dim=1, keepdim=True)[:, :, ::2, ::2])
    assert torch.allclose(loss_gan.detach() * w, b.expand(3), rtol=1e-5)


def test_fake_score_and_discriminator_share_noise_and_sigma():
    torch.manual_seed(0)
    fake_score = Recorder(0.5)
    x_g, x_real = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    torch.manual_seed(1)
    loss_psi, loss_D, _, readout = losses.SiDLoss(alpha=1.0).fake_score_discriminator(fake_score, x_g, x_real,
                                                                                      torch.zeros(2, 0), TorchNoise(2))
    assert [flag for _, flag in fake_score.seen] == ["encoder_decoder", "encoder"]
    assert not any(req for req, _ in fake_score.seen)  # x_g carries no gradient on this step
    # By hand with the same draws: L_ψ = Σ λ(σ)(0.5(x_g+n) − x_g)², L_D = λ(σ)·BCE(real, fake).
    torch.manual_seed(1)
    sigma = losses.sigma_lognormal(torch.randn(2, 1, 1, 1), -1.2, 1.2)
    n = sigma * torch.randn_like(x_g)
    lam = losses.edm_weight(sigma, 0.5)
    expected_psi = (lam * (0.5 * (x_g + n) - x_g) ** 2).flatten(1).sum(1)
    bce = losses.discriminator_bce((x_real + n)[:, :, ::2, ::2], (x_g + n)[:, :, ::2, ::2])
    assert torch.allclose(loss_psi, expected_psi, rtol=1e-5)
    assert torch.allclose(loss_D, (lam * bce).flatten(), rtol=1e-5)
    # D's λ-free readout: BCE and accuracy of each branch over the logit map, and the mean logits.
    logit_real, logit_fake = (x_real + n)[:, :, ::2, ::2], (x_g + n)[:, :, ::2, ::2]
    by_hand = {"D_bce_real": softplus(-logit_real).mean(), "D_bce_fake": softplus(logit_fake).mean(),
               "D_acc_real": (logit_real > 0).float().mean(), "D_acc_fake": (logit_fake < 0).float().mean(),
               "D_logit_real": logit_real.mean(), "D_logit_fake": logit_fake.mean()}
    assert readout.keys() == by_hand.keys()
    assert all(torch.allclose(readout[k], v, rtol=1e-5) for k, v in by_hand.items())


def test_ema_beta_matches_reference_values():
    assert ema_beta(100_000, 256, 500, 0.05) == pytest.approx(0.9651, abs=1e-4)
    assert ema_beta(1_000_000, 256, 500, 0.05) == pytest.approx(0.99646, abs=1e-5)
    assert ema_beta(1_000_000, 8192, 2000, 0.05) == pytest.approx(0.8926, abs=1e-4)
    assert ema_beta(0, 256, 500, 0.05) == 0.0


def test_three_stage_schedule():
    def stage(nimg, adversarial=True):
        return Distiller.stage(SimpleNamespace(settings={"adversarial": adversarial},
                                               d=SimpleNamespace(stage_kimg=(100, 200)), cur_nimg=nimg))
    assert [stage(n) for n in (0, 100_000, 100_001, 200_000, 200_001)] == [1, 1, 2, 2, 3]
    assert stage(0, adversarial=False) == 2


def test_batch_arithmetic_and_gradient_sanitising():
    assert batch_arithmetic(8192, 32, 8) == (1024, 32)
    assert batch_arithmetic(256, 32, 8) == (32, 1)
    with pytest.raises(ValueError, match="batch_gpu"):
        batch_arithmetic(256, 48, 1)
    with pytest.raises(ValueError, match="GPUs"):
        batch_arithmetic(100, 10, 8)
    net = torch.nn.Linear(3, 1, bias=False)
    net.weight.grad = torch.tensor([[float("nan"), float("inf"), -0.5]])
    sanitize_grads(net, None)
    assert net.weight.grad.tolist() == [[0.0, 1e5, -0.5]]
    sanitize_grads(net, 1.0)
    assert net.weight.grad.tolist() == [[0.0, 1.0, -0.5]]


class LabelRecorder(Recorder):
    """A Recorder that also keeps each call's input and augmentation labels."""

    def forward(self, x, sigma, labels, augment_labels=None, return_flag="decoder"):
        self.calls = getattr(self, "calls", []) + [(x.detach().clone(), augment_labels)]
        return super().forward(x, sigma, labels, augment_labels, return_flag)


def test_augmentation_where_the_official_losses_apply_it():
    """The fake-score loss sees augmented generator images with their labels; SiDA's discriminator sees real
    images augmented with draws of their own; the generator loss is never augmented."""
    torch.manual_seed(0)
    x_g, x_real, labels = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.zeros(4, 0)
    noise = SampleNoise(7, range(100, 104))
    pipe = AugmentPipe(1.0)
    loss = losses.SiDLoss(alpha=1.2, augment=pipe)
    y, a = pipe(x_g, noise, "augment")
    y_real, a_real = pipe(x_real, noise, "augment_real")
    assert not torch.allclose(y, x_g) and not torch.equal(a, a_real)
    sigma = losses.sigma_lognormal(noise.randn("sigma", (1, 1, 1)), -1.2, 1.2)
    n = sigma * noise.randn("eps", (3, 8, 8))
    lam = losses.edm_weight(sigma, 0.5)

    fake = LabelRecorder(0.5)
    loss_psi, _ = loss.fake_score(fake, x_g, labels, noise)
    assert torch.equal(fake.calls[0][0], y + n) and torch.equal(fake.calls[0][1], a)
    assert torch.allclose(loss_psi, (lam * (0.5 * (y + n) - y) ** 2).flatten(1).sum(1), rtol=1e-5)

    fake = LabelRecorder(0.5)
    loss_psi_d, *_ = loss.fake_score_discriminator(fake, x_g, x_real, labels, noise)
    (fake_in, fake_a), (real_in, real_a) = fake.calls
    assert torch.equal(fake_in, y + n) and torch.equal(fake_a, a)
    assert torch.equal(real_in, y_real + n) and torch.equal(real_a, a_real)
    assert torch.allclose(loss_psi_d, loss_psi)

    true, fake = LabelRecorder(0.7), LabelRecorder(0.2)
    loss.generator(true, fake, x_g, labels, noise, adversarial=True)
    sigma_g = losses.sigma_generator(noise.rand("sigma", (1, 1, 1)), 800)
    x_t = x_g + sigma_g * noise.randn("eps", (3, 8, 8))
    for net in (true, fake):
        assert torch.equal(net.calls[0][0], x_t) and net.calls[0][1] is None
