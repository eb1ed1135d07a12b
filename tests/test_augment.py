"""EDM's geometric augmentation: flips, quarter turns, whole-pixel shifts, fractional warps against a direct
resampling of a smooth image, the label layout, p = 0, the firing frequencies and position-tied draws."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sidcore.augment import SYM6, AugmentPipe, _margins, draw_params
from sidcore.randomness import Noise, SampleNoise

P = 0.5  # with the stand-in's defaults nothing fires (the x-flip gate is open, but its coin shows tails)
GATES = ("xflip_gate", "yflip_gate", "scale_gate", "rotate_gate", "aniso_gate", "aniso_frame_gate", "translate_gate")
UNIFORM_DEFAULTS = {"xflip": 0.25, "yflip": 0.25, "rotate": 0.5, "aniso_frame": 0.5, **{g: 0.75 for g in GATES}}
ALL_DRAWS = set(UNIFORM_DEFAULTS) | {"scale", "aniso", "translate"}


class Prescribed(Noise):
    """Noise stand-in: the draws named (without the stream prefix) in ``draws``, broadcast to [B, *shape]
    (one value for all samples, or one per sample); the others default to no transform at p = 0.5 (coins
    tails, angles 0, gates shut). Records the names asked for."""

    def __init__(self, batch: int, stream: str = "aug", **draws) -> None:
        self.batch, self.stream, self.draws, self.names = batch, stream, draws, []

    def _draw(self, name: str, shape: tuple[int, ...], uniform: bool) -> torch.Tensor:
        prefix, _, what = name.rpartition(".")
        assert prefix == self.stream, name
        self.names.append(what)
        value = torch.as_tensor(self.draws.get(what, UNIFORM_DEFAULTS[what] if uniform else 0.0), dtype=torch.float32)
        return torch.broadcast_to(value, (self.batch, *shape)).clone()

    def rand(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self._draw(name, shape, uniform=True)

    def randn(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self._draw(name, shape, uniform=False)


def random_images(*shape: int) -> torch.Tensor:
    """Uniform values in [−1, 1) from a fixed seed."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 2 - 1


def angle_draw(theta: float) -> float:
    """The uniform u with (2u − 1)·π = θ."""
    return (theta / math.pi + 1) / 2


def augment(images: torch.Tensor, p: float = P, **draws) -> tuple[torch.Tensor, torch.Tensor]:
    noise = Prescribed(images.shape[0], **draws)
    out = AugmentPipe(p)(images, noise, "aug")
    assert set(noise.names) == ALL_DRAWS and len(noise.names) == len(ALL_DRAWS)
    return out


def test_flips_are_pixel_flips_with_their_labels():
    """x- and y-flips are done by indexing; the (identity) resampling that every sample goes through when p > 0
    then returns the image to float rounding (the symlet-6 2× up/down round trip is exact in exact arithmetic)."""
    x = random_images(4, 3, 8, 12)
    y, labels = augment(x, xflip=[0.25, 0.75, 0.25, 0.75], yflip=[0.25, 0.25, 0.75, 0.75], yflip_gate=0.25)
    expected = torch.stack([x[0], x[1].flip(2), x[2].flip(1), x[3].flip(1, 2)])
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=0)
    assert (y - x).abs().amax(dim=(1, 2, 3))[1:].min() > 0.1  # the flips did change the images
    torch.testing.assert_close(labels[:, :2], torch.tensor([[0.0, 0], [1, 0], [0, 1], [1, 1]]), atol=0, rtol=0)
    assert not labels[:, 2:].any()

    # The y-flip coin only counts when its gate (u < p) opens; the x-flip gate is u < 1e8·p, always open.
    _, labels = augment(x, xflip=0.75, xflip_gate=0.999, yflip=0.75, yflip_gate=[0.4, 0.6, 0.4, 0.6])
    torch.testing.assert_close(labels[:, :2], torch.tensor([[1.0, 1], [1, 0], [1, 1], [1, 0]]), atol=0, rtol=0)


