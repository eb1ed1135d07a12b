"""Position-indexed random numbers: a reference generator, split invariance, distributions."""
import pytest
import torch

from sidcore.randomness import SampleNoise, micro_batch_positions, splitmix64

MASK = (1 << 64) - 1


def splitmix64_reference(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def test_splitmix64_matches_the_reference_in_wrapping_int64():
    xs = [0, 1, 12345, 2 ** 40 + 7, 2 ** 62 + 99, 2 ** 63 - 1]
    assert [int(v) & MASK for v in splitmix64(torch.tensor(xs))] == [splitmix64_reference(x) for x in xs]


def test_a_sample_gets_the_same_numbers_however_the_batch_is_split():
    whole = SampleNoise(7, range(100, 132)).randn("eps", (3, 4, 4))
    parts = [SampleNoise(7, range(s, s + 8)).randn("eps", (3, 4, 4)) for s in range(100, 132, 8)]
    assert torch.equal(whole, torch.cat(parts))
    other = SampleNoise(7, range(100, 132))
    assert not torch.equal(whole, other.randn("z", (3, 4, 4)))  # streams differ
    assert not torch.equal(whole, SampleNoise(8, range(100, 132)).randn("eps", (3, 4, 4)))  # seeds differ


def test_distributions():
    n = SampleNoise(0, range(50_000)).randn("x", (4,))
    assert n.mean().item() == pytest.approx(0, abs=0.01) and n.std().item() == pytest.approx(1, abs=0.01)
    u = SampleNoise(0, range(50_000)).rand("u", (1,))
    assert 0 < u.min().item() and u.max().item() < 1 and u.mean().item() == pytest.approx(0.5, abs=0.01)


def test_micro_batches_tile_each_phase_of_an_iteration():
    seen = [p for phase in (0, 1) for r in range(2) for rank in range(2)
            for p in micro_batch_positions(3, phase, 16, 4, 2, rank, 2, r)]
    assert sorted(seen) == list(range(3 * 32, 4 * 32))
    assert micro_batch_positions(3, 0, 16, 8, 2, 0, 1, 1) == micro_batch_positions(3, 0, 16, 8, 1, 1, 2, 0)
