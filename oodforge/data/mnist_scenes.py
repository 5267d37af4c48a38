"""``mnist-scenes``: the embedded dense benchmark for per-pixel anomaly segmentation (no download).

A scene is a ``size`` x ``size`` RGB image (64 by default): a smooth dark random background with 2-4
bright, randomly coloured MNIST digits 0-5 (the inlier classes ``1..6``; class 0 is the background).
Test scenes also hold 1-2 anomalies of one anomaly_set: digits 6-9 (``digits-6-9``, near) or opaque squares of
LFW faces, texture crops or photo crops from scikit-image (``faces``, ``textures``, ``photos``, far).

Each scene comes with a label map (inlier class per pixel, :data:`VOID` on anti-aliased digit edges and
on every anomaly pixel) and an anomaly map (1 anomaly, 0 inlier, :data:`VOID` on anti-aliased edges of
anomaly digits). The ID digit instances are split stratified into train/val/test pools, so test scenes
show unseen digits. Everything is a pure function of the :class:`SceneConfig`; built benchmarks are
cached in-process and their arrays are read-only: copy them (``a.copy()``) before writing.

Example:
    >>> bench = load_scenes(SceneConfig(n_train=40, n_val=10, n_test_per_set=5))
    >>> bench.test.images.shape, bench.test.anomalies[0]
    ((20, 64, 64, 3), 'digits-6-9')
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image
from pydantic import Field, model_validator

from oodforge.config import StrictModel
from oodforge.data.base import Shift, stratified_split
from oodforge.data.mnist_open import (
    ID_DIGITS,
    N_FACES,
    PHOTOS,
    TEXTURES,
    _read_only,
    _skimage,
    load_mnist,
    random_crops,
    to_rgb,
    to_uint8,
)
from oodforge.registry import Registry

VOID = 255  # ignore label, in label maps and anomaly maps
CLASS_NAMES = ["background"] + [str(d) for d in ID_DIGITS]  # digit d -> class d + 1
ANOMALY_SETS: dict[str, Shift] = {"digits-6-9": "near", "faces": "far", "textures": "far", "photos": "far"}

REFERENCE_SIZE = 64  # object sides in SceneConfig are in pixels of a 64 x 64 scene
GRID = 4  # the background is a GRID x GRID random colour field, upsampled bilinearly
BG_MAX = 70  # background colours are in [0, BG_MAX] per channel
NOISE_SIGMA = 4.0  # Gaussian noise on the background
COLOUR_MIN = 150  # digit colours are in [COLOUR_MIN, 255] per channel
EDGE_ALPHA = 0.02  # digit pixels with EDGE_ALPHA < alpha < 0.5 are VOID (anti-aliased edges)
GAP = 1  # free pixels between the bounding boxes of two objects
PLACE_TRIES = 30  # random positions tried per object before it is skipped
SCENE_TRIES = 100  # attempts at a scene that ends up with no digit (or, in test, no anomaly)
SPLITS = ("train", "val", "test")


@dataclass
class SceneSet:
    """Scenes with per-pixel labels and anomaly maps (arrays read-only when built by this module).

    Attributes:
        name: Name of the set (``train``, ``val``, ``test``, or ``test-<anomaly_set>`` for a subset).
        images: uint8 ``[N, S, S, 3]``.
        labels: uint8 ``[N, S, S]``: inlier class ``0..6`` per pixel (0 = background), :data:`VOID`
            on anti-aliased digit edges and on every anomaly pixel.
        anomaly: uint8 ``[N, S, S]``: 1 anomaly pixel, 0 inlier pixel, :data:`VOID` ignored.
        anomalies: Per scene, the anomaly set its anomalies come from (a key of :data:`ANOMALY_SETS`),
            ``""`` for none.
    """

    name: str
    images: np.ndarray
    labels: np.ndarray
    anomaly: np.ndarray
    anomalies: list[str]

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ValueError(
                f"scene set {self.name!r}: expected uint8 images [N, S, S, 3], "
                f"got {self.images.dtype} {self.images.shape}"
            )
        for what, a in (("labels", self.labels), ("anomaly", self.anomaly)):
            if a.shape != self.images.shape[:3] or a.dtype != np.uint8:
                raise ValueError(
                    f"scene set {self.name!r}: {what} must be uint8 {self.images.shape[:3]} like the images, "
                    f"got {a.dtype} {a.shape}"
                )
        if len(self.anomalies) != n:
            raise ValueError(
                f"scene set {self.name!r}: {n} scenes but {len(self.anomalies)} anomaly sets; pass one each"
            )

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return f"SceneSet(name={self.name!r}, n={len(self)})"

    def subset(self, anomaly_set: str) -> SceneSet:
        """The scenes whose anomalies are of ``anomaly_set`` (``""``: the scenes without anomalies).

        Args:
            anomaly_set: A key of :data:`ANOMALY_SETS`, or ``""``.

        Returns:
            A new set named ``<name>-<anomaly_set>`` with read-only copies of those scenes (possibly empty).

        Raises:
            KeyError: ``anomaly_set`` is not an anomaly set.
        """
        if anomaly_set != "" and anomaly_set not in ANOMALY_SETS:
            raise KeyError(
                f"unknown anomaly set {anomaly_set!r}; choose one of: {', '.join(ANOMALY_SETS)} "
                "(or '' for scenes without anomalies)"
            )
        keep = np.array([k == anomaly_set for k in self.anomalies], dtype=bool)
        return SceneSet(
            f"{self.name}-{anomaly_set or 'inlier'}",
            _read_only(self.images[keep]),
            _read_only(self.labels[keep]),
            _read_only(self.anomaly[keep]),
            [k for k in self.anomalies if k == anomaly_set],
        )


@dataclass
class DenseBenchmark:
    """Inlier train/val scenes, test scenes with anomalies, and each anomaly set's near/far tag.

    Attributes:
        name: Benchmark name.
        class_names: Name of each inlier class, index = label value (class 0 is the background).
        train: Inlier scenes only (anomaly maps all 0).
        val: Inlier scenes only, for threshold calibration.
        test: Scenes with anomalies of one anomaly_set each, grouped by anomaly_set in :data:`ANOMALY_SETS` order.
        shifts: Anomaly set -> ``near`` or ``far``.
    """

    name: str
    class_names: list[str]
    train: SceneSet
    val: SceneSet
    test: SceneSet
    shifts: dict[str, Shift]


class SceneConfig(StrictModel):
    """How to build a dense benchmark.

    Attributes:
        benchmark: A name in ``DENSE_BENCHMARKS`` (``mnist-scenes``).
        seed: Seed of the digit split and of every scene.
        size: Scene side in pixels.
        n_train: Number of training scenes (inliers only).
        n_val: Number of validation scenes (inliers only).
        n_test_per_set: Number of test scenes for each anomaly set.
        digits: Inclusive range of the number of inlier digits per scene.
        anomalies: Inclusive range of the number of anomalies per test scene.
        digit_side: Inclusive range of the side of a rendered 28 x 28 digit, in pixels of a 64 x 64 scene
            (scaled by ``size / 64``).
        anomaly_side: Inclusive range of the side of a far-anomaly square, in pixels of a 64 x 64 scene
            (scaled by ``size / 64``); near anomalies (digits) use ``digit_side``.

    Objects that do not fit into a crowded scene are skipped, so a scene may hold fewer than asked (but
    always at least one digit and, in test scenes, one anomaly).
    """

    benchmark: str = "mnist-scenes"
    seed: int = 0
    size: int = Field(64, ge=32, le=1024)
    n_train: int = Field(2000, ge=1)
    n_val: int = Field(200, ge=1)
    n_test_per_set: int = Field(100, ge=1)
    digits: tuple[int, int] = (2, 4)
    anomalies: tuple[int, int] = (1, 2)
    digit_side: tuple[int, int] = (18, 30)
    anomaly_side: tuple[int, int] = (14, 26)

    @model_validator(mode="after")
    def _ranges(self) -> SceneConfig:
        for name in ("digits", "anomalies", "digit_side", "anomaly_side"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(
                    f"{name} = ({lo}, {hi}) must be an inclusive range [lo, hi] with 1 <= lo <= hi; "
                    f"e.g. {name}: [{max(lo, 1)}, {max(lo, hi, 1)}]"
                )
        for name in ("digit_side", "anomaly_side"):
            hi = getattr(self, name)[1]
            if hi > REFERENCE_SIZE:
                raise ValueError(
                    f"{name} = {getattr(self, name)} is in pixels of a {REFERENCE_SIZE}-px scene (scaled to "
                    f"size); its upper bound must be at most {REFERENCE_SIZE} so that objects fit the scene"
                )
        return self


DENSE_BENCHMARKS: Registry[Callable[[SceneConfig], DenseBenchmark]] = Registry("dense benchmark")


# ---------------------------------------------------------------- raw material


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """MNIST sample as grey uint8 ``[N, 28, 28]`` and int64 labels (read-only)."""
    images, labels = load_mnist()
    return _read_only(np.ascontiguousarray(images[:, 2:30, 2:30, 0])), labels


@lru_cache(maxsize=1)
def _faces() -> np.ndarray:
    """The LFW faces of ``skimage.data.lfw_subset`` as grey uint8 ``[N_FACES, 25, 25]`` (read-only)."""
    return _read_only(to_uint8(np.asarray(_skimage("lfw_subset")[:N_FACES])))


@lru_cache(maxsize=8)
def _upsample_matrix(size: int, grid: int) -> np.ndarray:
    """float32 ``[size, grid]`` matrix of bilinear (corner-aligned) interpolation weights."""
    t = np.linspace(0.0, grid - 1.0, size)
    lo = np.minimum(np.floor(t).astype(np.int64), grid - 2)
    w = t - lo
    m = np.zeros((size, grid), dtype=np.float32)
    rows = np.arange(size)
    m[rows, lo] = 1.0 - w
    m[rows, lo + 1] = w
    return _read_only(m)


def scaled_range(side: tuple[int, int], size: int) -> tuple[int, int]:
    """A side range given in pixels of a 64-px scene, scaled to a ``size``-px scene (at least 1 px)."""
    lo, hi = (max(1, round(s * size / REFERENCE_SIZE)) for s in side)
    return lo, hi


# ---------------------------------------------------------------- rendering


def background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth dark random colour field with mild Gaussian noise: float32 ``[size, size, 3]`` in 0..255."""
    field = rng.uniform(0, BG_MAX, (GRID, GRID, 3)).astype(np.float32)
    m = _upsample_matrix(size, GRID)
    smooth = m @ np.einsum("yi,ijc->yjc", m, field)  # rows, then columns: [size, size, 3]
    noisy = smooth + rng.normal(0.0, NOISE_SIGMA, smooth.shape).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255)


