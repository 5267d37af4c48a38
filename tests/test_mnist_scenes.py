"""mnist-scenes: the embedded dense benchmark (scenes of digits with per-pixel labels and anomaly maps)."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest
from scipy import ndimage

from oodforge.config import ConfigError, validate
from oodforge.data import mnist_scenes as ms
from oodforge.data.mnist_scenes import (
    ANOMALY_SETS,
    CLASS_NAMES,
    DENSE_BENCHMARKS,
    VOID,
    DenseBenchmark,
    SceneConfig,
    load_scenes,
    scaled_range,
)

SMALL = {"n_train": 40, "n_val": 10, "n_test_per_set": 5}
FAR = [k for k, v in ANOMALY_SETS.items() if v == "far"]


@pytest.fixture(scope="module")
def cfg() -> SceneConfig:
    return SceneConfig(**SMALL)


@pytest.fixture(scope="module")
def bench(cfg: SceneConfig) -> DenseBenchmark:
    return load_scenes(cfg)


def arrays(bench: DenseBenchmark) -> list[np.ndarray]:
    return [
        getattr(s, a) for s in (bench.train, bench.val, bench.test) for a in ("images", "labels", "anomaly")
    ]


# ---------------------------------------------------------------- determinism


def test_same_config_gives_identical_scenes_even_after_the_cache_is_cleared(bench: DenseBenchmark) -> None:
    ms._build.cache_clear()
    again = load_scenes(SceneConfig(**SMALL))
    assert all(a is not b for a, b in zip(arrays(bench), arrays(again), strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(arrays(bench), arrays(again), strict=True))
    assert again.test.anomalies == bench.test.anomalies


def test_a_different_seed_gives_different_scenes(bench: DenseBenchmark) -> None:
    other = load_scenes(SceneConfig(**SMALL, seed=1))
    for a, b in zip(arrays(bench), arrays(other), strict=True):
        assert a.shape == b.shape
    for split in ("train", "val", "test"):
        assert not np.array_equal(getattr(bench, split).images, getattr(other, split).images)
        assert not np.array_equal(getattr(bench, split).labels, getattr(other, split).labels)
    assert not np.array_equal(bench.test.anomaly, other.test.anomaly)  # train/val anomaly maps are all 0


def test_more_scenes_keep_the_earlier_ones(bench: DenseBenchmark) -> None:
    fewer = load_scenes(SceneConfig(n_train=15, n_val=10, n_test_per_set=3))
    assert np.array_equal(fewer.train.images, bench.train.images[:15])
    for kind in ANOMALY_SETS:
        assert np.array_equal(fewer.test.subset(kind).images, bench.test.subset(kind).images[:3])


def test_cached_arrays_are_read_only_and_the_benchmark_objects_are_fresh(bench: DenseBenchmark) -> None:
    for a in arrays(bench):
        assert not a.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        bench.train.images[0, 0, 0, 0] = 1
    again = load_scenes(SceneConfig(**SMALL))
    assert again is not bench and again.test.anomalies is not bench.test.anomalies
    again.test.anomalies.clear()  # mutating one caller's lists leaves the cache intact
    assert len(load_scenes(SceneConfig(**SMALL)).test.anomalies) == len(bench.test)


# ---------------------------------------------------------------- shapes and values


def test_shapes_dtypes_and_value_sets(cfg: SceneConfig, bench: DenseBenchmark) -> None:
    assert bench.name == "mnist-scenes"
    assert bench.class_names == CLASS_NAMES == ["background", "0", "1", "2", "3", "4", "5"]
    assert bench.shifts == ANOMALY_SETS
    s = cfg.size
    for split, n in ((bench.train, 40), (bench.val, 10), (bench.test, 5 * len(ANOMALY_SETS))):
        assert len(split) == n == len(split.anomalies)
        assert split.images.shape == (n, s, s, 3) and split.images.dtype == np.uint8
        assert split.labels.shape == split.anomaly.shape == (n, s, s)
        assert split.labels.dtype == split.anomaly.dtype == np.uint8
        assert set(np.unique(split.labels)) <= {*range(len(CLASS_NAMES)), VOID}
        assert set(np.unique(split.anomaly)) <= {0, 1, VOID}
    assert [bench.train.name, bench.val.name, bench.test.name] == ["train", "val", "test"]


def test_train_and_val_scenes_have_no_anomalies(bench: DenseBenchmark) -> None:
    for split in (bench.train, bench.val):
        assert not split.anomaly.any()
        assert split.anomalies == [""] * len(split)
        assert set(np.unique(split.labels)) >= {0, VOID}  # background and anti-aliased digit edges


def test_every_test_scene_has_anomalies_of_one_kind_with_void_labels(bench: DenseBenchmark) -> None:
    test = bench.test
    assert Counter(test.anomalies) == dict.fromkeys(ANOMALY_SETS, 5)
    assert test.anomalies == [k for k in ANOMALY_SETS for _ in range(5)]  # grouped in ANOMALY_SETS order
    assert ((test.anomaly == 1).sum(axis=(1, 2)) > 0).all()
    assert (test.labels[test.anomaly == 1] == VOID).all()
    assert (test.labels[test.anomaly == VOID] == VOID).all()  # anti-aliased anomaly edges
    assert (test.anomaly[test.labels < VOID] == 0).all()  # every labelled pixel is an inlier
    near = test.subset("digits-6-9")
    assert (near.anomaly == VOID).any()  # anomaly digits have anti-aliased edges
    for kind in FAR:
        assert not (test.subset(kind).anomaly == VOID).any()  # squares are opaque: no edges


def test_subset_selects_one_anomaly_set_and_rejects_unknown_ones(bench: DenseBenchmark) -> None:
    for kind in ANOMALY_SETS:
        sub = bench.test.subset(kind)
        idx = [i for i, k in enumerate(bench.test.anomalies) if k == kind]
        assert len(sub) == 5 and sub.anomalies == [kind] * 5 and sub.name == f"test-{kind}"
        assert np.array_equal(sub.images, bench.test.images[idx])
        assert np.array_equal(sub.labels, bench.test.labels[idx])
        assert np.array_equal(sub.anomaly, bench.test.anomaly[idx])
        assert not sub.images.flags.writeable
    assert len(bench.test.subset("")) == 0
    assert len(bench.train.subset("")) == len(bench.train)
    assert len(bench.train.subset("faces")) == 0
    with pytest.raises(KeyError, match=r"unknown anomaly set 'noise'; choose one of: digits-6-9, faces"):
        bench.test.subset("noise")


# ---------------------------------------------------------------- content


def present_classes(labels: np.ndarray) -> set[int]:
    return set(np.unique(labels).tolist()) - {0, VOID}


def test_each_scene_holds_between_one_and_the_maximum_number_of_digits(
    cfg: SceneConfig, bench: DenseBenchmark
) -> None:
    for split in (bench.train, bench.val, bench.test):
        for labels in split.labels:
            assert 1 <= len(present_classes(labels)) <= cfg.digits[1]
    # one digit per scene -> exactly one class per scene; over many scenes every class shows up
    one = load_scenes(SceneConfig(**SMALL, digits=(1, 1)))
    counts = [len(present_classes(labels)) for labels in one.train.labels]
    assert counts == [1] * len(one.train)
    assert set().union(*(present_classes(labels) for labels in one.train.labels)) == set(range(1, 7))


def test_digits_are_composited_bright_over_a_dark_background(bench: DenseBenchmark) -> None:
    for split in (bench.train, bench.test):
        grey = split.images.astype(np.float64)
        digit = (split.labels >= 1) & (split.labels <= 6)
        background = split.labels == 0
        # alpha >= 0.5 over a colour with every channel >= 150 -> every channel >= 75 (rounding: 74)
        assert grey[digit].min() >= 74
        assert grey[digit].mean() > 150
        assert grey[background].mean() < 50
        # the background is smooth: neighbouring background pixels differ little (noise sigma ~4)
        both = background[:, :, 1:] & background[:, :, :-1]
        assert np.abs(np.diff(grey, axis=2)[both]).mean() < 10
    near = bench.test.subset("digits-6-9")
    assert near.images[near.anomaly == 1].min() >= 74  # anomaly digits are composited the same way


def test_far_anomalies_are_full_axis_aligned_squares_of_the_configured_sides(
    cfg: SceneConfig, bench: DenseBenchmark
) -> None:
    lo, hi = scaled_range(cfg.anomaly_side, cfg.size)
    for kind in FAR:
        sub = bench.test.subset(kind)
        for anomaly, labels in zip(sub.anomaly, sub.labels, strict=True):
            components, n = ndimage.label(anomaly == 1)
            assert cfg.anomalies[0] <= n <= cfg.anomalies[1]
            sides = []
            for box in ndimage.find_objects(components):
                h, w = box[0].stop - box[0].start, box[1].stop - box[1].start
                assert h == w and lo <= h <= hi
                assert (components[box] > 0).all()  # filled: the square is whole
                sides.append(h)
            assert (anomaly == 1).sum() == sum(s * s for s in sides)
            assert (labels[anomaly == 1] == VOID).all()


def test_object_sides_scale_with_the_scene_size() -> None:
    small = load_scenes(SceneConfig(**SMALL, size=32))
    assert small.train.images.shape[1:] == (32, 32, 3)
    lo, hi = scaled_range((14, 26), 32)
    assert (lo, hi) == (7, 13)
    for kind in FAR:
        for anomaly in small.test.subset(kind).anomaly:
            for box in ndimage.find_objects(ndimage.label(anomaly == 1)[0]):
                assert lo <= box[0].stop - box[0].start <= hi


def test_objects_too_large_for_the_scene_raise_a_clear_error() -> None:
    with pytest.raises(ValueError, match="raise size or lower digit_side / anomaly_side"):
        load_scenes(SceneConfig(size=32, n_train=1, n_val=1, n_test_per_set=1, anomaly_side=(64, 64)))


# ---------------------------------------------------------------- config and registry


def test_scene_config_rejects_unknown_keys_and_bad_ranges() -> None:
    with pytest.raises(ConfigError, match="unknown key 'n_tests'"):
        validate(SceneConfig, {"n_tests": 3})
    with pytest.raises(ConfigError, match=r"digits = \(4, 2\) must be an inclusive range"):
        validate(SceneConfig, {"digits": [4, 2]})
    with pytest.raises(ConfigError, match=r"anomalies = \(0, 2\) must be an inclusive range .* 1 <= lo"):
        validate(SceneConfig, {"anomalies": [0, 2]})
    with pytest.raises(ConfigError, match="digit_side"):
        validate(SceneConfig, {"digit_side": [20, 10]})
    with pytest.raises(ConfigError, match=r"anomaly_side = \(14, 80\) .* at most 64"):
        validate(SceneConfig, {"anomaly_side": [14, 80]})
    with pytest.raises(ConfigError, match="size"):
        validate(SceneConfig, {"size": 16})
    with pytest.raises(ConfigError, match="n_test_per_set"):
        validate(SceneConfig, {"n_test_per_set": 0})
    assert validate(SceneConfig, {"digits": [3, 3], "size": 48}).digits == (3, 3)


def test_unknown_dense_benchmark_lists_the_registered_ones() -> None:
    assert "mnist-scenes" in DENSE_BENCHMARKS
    with pytest.raises(KeyError, match="unknown dense benchmark 'nope'; choose one of: mnist-scenes"):
        DENSE_BENCHMARKS.get("nope")
    with pytest.raises(KeyError, match="mnist-scenes"):
        load_scenes(SceneConfig(benchmark="nope"))


def test_default_config_builds_quickly_with_the_documented_sizes() -> None:
    ms._digits()  # MNIST parsing is shared with mnist-open; time the scenes themselves
    start = time.perf_counter()
    bench = load_scenes(SceneConfig())
    elapsed = time.perf_counter() - start
    assert (len(bench.train), len(bench.val), len(bench.test)) == (2000, 200, 400)
    assert Counter(bench.test.anomalies) == dict.fromkeys(ANOMALY_SETS, 100)
    assert not bench.train.anomaly.any() and ((bench.test.anomaly == 1).sum(axis=(1, 2)) > 0).all()
    # scenes are crowded enough: most training scenes show at least two digit classes
    assert np.mean([len(present_classes(labels)) >= 2 for labels in bench.train.labels]) > 0.8
    assert elapsed < 30, f"building the default mnist-scenes took {elapsed:.1f} s"
