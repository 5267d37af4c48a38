"""The HTTP endpoints: ``/score``, ``/detectors``, ``/detectors/{name}``, ``/healthz``, ``/readyz``, ``/metrics``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from api.auth import require_api_key
from api.images import InputError
from api.maps import encode_maps
from api.schemas import (
    AnomalyMap,
    DetectorInfo,
    DetectorList,
    DetectorRef,
    ErrorBody,
    ImageResult,
    ScoreRequest,
    ScoreResponse,
    Status,
    ThresholdInfo,
)
from api.uploads import decode_batch, read_uploads
from oodforge.detector import Detector

router = APIRouter()
INLINE_DECODE_BYTES = 64 * 1024  # smaller requests are decoded on the event loop (tens of microseconds)
T = TypeVar("T")

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


async def _off_loop_unless(cheap: bool, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on the event loop when ``cheap`` (cheaper than a thread hop), else in the threadpool."""
    return fn(*args) if cheap else await run_in_threadpool(fn, *args)


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
    state = request.app.state
    name, model = state.table.get(detector)
    if maps and not model.has_maps:
        raise InputError(400, maps_refused(name, model, state.table.names_with_maps()))
    limits = state.settings.limits
    batcher = state.batchers[name]
    with batcher.announce():  # an open batch waits for this request while it is read and decoded
        uploads = await read_uploads(request, limits)
        cheap = sum(len(data) for _, data in uploads) <= INLINE_DECODE_BYTES
        decoded = await _off_loop_unless(cheap, decode_batch, uploads, model, limits)
        pending = batcher.submit(decoded.pixels)
    prediction = await pending
    state.metrics.observe_verdicts(name, prediction.is_ood)
    anomaly: list[AnomalyMap | None] = (
        list(await encode_maps(model, prediction, decoded.sizes)) if maps else [None] * len(uploads)
    )
    body = ScoreResponse(
        detector=detector_ref(name, model),
        threshold=threshold_info(model),
        results=[
            ImageResult(
                index=i,
                filename=filename,
                is_ood=bool(prediction.is_ood[i]),
                score=float(prediction.scores[i]),
                threshold=model.threshold,
                label=label,
                confidence=confidence,
                map=anomaly[i],
            )
            for i, ((filename, _), label, confidence) in enumerate(
                zip(uploads, prediction.label_names(), prediction.confidence_values(), strict=True)
            )
        ],
    )
    return Response(body.model_dump_json(), media_type="application/json")  # built typed: no re-validation


@router.get(
    "/detectors", response_model=DetectorList, dependencies=[Depends(require_api_key)], responses=_ERRORS
)
async def list_detectors(request: Request) -> DetectorList:
    table = request.app.state.table
    return DetectorList(
        default=table.default,
        detectors=[detector_info(n, d, table.default) for n, d in sorted(table.detectors.items())],
        failed=table.failed,
    )


@router.get(
    "/detectors/{name}",
    response_model=DetectorInfo,
    dependencies=[Depends(require_api_key)],
    responses=_ERRORS,
)
async def get_detector(request: Request, name: str) -> DetectorInfo:
    table = request.app.state.table
    name, model = table.get(name)
    return detector_info(name, model, table.default)


@router.get("/healthz", response_model=Status)
async def healthz() -> Status:
    """The process is alive (no detector needed)."""
    return Status(status="ok")


@router.get("/readyz", response_model=Status, responses={503: {"model": Status}})
async def readyz(request: Request) -> Any:
    """200 once the default detector is loaded, 503 (with the reasons) otherwise."""
    table = request.app.state.table
    failed = dict(table.failed)
    for name, batcher in request.app.state.batchers.items():
        if not batcher.alive:
            failed[name] = "its batching task stopped; restart the server (the log has the error)"
    ready = table.ready and table.default not in failed
    body = Status(status="ready" if ready else "not ready", detectors=sorted(table.detectors), failed=failed)
    return body if ready else JSONResponse(body.model_dump(), status_code=503)


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(request: Request) -> Response:
    """Prometheus exposition of the server's counters and histograms."""
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
