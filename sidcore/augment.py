"""EDM's geometric augmentation (Karras et al. 2022), in the configuration SiD trains with.

The official SiD scripts construct EDM's ``AugmentPipe(p, xflip=1e8, yflip=1, scale=1, rotate_frac=1,
aniso=1, translate_frac=1)`` with the default strengths. Per sample, in this order (u: a uniform of its own):

- x-flip, w ∈ {0, 1}, when u < 1e8·p (so always for p > 0); label w.
- y-flip, w ∈ {0, 1}, when u < p; label w.
- isotropic scale by 2^(0.2·w), w ~ N(0, 1), when u < p; label w.
- rotation by θ = (2u' − 1)·π, when u < p; labels cos θ − 1, sin θ.
- anisotropic scale by 2^(±0.2·w), w ~ N(0, 1), when u < p, in a frame turned by r = (2u' − 1)·π when
  u'' < 1/2 (else r = 0); labels w·cos r, w·sin r.
- translation by (0.125·W·w_x, 0.125·H·w_y) pixels, (w_x, w_y) ~ N(0, 1)², when u < p; labels w_x, w_y.

Parameters that do not fire are 0 (identity). Flips are exact pixel flips. The four geometric transforms
form one matrix, and the whole batch is resampled through it whenever p > 0 (as in EDM, even for samples
whose matrix is the identity): reflect padding, 2× upsampling with the symlet-6 wavelet filter, bilinear
sampling, then 2× downsampling with the same filter and a crop. The padding is common to the batch, sized
by the largest reach of any sample's matrix, exactly as EDM computes it.

Unlike EDM, no global generator is used: every number comes from ``Noise`` under the name
``f"{stream}.<parameter>"``, so a sample's augmentation depends only on the seed, the stream and its position.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sidcore.randomness import Noise
from sidcore.settings import AUGMENT_DIM

XFLIP, SCALE_STD, ANISO_STD, ANISO_FRAME_PROB, TRANSLATE_STD = 1e8, 0.2, 0.2, 0.5, 0.125

# Daubechies symlet-6 low-pass decomposition filter (orthonormal: unit norm, orthogonal to its even shifts).
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)
FILTER_PAD = (len(SYM6) - 1) // 2  # 5: padding that centres the filter on the 2× grid
BORDER = len(SYM6) // 4  # 3: pixels kept around the output while filtering, cropped at the end


@dataclass(frozen=True)
class AugmentParams:
    """One batch's draws, 0 where a transform did not fire. Each field is float32 [B], ``translate`` [B, 2]."""

    xflip: torch.Tensor  # 1: mirror left–right
    yflip: torch.Tensor  # 1: mirror top–bottom
    scale: torch.Tensor  # w: content scaled by 2^(0.2·w)
    rotate: torch.Tensor  # θ (radians): content turned counter-clockwise on screen for θ > 0
    aniso: torch.Tensor  # w: content stretched by 2^(0.2·w) along one axis of the frame, 2^(−0.2·w) across
    aniso_frame: torch.Tensor  # r: angle of that frame
    translate: torch.Tensor  # (w_x, w_y): content moved right by 0.125·W·w_x and down by 0.125·H·w_y pixels

    def labels(self) -> torch.Tensor:
        """The augmentation labels the score network is conditioned on, [B, 9] float32 in EDM's order."""
        w, r = self.aniso, self.aniso_frame
        return torch.stack([self.xflip, self.yflip, self.scale, self.rotate.cos() - 1, self.rotate.sin(),
                            w * r.cos(), w * r.sin(), self.translate[:, 0], self.translate[:, 1]], dim=1)

    def inverse_matrix(self, height: int, width: int) -> torch.Tensor:
        """G⁻¹ [B, 3, 3]: output pixel (x right, y down, in pixels from the image centre) ↦ where it is read.

        G⁻¹ = S(s)⁻¹ · R(θ) · R(−r) · S(a, 1/a)⁻¹ · R(r) · T(−t), R(φ) = [[cos φ, −sin φ], [sin φ, cos φ]],
        evaluated left to right in float32 as EDM does, so that the two agree to the last bit.
        """
        s = (self.scale * SCALE_STD).exp2()
        a = (self.aniso * ANISO_STD).exp2()
        r = self.aniso_frame
        tx = self.translate[:, 0] * (width * TRANSLATE_STD)
        ty = self.translate[:, 1] * (height * TRANSLATE_STD)
        return (_inverse_scaling(s, s) @ _rotation(self.rotate) @ _rotation(-r) @ _inverse_scaling(a, 1 / a)
                @ _rotation(r) @ _translation(-tx, -ty))


