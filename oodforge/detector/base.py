"""The detector contract: one base class, one registry of kinds, one loader.

A detector is a model, its :class:`~oodforge.detector.spec.DetectorSpec` and the device it runs on.
Every kind (``classifier``, ``dense``, or one a user adds in one file) subclasses :class:`Detector`,
sets ``kind`` and its ``Head`` model (the spec's kind-specific section), implements
:meth:`Detector.predict_pixels` and :meth:`Detector.from_parts`, and registers itself with
:func:`register_kind`. Everything else — pre-processing, batching, ``predict`` on images, bytes or
tensors, saving, loading with checksums, ``describe`` for the API and reports — is shared.

Example:
    >>> detector = Detector.load("runs/oal/detector")     # any kind: the registry picks the class
    >>> out = detector.predict([PIL.Image.open("x.png")])
    >>> out.scores, out.is_ood, out.label_names()
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from PIL import Image
from pydantic import ValidationError
from torch import nn

from oodforge.artifacts import (
    SPEC_FILE,
    WEIGHTS_FILE,
    ArtifactError,
    library_versions,
    read_json,
    read_weights,
    write_artifact,
)
from oodforge.config import StrictModel
from oodforge.data.transforms import Preprocess
from oodforge.detector.prediction import Prediction
from oodforge.detector.spec import (
    FORMAT_VERSION,
    Calibration,
    DetectorSpec,
    InputSpec,
    Provenance,
    ScoreSpec,
    upgrade_v1,
)
from oodforge.images import decode_image, to_rgb
from oodforge.registry import Registry

ImageInput = Image.Image | bytes | str | Path
D = TypeVar("D", bound="Detector")

KINDS: Registry[type[Detector]] = Registry("detector kind")
"""Kind name -> :class:`Detector` subclass; ``detector.json``'s ``kind`` picks the class that loads it."""

ENTRY_POINT_GROUP = "oodforge.detector_kinds"
PLUGINS_ENV = "OODFORGE_PLUGINS"
"""Environment variable naming plugin modules (comma-separated) that :func:`load_plugins` imports."""


def register_kind(name: str) -> Callable[[type[D]], type[D]]:
    """Class decorator: register a :class:`Detector` subclass under ``name`` (sets its ``kind``)."""

    def add(cls: type[D]) -> type[D]:
        cls.kind = name
        KINDS.register(name)(cls)
        return cls

    return add


