"""Batched augmentation of pre-processed image tensors, on whatever device the batch is on.

Two parts, both seeded by a ``torch.Generator`` on the CPU (so a batch gets the same augmentation on
every device, every process and every resume):

* :func:`shift_batch` — a random translation by up to ``pad`` pixels (edge padding, then a crop back) and
  an optional left-right flip: the classic augmentation, per image exactly as :func:`oodforge.data.augment`
  of one image.
* :class:`CovariateAugment` — covariate shifts that keep the class, so that the detector learns that
  they are ID (full-spectrum OOD): small rotations / scalings / translations (one affine warp), Gaussian
  blur and down-up resampling, each image with probability ``p``. They cover the csID suite's
  families (:mod:`oodforge.data.shifts`) without copying its exact settings: ranges, not points.

Blur, resampling and the warp are linear with weights summing to 1, so they commute with the per-channel
normalisation and run on normalised tensors; the warp fills with the border (``padding_mode="border"``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from oodforge.config import StrictModel


def shift_batch(
    x: torch.Tensor, generator: torch.Generator, pad: int = 2, hflip: bool = False
) -> torch.Tensor:
    """Translate each image of ``x`` ``[N, C, H, W]`` by up to ``pad`` px (edge padding), flip at random if ``hflip``."""
    n, _, h, w = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
        offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator).tolist()
        x = torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])
    if hflip:
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
    return x


def gaussian_kernels(sigmas: torch.Tensor, radius: int) -> torch.Tensor:
    """Normalised 2-D Gaussian kernels ``[N, 2r+1, 2r+1]``, one per sigma (pixels)."""
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-(t.view(1, -1) ** 2) / (2 * sigmas.float().clamp_min(1e-3).view(-1, 1) ** 2))
    g = g / g.sum(1, keepdim=True)
    return g.unsqueeze(2) * g.unsqueeze(1)


def blur_batch(x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Each image of ``x`` blurred with its own Gaussian sigma (replicate padding), in one grouped conv."""
    n, c, h, w = x.shape
    radius = max(1, math.ceil(3 * float(sigmas.max())))
    k = gaussian_kernels(sigmas, radius).to(x.device, x.dtype)
    weight = k.repeat_interleave(c, dim=0).unsqueeze(1)  # [N*C, 1, k, k]
    padded = F.pad(x.reshape(1, n * c, h, w), (radius,) * 4, mode="replicate")
    return F.conv2d(padded, weight, groups=n * c).reshape(n, c, h, w)


def resample_batch(x: torch.Tensor, factors: list[float]) -> torch.Tensor:
    """Each image down-sampled by its factor (bilinear, antialiased) and back up (bilinear)."""
    h, w = x.shape[-2:]
    out = x.clone()
    for f in sorted(set(factors)):
        idx = [i for i, v in enumerate(factors) if v == f]
        small = F.interpolate(
            x[idx],
            size=(max(2, round(h * f)), max(2, round(w * f))),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
        out[idx] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    return out


def affine_batch(
    x: torch.Tensor, degrees: torch.Tensor, scales: torch.Tensor, shifts: torch.Tensor
) -> torch.Tensor:
    """Rotate (degrees), scale and translate (``shifts`` in pixels, ``[N, 2]``) each image about its centre."""
    n, _, h, w = x.shape
    a = torch.deg2rad(degrees.float())
    cos, sin = torch.cos(a) / scales, torch.sin(a) / scales
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    theta[:, 0, 2] = -2 * shifts[:, 0] / w
    theta[:, 1, 2] = -2 * shifts[:, 1] / h
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class CovariateAugment(StrictModel):
    """Class-preserving covariate shifts applied during training (``train.covariate``); ``p: 0`` is off.

    Each image is shifted with probability ``p``; a shifted image gets the affine warp, and independently
    with probability 1/2 each a blur and a down-up resampling.

    Attributes:
        p: Probability that an image is shifted at all.
        degrees: Largest rotation either way.
        scale: Range of the zoom factor.
        translate: Largest translation in pixels.
        blur_sigma: Range of the Gaussian blur's sigma (pixels).
        resample: Range of the down-sampling factor before the resize back.
    """

    p: float = Field(0.0, ge=0, le=1)
    degrees: float = Field(15.0, ge=0, le=180)
    scale: tuple[float, float] = (0.8, 1.2)
    translate: float = Field(3.0, ge=0)
    blur_sigma: tuple[float, float] = (0.3, 1.2)
    resample: tuple[float, float] = (0.4, 0.9)

    @model_validator(mode="after")
    def _ranges(self) -> CovariateAugment:
        for name in ("scale", "blur_sigma", "resample"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(
                    f"train.covariate.{name} must be (low, high) with 0 < low <= high, got {(lo, hi)}"
                )
        if self.resample[1] > 1:
            raise ValueError(f"train.covariate.resample factors must be at most 1, got {self.resample}")
        return self

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The batch ``x`` ``[N, C, H, W]`` with the shifts drawn from ``generator``."""
        if self.p <= 0:
            return x
        n = len(x)
        chosen = torch.rand(n, generator=generator) < self.p
        u = torch.rand(n, 8, generator=generator)  # every draw made for every image: draws do not depend on p
        idx = torch.nonzero(chosen).flatten().tolist()
        if not idx:
            return x
        sub = x[idx]
        u = u[idx]
        degrees = (2 * u[:, 0] - 1) * self.degrees
        scales = self.scale[0] + u[:, 1] * (self.scale[1] - self.scale[0])
        shifts = (2 * u[:, 2:4] - 1) * self.translate
        sub = affine_batch(sub, degrees, scales, shifts)
        blur = (u[:, 4] < 0.5).nonzero().flatten().tolist()
        if blur:
            sigmas = self.blur_sigma[0] + u[blur, 5] * (self.blur_sigma[1] - self.blur_sigma[0])
            sub[blur] = blur_batch(sub[blur], sigmas)
        down = (u[:, 6] < 0.5).nonzero().flatten().tolist()
        if down:
            lo, hi = self.resample
            # factors on an 8-step grid, so each distinct size is one interpolate call
            grid = [lo + (hi - lo) * k / 7 for k in range(8)]
            factors = [grid[min(7, int(v * 8))] for v in u[down, 7].tolist()]
            sub[down] = resample_batch(sub[down], factors)
        out = x.clone()
        out[idx] = sub
        return out
