"""How the networks are executed: the official precision flags, and opt-in levers that change only rounding.

Each lever of ``Engine`` (config.yaml: ``distill.engine``, ``evaluation.engine``) computes the same
mathematics as the official code in another order or layout; none is on unless a configuration asks.
``tests/test_engine.py`` bounds the difference each makes to the losses and gradients of an iteration.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from sidcore.networks.edm2 import Block
from sidcore.networks.layers import UNetBlock
from sidcore.networks.precond import Precond
from sidcore.settings import Engine


def set_precision_flags(device: torch.device) -> None:
    """The official loops' settings: full-precision float32 (no TF32, no reduced-precision fp16 sums) and
    cuDNN's autotuner picking each convolution's fastest algorithm."""
    if device.type == "cuda":  # (PyTorch's defaults allow TF32 in cuDNN's convolutions)
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False


def prepare(net: torch.nn.Module, engine: Engine) -> torch.nn.Module:
    """``net`` (in place) set up for ``engine``'s layout, attention and compilation; returns it."""
    if engine.channels_last:
        net.to(memory_format=torch.channels_last)
    for module in net.modules():
        if isinstance(module, (UNetBlock, Block)):
            module.fused_attention = engine.fused_attention
        if isinstance(module, Precond):
            module.memory_format = torch.channels_last if engine.channels_last else torch.contiguous_format
    if engine.compile:
        torch._inductor.config.fallback_random = True  # dropout masks drawn as eager mode draws them
        # One graph per calling mode and batch shape (the four networks share their forward code: G, G_ema,
        # teacher and fake score, in training, no-gradient and encoder modes, at the training and evaluation
        # batches), never a shape-generic one.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        net.compile(dynamic=False)
    return net


def adam(params: Iterable[torch.nn.Parameter], engine: Engine, **options) -> torch.optim.Adam:
    """``torch.optim.Adam`` with the engine's implementation (PyTorch's per-parameter loop, or fused)."""
    return torch.optim.Adam(params, fused=True if engine.fused_adam else None, **options)
