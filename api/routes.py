"""The HTTP endpoints: ``/score``, ``/detectors``, ``/detectors/{name}``, ``/healthz``, ``/readyz``, ``/metrics``.

The Open Inference Protocol endpoints (``/v2/...``) are in :mod:`api.v2`; both score through
:mod:`api.pipeline`.
"""

from __future__ import annotations

import time
import weakref
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from api.auth import require_api_key
from api.images import InputError, short_filename
from api.maps import encode_maps
from api.pipeline import predict
from api.schemas import (
    DetectorInfo,
    DetectorList,
    DetectorRef,
    ErrorBody,
    ScoreRequest,
    ScoreResponse,
    Serving,
    Status,
    ThresholdInfo,
)
from api.uploads import DecodedBatch, Upload, read_uploads
from oodforge.detector import Detector, Prediction

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "empty, corrupt or truncated image, bad base64, malformed body, maps=true on a classifier",
        401: "missing or invalid API key",
        404: "unknown detector",
        413: "body, image count or image pixels above the server's limits",
        415: "not an image, unsupported image mode/format, animated image, wrong content type",
        422: "JSON body that does not match the schema",
    }.items()
}
_SCORE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                }
            },
            "application/json": {"schema": ScoreRequest.model_json_schema()},
        },
    }
}


_MAPS_DOC = (
    "dense detectors only: also return each image's anomaly map (`results[i].map`: a grey PNG, base64, "
    "the size of that input image, 255 = most anomalous; `encoding` says how scores map to values). "
    "Off by default, which keeps responses small; a classifier detector answers 400"
)


def detector_ref(name: str, detector: Detector) -> DetectorRef:
    """Which detector answered: its served name, weights version and creation time."""
    return DetectorRef(name=name, version=detector.spec.version, created=detector.spec.provenance.created)


def threshold_info(detector: Detector) -> ThresholdInfo:
    """What the threshold means (from ``describe()``)."""
    return ThresholdInfo(**detector.describe()["threshold"])


def detector_info(name: str, detector: Detector, default: str | None) -> DetectorInfo:
    """``GET /detectors/{name}``: the detector's ``describe()`` under its served name."""
    about = detector.describe()
    return DetectorInfo(
        detector=detector_ref(name, detector),
        kind=about["kind"],
        has_labels=about["has_labels"],
        has_maps=about["has_maps"],
        default=name == default,
        classes=about["classes"],
        score=about["score"],
        threshold=ThresholdInfo(**about["threshold"]),
        input_size=about["input"]["shape"][-1],
        input=about["input"],
        metrics=about["metrics"],
    )


def maps_refused(name: str, detector: Detector, with_maps: list[str]) -> str:
    """The 400 message for ``maps=true`` on a detector whose kind has no maps."""
    available = ", ".join(with_maps) or "none is served here"
    return (
        f"detector {name!r} is a {detector.kind}: it has no per-pixel maps; maps come from dense detectors: "
        f"name one with ?detector=NAME&maps=true (detectors with maps: {available}; GET /detectors lists "
        "each one's kind), or leave out maps=true"
    )


def score_body(
    name: str,
    detector: Detector,
    uploads: list[Upload],
    prediction: Prediction,
    maps: list[dict[str, Any]] | None = None,
) -> bytes:
    """The JSON of a :class:`ScoreResponse`, built from plain values (orjson; no model validation)."""
    threshold = detector.threshold
    ref, about_threshold = _response_head(name, detector)
    results = []
    scores, is_ood = prediction.scores.tolist(), prediction.is_ood.tolist()
    labels, confidences = prediction.label_names(), prediction.confidence_values()
    for i, (filename, _) in enumerate(uploads):
        result = {
            "index": i,
            "filename": short_filename(filename),
            "is_ood": bool(is_ood[i]),
            "score": float(scores[i]),
            "threshold": threshold,
            "label": labels[i],
            "confidence": confidences[i],
        }
        if maps is not None:
            result["map"] = maps[i]
        results.append(result)
    return orjson.dumps({"detector": ref, "threshold": about_threshold, "results": results})


