"""Image sets, benchmarks and the ``BENCHMARKS`` registry (a benchmark = ID splits + named OOD sets)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field, model_validator

from oodforge.config import StrictModel
from oodforge.registry import Registry

Kind = Literal["near", "far"]


class ImageSet(torch.utils.data.Dataset):
    """A sized sequence of ``(RGB PIL image, label)``; label is -1 for OOD images."""

    name: str
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        raise NotImplementedError


class ArrayImageSet(ImageSet):
    """Images held in memory as a uint8 array ``[N, H, W, 3]``."""

    def __init__(self, name: str, images: np.ndarray, labels: np.ndarray) -> None:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"{name}: expected uint8 images [N, H, W, 3], got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{name}: {len(images)} images but {len(labels)} labels")
        self.name = name
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[i]), int(self.labels[i])


class FileImageSet(ImageSet):
    """Images decoded lazily from files (converted to RGB)."""

    def __init__(self, name: str, paths: list[Path], labels: np.ndarray) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{name}: {len(paths)} files but {len(labels)} labels")
        self.name = name
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        try:
            with Image.open(self.paths[i]) as im:
                return im.convert("RGB"), int(self.labels[i])
        except OSError as err:
            raise OSError(f"cannot read image {self.paths[i]}: {err}; remove or replace the file") from None


@dataclass
class OODSet:
    images: ImageSet
    kind: Kind


@dataclass
class Benchmark:
    """ID train/val/test splits with their class names, and OOD sets labelled near or far."""

    name: str
    class_names: list[str]
    train: ImageSet
    val: ImageSet
    test: ImageSet
    ood: dict[str, OODSet] = field(default_factory=dict)

    def near(self) -> list[str]:
        return [n for n, s in self.ood.items() if s.kind == "near"]

    def far(self) -> list[str]:
        return [n for n, s in self.ood.items() if s.kind == "far"]


class OODDirConfig(StrictModel):
    """An extra OOD set: every image under ``path`` (recursively)."""

    path: Path
    kind: Kind = "far"


class DataConfig(StrictModel):
    """Which benchmark to load and how to split it."""

    benchmark: str = "mnist-open"
    root: Path | None = None
    ood: dict[str, OODDirConfig] = {}
    seed: int = 0
    val_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    image_size: int = Field(32, ge=8)

    @model_validator(mode="after")
    def _fractions(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("data.val_fraction + data.test_fraction must be below 1 to leave a train split")
        return self


BENCHMARKS: Registry[Callable[[DataConfig], Benchmark]] = Registry("benchmark")


def stratified_split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic per-class split of indices into train/val/test (each class split in the same shares)."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val, n_test = round(len(idx) * val_fraction), round(len(idx) * test_fraction)
        parts[1].append(idx[:n_val])
        parts[2].append(idx[n_val : n_val + n_test])
        parts[0].append(idx[n_val + n_test :])
    train, val, test = (np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts)
    return train, val, test


def load_benchmark(cfg: DataConfig) -> Benchmark:
    """Build the benchmark named by ``cfg.benchmark`` and add the OOD folders of ``cfg.ood``."""
    bench = BENCHMARKS.get(cfg.benchmark)(cfg)
    if cfg.ood:
        from oodforge.data.folders import folder_ood_set

        for name, spec in cfg.ood.items():
            bench.ood[name] = OODSet(folder_ood_set(name, spec.path), spec.kind)
    return bench
