"""Image sets, benchmarks and the ``BENCHMARKS`` registry (a benchmark = ID splits + named OOD sets).

An :class:`ImageSet` yields ``(RGB PIL image, label)`` pairs (label -1 for OOD images); a
:class:`Benchmark` bundles the ID train/val/test sets with OOD sets marked ``near`` or ``far``.
``load_benchmark(DataConfig(...))`` builds the benchmark named in the config and adds the extra OOD
folders it lists.

Example:
    >>> bench = load_benchmark(DataConfig(benchmark="mnist-open", seed=0))
    >>> image, label = bench.train[0]
    >>> bench.near(), bench.far()
    (['digits-6-9'], ['faces', 'textures', 'photos', 'noise'])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import AliasChoices, Field, model_validator

from oodforge.config import StrictModel
from oodforge.registry import Registry

Shift = Literal["near", "far"]
"""How far an OOD set is from ID: ``near`` (semantic shift only) or ``far`` (other images altogether)."""


class ImageSet(torch.utils.data.Dataset):
    """A sized sequence of ``(RGB PIL image, label)`` with ``labels`` as int64 ``[N]`` (-1 = OOD).

    Subclasses set ``name`` and ``labels`` and implement ``__getitem__``.
    """

    name: str
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        raise NotImplementedError(f"{type(self).__name__} must implement __getitem__")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, n={len(self)})"


def _as_labels(name: str, labels: np.ndarray, n: int, what: str) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.int64)
    if labels.ndim != 1 or len(labels) != n:
        raise ValueError(
            f"image set {name!r}: {n} {what} but labels of shape {labels.shape}; pass one label per image"
        )
    return labels


class ArrayImageSet(ImageSet):
    """Images held in memory as a uint8 array ``[N, H, W, 3]``.

    Args:
        name: Name of the set (used in logs and reports).
        images: uint8 array ``[N, H, W, 3]``.
        labels: Integer labels ``[N]`` (-1 for OOD).
    """

    def __init__(self, name: str, images: np.ndarray, labels: np.ndarray) -> None:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"image set {name!r}: expected uint8 images [N, H, W, 3], got {images.dtype} {images.shape}; "
                "convert grey images with np.repeat(x[..., None], 3, axis=-1)"
            )
        self.name = name
        self.images = images
        self.labels = _as_labels(name, labels, len(images), "images")

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[i]), int(self.labels[i])


class FileImageSet(ImageSet):
    """Images decoded lazily from files and converted to RGB.

    Args:
        name: Name of the set.
        paths: One image file per item.
        labels: Integer labels ``[N]`` (-1 for OOD).
    """

    def __init__(self, name: str, paths: list[Path], labels: np.ndarray) -> None:
        self.name = name
        self.paths = [Path(p) for p in paths]
        self.labels = _as_labels(name, labels, len(self.paths), "files")

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        path = self.paths[i]
        try:
            with Image.open(path) as im:
                return im.convert("RGB"), int(self.labels[i])
        except OSError as err:
            raise OSError(f"cannot read image {path}: {err}; remove or replace the file") from None


class RawGeometry(StrictModel):
    """How a benchmark made its training copies from the raw source images (train/serve parity).

    ``mnist-open`` pads each 28x28 MNIST digit by 2 black pixels to 32x32: ``RawGeometry(side=28,
    pad_to=32)``. An input of exactly ``side`` x ``side`` pixels is the raw form of the source data, so
    the detector pads it the same way (centred, ``fill``) before the usual resize, and scores it as its
    training copy; any other size is resized as usual.

    Attributes:
        side: Side of the raw source images.
        pad_to: Side the benchmark pads them to (centred).
        fill: Grey value (0..255) of the padding.
    """

    side: int = Field(ge=1)
    pad_to: int = Field(ge=1)
    fill: int = Field(0, ge=0, le=255)

    @model_validator(mode="after")
    def _pad_grows(self) -> RawGeometry:
        if self.pad_to < self.side:
            raise ValueError(f"raw.pad_to ({self.pad_to}) must be at least raw.side ({self.side})")
        return self

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Float ``[N, 3, side, side]`` in 0..1 -> ``[N, 3, pad_to, pad_to]``, centred on ``fill``."""
        before = (self.pad_to - self.side) // 2
        after = self.pad_to - self.side - before
        return F.pad(x, (before, after, before, after), mode="constant", value=self.fill / 255.0)

    def raw_form(self, image: Image.Image) -> Image.Image:
        """A training copy back in its raw form: the centre ``side/pad_to`` crop at ``side`` x ``side``."""
        w, h = image.size
        cw, ch = round(w * self.side / self.pad_to), round(h * self.side / self.pad_to)
        left, top = (w - cw) // 2, (h - ch) // 2
        crop = image.crop((left, top, left + cw, top + ch))
        return (
            crop
            if crop.size == (self.side, self.side)
            else crop.resize((self.side, self.side), Image.BILINEAR)
        )