def draw_params(noise: Noise, stream: str, p: float) -> AugmentParams:
    """Draw every sample's parameters from ``noise`` under ``f"{stream}.…"`` (all of them, whatever ``p``)."""

    def rand(what: str, shape: tuple[int, ...] = ()) -> torch.Tensor:
        return noise.rand(f"{stream}.{what}", shape)

    def gated(value: torch.Tensor, what: str, prob: float) -> torch.Tensor:
        """``value`` where this sample's uniform ``u < prob`` (compared in float32, as EDM), else 0."""
        u = rand(what, ())
        keep = u < prob
        return torch.where(keep.reshape(*keep.shape, *[1] * (value.ndim - 1)), value, torch.zeros_like(value))

    def bit(what: str) -> torch.Tensor:
        """A fair coin from a uniform: floor(2u) (u ≥ 1/2 also covers u rounded up to 1 in float32)."""
        return (rand(what) >= 0.5).to(torch.float32)

    angle = (rand("rotate") * 2 - 1) * math.pi
    aniso_frame = (rand("aniso_frame") * 2 - 1) * math.pi
    return AugmentParams(
        xflip=gated(bit("xflip"), "xflip_gate", XFLIP * p),
        yflip=gated(bit("yflip"), "yflip_gate", p),
        scale=gated(noise.randn(f"{stream}.scale", ()), "scale_gate", p),
        rotate=gated(angle, "rotate_gate", p),
        aniso=gated(noise.randn(f"{stream}.aniso", ()), "aniso_gate", p),
        aniso_frame=gated(aniso_frame, "aniso_frame_gate", ANISO_FRAME_PROB),
        translate=gated(noise.randn(f"{stream}.translate", (2,)), "translate_gate", p),
    )