def reflect_index(i: torch.Tensor, n: int) -> torch.Tensor:
    """Index into an axis of length n extended by mirroring about its end pixels (…, 2, 1, 0, 1, 2, …)."""
    i = i.abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


@pytest.mark.parametrize("wx, wy", [(0.5, 0.0), (0.0, -1.0), (-1.5, 0.5), (1.0, 2.0)])
def test_whole_pixel_translations_are_exact(wx, wy):
    """On a 16 × 16 image one translation unit is 16 · 0.125 = 2 pixels, so w = 0.5 moves the content one
    pixel right (x) or down (y). A whole-pixel shift is an even shift on the 2× grid, which the filter pair
    undoes exactly: the result is the shifted image, the border filled from the mirrored image (EDM's
    reflect padding), to float rounding, over the whole image."""
    x = random_images(2, 3, 16, 16)
    y, labels = augment(x, translate=[wx, wy], translate_gate=0.25)
    tx, ty = round(wx * 2), round(wy * 2)
    rows, cols = reflect_index(torch.arange(16) - ty, 16), reflect_index(torch.arange(16) - tx, 16)
    expected = x[:, :, rows][:, :, :, cols]  # output (i, j) shows input (i − ty, j − tx)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=0)
    assert (y - x).abs().max() > 0.1
    torch.testing.assert_close(labels, torch.tensor([[0.0] * 7 + [wx, wy]] * 2), atol=0, rtol=0)


def quarter_turn_residue() -> torch.Tensor:
    """c[j] = (h ∗ h)[2j], the even taps of the self-convolution of the symlet-6 filter h: ≈ δ[j − 5] but not δ."""
    h = np.asarray(SYM6)
    return torch.tensor(np.convolve(h, h)[::2], dtype=torch.float32)


@pytest.mark.parametrize("theta, k, axis", [(math.pi / 2, 1, 2), (-math.pi / 2, -1, 3)])
def test_quarter_turns_are_rot90_then_a_fixed_filter(theta, k, axis):
    """θ = ±π/2 turns the content counter-clockwise / clockwise on screen, like ``torch.rot90(x, ±1, (2, 3))``
    (label sin θ = ±1), but not exactly. The round trip down ∘ up is the identity because the filter h is
    orthogonal to its even shifts (its autocorrelation at even lags is δ). A quarter turn reads one axis of the
    2× grid backwards, which mirrors the upsampling filter along that axis, so the round trip there becomes
    the even taps of the self-convolution h ∗ h. The symlet is nearly but not exactly symmetric, so this
    12-tap filter is c ≈ (…, −0.098, 0.084, 0.965, −0.026, 0.064, …), not δ: it keeps the mean, attenuates
    the highest frequencies by up to 14 % and, at low frequencies, reads about 0.1 pixel off centre (its first
    moment, 0.098). "Exact" therefore means: rot90, then correlation with c (centred on tap 5, mirrored
    borders) along the output axis that reads the input backwards (y for +π/2, x for −π/2), to float
    rounding over the whole image. On white noise this differs from plain rot90 by far more than rounding."""
    x = random_images(2, 3, 16, 16)
    y, labels = augment(x, rotate=angle_draw(theta), rotate_gate=0.25)
    turned = torch.rot90(x, k, (2, 3))
    c = quarter_turn_residue()
    along = turned if axis == 3 else turned.transpose(2, 3)
    filtered = F.conv1d(F.pad(along.reshape(-1, 1, 16), [5, 6], mode="reflect"), c.view(1, 1, -1))
    expected = filtered.reshape(along.shape)
    expected = expected if axis == 3 else expected.transpose(2, 3)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=0)
    assert (y - turned).abs().max() > 0.1  # on white noise the residual filter is far from negligible
    torch.testing.assert_close(labels[:, 3:5], torch.tensor([[-1.0, math.sin(theta)]] * 2), atol=1e-6, rtol=0)

    # On a smooth image the result is close to plain rot90 and far from the opposite turn.
    s = smooth_image(16, 16, periods=24).expand(1, 3, 16, 16)
    y, _ = augment(s, rotate=angle_draw(theta), rotate_gate=0.25)
    assert (y - torch.rot90(s, k, (2, 3))).abs().max() < 0.05 < 0.5 < (y - torch.rot90(s, -k, (2, 3))).abs().max()