def digit_alpha(digit: np.ndarray, side: int) -> np.ndarray:
    """A 28 x 28 grey digit resized to ``side`` (bilinear), as alpha in 0..1, cropped to its ink.

    Returns:
        float32 ``[h, w]`` with ``h, w <= side``: the bounding box of the pixels with alpha > EDGE_ALPHA.
    """
    resized = np.asarray(Image.fromarray(digit).resize((side, side), Image.BILINEAR), dtype=np.float32)
    alpha = resized / 255.0
    ink = alpha > EDGE_ALPHA
    if not ink.any():
        return alpha
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    return alpha[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def far_patch(anomaly_set: str, side: int, rng: np.random.Generator) -> np.ndarray:
    """An opaque uint8 ``[side, side, 3]`` square of far anomaly ``anomaly_set`` (``faces``/``textures``/``photos``)."""
    if anomaly_set == "faces":
        faces = _faces()
        return to_rgb(faces[int(rng.integers(len(faces)))], side)
    if anomaly_set == "textures":
        names: tuple[str, ...] = TEXTURES
    elif anomaly_set == "photos":
        names = PHOTOS
    else:
        raise KeyError(f"no far anomaly set {anomaly_set!r}; choose one of: faces, textures, photos")
    return random_crops(_skimage(names[int(rng.integers(len(names)))]), 1, rng, size=side)[0]


def overlaps(box: tuple[int, int, int, int], boxes: list[tuple[int, int, int, int]], gap: int = GAP) -> bool:
    """Whether ``box = (y, x, h, w)`` comes closer than ``gap`` pixels to any of ``boxes``."""
    y, x, h, w = box
    return any(
        y < by + bh + gap and by < y + h + gap and x < bx + bw + gap and bx < x + w + gap
        for by, bx, bh, bw in boxes
    )


def place(
    shape: tuple[int, int], size: int, boxes: list[tuple[int, int, int, int]], rng: np.random.Generator
) -> tuple[int, int] | None:
    """A random top-left corner for an ``(h, w)`` object fully inside the scene, clear of ``boxes``.

    Tries :data:`PLACE_TRIES` positions; returns ``None`` when none is free (the caller skips the object).
    """
    h, w = shape
    if h > size or w > size:
        return None
    for _ in range(PLACE_TRIES):
        y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        if not overlaps((y, x, h, w), boxes):
            return y, x
    return None


@dataclass
class _Object:
    """One thing to draw: a digit (``alpha`` + ``colour``) or an opaque square (``patch``)."""

    anomaly: bool
    cls: int = 0  # inlier class of an ID digit
    alpha: np.ndarray | None = None
    colour: np.ndarray | None = None
    patch: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        a = self.alpha if self.alpha is not None else self.patch
        assert a is not None
        return a.shape[0], a.shape[1]


def draw(obj: _Object, y: int, x: int, canvas: np.ndarray, labels: np.ndarray, anomaly: np.ndarray) -> None:
    """Composite ``obj`` at ``(y, x)`` onto ``canvas`` (float32) and write its labels and anomaly map."""
    h, w = obj.shape
    win = (slice(y, y + h), slice(x, x + w))
    if obj.patch is not None:
        canvas[win] = obj.patch
        labels[win] = VOID
        anomaly[win] = 1
        return
    assert obj.alpha is not None and obj.colour is not None
    a = obj.alpha[..., None]
    canvas[win] = canvas[win] * (1.0 - a) + obj.colour * a
    full = obj.alpha >= 0.5
    edge = (obj.alpha > EDGE_ALPHA) & ~full
    lab, anom = labels[win], anomaly[win]
    if obj.anomaly:
        lab[full | edge] = VOID
        anom[full] = 1
        anom[edge] = VOID
    else:
        lab[full] = obj.cls
        lab[edge] = VOID


# ---------------------------------------------------------------- scenes


@dataclass(frozen=True)
class _Sources:
    """The digit pools a split draws from: grey 28 x 28 digits and their inlier classes."""

    digits: np.ndarray
    classes: np.ndarray
    near: np.ndarray


def _objects(cfg: SceneConfig, src: _Sources, anomaly_set: str, rng: np.random.Generator) -> list[_Object]:
    """The objects of one scene (inlier digits, then anomalies of ``anomaly_set`` if any), in drawing order."""
    digit_side = scaled_range(cfg.digit_side, cfg.size)
    objs = []
    for _ in range(int(rng.integers(cfg.digits[0], cfg.digits[1] + 1))):
        k = int(rng.integers(len(src.digits)))
        side = int(rng.integers(digit_side[0], digit_side[1] + 1))
        colour = rng.integers(COLOUR_MIN, 256, 3).astype(np.float32)
        objs.append(_Object(False, int(src.classes[k]), digit_alpha(src.digits[k], side), colour))
    if anomaly_set:
        for _ in range(int(rng.integers(cfg.anomalies[0], cfg.anomalies[1] + 1))):
            if ANOMALY_SETS[anomaly_set] == "near":
                side = int(rng.integers(digit_side[0], digit_side[1] + 1))
                colour = rng.integers(COLOUR_MIN, 256, 3).astype(np.float32)
                digit = src.near[int(rng.integers(len(src.near)))]
                objs.append(_Object(True, alpha=digit_alpha(digit, side), colour=colour))
            else:
                lo, hi = scaled_range(cfg.anomaly_side, cfg.size)
                objs.append(_Object(True, patch=far_patch(anomaly_set, int(rng.integers(lo, hi + 1)), rng)))
    return [objs[i] for i in rng.permutation(len(objs))]


def make_scene(
    cfg: SceneConfig, src: _Sources, anomaly_set: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scene of ``cfg.size`` px with anomalies of ``anomaly_set`` (``""``: none).

    Objects that find no free spot are skipped; a scene without a digit (or, with ``anomaly_set``, without an
    anomaly) is drawn again, up to :data:`SCENE_TRIES` times.

    Returns:
        uint8 image ``[S, S, 3]``, label map ``[S, S]`` and anomaly map ``[S, S]``.

    Raises:
        ValueError: No valid scene after :data:`SCENE_TRIES` attempts (objects too large for the scene).
    """
    s = cfg.size
    for _ in range(SCENE_TRIES):
        canvas = background(s, rng)
        labels = np.zeros((s, s), dtype=np.uint8)
        anomaly = np.zeros((s, s), dtype=np.uint8)
        boxes: list[tuple[int, int, int, int]] = []
        n_digits = n_anomalies = 0
        for obj in _objects(cfg, src, anomaly_set, rng):
            spot = place(obj.shape, s, boxes, rng)
            if spot is None:
                continue
            boxes.append((*spot, *obj.shape))
            draw(obj, *spot, canvas, labels, anomaly)
            n_anomalies += obj.anomaly
            n_digits += not obj.anomaly
        if n_digits and (n_anomalies or not anomaly_set):
            image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
            return image, labels, anomaly
    raise ValueError(
        f"could not fit a digit{' and an anomaly' if anomaly_set else ''} into a {s}-px scene in {SCENE_TRIES} "
        "attempts; raise size or lower digit_side / anomaly_side"
    )


def make_scenes(
    cfg: SceneConfig, src: _Sources, split: int, anomaly_sets: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scene ``i`` of split ``split`` with anomalies of ``anomaly_sets[i]``, each from its own seed.

    Scene ``i`` is drawn with ``default_rng([cfg.seed, 2, split, anomaly-set index + 1 (0: none), j])``, ``j``
    its index among the scenes of that anomaly_set, so growing ``n_*`` keeps the earlier scenes.
    """
    s, n = cfg.size, len(anomaly_sets)
    images = np.empty((n, s, s, 3), dtype=np.uint8)
    labels = np.empty((n, s, s), dtype=np.uint8)
    anomaly = np.empty((n, s, s), dtype=np.uint8)
    set_index = {k: i + 1 for i, k in enumerate(ANOMALY_SETS)} | {"": 0}
    seen: dict[str, int] = {}
    for i, anomaly_set in enumerate(anomaly_sets):
        j = seen.get(anomaly_set, 0)
        seen[anomaly_set] = j + 1
        rng = np.random.default_rng([cfg.seed, 2, split, set_index[anomaly_set], j])
        images[i], labels[i], anomaly[i] = make_scene(cfg, src, anomaly_set, rng)
    return _read_only(images), _read_only(labels), _read_only(anomaly)


@lru_cache(maxsize=4)
def _build(
    key: tuple[tuple[str, Any], ...],
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray, list[str]], ...]:
    """The (images, labels, anomaly, anomaly_sets) of train/val/test for a config given as sorted items."""
    cfg = SceneConfig(**dict(key))
    digits, labels = _digits()
    is_id = np.isin(labels, ID_DIGITS)
    id_digits, id_classes = digits[is_id], (labels[is_id] + 1).astype(np.uint8)
    near = digits[~is_id]
    pools = stratified_split(labels[is_id], 0.1, 0.2, cfg.seed)
    counts = (cfg.n_train, cfg.n_val)
    out = []
    for split, pool in enumerate(pools):
        src = _Sources(id_digits[pool], id_classes[pool], near)
        if split < 2:
            anomaly_sets = [""] * counts[split]
        else:
            anomaly_sets = [k for k in ANOMALY_SETS for _ in range(cfg.n_test_per_set)]
        out.append((*make_scenes(cfg, src, split, anomaly_sets), anomaly_sets))
    return tuple(out)


@DENSE_BENCHMARKS.register("mnist-scenes")
def mnist_scenes(cfg: SceneConfig) -> DenseBenchmark:
    """Build ``mnist-scenes`` for ``cfg`` (cached: equal configs share the same read-only arrays).

    Args:
        cfg: Scene config; ``benchmark`` is not used.

    Returns:
        ``n_train`` / ``n_val`` inlier scenes and ``n_test_per_set`` test scenes for each anomaly set
        (in :data:`ANOMALY_SETS` order). The arrays are read-only; copy before writing.
    """
    key = tuple(sorted(cfg.model_dump(exclude={"benchmark"}).items()))
    train, val, test = (
        SceneSet(name, images, labels, anomaly, list(anomaly_sets))
        for name, (images, labels, anomaly, anomaly_sets) in zip(SPLITS, _build(key), strict=True)
    )
    return DenseBenchmark("mnist-scenes", list(CLASS_NAMES), train, val, test, dict(ANOMALY_SETS))


def load_scenes(cfg: SceneConfig) -> DenseBenchmark:
    """Build the dense benchmark named by ``cfg.benchmark``.

    Raises:
        KeyError: ``cfg.benchmark`` is not registered (the message lists the registered names).
    """
    return DENSE_BENCHMARKS.get(cfg.benchmark)(cfg)
