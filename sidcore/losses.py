"""SiD and SiDA losses (Zhou et al., ICML 2024; ICLR 2025), as the official implementation computes them.

Every loss returns one value per sample (summed over pixels) and the boolean ``keep`` mask: samples
with a NaN in any of the tensors the official code checks count zero, as if dropped, once the loop
divides the sums by the per-GPU batch. The mask is applied with ``torch.where`` rather than by
indexing, so no step waits for the device. Equation numbers refer to the SiDA paper.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.functional import softplus

from sidcore.augment import AugmentPipe
from sidcore.instruments import discriminator_readout
from sidcore.randomness import Noise
from sidcore.sampling import karras_sigma


def sigma_from_t(t: torch.Tensor) -> torch.Tensor:
    """σ(t) of the generator loss on EDM's schedule: t = 0 → σ_min, t = 1 → σ_max."""
    return karras_sigma(1 - t)


def sigma_generator(u: torch.Tensor, tmax: int) -> torch.Tensor:
    """Per-sample σ for the generator loss from u ~ U(0, 1): t = u·tmax/1000, σ = σ(t)."""
    return sigma_from_t(u * (tmax / 1000))


def sigma_lognormal(n: torch.Tensor, P_mean: float, P_std: float) -> torch.Tensor:
    """Per-sample σ for the fake-score / discriminator loss from n ~ N(0, 1): ln σ = P_mean + P_std·n."""
    return (n * P_std + P_mean).exp()


def edm_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """λ(σ) = (σ² + σ_d²) / (σ·σ_d)²."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def nan_free(*tensors: torch.Tensor) -> torch.Tensor:
    """Boolean [B]: samples with no NaN in any of ``tensors``."""
    keep = torch.ones(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        keep &= ~torch.isnan(t).flatten(1).any(dim=1)
    return keep


def masked(keep: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """``tensors`` with the samples not kept set to zero, so that the arithmetic on them stays finite."""
    return [torch.where(keep.reshape(-1, *[1] * (t.ndim - 1)), t, torch.zeros_like(t)) for t in tensors]


def per_sample(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Σ over all but the first dimension, 0 for the samples not kept: [B]."""
    return torch.where(keep, values.flatten(1).sum(dim=1), torch.zeros((), device=values.device))


def weight_factor(x_g: torch.Tensor, f_phi: torch.Tensor) -> torch.Tensor:
    """w_i = stopgrad(mean_{C,H,W} |x_g − f_φ|), clipped below at 1e-5, shape [B, 1, 1, 1]."""
    w = (x_g - f_phi).detach().float().abs().mean(dim=[1, 2, 3], keepdim=True)
    return w.clamp(min=1e-5)


