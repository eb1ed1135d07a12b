"""Random draws tied to sample positions rather than to processes.

Every sample a run draws has a global position: iteration ``it`` uses positions
``[2·it·batch, 2·(it+1)·batch)`` (the fake-score step's batch, then the generator step's), split into
contiguous slices per accumulation round and rank. The dataset index, the latent z and every noise
tensor of a sample are functions of (seed, stream name, position) only. So a run gives the same numbers
on one process or many, with or without accumulation, and a resumed run needs nothing but the iteration
count to continue the exact stream.

The numbers come from a counter-based generator: SplitMix64 of (element counter XOR stream key), then
53-bit uniforms and Box–Muller normals, all as tensor operations on the target device.
"""
from __future__ import annotations

import math
import zlib

import torch


class Noise:
    """The random draws of one micro-batch: ``randn`` / ``rand`` return [B, *shape] for a named draw."""

    def randn(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError

    def rand(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError


ELEMENT_BITS = 24  # up to 2^24 numbers per sample and stream (EDM2 latents use 16,384)


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


_GAMMA, _M1, _M2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (multiplications wrap modulo 2^64)."""
    z = x + _GAMMA
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def stream_key(seed: int, stream: str) -> int:
    """A 63-bit key per (run seed, stream name)."""
    return (seed * 0x9E3779B97F4A7C15 + zlib.crc32(stream.encode()) * 0xBF58476D1CE4E5B9) % (1 << 63)


def micro_batch_positions(it: int, phase: int, batch: int, batch_gpu: int, rounds: int, rank: int,
                          world_size: int, round_: int) -> range:
    """Global positions of one micro-batch: iteration ``it``, phase 0 (fake score) or 1 (generator)."""
    assert batch == batch_gpu * rounds * world_size
    start = (2 * it + phase) * batch + (round_ * world_size + rank) * batch_gpu
    return range(start, start + batch_gpu)


class SampleNoise(Noise):
    """Standard normal / uniform draws of a micro-batch; sample i's numbers depend on its position only."""

    def __init__(self, seed: int, positions: range, device: torch.device | str = "cpu") -> None:
        self.seed, self.positions, self.device = seed, positions, torch.device(device)

    def _uniforms(self, name: str, shape: tuple[int, ...], per_number: int) -> torch.Tensor:
        """[per_number, B, n] uniforms in (0, 1), float64."""
        n = math.prod(shape)
        if n > 1 << ELEMENT_BITS:
            raise ValueError(f"{n} numbers per sample exceed the generator's 2^{ELEMENT_BITS}")
        pos = torch.arange(self.positions.start, self.positions.stop, dtype=torch.int64, device=self.device)
        counter = ((pos[:, None] << ELEMENT_BITS) + torch.arange(n, dtype=torch.int64, device=self.device)) * 2
        bits = splitmix64(torch.stack([counter + j for j in range(per_number)]) ^ stream_key(self.seed, name))
        return (_shr(bits, 11).to(torch.float64) + 0.5) / 2.0 ** 53

    def randn(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        u = self._uniforms(name, shape, 2)
        z = torch.sqrt(-2 * torch.log(u[0])) * torch.cos(2 * math.pi * u[1])  # Box–Muller
        return z.to(torch.float32).reshape(len(self.positions), *shape)

    def rand(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self._uniforms(name, shape, 1)[0].to(torch.float32).reshape(len(self.positions), *shape)
