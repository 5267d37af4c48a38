"""The HTTP endpoints: ``/score``, ``/detectors``, ``/detectors/{name}``, ``/healthz``, ``/readyz``, ``/metrics``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from api.auth import require_api_key
from api.schemas import (
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

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "empty, corrupt or truncated image, bad base64, malformed body",
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


def detector_ref(name: str, detector: Detector) -> DetectorRef:
    return DetectorRef(name=name, version=detector.spec.weights_sha256[:12], created=detector.spec.created)


def threshold_info(detector: Detector) -> ThresholdInfo:
    t = detector.spec.threshold
    return ThresholdInfo(
        value=t.value,
        score=detector.spec.score.name,
        split=t.split,
        target_id_tpr=t.target_id_tpr,
        n_samples=t.n_samples,
        rule=t.rule,
    )


def detector_info(name: str, detector: Detector, default: str | None) -> DetectorInfo:
    return DetectorInfo(
        detector=detector_ref(name, detector),
        default=name == default,
        classes=detector.class_names,
        score=detector.spec.score.model_dump(),
        threshold=threshold_info(detector),
        input_size=detector.preprocess.size,
        metrics=detector.spec.metrics,
    )


@router.post(
    "/score",
    response_model=ScoreResponse,
    dependencies=[Depends(require_api_key)],
    responses=_ERRORS,
    openapi_extra=_SCORE_BODY,
    summary="Score images: an OOD verdict per image",
)
async def score(
    request: Request,
    detector: Annotated[
        str | None, Query(description="detector name (default: the server's default)")
    ] = None,
) -> Response:
    state = request.app.state
    name, model = state.table.get(detector)
    limits = state.settings.limits
    batcher = state.batchers[name]
    with batcher.announce():  # an open batch waits for this request while it is read and decoded
        uploads = await read_uploads(request, limits)
        if sum(len(data) for _, data in uploads) <= INLINE_DECODE_BYTES:  # cheaper than a thread hop
            pixels = decode_batch(uploads, model.preprocess, limits)
        else:
            pixels = await run_in_threadpool(decode_batch, uploads, model.preprocess, limits)
        pending = batcher.submit(pixels)
    prediction = await pending
    state.metrics.observe_verdicts(name, prediction.is_ood)
    labels = prediction.label_names()
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
                label=labels[i],
                confidence=float(prediction.confidences[i]),
            )
            for i, (filename, _) in enumerate(uploads)
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