def sid_objective(x_g: torch.Tensor, f_phi: torch.Tensor, f_psi: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. (6): Σ_pixels (f_φ − f_ψ)ᵀ[(f_φ − x_g) − α(f_φ − f_ψ)] / w, per sample. No stop-gradient."""
    w = weight_factor(x_g, f_phi)
    ell = (f_phi - f_psi) * ((f_phi - x_g) - alpha * (f_phi - f_psi)) / w
    return ell.flatten(1).sum(dim=1)


def generator_fakeness(logits: torch.Tensor) -> torch.Tensor:
    """Eq. (7): mean over the per-GPU batch and map positions of −log D = softplus(−clamp(logits, ±10))."""
    return softplus(-logits.clamp(-10, 10)).mean()


def discriminator_bce(logit_real: torch.Tensor, logit_fake: torch.Tensor) -> torch.Tensor:
    """Eq. (10) core: (mean softplus(−logit_real) + mean softplus(logit_fake)) / 2 (no clamp)."""
    return (softplus(-logit_real).mean() + softplus(logit_fake).mean()) / 2


@dataclass
class SiDLoss:
    """The three losses of one SiD / SiDA iteration, with the settings of config.yaml's ``distill`` block.

    With ``logvar`` (EDM2's ``return_logvar``) every loss is divided by e^{u(σ)}, u being the fake
    score's learned log-variance at the sample's σ, and the fake-score loss adds u per pixel (EDM2's
    uncertainty weighting). u depends on σ only, so it opens no gradient path to the generator.
    """

    alpha: float
    tmax: int = 800
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = 0.5
    logvar: bool = False
    augment: AugmentPipe | None = None  # EDM's augmentation of the fake score's inputs (distill.augment > 0)

    def call_fake(self, fake_score, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor,
                  return_flag: str = "decoder", augment_labels: torch.Tensor | None = None):
        """fake_score(x; σ) in the given mode, and u(σ) (zeros without the log-variance weighting)."""
        if not self.logvar:
            out = fake_score(x, sigma, labels, augment_labels=augment_labels, return_flag=return_flag)
            return out, torch.zeros_like(sigma)
        *out, u = fake_score(x, sigma, labels, augment_labels=augment_labels, return_flag=return_flag,
                             return_logvar=True)
        return (out[0] if len(out) == 1 else tuple(out)), u

    def augmented(self, x: torch.Tensor, noise: Noise, stream: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(y, a): ``x`` through the augmentation pipeline with its labels, or ``x`` and no labels."""
        return (x, None) if self.augment is None else self.augment(x, noise, stream)

    def fake_score(self, fake_score, x_g: torch.Tensor, labels: torch.Tensor,
                   noise: Noise) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. (5): Σ_pixels λ(σ)(f_ψ(y + σε) − y)², y = x_g (augmented where configured) without gradient."""
        sigma = sigma_lognormal(noise.randn("sigma", (1, 1, 1)), self.P_mean, self.P_std)
        y, a = self.augmented(x_g, noise, "augment")
        f_psi, u = self.call_fake(fake_score, y + sigma * noise.randn("eps", y.shape[1:]), sigma, labels,
                                  augment_labels=a)
        keep = nan_free(y, f_psi)
        loss = edm_weight(sigma, self.sigma_data) / u.exp() * (f_psi - y) ** 2 + u
        return per_sample(loss, keep), keep

    def fake_score_discriminator(self, fake_score, x_g: torch.Tensor, x_real: torch.Tensor, labels: torch.Tensor,
                                 noise: Noise) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """Eqs. (9)–(10): the fake-score loss and the discriminator loss from the fake score's encoder.

        Real and fake branches share σ, the noise tensor and the labels; each is augmented with draws of its
        own where configured; the real branch runs the encoder only. Returns (L_ψ per sample, L_D per
        sample, keep, D's λ-free readout: ``sidcore.instruments.discriminator_readout``).
        """
        sigma = sigma_lognormal(noise.randn("sigma", (1, 1, 1)), self.P_mean, self.P_std)
        n = sigma * noise.randn("eps", x_g.shape[1:])
        y, a_fake = self.augmented(x_g, noise, "augment")
        y_real, a_real = self.augmented(x_real, noise, "augment_real")
        (f_psi, logit_fake), u = self.call_fake(fake_score, y + n, sigma, labels, "encoder_decoder", a_fake)
        logit_real, _ = self.call_fake(fake_score, y_real + n, sigma, labels, "encoder", a_real)
        keep = nan_free(y, f_psi, logit_fake, logit_real)
        weight = edm_weight(sigma, self.sigma_data) / u.exp()
        loss_psi = per_sample(weight * (f_psi - y) ** 2 + u, keep)
        loss_D = per_sample(weight * discriminator_bce(logit_real, logit_fake), keep)
        return loss_psi, loss_D, keep, discriminator_readout(logit_real, logit_fake, keep)

    def generator(self, true_score, fake_score, x_g: torch.Tensor, labels: torch.Tensor, noise: Noise,
                  adversarial: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Eq. (6) and, for SiDA, eq. (7): per sample L_SiD(i) and b / w_i (b = pooled fakeness), and keep.

        The gradient reaches G through x_g directly and through both score networks' inputs x_t.
        """
        sigma = sigma_generator(noise.rand("sigma", (1, 1, 1)), self.tmax)
        x_t = x_g + sigma * noise.randn("eps", x_g.shape[1:])
        f_phi = true_score(x_t, sigma, labels, augment_labels=None)
        if adversarial:
            (f_psi, logits), u = self.call_fake(fake_score, x_t, sigma, labels, "encoder_decoder")
        else:
            (f_psi, u), logits = self.call_fake(fake_score, x_t, sigma, labels), None
        keep = nan_free(x_g, f_phi, f_psi)
        x_g0, f_phi0, f_psi0 = masked(keep, x_g, f_phi, f_psi)
        scale = torch.where(keep, (-u).exp().flatten(), 0)  # 1 / e^{u(σ_i)}, 0 if not kept
        loss_sid = sid_objective(x_g0, f_phi0, f_psi0, self.alpha) * scale
        if logits is None:
            return loss_sid, None, keep
        b = generator_fakeness(logits)  # pooled over the whole micro-batch, NaN samples included
        loss_gan = (b / weight_factor(x_g0, f_phi0)).flatten() * scale
        return loss_sid, loss_gan, keep