def smooth_image(height: int, width: int, periods: float = 16.0) -> torch.Tensor:
    """A band-limited test image [1, 1, H, W]: three sinusoids, periods ≥ ``periods`` / 1.25 pixels."""
    return smooth_function(*torch.meshgrid(torch.arange(width, dtype=torch.float64),
                                           torch.arange(height, dtype=torch.float64), indexing="xy"),
                           periods)[None, None].float()


def smooth_function(x: torch.Tensor, y: torch.Tensor, periods: float = 16.0) -> torch.Tensor:
    """The function behind ``smooth_image`` at pixel coordinates (x right, y down; pixel centres at integers)."""
    k = 2 * math.pi / periods
    return (0.6 * torch.cos(k * (x + 0.5 * y) + 0.3) + 0.5 * torch.sin(k * (-0.7 * x + y) + 1.1)
            + 0.4 * torch.cos(k * (0.8 * x - 0.9 * y) - 0.4))


def rotation(theta: float) -> np.ndarray:
    """Rotation by θ in image coordinates (y down): clockwise on screen for θ > 0."""
    return np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])


def resample_directly(g: np.ndarray, t: np.ndarray, height: int, width: int,
                      margin: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Content moved by q ↦ g·q + t about the image centre: output pixel q shows the smooth function at
    g⁻¹(q − t). Returns (values [H, W], mask of the pixels read ≥ ``margin`` pixels inside the image)."""
    cx, cy = (width - 1) / 2, (height - 1) / 2
    xs, ys = np.meshgrid(np.arange(width) - cx, np.arange(height) - cy, indexing="xy")
    src = np.linalg.solve(g, np.stack([xs.ravel() - t[0], ys.ravel() - t[1]]))
    sx, sy = (torch.tensor(v.reshape(height, width)) for v in (src[0] + cx, src[1] + cy))
    inside = (sx >= margin) & (sx <= width - 1 - margin) & (sy >= margin) & (sy <= height - 1 - margin)
    return smooth_function(sx, sy).float(), inside


H, W = 32, 40
THETA, S_W, A_W, R, TX, TY = 0.4, 1.5, -1.2, 0.7, 0.3, -0.45
S, A = 2 ** (0.2 * S_W), 2 ** (0.2 * A_W)
T = np.array([TX * W * 0.125, TY * H * 0.125])
ANISO = rotation(-R) @ np.diag([A, 1 / A]) @ rotation(R)
NONE = np.zeros(2)
CASES = {  # draws, the forward map (g, t) it should apply, and deliberately wrong maps
    "rotation": (dict(rotate=angle_draw(THETA), rotate_gate=0.25), (rotation(-THETA), NONE),
                 [(rotation(THETA), NONE), (rotation(-THETA).T @ np.diag([1, -1]), NONE)]),
    "scale": (dict(scale=S_W, scale_gate=0.25), (S * np.eye(2), NONE), [(np.eye(2) / S, NONE)]),
    "aniso": (dict(aniso=A_W, aniso_gate=0.25, aniso_frame=angle_draw(R), aniso_frame_gate=0.25), (ANISO, NONE),
              [(rotation(R) @ np.diag([A, 1 / A]) @ rotation(-R), NONE), (np.diag([A, 1 / A]), NONE),
               (np.linalg.inv(ANISO), NONE)]),
    "aniso_unrotated_frame": (dict(aniso=A_W, aniso_gate=0.25, aniso_frame=angle_draw(R)),
                              (np.diag([A, 1 / A]), NONE), [(ANISO, NONE)]),
    "translation": (dict(translate=[TX, TY], translate_gate=0.25), (np.eye(2), T),
                    [(np.eye(2), -T), (np.eye(2), T[::-1] * [W / H, H / W])]),
    "all": (dict(scale=S_W, scale_gate=0.25, rotate=angle_draw(THETA), rotate_gate=0.25, aniso=A_W, aniso_gate=0.25,
                 aniso_frame=angle_draw(R), aniso_frame_gate=0.25, translate=[TX, TY], translate_gate=0.25),
            (ANISO @ rotation(-THETA) * S, T),
            [(rotation(-THETA) @ ANISO * S, T), (ANISO @ rotation(THETA) * S, T), (ANISO @ rotation(-THETA) * S, -T)]),
}
TOLERANCE = 0.02  # max |error| in the interior


@pytest.mark.parametrize("case", CASES)
def test_fractional_warps_match_direct_resampling(case):
    """A smooth image (periods ≥ 13 pixels) warped by the pipeline agrees with the same transform computed
    directly, f(g⁻¹(q − t)), within 0.02 (values span ±1.5) over the output pixels read at least 4 pixels
    inside the image, so that mirrored borders do not count. Observed: 0.005 (translation) to 0.015
    (rotation): bilinear interpolation on the 2× grid, and the symlet's slight asymmetry (see the quarter
    turns), which leaves up to ~0.1 pixel of offset once the warp is not a pure shift. A wrong sign, a
    transposed or reordered matrix, swapped axes or a half-pixel offset (a wrong centre) gives ≥ 0.17."""
    draws, (g, t), wrong = CASES[case]
    y, _ = augment(smooth_image(H, W).expand(2, 3, H, W), **draws)
    expected, inside = resample_directly(g, t, H, W)
    assert inside.float().mean() > 0.25
    error = (y - expected).abs()[:, :, inside].max()
    assert error < TOLERANCE
    for g_wrong, t_wrong in wrong + [(g, t + 0.5)]:
        expected_wrong, inside_wrong = resample_directly(g_wrong, t_wrong, H, W)
        assert (y - expected_wrong).abs()[:, :, inside & inside_wrong].max() > 5 * TOLERANCE


def test_labels_layout():
    """[x-flip, y-flip, scale w, cos θ − 1, sin θ, w·cos r, w·sin r, t_x, t_y], 0 for what did not fire; the
    aniso frame is r only when its own gate opens."""
    theta, r = 1.0, 0.6
    draws = dict(xflip=[0.75, 0.25, 0.75], yflip=0.75, yflip_gate=[0.1, 0.9, 0.9], scale=[0.7, 0.7, -0.3],
                 scale_gate=[0.1, 0.9, 0.2], rotate=angle_draw(theta), rotate_gate=[0.1, 0.9, 0.9],
                 aniso=-0.4, aniso_gate=[0.1, 0.9, 0.3], aniso_frame=angle_draw(r), aniso_frame_gate=[0.1, 0.1, 0.6],
                 translate=[[0.3, -0.2], [0.3, -0.2], [1.1, 0.4]], translate_gate=[0.1, 0.9, 0.4])
    _, labels = augment(torch.zeros(3, 1, 8, 8), **draws)
    expected = torch.tensor([
        [1, 1, 0.7, math.cos(theta) - 1, math.sin(theta), -0.4 * math.cos(r), -0.4 * math.sin(r), 0.3, -0.2],
        [0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 0, -0.3, 0, 0, -0.4, 0, 1.1, 0.4],
    ])
    assert labels.dtype == torch.float32 and labels.shape == (3, 9)
    torch.testing.assert_close(labels, expected, atol=1e-6, rtol=0)
    params = draw_params(Prescribed(3, stream="gen.aug", **draws), "gen.aug", P)  # names: f"{stream}.<what>"
    torch.testing.assert_close(params.labels(), labels, atol=0, rtol=0)


def test_p_zero_is_the_identity():
    x = random_images(4, 3, 8, 8)
    y, labels = AugmentPipe(0.0)(x, SampleNoise(0, range(4)), "aug")
    assert torch.equal(y, x)
    assert labels.dtype == torch.float32 and torch.equal(labels, torch.zeros(4, 9))


@pytest.mark.parametrize("p", [0.2, 1.0])
def test_firing_frequencies(p):
    """Over 10,000 positions each transform fires at its rate within 3σ, σ = √(q(1 − q)/n)."""
    n = 10_000
    params = draw_params(SampleNoise(11, range(n)), "aug", p)
    fired = params.aniso != 0

    def check(hits: torch.Tensor, q: float) -> None:
        assert abs(hits.float().mean().item() - q) <= 3 * math.sqrt(q * (1 - q) / hits.numel()) + 1e-12

    check(params.xflip == 1, 0.5)
    check(params.yflip == 1, p / 2)
    check(params.scale != 0, p)
    check(params.rotate != 0, p)
    check(fired, p)
    check(params.translate[:, 0] != 0, p)
    check(params.aniso_frame[fired] != 0, 0.5)
    assert torch.equal(params.translate[:, 0] != 0, params.translate[:, 1] != 0)  # one gate for both
    assert set(params.xflip.unique().tolist()) <= {0.0, 1.0} and set(params.yflip.unique().tolist()) <= {0.0, 1.0}
    # The parameters themselves: N(0, 1) strengths and angles uniform on (−π, π).
    w = params.scale[params.scale != 0]
    assert abs(w.mean()) < 3 / math.sqrt(len(w)) and abs(w.std() - 1) < 0.05
    angles = params.rotate[params.rotate != 0]
    assert angles.abs().max() < math.pi and abs(angles.abs().mean() - math.pi / 2) < 0.05


def test_draws_follow_stream_and_position_not_batch():
    """Different streams give different draws (for every parameter); a sample's draws and labels are the same
    however the batch is split. Its image is the same only to about 1e-5 (1e-4 at the outermost pixels): the
    reflect padding is common to the batch and sized by its farthest-reaching sample, as in EDM, and a
    different padding changes the rounding of the sampling coordinates and the filters' edge effects."""
    x = random_images(8, 3, 16, 16)
    pipe = AugmentPipe(0.5)
    y, labels = pipe(x, SampleNoise(5, range(100, 108)), "real")
    parts = [pipe(x[i:i + 4], SampleNoise(5, range(100 + i, 104 + i)), "real") for i in (0, 4)]
    assert torch.equal(labels, torch.cat([part_labels for _, part_labels in parts]))
    y_parts = torch.cat([im for im, _ in parts])
    torch.testing.assert_close(y, y_parts, atol=1e-4, rtol=0)
    torch.testing.assert_close(y[..., 2:-2, 2:-2], y_parts[..., 2:-2, 2:-2], atol=1e-5, rtol=0)
    g_inv = draw_params(SampleNoise(5, range(100, 108)), "real", 0.5).inverse_matrix(16, 16)
    assert _margins(g_inv, 16, 16) != _margins(g_inv[:4], 16, 16) != _margins(g_inv[4:], 16, 16)  # paddings differ

    y_other, labels_other = pipe(x, SampleNoise(5, range(100, 108)), "fake")
    assert (labels_other != labels).any(dim=1).all() and (y_other - y).abs().amax(dim=(1, 2, 3)).min() > 0.01
    noise = SampleNoise(5, range(64))
    real, fake = vars(draw_params(noise, "real", 0.5)), vars(draw_params(noise, "fake", 0.5))
    assert all(not torch.equal(real[k], fake[k]) for k in real)  # every parameter's draws depend on the stream
    again, labels_again = pipe(x, SampleNoise(5, range(100, 108)), "real")
    assert torch.equal(labels_again, labels) and torch.equal(again, y)
