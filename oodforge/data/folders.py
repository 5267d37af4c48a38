"""Real user data from local disk (no download): ImageFolder trees and CIFAR-10/100 python pickles.

Registers the ``imagefolder``, ``cifar10`` and ``cifar100`` benchmarks, and provides
``folder_ood_set`` for the extra OOD folders of ``DataConfig.ood``.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from oodforge.config import ConfigError
from oodforge.data.base import (
    BENCHMARKS,
    ArrayImageSet,
    Benchmark,
    DataConfig,
    FileImageSet,
    resize_images,
    stratified_split,
)

log = logging.getLogger(__name__)
EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
SPLITS = ("train", "val", "test")
IMAGEFOLDER_LAYOUT = "root/<class>/<images> or root/{train,val,test}/<class>/<images>"
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:  # PIL raises many exception types for broken files
        return False


def scan_images(root: Path) -> tuple[list[Path], list[Path]]:
    """All image files under ``root`` (recursively, sorted), split into readable and unreadable ones.

    Unreadable files (``PIL.Image.verify`` fails) are logged in one warning with their count and first names.

    Args:
        root: Directory to scan; hidden files and directories (``.name``) are ignored.

    Returns:
        ``(readable, unreadable)`` lists of paths.
    """
    files = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and p.is_file()
    )
    good: list[Path] = []
    bad: list[Path] = []
    for p in files:
        (good if _readable(p) else bad).append(p)
    if bad:
        shown = ", ".join(str(p) for p in bad[:5]) + (", ..." if len(bad) > 5 else "")
        log.warning("skipped %d unreadable image file(s) under %s: %s", len(bad), root, shown)
    return good, bad


def _class_dirs(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _class_tree(root: Path, class_names: list[str]) -> tuple[list[Path], np.ndarray]:
    """Readable images of ``root/<class>/`` for each class, labelled by position in ``class_names``."""
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        if (root / name).is_dir():
            found, _ = scan_images(root / name)
            paths += found
            labels += [label] * len(found)
    return paths, np.asarray(labels, dtype=np.int64)


def _require_root(cfg: DataConfig, what: str) -> Path:
    if cfg.root is None:
        raise ConfigError(f"benchmark {cfg.benchmark!r} needs data.root: {what}")
    root = Path(cfg.root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {root} does not exist; it should be {what}")
    return root


@BENCHMARKS.register("imagefolder")
def imagefolder(cfg: DataConfig) -> Benchmark:
    """Images from ``cfg.root`` laid out as ``root/{train,val,test}/<class>/*`` or ``root/<class>/*``.

    Class names are the sorted class sub-directory names (of ``train/`` in the split layout). With the
    flat layout every class is split stratified by ``cfg.val_fraction``/``test_fraction``/``seed``; the
    split layout is used whenever ``root/train/`` exists, and a missing ``val/`` or ``test/`` is then
    carved out of ``train/`` the same way.
    Unreadable files are skipped with a warning.

    Args:
        cfg: Data config with ``root`` set.

    Returns:
        The benchmark, with no OOD sets of its own (add them with ``cfg.ood``).

    Raises:
        FileNotFoundError: ``root`` does not exist or has no class sub-directories.
        ValueError: A split has no readable images, or val/test has classes that train lacks.
    """
    root = _require_root(cfg, f"an image folder: {IMAGEFOLDER_LAYOUT}")
    split_layout = (root / "train").is_dir()
    if not split_layout and any((root / s).is_dir() for s in SPLITS[1:]):
        raise FileNotFoundError(f"{root} has val/ or test/ but no train/; expected {IMAGEFOLDER_LAYOUT}")
    top = root / "train" if split_layout else root
    names = _class_dirs(top)
    if not names:
        raise FileNotFoundError(f"{top} has no class sub-directories; expected {IMAGEFOLDER_LAYOUT}")
    paths, labels = _class_tree(top, names)
    if split_layout:
        given = [s for s in SPLITS[1:] if (root / s).is_dir()]
        for s in given:
            extra = sorted(set(_class_dirs(root / s)) - set(names))
            if extra:
                raise ValueError(
                    f"{root / s} has classes that {top} lacks: {extra}; every class needs train images"
                )
        val_share = 0.0 if "val" in given else cfg.val_fraction
        test_share = 0.0 if "test" in given else cfg.test_fraction
        idx = stratified_split(labels, val_share, test_share, cfg.seed)
        split = {s: ([paths[j] for j in i], labels[i]) for s, i in zip(SPLITS, idx, strict=True)}
        for s in given:
            split[s] = _class_tree(root / s, names)
    else:
        idx = stratified_split(labels, cfg.val_fraction, cfg.test_fraction, cfg.seed)
        split = {s: ([paths[j] for j in i], labels[i]) for s, i in zip(SPLITS, idx, strict=True)}
    for s, (files, _) in split.items():
        if not files:
            raise ValueError(
                f"the {s} split of {root} has no readable images; add images"
                + ("" if split_layout else " or change data.val_fraction / data.test_fraction")
            )
    sets = {s: FileImageSet(f"id-{s}", files, lab) for s, (files, lab) in split.items()}
    return Benchmark(f"imagefolder:{root.name}", names, sets["train"], sets["val"], sets["test"], {})


def folder_ood_set(name: str, path: Path) -> FileImageSet:
    """Every readable image under ``path`` (recursively) as an OOD set with label -1.

    Raises:
        FileNotFoundError: ``path`` is not a directory.
        ValueError: It holds no readable image.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"data.ood.{name}: directory {path} does not exist; point path at a folder of images"
        )
    paths, _ = scan_images(path)
    if not paths:
        raise ValueError(
            f"data.ood.{name}: no readable images under {path} (extensions: {', '.join(sorted(EXTENSIONS))})"
        )
    return FileImageSet(name, paths, np.full(len(paths), -1))


def _unpickle(path: Path, archive: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; download the {archive} 'python version' archive from {CIFAR_URL}, "
            "extract it and point data.root at the extracted directory"
        )
    with path.open("rb") as f:
        return pickle.load(f, encoding="bytes")  # the official CIFAR format is a pickle of arrays


def _cifar_arrays(batch: dict, label_key: bytes, path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        data, labels = (
            np.asarray(batch[b"data"], dtype=np.uint8),
            np.asarray(batch[label_key], dtype=np.int64),
        )
    except KeyError as err:
        raise ValueError(
            f"{path} lacks the key {err.args[0]!r}; is it a CIFAR python-version batch?"
        ) from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(f"{path}: expected data [N, 3072] and N labels, got {data.shape} and {labels.shape}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # rows are R, G, B planes of 32x32
    return np.ascontiguousarray(images), labels


def _cifar(
    cfg: DataConfig,
    archive: str,
    train_files: list[str],
    test_file: str,
    meta: str,
    label_key: bytes,
    names_key: bytes,
) -> Benchmark:
    root = _require_root(
        cfg, f"the extracted {archive} python directory (with {', '.join([*train_files, test_file, meta])})"
    )
    batches = [_cifar_arrays(_unpickle(root / f, archive), label_key, root / f) for f in train_files]
    x, y = np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
    x_test, y_test = _cifar_arrays(_unpickle(root / test_file, archive), label_key, root / test_file)
    names = [
        n.decode() if isinstance(n, bytes) else str(n) for n in _unpickle(root / meta, archive)[names_key]
    ]
    x, x_test = resize_images(x, cfg.image_size), resize_images(x_test, cfg.image_size)
    train, val, _ = stratified_split(y, cfg.val_fraction, 0.0, cfg.seed)
    return Benchmark(
        cfg.benchmark,
        names,
        ArrayImageSet("id-train", x[train], y[train]),
        ArrayImageSet("id-val", x[val], y[val]),
        ArrayImageSet("id-test", x_test, y_test),
        {},
    )


@BENCHMARKS.register("cifar10")
def cifar10(cfg: DataConfig) -> Benchmark:
    """CIFAR-10 from ``data.root`` = ``cifar-10-batches-py``.

    val is ``cfg.val_fraction`` of the five train batches (stratified); test is ``test_batch``
    (``cfg.test_fraction`` is not used).
    """
    files = [f"data_batch_{i}" for i in range(1, 6)]
    return _cifar(cfg, "CIFAR-10", files, "test_batch", "batches.meta", b"labels", b"label_names")


@BENCHMARKS.register("cifar100")
def cifar100(cfg: DataConfig) -> Benchmark:
    """CIFAR-100 (fine labels) from ``data.root`` = ``cifar-100-python``.

    val is ``cfg.val_fraction`` of ``train`` (stratified); test is ``test``.
    """
    return _cifar(cfg, "CIFAR-100", ["train"], "test", "meta", b"fine_labels", b"fine_label_names")
