"""SiD and SiDA losses (Zhou et al., ICML 2024; ICLR 2025), as the official implementation computes them.

Every loss returns one value per *kept* sample (summed over pixels); samples with a NaN in any
of the tensors the official code checks are dropped, so they contribute zero once the loop
divides the sums by the per-GPU batch. Equation numbers refer to the SiDA paper.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.functional import softplus

# Noise-level schedule of the generator loss (Karras et al. 2022, eq. 5), fixed in the official code.
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0


def sigma_from_t(t: torch.Tensor) -> torch.Tensor:
    """σ(t) = (σ_max^{1/ρ} + (1 − t)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ; t = 0 → σ_min, t = 1 → σ_max."""
    return (SIGMA_MAX ** (1 / RHO) + (1 - t) * (SIGMA_MIN ** (1 / RHO) - SIGMA_MAX ** (1 / RHO))) ** RHO


def sample_sigma_generator(n: int, tmax: int, device: torch.device) -> torch.Tensor:
    """Per-sample σ for the generator loss: t ~ U(0, tmax/1000)."""
    t = torch.rand([n, 1, 1, 1], device=device) * (tmax / 1000)
    return sigma_from_t(t)


def sample_sigma_lognormal(n: int, P_mean: float, P_std: float, device: torch.device) -> torch.Tensor:
    """Per-sample σ for the fake-score / discriminator loss: ln σ ~ N(P_mean, P_std²)."""
    return (torch.randn([n, 1, 1, 1], device=device) * P_std + P_mean).exp()


def edm_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """λ(σ) = (σ² + σ_d²) / (σ·σ_d)²."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def nan_free(*tensors: torch.Tensor) -> torch.Tensor:
    """Boolean [B]: samples with no NaN in any of ``tensors``."""
    keep = torch.ones(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        keep &= ~torch.isnan(t).flatten(1).any(dim=1)
    return keep


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

    def call_fake(self, fake_score, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor,
                  return_flag: str = "decoder"):
        """fake_score(x; σ) in the given mode, and u(σ) (zeros without the log-variance weighting)."""
        if not self.logvar:
            return fake_score(x, sigma, labels, augment_labels=None, return_flag=return_flag), torch.zeros_like(sigma)
        *out, u = fake_score(x, sigma, labels, augment_labels=None, return_flag=return_flag, return_logvar=True)
        return (out[0] if len(out) == 1 else tuple(out)), u

    def fake_score(self, fake_score, x_g: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Eq. (5): Σ_pixels λ(σ)(f_ψ(x_g + σε) − x_g)², x_g without gradient."""
        sigma = sample_sigma_lognormal(x_g.shape[0], self.P_mean, self.P_std, x_g.device)
        y = x_g
        f_psi, u = self.call_fake(fake_score, y + sigma * torch.randn_like(y), sigma, labels)
        keep = nan_free(y, f_psi)
        loss = edm_weight(sigma, self.sigma_data) / u.exp() * (f_psi - y) ** 2 + u
        return loss[keep].flatten(1).sum(dim=1)

    def fake_score_discriminator(self, fake_score, x_g: torch.Tensor, x_real: torch.Tensor,
                                 labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eqs. (9)–(10): the fake-score loss and the discriminator loss from the fake score's encoder.

        Real and fake branches share σ, the noise tensor and the labels; the real branch runs the
        encoder only. Returns (L_ψ per sample, L_D per sample).
        """
        sigma = sample_sigma_lognormal(x_g.shape[0], self.P_mean, self.P_std, x_g.device)
        noise = sigma * torch.randn_like(x_g)
        y = x_g
        (f_psi, logit_fake), u = self.call_fake(fake_score, y + noise, sigma, labels, "encoder_decoder")
        logit_real, _ = self.call_fake(fake_score, x_real + noise, sigma, labels, "encoder")
        keep = nan_free(y, f_psi, logit_fake, logit_real)
        weight = edm_weight(sigma, self.sigma_data) / u.exp()
        loss_psi = (weight * (f_psi - y) ** 2 + u)[keep].flatten(1).sum(dim=1)
        loss_D = (weight * discriminator_bce(logit_real, logit_fake))[keep].flatten(1).sum(dim=1)
        return loss_psi, loss_D

    def generator(self, true_score, fake_score, x_g: torch.Tensor, labels: torch.Tensor,
                  adversarial: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Eq. (6) and, for SiDA, eq. (7): per kept sample L_SiD(i) and b / w_i (b = pooled fakeness).

        The gradient reaches G through x_g directly and through both score networks' inputs x_t.
        """
        sigma = sample_sigma_generator(x_g.shape[0], self.tmax, x_g.device)
        x_t = x_g + sigma * torch.randn_like(x_g)
        f_phi = true_score(x_t, sigma, labels, augment_labels=None)
        if adversarial:
            (f_psi, logits), u = self.call_fake(fake_score, x_t, sigma, labels, "encoder_decoder")
        else:
            (f_psi, u), logits = self.call_fake(fake_score, x_t, sigma, labels), None
        keep = nan_free(x_g, f_phi, f_psi)
        scale = (-u[keep]).exp().flatten()  # 1 / e^{u(σ_i)}
        loss_sid = sid_objective(x_g[keep], f_phi[keep], f_psi[keep], self.alpha) * scale
        if logits is None:
            return loss_sid, None
        b = generator_fakeness(logits)  # pooled over the whole micro-batch, NaN samples included
        loss_gan = (b / weight_factor(x_g[keep], f_phi[keep])).flatten() * scale
        return loss_sid, loss_gan
