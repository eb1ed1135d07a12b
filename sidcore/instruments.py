"""Instruments of a distillation's dynamics, read from tensors a step already has and logged with each tick.

- The discriminator (SiDA): λ(σ)-free binary cross-entropy and accuracy (the logit's sign) on real and on fake
  images, and the mean logits. At chance a branch's BCE is ln 2 ≈ 0.693 and its accuracy 0.5; the logged
  ``loss_D`` is λ(σ)-weighted and summed over the logit map, so it cannot tell.
- The generator (SiDA's third stage): the norm of the adversarial term's gradient over G's parameters relative
  to the SiD term's, and the cosine between the two, on one sampled iteration per tick (two extra backward
  passes through the generator step's graph, and G's gradients held twice while they are compared).
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.nn.functional import softplus


def masked_mean(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` [B, …] over the samples ``keep`` [B] holds (0 where none is kept), without a sync."""
    per_sample = values.flatten(1).float().mean(dim=1)
    return torch.where(keep, per_sample, 0).sum() / keep.sum().clamp(min=1)


def discriminator_readout(logit_real: torch.Tensor, logit_fake: torch.Tensor,
                          keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """D's view of one micro-batch, λ-free: per branch BCE = softplus(∓logit), accuracy = share of map positions
    on the right side of 0 (real > 0, fake < 0), and mean logit; over the samples ``keep`` holds."""
    logit_real, logit_fake = logit_real.detach(), logit_fake.detach()
    return {"D_bce_real": masked_mean(softplus(-logit_real), keep),
            "D_bce_fake": masked_mean(softplus(logit_fake), keep),
            "D_acc_real": masked_mean(logit_real > 0, keep), "D_acc_fake": masked_mean(logit_fake < 0, keep),
            "D_logit_real": masked_mean(logit_real, keep), "D_logit_fake": masked_mean(logit_fake, keep)}


def gradient_probe(S_sid: torch.Tensor, S_gan: torch.Tensor, params: Iterable[torch.Tensor]) -> dict[str, float]:
    """‖∇_θ S_gan‖ / ‖∇_θ S_sid‖ and cos(∇_θ S_gan, ∇_θ S_sid) over ``params`` (this process's micro-batch). The
    graph is kept for the step's own backward pass; the parameters' ``.grad`` are not touched."""
    params = [p for p in params if p.requires_grad]
    g_sid = torch.autograd.grad(S_sid, params, retain_graph=True, allow_unused=True)
    g_gan = torch.autograd.grad(S_gan, params, retain_graph=True, allow_unused=True)
    pairs = [(a.double(), b.double()) for a, b in zip(g_sid, g_gan) if a is not None and b is not None]
    sums = torch.stack([torch.stack([(a * a).sum(), (b * b).sum(), (a * b).sum()]) for a, b in pairs])
    n_sid, n_gan, dot = sums.sum(dim=0).tolist()  # one wait for the device
    if n_sid == 0 or n_gan == 0:
        return {"G_grad_ratio": math.nan, "G_grad_cos": math.nan}
    return {"G_grad_ratio": math.sqrt(n_gan / n_sid), "G_grad_cos": dot / math.sqrt(n_sid * n_gan)}