def load_plugins(modules: Sequence[str] = ()) -> list[str]:
    """Import the modules that register detector kinds and return their names.

    Those are ``modules``, the comma-separated modules of the ``OODFORGE_PLUGINS`` environment variable
    (so every command, not only the server, finds the kinds a user registered) and the installed
    ``oodforge.detector_kinds`` entry points.
    """
    names = list(modules)
    names += [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
    names += [ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ArtifactError(f"detector plugin module {name!r} cannot be imported: {err}") from None
    return names


class Detector:
    """A model, its spec (pre-processing, score, threshold, head) and a device; see the module docstring.

    Attributes:
        kind: Registry name of the class (set by :func:`register_kind`).
        Head: Pydantic model of the spec's ``head`` section.
        has_labels: Whether predictions carry a class label and confidence per image.
        has_maps: Whether predictions carry per-pixel maps (``/score?maps=true``).
        model: The torch model, in eval mode on ``device``.
        spec: The ``detector.json`` content.
        head: ``spec.head`` validated into ``Head``.
    """

    kind: ClassVar[str] = ""
    Head: ClassVar[type[StrictModel]] = StrictModel
    has_labels: ClassVar[bool] = False
    has_maps: ClassVar[bool] = False

    def __init__(self, model: nn.Module, spec: DetectorSpec, device: str | torch.device = "cpu") -> None:
        """Wrap ``model`` with its ``spec``; the head section is validated here."""
        self.model = model.eval().to(device)
        self.spec = spec
        self.head = self.Head.model_validate(spec.head)
        self.device = torch.device(device)

    # ---------------------------------------------------------------- what the spec says
    @property
    def name(self) -> str:
        """The detector's name."""
        return self.spec.name

    @property
    def threshold(self) -> float:
        """``is_ood = score < threshold``."""
        return self.spec.threshold

    @property
    def class_names(self) -> list[str]:
        """The ID class names."""
        return self.spec.class_names

    @property
    def preprocess(self) -> Preprocess:
        """The pre-processing every image goes through."""
        return self.spec.preprocess

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of one model input."""
        size = self.spec.preprocess.size
        return (3, size, size)

    # ---------------------------------------------------------------- inference
    def decode(self, data: bytes, what: str = "image", *, draft: bool = True) -> Image.Image:
        """Encoded bytes -> the RGB image this detector scores (the server's decoder and settings).

        With ``draft`` (the server's ``limits.jpeg_draft``, on by default) a JPEG is decoded at the
        smallest DCT scale that keeps both sides at least the model input's (:mod:`oodforge.images`).
        """
        side = self.input_shape[-1] if draft else None
        return decode_image(data, what, background=self.spec.input.background, draft=side)

    def pixels(self, images: Sequence[ImageInput] | ImageInput | torch.Tensor) -> torch.Tensor:
        """Pre-processed model input ``[N, 3, S, S]`` of PIL images, encoded bytes, file paths or a tensor.

        A tensor is ``[N, 3, H, W]`` (or ``[3, H, W]``) RGB, uint8 0..255 or float 0..1.
        """
        if isinstance(images, torch.Tensor):
            batch = images.unsqueeze(0) if images.ndim == 3 else images
            return self.preprocess.tensor(batch)
        if isinstance(images, (Image.Image, bytes, str, Path)):
            images = [images]
        if len(images) == 0:
            raise ValueError("predict() got no images")
        return torch.stack([self.preprocess(self._rgb(im, i)) for i, im in enumerate(images)])

    def _rgb(self, image: ImageInput, index: int) -> Image.Image:
        if isinstance(image, Image.Image):
            return to_rgb(image, self.spec.input.background)
        if isinstance(image, (str, Path)):
            return self.decode(Path(image).read_bytes(), f"image {index} ({image})")
        if isinstance(image, (bytes, bytearray)):
            return self.decode(bytes(image), f"image {index}")
        raise TypeError(
            f"image {index} is a {type(image).__name__}; pass PIL images, bytes, paths or a tensor"
        )

    @torch.no_grad()
    def predict(
        self, images: Sequence[ImageInput] | ImageInput | torch.Tensor, batch_size: int = 256
    ) -> Prediction:
        """Score images: PIL images (any mode and size), encoded bytes, file paths, or an RGB tensor.

        Returns:
            :class:`Prediction`: ``scores`` (higher = more in-distribution), ``is_ood``
            (``score < threshold``) and, depending on the kind, labels and confidences or maps.
        """
        pixels = self.pixels(images)
        parts = [self.predict_pixels(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)]
        return Prediction.concat(parts)

    def predict_pixels(self, pixel_values: torch.Tensor) -> Prediction:
        """:class:`Prediction` of already pre-processed pixels ``[N, 3, S, S]`` (one forward pass)."""
        raise NotImplementedError(f"{type(self).__name__} must implement predict_pixels")

    def render_map(self, score_map: np.ndarray, size: tuple[int, int]) -> dict[str, Any]:
        """One per-pixel map as an image the size ``(height, width)`` of the input (kinds with maps).

        Returns ``{"png": bytes, "encoding": str, "range": (lo, hi), "pixel_threshold": float,
        "pixel_score": str}``.
        """
        raise TypeError(f"detector {self.name!r} is a {self.kind}: it has no per-pixel maps")

    # ---------------------------------------------------------------- description
    def describe_score(self) -> dict[str, Any]:
        """How this detector scores an image (``describe()["score"]``); kinds add their own fields."""
        return self.spec.score.model_dump()

    def describe(self) -> dict[str, Any]:
        """What the API's detector info and the reports show: the same fields for every kind."""
        spec = self.spec
        return {
            "name": spec.name,
            "kind": self.kind,
            "version": spec.version,
            "created": spec.provenance.created,
            "classes": spec.class_names,
            "has_labels": self.has_labels,
            "has_maps": self.has_maps,
            "input": {"shape": list(self.input_shape), **spec.input.model_dump(mode="json")},
            "preprocess": spec.preprocess.model_dump(mode="json"),
            "score": self.describe_score(),
            "threshold": {
                "value": spec.threshold,
                **spec.calibration.model_dump(exclude={"histogram"}),  # bins: spec.calibration.histogram
                "score": spec.score.name,
            },
            "metrics": spec.metrics,
        }

    # ---------------------------------------------------------------- persistence
    def tensors(self) -> dict[str, torch.Tensor]:
        """The weights file's content: the model's state under ``model.``."""
        return {f"model.{k}": v for k, v in self.model.state_dict().items()}

    def save(self, path: str | Path) -> Path:
        """Write the artifact atomically (temp dir + rename); an existing directory is replaced."""
        self.spec = write_artifact(path, self.tensors(), self.spec)
        return Path(path)

    @classmethod
    def from_parts(
        cls: type[D], spec: DetectorSpec, tensors: dict[str, torch.Tensor], device: str | torch.device
    ) -> D:
        """Rebuild the detector from its spec and weights (raise ``ValueError``/``KeyError`` if they do not fit)."""
        raise NotImplementedError(f"{cls.__name__} must implement from_parts")

    @classmethod
    def load(cls: type[D], path: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> D:
        """Load an artifact directory of any registered kind (of this class's kind when called on one).

        Raises:
            ArtifactError: missing, incomplete, tampered-with or malformed artifact, or a kind that
                is not registered; the message says what to do.
        """
        path = Path(path)
        spec = read_spec(path)
        loader = _kind_class(spec.kind, path)
        if cls is not Detector and not issubclass(loader, cls):
            raise ArtifactError(
                f"{path} is a {spec.kind} detector, not a {cls.kind}; load it with Detector.load(path)"
            )
        tensors = read_weights(path, spec.weights_sha256, verify)
        try:
            return loader.from_parts(spec, tensors, device)
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            raise ArtifactError(
                f"the {spec.kind} detector in {path} cannot be rebuilt: {err}; re-export it with the "
                "training command that made it (trainer/train.py or trainer/train_dense.py)"
            ) from None


def _kind_class(kind: str, path: Path) -> type[Detector]:
    if kind not in KINDS:
        load_plugins()
    try:
        return KINDS.get(kind)
    except KeyError as err:
        raise ArtifactError(
            f"{path / SPEC_FILE}: {err.args[0]}; import the module that defines it "
            "(OODFORGE_PLUGINS / load_plugins) or upgrade oodforge"
        ) from None


def read_spec(path: Path) -> DetectorSpec:
    """``detector.json`` of ``path`` as a :class:`DetectorSpec` (format-1 files are upgraded)."""
    data = read_json(path)
    if data.get("format_version", 1) < FORMAT_VERSION:
        data = upgrade_v1(data)
    try:
        return DetectorSpec.model_validate(data)
    except ValidationError as err:
        keys = ", ".join(".".join(map(str, e["loc"])) for e in err.errors())
        raise ArtifactError(
            f"{path / SPEC_FILE} is malformed (problem with: {keys}); re-export the detector with the "
            "training command that made it"
        ) from None


def make_spec(
    *,
    kind: str,
    name: str,
    preprocess: Preprocess,
    class_names: list[str],
    score: ScoreSpec,
    threshold: float,
    calibration: Calibration,
    head: StrictModel,
    metrics: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    input_spec: InputSpec | None = None,
) -> DetectorSpec:
    """Assemble ``detector.json`` content; the checksums are filled in by :meth:`Detector.save`."""
    return DetectorSpec(
        kind=kind,
        name=name,
        input=input_spec or InputSpec(),
        preprocess=preprocess,
        class_names=class_names,
        score=score,
        threshold=threshold,
        calibration=calibration,
        head=head.model_dump(mode="json"),
        metrics=metrics or {},
        provenance=Provenance(
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            training=training or {},
            versions=library_versions(),
        ),
    )


__all__ = [
    "KINDS",
    "SPEC_FILE",
    "WEIGHTS_FILE",
    "ArtifactError",
    "Detector",
    "load_plugins",
    "make_spec",
    "read_spec",
    "register_kind",
]
