"""Request and response bodies of the HTTP API (they are also its OpenAPI schema)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from pydantic.json_schema import SkipJsonSchema

from oodforge.detector import MAP_ENCODING


class ScoreRequest(BaseModel):
    """JSON alternative to multipart: images as base64 strings (or ``data:image/...;base64,`` URLs)."""

    images: list[str] = Field(..., description="base64-encoded image files, scored in this order")
    filenames: list[str | None] | None = Field(None, description="optional names echoed back per image")


class AnomalyMap(BaseModel):
    """A detector's per-pixel verdict on one image, as a grey PNG the size of that image."""

    png_base64: str = Field(..., description="base64 of an 8-bit grey (mode L) PNG; 255 = most anomalous")
    shape: tuple[int, int] = Field(..., description="[height, width] of the PNG: the input image's size")
    encoding: str = Field(
        ..., description=f"how pixel scores become PNG values (dense detectors: {MAP_ENCODING})"
    )
    range: tuple[float, float] = Field(
        ..., description="[lo, hi] of the encoding: scores >= hi are 0, scores <= lo are 255"
    )
    pixel_threshold: float = Field(
        ...,
        description="pixels scoring below it are anomalous; in the PNG, values above "
        "255 * (hi - pixel_threshold) / (hi - lo)",
    )
    pixel_score: str = Field(..., description="the per-pixel score (higher = more in-distribution)")


def _absent_when_none(schema: dict[str, Any]) -> None:
    schema.pop("default", None)  # the field is left out of the JSON, never sent as null


class ImageResult(BaseModel):
    """One image's verdict in a score response."""

    index: int = Field(..., description="position of the image in the request")
    filename: str | None
    is_ood: bool = Field(..., description="score < threshold")
    score: float = Field(..., description="higher = more in-distribution")
    threshold: float
    label: str | None = Field(
        ...,
        description="detectors that label images (classifiers; null otherwise): the predicted ID class "
        "(meaningful when is_ood is false)",
    )
    confidence: float | None = Field(
        ..., description="detectors that label images (null otherwise): softmax probability of that class"
    )
    map: AnomalyMap | SkipJsonSchema[None] = Field(
        None,
        exclude_if=lambda value: value is None,
        json_schema_extra=_absent_when_none,
        description="only with POST /score?maps=true on a detector with maps (dense): the image's "
        "anomaly map; absent otherwise",
    )


class DetectorRef(BaseModel):
    """Which detector answered: its name, weights version and creation time."""

    name: str
    version: str = Field(..., description="first 12 hex digits of the weights' SHA-256")
    created: str


class ThresholdInfo(BaseModel):
    """The calibrated OOD threshold and how it was chosen."""

    value: float
    score: str = Field(
        ...,
        description="the OOD score the threshold applies to (dense detectors: the pixel score, pooled "
        "over the image as the detector's score.pooling says)",
    )
    split: str = Field(..., description="ID split the threshold was calibrated on")
    target_id_tpr: float = Field(..., description="share of ID images of that split accepted as ID")
    n_samples: int
    rule: str


class ScoreResponse(BaseModel):
    """The answer to POST /score: the detector, its threshold and a result per image."""

    detector: DetectorRef
    threshold: ThresholdInfo
    results: list[ImageResult]


class DetectorInfo(BaseModel):
    """A loaded detector: its kind, classes, score, threshold, input and metrics."""

    detector: DetectorRef
    kind: str = Field(
        ...,
        description="the artifact kind: 'classifier' (a label per image), 'dense' (a segmenter: a per-pixel "
        "score map per image, returned by POST /score?maps=true), or a kind a plugin registers",
    )
    has_labels: bool = Field(..., description="results carry label and confidence")
    has_maps: bool = Field(..., description="POST /score?maps=true returns a per-pixel map per image")
    default: bool
    classes: list[str] = Field(
        ..., description="classifier: the ID classes; dense: the segmentation classes, background first"
    )
    score: dict[str, Any] = Field(
        ...,
        description="classifier: the OOD score's name and params; dense: the pixel score's name, its "
        "pooling into the image score, the pixel threshold and the map's range",
    )
    threshold: ThresholdInfo
    input_size: int
    input: dict[str, Any] = Field(..., description="model input: shape [C, H, W], mode, alpha background")
    metrics: dict[str, Any]


class Serving(BaseModel):
    """How the answering worker uses the machine (``workers``, ``torch_threads``, ``decode_*`` resolved)."""

    cores: int = Field(..., description="CPU cores this worker may run on")
    workers: int = Field(..., description="uvicorn worker processes sharing them")
    torch_threads: int = Field(..., description="intra-op threads of each worker's models")
    decode_processes: int = Field(..., description="decode processes per worker (0: decode_threads threads)")
    decode_threads: int = Field(..., description="decode threads per worker when decode_processes is 0")


class DetectorList(BaseModel):
    """The loaded detectors, the default one, those that failed to load, and the serving settings."""

    default: str | None
    detectors: list[DetectorInfo]
    failed: dict[str, str] = Field(default_factory=dict, description="name -> why it did not load")
    serving: Serving


class Status(BaseModel):
    """Liveness or readiness: a status word, the loaded detectors and why others failed."""

    status: str
    detectors: list[str] = []
    failed: dict[str, str] = {}


class ErrorBody(BaseModel):
    """An error response: what went wrong."""

    detail: str
