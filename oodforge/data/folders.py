"""Real user data from local disk (no download): ImageFolder trees and CIFAR-10/100 python pickles."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from oodforge.data.base import BENCHMARKS, ArrayImageSet, Benchmark, DataConfig, FileImageSet, stratified_split

log = logging.getLogger(__name__)
EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
SPLITS = ("train", "val", "test")


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:  # PIL raises many types for broken files
        return False


def scan_images(root: Path) -> tuple[list[Path], list[Path]]:
    """All image files under ``root`` (sorted), split into readable and corrupt ones."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)
    good, bad = [], []
    for p in files:
        (good if _readable(p) else bad).append(p)
    if bad:
        shown = ", ".join(str(p) for p in bad[:5]) + (" …" if len(bad) > 5 else "")
        log.warning("skipped %d unreadable image file(s) under %s: %s", len(bad), root, shown)
    return good, bad


def _class_tree(root: Path, class_names: list[str] | None = None) -> tuple[list[Path], np.ndarray, list[str]]:
    names = class_names or sorted(d.name for d in root.iterdir() if d.is_dir())
    if not names:
        raise FileNotFoundError(f"{root} has no class sub-directories; expected {root}/<class name>/<image files>")
    paths, labels = [], []
    for label, name in enumerate(names):
        found, _ = scan_images(root / name) if (root / name).is_dir() else ([], [])
        paths += found
        labels += [label] * len(found)
    if not paths:
        raise ValueError(f"no readable images under {root}; expected {root}/<class name>/<image files>")
    return paths, np.asarray(labels, dtype=np.int64), names


@BENCHMARKS.register("imagefolder")
def imagefolder(cfg: DataConfig) -> Benchmark:
    """``root/{train,val,test}/<class>/*`` or ``root/<class>/*`` (then split by ``cfg`` fractions)."""
    root = _require_root(cfg, "an ImageFolder directory: root/<class>/<images> or root/{train,val,test}/<class>/")
    if all((root / s).is_dir() for s in SPLITS):
        _, _, names = _class_tree(root / "train")
        sets = {}
        for s in SPLITS:
            paths, labels, _ = _class_tree(root / s, names)
            sets[s] = FileImageSet(f"id-{s}", paths, labels)
    else:
        paths, labels, names = _class_tree(root)
        idx = stratified_split(labels, cfg.val_fraction, cfg.test_fraction, cfg.seed)
        sets = {s: FileImageSet(f"id-{s}", [paths[j] for j in i], labels[i]) for s, i in zip(SPLITS, idx, strict=True)}
    for s, images in sets.items():
        if len(images) == 0:
            raise ValueError(f"the {s} split of {root} is empty; add images or change data.*_fraction")
    return Benchmark(f"imagefolder:{root.name}", names, sets["train"], sets["val"], sets["test"], {})


def folder_ood_set(name: str, path: Path) -> FileImageSet:
    """Every readable image under ``path`` as an OOD set (label -1)."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"OOD set {name!r}: directory {path} does not exist")
    paths, _ = scan_images(Path(path))
    if not paths:
        raise ValueError(f"OOD set {name!r}: no readable images under {path}")
    return FileImageSet(name, paths, np.full(len(paths), -1))


def _require_root(cfg: DataConfig, what: str) -> Path:
    if cfg.root is None:
        raise ValueError(f"benchmark {cfg.benchmark!r} needs data.root: {what}")
    root = Path(cfg.root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {root} does not exist; it should be {what}")
    return root


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; download the CIFAR 'python version' archive from "
            "https://www.cs.toronto.edu/~kriz/cifar.html and extract it, then point data.root at the directory"
        )
    with path.open("rb") as f:
        return pickle.load(f, encoding="bytes")  # the official CIFAR format is a pickle of arrays


def _cifar_arrays(batch: dict, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(data), np.asarray(batch[label_key], dtype=np.int64)


def _cifar(cfg: DataConfig, train_files: list[str], test_file: str, meta: str, label_key: bytes, names_key: bytes) -> Benchmark:
    root = _require_root(cfg, f"the extracted CIFAR python directory (with {test_file} and {meta})")
    parts = [_cifar_arrays(_unpickle(root / f), label_key) for f in train_files]
    x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    xt, yt = _cifar_arrays(_unpickle(root / test_file), label_key)
    names = [n.decode() for n in _unpickle(root / meta)[names_key]]
    share = cfg.val_fraction / (1 - cfg.test_fraction)  # val is taken from the official train part
    train, val, _ = stratified_split(y, share, 0.0, cfg.seed) if share > 0 else (np.arange(len(y)), [], [])
    return Benchmark(
        f"{cfg.benchmark}",
        names,
        ArrayImageSet("id-train", x[train], y[train]),
        ArrayImageSet("id-val", x[val], y[val]),
        ArrayImageSet("id-test", xt, yt),
        {},
    )


@BENCHMARKS.register("cifar10")
def cifar10(cfg: DataConfig) -> Benchmark:
    """CIFAR-10 from ``data.root`` = ``cifar-10-batches-py``; val is carved out of the train batches."""
    files = [f"data_batch_{i}" for i in range(1, 6)]
    return _cifar(cfg, files, "test_batch", "batches.meta", b"labels", b"label_names")


@BENCHMARKS.register("cifar100")
def cifar100(cfg: DataConfig) -> Benchmark:
    """CIFAR-100 (fine labels) from ``data.root`` = ``cifar-100-python``."""
    return _cifar(cfg, ["train"], "test", "meta", b"fine_labels", b"fine_label_names")
