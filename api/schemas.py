"""Request and response bodies of the HTTP API (they are also its OpenAPI schema)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ScoreRequest(BaseModel):
    """JSON alternative to multipart: images as base64 strings (or ``data:image/...;base64,`` URLs)."""

    images: list[str] = Field(..., description="base64-encoded image files, scored in this order")
    filenames: list[str | None] | None = Field(None, description="optional names echoed back per image")


class ImageResult(BaseModel):
    index: int = Field(..., description="position of the image in the request")
    filename: str | None
    is_ood: bool = Field(..., description="score < threshold")
    score: float = Field(..., description="higher = more in-distribution")
    threshold: float
    label: str = Field(..., description="the predicted ID class (meaningful when is_ood is false)")
    confidence: float = Field(..., description="softmax probability of that class")


class DetectorRef(BaseModel):
    name: str
    version: str = Field(..., description="first 12 hex digits of the weights' SHA-256")
    created: str


class ThresholdInfo(BaseModel):
    value: float
    score: str = Field(..., description="the OOD score the threshold applies to")
    split: str = Field(..., description="ID split the threshold was calibrated on")
    target_id_tpr: float = Field(..., description="share of ID images of that split accepted as ID")
    n_samples: int
    rule: str


class ScoreResponse(BaseModel):
    detector: DetectorRef
    threshold: ThresholdInfo
    results: list[ImageResult]


class DetectorInfo(BaseModel):
    detector: DetectorRef
    default: bool
    classes: list[str]
    score: dict[str, Any]
    threshold: ThresholdInfo
    input_size: int
    metrics: dict[str, Any]


class DetectorList(BaseModel):
    default: str | None
    detectors: list[DetectorInfo]
    failed: dict[str, str] = Field(default_factory=dict, description="name -> why it did not load")


class Status(BaseModel):
    status: str
    detectors: list[str] = []
    failed: dict[str, str] = {}


class ErrorBody(BaseModel):
    detail: str