class AugmentPipe:
    """EDM's ``AugmentPipe`` as SiD configures it (see the module docstring), with position-tied randomness."""

    def __init__(self, p: float) -> None:
        self.p = float(p)  # probability of each transform (the x-flip is drawn whenever p > 0)

    def __call__(self, images: torch.Tensor, noise: Noise, stream: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(augmented images [B, C, H, W], augmentation labels [B, 9] float32).

        Every draw is ``noise.rand/randn(f"{stream}.<what>", shape)``, so calls with different ``stream``
        are independent. With p = 0 the images are returned as they are, with zero labels.
        """
        batch, _, height, width = images.shape
        if self.p == 0:
            return images, torch.zeros(batch, AUGMENT_DIM, device=images.device)
        params = draw_params(noise, stream, self.p)
        params = AugmentParams(**{k: v.to(images.device) for k, v in vars(params).items()})
        images = torch.where(params.xflip.reshape(-1, 1, 1, 1) == 1, images.flip(3), images)
        images = torch.where(params.yflip.reshape(-1, 1, 1, 1) == 1, images.flip(2), images)
        images = warp(images, params.inverse_matrix(height, width))
        return images, params.labels()


def warp(images: torch.Tensor, g_inv: torch.Tensor) -> torch.Tensor:
    """Resample ``images`` [B, C, H, W] so that output pixel q takes the input's value at G⁻¹·q (centred pixels).

    The image is reflect-padded (far enough for every sample's corners, at most H − 1 / W − 1 per side),
    upsampled 2×, sampled bilinearly (zeros beyond the padded image), then low-passed back to H × W.
    """
    batch, channels, height, width = images.shape
    left, top, right, bottom = _margins(g_inv, height, width)
    images = F.pad(images, [left, right, top, bottom], mode="reflect")
    images = _upsample(images)
    out_h, out_w = (height + 2 * BORDER) * 2, (width + 2 * BORDER) * 2
    theta = _sampling_theta(g_inv, (left - right) / 2, (top - bottom) / 2, images.shape[-2:], (out_h, out_w))
    grid = F.affine_grid(theta[:, :2, :], [batch, channels, out_h, out_w], align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return _downsample(images)[:, :, BORDER:-BORDER, BORDER:-BORDER]


def _margins(g_inv: torch.Tensor, height: int, width: int) -> list[int]:
    """Reflect padding [left, top, right, bottom]: the farthest any sample's image corner is read outside
    the image, plus twice the filtering border, clipped to [0, size − 1] and rounded up."""
    cx, cy = (width - 1) / 2, (height - 1) / 2
    corners = _constant(((-cx, cx, cx, -cx), (-cy, -cy, cy, cy), (1, 1, 1, 1)), g_inv.device)
    reach = (g_inv @ corners)[:, :2, :].transpose(0, 1).flatten(1)  # [xy, batch · corner]
    margin = torch.cat([-reach, reach]).amax(dim=1)  # left, top, right, bottom, relative to the centre
    margin = margin + _constant((2 * BORDER - cx, 2 * BORDER - cy) * 2, g_inv.device)
    limit = _constant((width - 1, height - 1) * 2, g_inv.device)
    margin = margin.clamp(min=torch.zeros_like(limit), max=limit)
    return margin.ceil().to(torch.int64).tolist()


def _sampling_theta(g_inv: torch.Tensor, shift_x: float, shift_y: float, in_size: torch.Size,
                    out_size: tuple[int, int]) -> torch.Tensor:
    """G⁻¹ rewritten for ``affine_grid`` (align_corners=False): from normalised coordinates of the 2× output
    grid to normalised coordinates of the 2× padded input. The padded image's centre is (shift_x, shift_y)
    off the original's; a point at x (centred pixels) lies at 2x − 1/2 in centred pixels of the 2× grid."""
    (in_h, in_w), (out_h, out_w) = in_size, out_size
    g = _affine(1, 1, shift_x, shift_y, g_inv.device) @ g_inv
    g = _affine(2, 2, 0, 0, g_inv.device) @ g @ _affine(0.5, 0.5, 0, 0, g_inv.device)
    g = _affine(1, 1, -0.5, -0.5, g_inv.device) @ g @ _affine(1, 1, 0.5, 0.5, g_inv.device)
    return _affine(2 / in_w, 2 / in_h, 0, 0, g_inv.device) @ g @ _affine(out_w / 2, out_h / 2, 0, 0, g_inv.device)


def _upsample(images: torch.Tensor) -> torch.Tensor:
    """2× upsampling, x then y: zeros between the pixels, then convolution with the filter (the adjoint of
    ``_downsample``). [.., H, W] → [.., 2H, 2W]; input pixel i becomes pixel 2i."""
    kernel = _filter(images).flip(-1)
    for axis in (3, 2):
        shape = list(images.shape)
        shape[axis] = 2 * shape[axis] - 1
        spread = images.new_zeros(shape)
        spread[(slice(None),) * axis + (slice(None, None, 2),)] = images
        images = _correlate(spread, kernel, axis, padding=len(SYM6) // 2)
    return images


def _downsample(images: torch.Tensor) -> torch.Tensor:
    """2× downsampling, x then y: correlation with the filter at stride 2. [.., 2H, 2W] → [.., H, W]."""
    kernel = _filter(images)
    for axis in (3, 2):
        images = _correlate(images, kernel, axis, padding=FILTER_PAD, stride=2)
    return images


def _correlate(images: torch.Tensor, kernel: torch.Tensor, axis: int, padding: int, stride: int = 1) -> torch.Tensor:
    """Depthwise 1-D correlation with ``kernel`` [C, 1, K] along x (axis 3) or y (axis 2), zero-padded."""
    groups = kernel.shape[0]
    if axis == 3:
        return F.conv2d(images, kernel[:, :, None, :], stride=(1, stride), padding=(0, padding), groups=groups)
    return F.conv2d(images, kernel[:, :, :, None], stride=(stride, 1), padding=(padding, 0), groups=groups)


def _filter(images: torch.Tensor) -> torch.Tensor:
    """The filter as one depthwise kernel per channel, [C, 1, 12]."""
    return _constant(SYM6, images.device, images.dtype).repeat(images.shape[1], 1, 1)


def _affine(sx: float, sy: float, tx: float, ty: float, device: torch.device) -> torch.Tensor:
    """The constant [[sx, 0, tx], [0, sy, ty], [0, 0, 1]] (float32)."""
    return _constant(((sx, 0, tx), (0, sy, ty), (0, 0, 1)), device)


@functools.lru_cache(maxsize=256)
def _constant(values: tuple, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A constant tensor, made once per device (as EDM's ``misc.constant``): a call of the pipeline in the
    training step copies nothing from the host and waits for nothing but its padding size."""
    return torch.tensor(values, dtype=dtype, device=device)


def _matrix(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor, e: torch.Tensor,
            f: torch.Tensor) -> torch.Tensor:
    """Per-sample affine matrices [[a, b, c], [d, e, f], [0, 0, 1]] from [B] entries: [B, 3, 3]."""
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([a, b, c, d, e, f, zero, zero, one], dim=1).reshape(-1, 3, 3)


def _inverse_scaling(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros_like(sx)
    return _matrix(1 / sx, zero, zero, zero, 1 / sy, zero)


def _rotation(angle: torch.Tensor) -> torch.Tensor:
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    return _matrix(cos, -sin, zero, sin, cos, zero)


def _translation(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    zero, one = torch.zeros_like(tx), torch.ones_like(tx)
    return _matrix(one, zero, tx, zero, one, ty)
