"""Random draws tied to sample positions rather than to processes.

Every sample a run draws has a global position: iteration ``it`` uses positions
``[2·it·batch, 2·(it+1)·batch)`` (the fake-score step's batch, then the generator step's), split into
contiguous slices per accumulation round and rank. The dataset index, the latent z and every noise
tensor of a sample are functions of (seed, position) only. So a run gives the same numbers on one
process or many, with or without accumulation, and a resumed run needs nothing but the iteration
count to continue the exact stream.
"""
from __future__ import annotations

import zlib

import torch

from sidcore.distributed import to_device
from sidcore.losses import Noise

_MIX = 0x9E3779B97F4A7C15  # 64-bit golden-ratio constant: spreads (seed, stream, position) over seeds


def sample_seed(seed: int, stream: str, position: int) -> int:
    """A 63-bit generator seed for one sample of one named stream."""
    return (seed * _MIX + zlib.crc32(stream.encode()) * (_MIX >> 7) + position) % (1 << 63)


def micro_batch_positions(it: int, phase: int, batch: int, batch_gpu: int, rounds: int, rank: int,
                          world_size: int, round_: int) -> range:
    """Global positions of one micro-batch: iteration ``it``, phase 0 (fake score) or 1 (generator)."""
    assert batch == batch_gpu * rounds * world_size
    start = (2 * it + phase) * batch + (round_ * world_size + rank) * batch_gpu
    return range(start, start + batch_gpu)


class SampleNoise(Noise):
    """Standard normal / uniform draws of a micro-batch, each sample from its own seeded generator.

    Draws are made on the CPU (identical on every device) and moved to ``device``.
    """

    def __init__(self, seed: int, positions: range, device: torch.device | str = "cpu") -> None:
        self.seed, self.positions, self.device = seed, positions, device

    def _draw(self, fn, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        out = torch.empty([len(self.positions), *shape])
        g = torch.Generator()
        for i, p in enumerate(self.positions):
            g.manual_seed(sample_seed(self.seed, name, p))
            out[i] = fn(tuple(shape), generator=g)
        return to_device(out, torch.device(self.device))

    def randn(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self._draw(torch.randn, name, shape)

    def rand(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self._draw(torch.rand, name, shape)