@dataclass
class OODSet:
    """An OOD image set and its :data:`Shift`: ``near`` (semantic shift only) or ``far`` OOD."""

    images: ImageSet
    shift: Shift


@dataclass
class Benchmark:
    """ID train/val/test splits with their class names, and OOD sets labelled near or far.

    Attributes:
        ood: The test OOD sets (reporting only).
        val_ood: Validation OOD sets, from sources distinct from every test set (OpenOOD v1.5): what
            score selection and recipe choices may read, with ID val and held-out synthetic data.
        extra_ood: More test OOD families, reported beside ``ood`` (and outside its near/far means),
            read by no choice.
        raw: How the training copies were made from the raw source images (``None``: they are the
            source images), recorded in the detector's pre-processing for train/serve parity.
    """

    name: str
    class_names: list[str]
    train: ImageSet
    val: ImageSet
    test: ImageSet
    ood: dict[str, OODSet] = field(default_factory=dict)
    val_ood: dict[str, OODSet] = field(default_factory=dict)
    extra_ood: dict[str, OODSet] = field(default_factory=dict)
    raw: RawGeometry | None = None

    def near(self) -> list[str]:
        """Names of the near-OOD sets, in insertion order."""
        return [n for n, s in self.ood.items() if s.shift == "near"]

    def far(self) -> list[str]:
        """Names of the far-OOD sets, in insertion order."""
        return [n for n, s in self.ood.items() if s.shift == "far"]


class OODDirConfig(StrictModel):
    """An extra OOD set: every image under ``path`` (recursively), ``near`` or ``far`` (``kind`` is an alias)."""

    path: Path
    shift: Shift = Field("far", validation_alias=AliasChoices("shift", "kind"))


class DataConfig(StrictModel):
    """Which benchmark to load and how to split it.

    Attributes:
        benchmark: A name in ``BENCHMARKS`` (``mnist-open``, ``imagefolder``, ``cifar10``, ``cifar100``).
        root: Data directory for the benchmarks read from disk.
        ood: Extra OOD sets, ``name -> {path, shift}``, each a folder of images.
        builtin_ood: Keep the benchmark's own OOD sets (``false``: only the ``ood`` folders are test OOD).
        seed: Seed of the splits and of the generated OOD sets.
        val_fraction: Share of ID images used for validation.
        test_fraction: Share of ID images used for testing (where the benchmark has no fixed test set).
        image_size: Side of the images of the in-memory benchmarks (mnist-open, cifar); folder images are
            decoded at their own size and resized by the model's ``Preprocess``.
    """

    benchmark: str = "mnist-open"
    root: Path | None = None
    ood: dict[str, OODDirConfig] = {}
    builtin_ood: bool = True
    seed: int = 0
    val_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    image_size: int = Field(32, ge=8, le=1024)

    @model_validator(mode="after")
    def _fractions(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"data.val_fraction + data.test_fraction = {self.val_fraction + self.test_fraction:g} "
                "must be below 1 to leave a train split; lower one of them"
            )
        return self


BENCHMARKS: Registry[Callable[[DataConfig], Benchmark]] = Registry("benchmark")


def stratified_split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic per-class split of indices into train/val/test.

    Each class is shuffled with ``seed`` and cut at ``round(n_c * val_fraction)`` and
    ``round(n_c * test_fraction)``, so every class has the same share in every split (within one image).

    Args:
        labels: Integer labels ``[N]``.
        val_fraction: Share of each class for validation, ``0 <= x < 1``.
        test_fraction: Share of each class for testing, ``0 <= x < 1``, with ``val + test < 1``.
        seed: Seed of the shuffle.

    Returns:
        Sorted int64 index arrays ``(train, val, test)``; together they are a partition of ``range(N)``.

    Example:
        >>> stratified_split(np.array([0, 0, 0, 0, 1, 1, 1, 1]), 0.25, 0.25, seed=0)[1].size
        2
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must each be in [0, 1) "
            "with a sum below 1"
        )
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[np.zeros(0, np.int64)] for _ in range(3)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val, n_test = round(len(idx) * val_fraction), round(len(idx) * test_fraction)
        parts[1].append(idx[:n_val])
        parts[2].append(idx[n_val : n_val + n_test])
        parts[0].append(idx[n_val + n_test :])
    train, val, test = (np.sort(np.concatenate(p)).astype(np.int64) for p in parts)
    return train, val, test


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 ``[N, H, W, 3]`` images to ``size`` x ``size`` (bilinear, antialiased); no-op if equal."""
    if images.shape[1:3] == (size, size):
        return images
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for k, image in enumerate(images):
        out[k] = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    return out
