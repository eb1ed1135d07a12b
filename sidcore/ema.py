"""Exponential moving average of network weights with EDM's ramp-up (the generator's G_ema; the teacher's EMA)."""
from __future__ import annotations

import torch


def ema_beta(cur_nimg: int, batch: int, halflife_kimg: float, rampup: float | None) -> float:
    """β = 0.5^(batch / h), h = min(half-life, rampup·images seen) (EDM's EMA with ramp-up)."""
    h = halflife_kimg * 1000
    if rampup is not None:
        h = min(h, cur_nimg * rampup)
    return 0.5 ** (batch / max(h, 1e-8))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, beta: float) -> None:
    """θ_ema ← β·θ_ema + (1 − β)·θ over parameters (buffers are constant in these networks)."""
    torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - beta)
