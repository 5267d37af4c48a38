"""uint8 image-array helpers shared by the embedded benchmarks: grey/float/bool to RGB, random crops."""

from __future__ import annotations

import numpy as np
from PIL import Image

SIZE = 32


def to_rgb(image: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Any grey/RGB(A) image (uint8, bool, or float in 0..1) -> uint8 ``size`` x ``size`` x 3 (bilinear)."""
    image = to_uint8(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    pil = Image.fromarray(np.ascontiguousarray(image[..., :3]))
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.BILINEAR)
    return np.asarray(pil, dtype=np.uint8)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Convert to uint8: bool -> {0, 255}; float in 0..1 -> 0..255 (rounded, clipped); uint8 unchanged."""
    if image.dtype == np.uint8:
        return image
    if image.dtype == bool:
        return image.astype(np.uint8) * 255
    if np.issubdtype(image.dtype, np.floating) and image.max() <= 1.0:
        image = image * 255.0
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def random_crops(
    image: np.ndarray, n: int, rng: np.random.Generator, lo: int = 64, hi: int = 128, size: int = SIZE
) -> np.ndarray:
    """``n`` random square crops with side in ``[lo, hi]`` (clipped to the image), resized to ``size``."""
    image = to_uint8(image)
    h, w = image.shape[:2]
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for k in range(n):
        side = int(rng.integers(min(lo, h, w), min(hi, h, w) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        out[k] = to_rgb(image[y : y + side, x : x + side], size)
    return out
