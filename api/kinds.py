"""What the API does differently per artifact kind, in one place: ``KINDS[detector.spec.kind]``.

A classifier answers each image with a label and its confidence; a dense detector (a segmenter) has
no image label but can return a per-pixel anomaly map. Routes ask the detector's :class:`ServedKind`
instead of branching on the kind.

Example:
    >>> kind = kind_of(detector)
    >>> kind.name, kind.has_maps
    ('dense', True)
    >>> kind.labels(prediction)
    [(None, None), (None, None)]
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

from api.detectors import ServedDetector
from api.maps import encode_maps
from api.schemas import AnomalyMap
from oodforge.dense_detector import DenseDetector, DensePrediction
from oodforge.detector import Detector, Prediction

Label = tuple[str | None, float | None]  # (label, confidence) of one image


class ServedKind(Protocol):
    """How the API describes and answers one artifact kind (detector/prediction types vary by kind)."""

    name: ClassVar[str]
    has_maps: ClassVar[bool]

    def score(self, detector: Any) -> dict[str, Any]:
        """``DetectorInfo.score``: how the detector scores an image."""
        ...

    def score_name(self, detector: Any) -> str:
        """The name of the score the image threshold applies to."""
        ...

    def labels(self, prediction: Any) -> list[Label]:
        """``(label, confidence)`` of each image; ``(None, None)`` where the kind has no image label."""
        ...

    async def maps(self, detector: Any, prediction: Any, sizes: list[tuple[int, int]]) -> list[AnomalyMap]:
        """Each image's anomaly map at its ``(height, width)``; only called when ``has_maps``."""
        ...


class ClassifierKind:
    """A classifier ``Detector``: one label and confidence per image, no maps."""

    name: ClassVar[str] = "classifier"
    has_maps: ClassVar[bool] = False

    def score(self, detector: Detector) -> dict[str, Any]:
        return detector.spec.score.model_dump()

    def score_name(self, detector: Detector) -> str:
        return detector.spec.score.name

    def labels(self, prediction: Prediction) -> list[Label]:
        return list(zip(prediction.label_names(), prediction.confidences.tolist(), strict=True))

    async def maps(
        self, detector: Detector, prediction: Prediction, sizes: list[tuple[int, int]]
    ) -> list[AnomalyMap]:
        raise TypeError(f"detector {detector.name!r} is a classifier: it has no anomaly maps")


class DenseKind:
    """A ``DenseDetector``: an image score pooled from a per-pixel map, which can be returned as a PNG."""

    name: ClassVar[str] = "dense"
    has_maps: ClassVar[bool] = True

    def score(self, detector: DenseDetector) -> dict[str, Any]:
        spec = detector.spec
        return {
            "name": spec.pixel_score,
            "pooling": spec.pooling.model_dump(),
            "pixel_threshold": spec.pixel_threshold,
            "map_range": list(spec.map_range),
        }

    def score_name(self, detector: DenseDetector) -> str:
        return detector.spec.pixel_score

    def labels(self, prediction: DensePrediction) -> list[Label]:
        return [(None, None)] * len(prediction.scores)

    async def maps(
        self, detector: DenseDetector, prediction: DensePrediction, sizes: list[tuple[int, int]]
    ) -> list[AnomalyMap]:
        return await encode_maps(detector, prediction, sizes)


KINDS: dict[str, ServedKind] = {kind.name: kind for kind in (ClassifierKind(), DenseKind())}


def kind_of(detector: ServedDetector) -> ServedKind:
    """The :class:`ServedKind` of a loaded detector (by its artifact's ``kind``)."""
    return KINDS[detector.spec.kind]


def maps_refused(name: str, kind: ServedKind, dense_names: list[str]) -> str:
    """The 400 message for ``maps=true`` on a detector whose kind has no maps."""
    available = ", ".join(dense_names) or "none is served here"
    return (
        f"detector {name!r} is a {kind.name}; anomaly maps come from dense detectors: name one with "
        f"?detector=NAME&maps=true (dense detectors: {available}; GET /detectors lists each one's kind), "
        "or leave out maps=true"
    )
