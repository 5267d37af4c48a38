"""Covariate shifts of ID images (full-spectrum OOD, Yang et al. 2022; OpenOOD v1.5 "csID").

A covariate-shifted ID image is still ID: the digit, resampled, blurred, rotated a little or
re-encoded, keeps its class, and a detector that rejects it is wrong, not strict. :data:`SHIFTS` maps a
name to a pure function ``shift(image, rng) -> image`` on one PIL RGB image; a shift may change the
image's size (``upscale-4x`` sends a 4x larger image, which the detector's ``Preprocess`` resizes back,
as a client's upload would be). :func:`csid_sets` applies every shift to an ID split, each image with
its own seeded generator, so the suite is a pure function of ``(images, seed)``.

The generator-based shifts (the generator's VAE round trip, generated ID-class images) need the
generator and come from the synth stage's reference pools (:mod:`oodforge.reference`), not from here.

Example:
    >>> sets = csid_sets(bench.test, seed=0)
    >>> sets["blur-0.7"][0][0].size
    (32, 32)
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

from oodforge.data.base import ImageSet
from oodforge.registry import Registry

ShiftFn = Callable[[Image.Image, np.random.Generator], Image.Image]
SHIFTS: Registry[ShiftFn] = Registry("covariate shift")


def _border_colour(image: Image.Image) -> tuple[int, ...]:
    """The median colour of the image's one-pixel frame (the background a shift fills with)."""
    a = np.asarray(image.convert("RGB"))
    frame = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    return tuple(int(v) for v in np.median(frame, axis=0))


def zoom(image: Image.Image, factor: float, resample: Image.Resampling = Image.BILINEAR) -> Image.Image:
    """Scale the content by ``factor`` about the centre and keep the size (the frame colour fills in)."""
    w, h = image.size
    if factor >= 1:  # crop the centre 1/factor and resize it back up
        cw, ch = max(1, round(w / factor)), max(1, round(h / factor))
        left, top = (w - cw) // 2, (h - ch) // 2
        return image.crop((left, top, left + cw, top + ch)).resize((w, h), resample)
    small = image.resize((max(1, round(w * factor)), max(1, round(h * factor))), resample)
    canvas = Image.new("RGB", (w, h), _border_colour(image))
    canvas.paste(small, ((w - small.width) // 2, (h - small.height) // 2))
    return canvas


@SHIFTS.register("zoom-in-1.14")
def zoom_in(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The content resampled 1.14x larger (a 28-px digit resized to 32 instead of padded)."""
    return zoom(image, 32 / 28)


@SHIFTS.register("zoom-out-0.85")
def zoom_out(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The content resampled to 85% of its size, centred on the frame colour."""
    return zoom(image, 0.85)


@SHIFTS.register("upscale-4x")
def upscale(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Sent at 4x the side (bicubic); the detector's pre-processing resizes it back."""
    return image.resize((image.width * 4, image.height * 4), Image.BICUBIC)


@SHIFTS.register("downscale-0.75")
def downscale(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Sent at 3/4 of the side (bilinear); the detector's pre-processing upsamples it."""
    return image.resize(
        (max(1, round(image.width * 0.75)), max(1, round(image.height * 0.75))), Image.BILINEAR
    )


@SHIFTS.register("rotate-10")
def rotate(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Rotated by 10 degrees, either way at random (bilinear, the frame colour fills the corners)."""
    angle = 10.0 if rng.random() < 0.5 else -10.0
    return image.rotate(angle, resample=Image.BILINEAR, fillcolor=_border_colour(image))


@SHIFTS.register("shift-3px")
def translate(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Moved by 3 pixels along a random axis and direction (the frame colour fills in)."""
    dx, dy = [(3, 0), (-3, 0), (0, 3), (0, -3)][int(rng.integers(4))]
    canvas = Image.new("RGB", image.size, _border_colour(image))
    canvas.paste(image, (dx, dy))
    return canvas


@SHIFTS.register("blur-0.7")
def blur(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Gaussian blur, sigma 0.7 pixels."""
    return image.filter(ImageFilter.GaussianBlur(radius=0.7))


@SHIFTS.register("jpeg-75")
def jpeg(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Re-encoded as a quality-75 JPEG (4:2:0 chroma subsampling, as most encoders do)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=75)
    buf.seek(0)
    with Image.open(buf) as decoded:
        return decoded.convert("RGB")


def _morphology(image: Image.Image, filt: ImageFilter.Filter) -> Image.Image:
    """A 3x3 grey morphology at twice the resolution (about half a pixel at the image's own scale)."""
    big = image.resize((image.width * 2, image.height * 2), Image.BILINEAR)
    return big.filter(filt).resize(image.size, Image.BILINEAR)


@SHIFTS.register("stroke-thicker")
def thicker(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Bright strokes about one pixel wider (grey dilation)."""
    return _morphology(image, ImageFilter.MaxFilter(3))


@SHIFTS.register("stroke-thinner")
def thinner(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Bright strokes about one pixel narrower (grey erosion)."""
    return _morphology(image, ImageFilter.MinFilter(3))


class ShiftedSet(ImageSet):
    """An ID image set seen through one shift; image ``i`` uses a generator seeded by ``(seed, i)``.

    Args:
        base: The ID images (their labels are kept: a shifted image keeps its class).
        shift: Name of a registered shift.
        seed: Seed of the per-image randomness.
    """

    def __init__(self, base: ImageSet, shift: str, seed: int = 0) -> None:
        self.base = base
        self.fn = SHIFTS.get(shift)
        self.name = f"{base.name}/{shift}"
        self.labels = base.labels
        self.seed = seed
        self._salt = sum(shift.encode())

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        image, label = self.base[i]
        rng = np.random.default_rng([self.seed, self._salt, int(i)])
        return self.fn(image.convert("RGB"), rng), label


def csid_sets(images: ImageSet, seed: int = 0, names: list[str] | None = None) -> dict[str, ImageSet]:
    """Every registered shift (or those in ``names``) of ``images``, keyed by the shift's name."""
    return {name: ShiftedSet(images, name, seed) for name in (names or list(SHIFTS))}
