"""Datasets: image sets, benchmarks (ID splits + near/far OOD sets), their registry and transforms.

Importing this package registers the built-in benchmarks: ``mnist-open`` (embedded, the default),
``imagefolder``, ``cifar10`` and ``cifar100`` (local files, no download), and the dense benchmark
``mnist-scenes`` (per-pixel labels; ``DENSE_BENCHMARKS`` in ``oodforge.data.mnist_scenes``).
"""

from oodforge.data import folders, mnist_open, mnist_scenes  # noqa: F401  (registers the benchmarks)
from oodforge.data.base import (
    BENCHMARKS,
    ArrayImageSet,
    Benchmark,
    DataConfig,
    FileImageSet,
    ImageSet,
    OODDirConfig,
    OODSet,
    Shift,
    stratified_split,
)
from oodforge.data.benchmarks import load_benchmark
from oodforge.data.transforms import Preprocess, TransformedSet, augment

__all__ = [
    "BENCHMARKS",
    "ArrayImageSet",
    "Benchmark",
    "DataConfig",
    "FileImageSet",
    "ImageSet",
    "OODDirConfig",
    "OODSet",
    "Shift",
    "Preprocess",
    "TransformedSet",
    "augment",
    "load_benchmark",
    "stratified_split",
]