_HEADS: weakref.WeakKeyDictionary[Detector, dict[str, tuple[dict[str, Any], dict[str, Any]]]] = (
    weakref.WeakKeyDictionary()
)


def _response_head(name: str, detector: Detector) -> tuple[dict[str, Any], dict[str, Any]]:
    """``detector`` and ``threshold`` of a score response: the same for every request, so built once."""
    by_name = _HEADS.setdefault(detector, {})
    if name not in by_name:
        by_name[name] = (detector_ref(name, detector).model_dump(), threshold_info(detector).model_dump())
    return by_name[name]


@router.post(
    "/score",
    response_model=ScoreResponse,
    dependencies=[Depends(require_api_key)],
    responses=_ERRORS,
    openapi_extra=_SCORE_BODY,
    summary="Score images: an OOD verdict per image (and, from dense detectors, an anomaly map)",
)
async def score(
    request: Request,
    detector: Annotated[
        str | None, Query(description="detector name (default: the server's default)")
    ] = None,
    maps: Annotated[bool, Query(description=_MAPS_DOC)] = False,
) -> Response:
    """Score the uploaded images with one detector and answer the JSON verdicts (and maps if asked)."""
    state = request.app.state
    name, model = state.table.get(detector)
    if maps and not model.has_maps:
        raise InputError(400, maps_refused(name, model, state.table.names_with_maps()))
    limits = state.settings.limits
    uploads: list[Upload] = []

    async def prepare() -> DecodedBatch:
        start = time.perf_counter()
        uploads.extend(await read_uploads(request, limits))
        state.metrics.observe_stage("read", time.perf_counter() - start)
        return await state.decoder.decode(uploads, model, limits)

    prediction, decoded = await predict(state, name, prepare)
    start = time.perf_counter()
    anomaly = None
    if maps:
        anomaly = [m.model_dump() for m in await encode_maps(model, prediction, decoded.sizes)]
    body = score_body(name, model, uploads, prediction, anomaly)
    state.metrics.observe_stage("respond", time.perf_counter() - start)
    return Response(body, media_type="application/json")


@router.get(
    "/detectors", response_model=DetectorList, dependencies=[Depends(require_api_key)], responses=_ERRORS
)
async def list_detectors(request: Request) -> DetectorList:
    """List the loaded detectors, the default one, those that failed to load, and the serving settings."""
    table = request.app.state.table
    return DetectorList(
        default=table.default,
        detectors=[detector_info(n, d, table.default) for n, d in sorted(table.detectors.items())],
        failed=table.failed,
        serving=Serving(**request.app.state.resources._asdict()),
    )


@router.get(
    "/detectors/{name}",
    response_model=DetectorInfo,
    dependencies=[Depends(require_api_key)],
    responses=_ERRORS,
)
async def get_detector(request: Request, name: str) -> DetectorInfo:
    """Describe the detector called ``name``."""
    table = request.app.state.table
    name, model = table.get(name)
    return detector_info(name, model, table.default)


@router.get("/healthz", response_model=Status)
async def healthz() -> Status:
    """The process is alive (no detector needed)."""
    return Status(status="ok")


def readiness(state: Any) -> tuple[bool, dict[str, str]]:
    """Whether the server is ready (the default detector is loaded and its batcher runs) and what failed."""
    table = state.table
    failed = dict(table.failed)
    for name, batcher in state.batchers.items():
        if not batcher.alive:
            failed[name] = "its batching task stopped; restart the server (the log has the error)"
    return table.ready and table.default not in failed, failed


@router.get("/readyz", response_model=Status, responses={503: {"model": Status}})
async def readyz(request: Request) -> Any:
    """200 once the default detector is loaded, 503 (with the reasons) otherwise."""
    ready, failed = readiness(request.app.state)
    body = Status(
        status="ready" if ready else "not ready",
        detectors=sorted(request.app.state.table.detectors),
        failed=failed,
    )
    return body if ready else JSONResponse(body.model_dump(), status_code=503)


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(request: Request) -> Response:
    """Prometheus exposition of the server's counters and histograms."""
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
