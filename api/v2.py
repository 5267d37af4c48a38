"""Open Inference Protocol (KServe / Triton "v2") endpoints beside ``/score``, on the same detectors.

A model is a served detector (its name); its version is the detector's ``version`` (the weights'
checksum prefix). Routes:

========================================  ====================================================  ========
route                                     answer                                                API key
========================================  ====================================================  ========
GET  /v2                                  server metadata: name, version, extensions            yes
GET  /v2/health/live                      200 (empty body) while the process runs               no
GET  /v2/health/ready                     200 once the default detector is loaded, else 400     no
GET  /v2/models/{name}[/versions/{v}]     model metadata: inputs and outputs with shapes        yes
GET  /v2/models/{name}[/versions/{v}]/ready  200 when that detector serves, else 400 / 404      no
POST /v2/models/{name}[/versions/{v}]/infer  the outputs score, is_ood (+ label, confidence)     yes
========================================  ====================================================  ========

Inputs (send exactly one): ``image`` — BYTES, one encoded image file per element, decoded exactly as
``/score`` decodes uploads (same modes, limits and 4xx); its ``content_type`` parameter may say
``image/png``, ``image/jpeg``, ... (only that format is accepted), ``image/*`` or
``application/octet-stream`` (any served format), or ``base64`` (the elements are base64 text of the
files). As binary data an element is the file's bytes; in JSON it is base64 text, a plain string or
``{"b64": "..."}`` (``data:`` URLs too). ``pixels`` — FP32 RGB in [0, 1], or ``pixels_uint8`` — UINT8
RGB 0..255, shape ``[N, 3, S, S]`` with ``S`` the detector's input side; normalised as the detector's
pre-processing says. The protocol gives a metadata tensor one datatype, so each accepted datatype of
pre-processed pixels is its own input, and model metadata lists exactly what infer accepts.

Outputs, each of shape ``[N]``: ``score`` FP32 (higher = more in-distribution), ``is_ood`` BOOL, and for
detectors that label images (classifiers) ``label`` BYTES (the class name) and ``confidence`` FP32.
Detectors without labels (dense) have no ``label``/``confidence`` outputs: metadata does not list them,
and asking for them is a 400. The response's ``parameters.threshold`` is the detector's threshold.
Errors are ``{"error": "..."}`` with 400, 401, 404, 413, 415 or 422.
"""

from __future__ import annotations

import time
import zlib
from typing import Annotated, Any

import numpy as np
import orjson
import torch
from fastapi import APIRouter, Depends, Path, Request, Response

import oodforge
from api import oip
from api.auth import require_api_key
from api.images import InputError, decode_base64
from api.pipeline import predict
from api.routes import readiness
from api.settings import Limits
from api.uploads import DecodedBatch, Upload, limited_stream
from oodforge.detector import Detector, Prediction

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])
IMAGE = "image"
PIXEL_INPUTS = {"pixels": "FP32", "pixels_uint8": "UINT8"}  # input name -> its one datatype
PIXEL_RANGE = {"FP32": "RGB in [0, 1]", "UINT8": "RGB 0..255"}
MIME_FORMATS = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/jpg": "JPEG",
    "image/bmp": "BMP",
    "image/gif": "GIF",
    "image/tiff": "TIFF",
    "image/webp": "WEBP",
    "image/x-portable-pixmap": "PPM",
    "image/x-portable-graymap": "PPM",
    "image/x-portable-bitmap": "PPM",
    "image/x-portable-anymap": "PPM",
}
ANY_FORMAT = ("image/*", "application/octet-stream")
BASE64 = "base64"
ENCODINGS = {"gzip": 31, "deflate": 15}  # Content-Encoding -> zlib wbits
ModelName = Annotated[str, Path(description="a served detector's name")]
Version = Annotated[str, Path(description="the detector's version (GET /v2/models/{name} lists it)")]

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"description": text, "content": {"application/json": {"example": {"error": text}}}}
    for code, text in {
        400: "malformed request, tensor or image; a model that is not ready",
        401: "missing or invalid API key",
        404: "unknown model or version",
        413: "body, element count or image pixels above the server's limits",
        415: "not an image, unsupported content_type or Content-Encoding, animated image",
        422: "JSON that is not an inference request",
    }.items()
}
_INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": oip.InferenceRequest.model_json_schema()},
            oip.BINARY_CONTENT_TYPE: {
                "schema": {"type": "string", "format": "binary"},
                "description": "binary tensor data extension: a JSON header of Inference-Header-Content-Length "
                "bytes, then each binary input's data",
            },
        },
    }
}


# ---------------------------------------------------------------- models


def output_types(detector: Detector) -> dict[str, str]:
    """Output name -> datatype for ``detector`` (labels only for kinds that label images)."""
    types = {"score": "FP32", "is_ood": "BOOL"}
    if detector.has_labels:
        types |= {"label": "BYTES", "confidence": "FP32"}
    return types


def model_metadata(name: str, detector: Detector) -> dict[str, Any]:
    """``GET /v2/models/{name}``: the protocol's model metadata object."""
    return {
        "name": name,
        "versions": [detector.spec.version],
        "platform": f"oodforge_{detector.kind}",
        "inputs": [
            {"name": IMAGE, "datatype": "BYTES", "shape": [-1]},
            *(
                {"name": name, "datatype": datatype, "shape": [-1, *detector.input_shape]}
                for name, datatype in PIXEL_INPUTS.items()
            ),
        ],
        "outputs": [{"name": n, "datatype": t, "shape": [-1]} for n, t in output_types(detector).items()],
    }


def _model(request: Request, name: str, version: str | None) -> tuple[str, Detector]:
    table = request.app.state.table
    if name not in table.detectors:
        models = ", ".join(sorted(table.detectors)) or "none"
        raise InputError(404, f"unknown model {name!r}; models served here: {models}")
    detector = table.detectors[name]
    if version is not None and version != detector.spec.version:
        raise InputError(
            404,
            f"model {name!r} has no version {version!r}; it serves version {detector.spec.version} "
            "(or leave the version out of the path)",
        )
    return name, detector


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


# ---------------------------------------------------------------- health and metadata


@router.get("", dependencies=[Depends(require_api_key)], responses=_ERRORS, summary="Server metadata")
async def server_metadata() -> Response:
    """The protocol's server metadata: name, version and supported extensions."""
    return _json({"name": "oodforge", "version": oodforge.__version__, "extensions": ["binary_tensor_data"]})


@router.get("/health/live", summary="200 while the server process runs")
async def live() -> Response:
    """Answer 200 (the process is alive; no detector needed)."""
    return Response(status_code=200)


@router.get("/health/ready", responses=_ERRORS, summary="200 once the default detector serves, 400 before")
async def ready(request: Request) -> Response:
    """The same rule as ``/readyz``; 400 rather than 503, as the protocol says (4xx = not ready)."""
    is_ready, failed = readiness(request.app.state)
    if is_ready:
        return Response(status_code=200)
    reasons = "; ".join(f"{k}: {v}" for k, v in sorted(failed.items())) or "no detector is loaded"
    return _json({"error": f"not ready: {reasons}"}, 400)


@router.get(
    "/models/{name}", dependencies=[Depends(require_api_key)], responses=_ERRORS, summary="Model metadata"
)
async def metadata(request: Request, name: ModelName) -> Response:
    """The metadata of model ``name`` (404 when it is not served)."""
    return _json(model_metadata(*_model(request, name, None)))


@router.get(
    "/models/{name}/versions/{version}",
    dependencies=[Depends(require_api_key)],
    responses=_ERRORS,
    summary="Model metadata of one version",
)
async def version_metadata(request: Request, name: ModelName, version: Version) -> Response:
    """The metadata of model ``name`` (404 unless it serves ``version``)."""
    return _json(model_metadata(*_model(request, name, version)))


def _model_ready(request: Request, name: str, version: str | None) -> Response:
    name, _ = _model(request, name, version)
    batcher = request.app.state.batchers.get(name)
    if batcher is None or not batcher.alive:
        return _json(
            {"error": f"model {name!r} is not ready: its batching task stopped; restart the server"}, 400
        )
    return Response(status_code=200)


@router.get("/models/{name}/ready", responses=_ERRORS, summary="200 when the model serves")
async def model_ready(request: Request, name: ModelName) -> Response:
    """Answer 200 while model ``name``'s batcher runs, 400 once it has stopped."""
    return _model_ready(request, name, None)


@router.get(
    "/models/{name}/versions/{version}/ready", responses=_ERRORS, summary="200 when that version serves"
)
async def version_ready(request: Request, name: ModelName, version: Version) -> Response:
    """Like ``model_ready``, and 404 unless model ``name`` serves ``version``."""
    return _model_ready(request, name, version)


# ---------------------------------------------------------------- inference


async def read_body(request: Request, limits: Limits) -> bytes:
    """The body within ``limits.max_body_bytes``, gunzipped / inflated when ``Content-Encoding`` says so."""
    body = b"".join([chunk async for chunk in limited_stream(request, limits.max_body_bytes)])
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ENCODINGS:
        raise InputError(415, f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or none")
    inflater = zlib.decompressobj(wbits=ENCODINGS[encoding])
    try:
        data = inflater.decompress(body, limits.max_body_bytes + 1)
    except zlib.error:
        raise InputError(
            400, f"the body is not valid {encoding} data; compress it again or send it plain"
        ) from None
    if len(data) > limits.max_body_bytes:
        raise InputError(
            413,
            f"the decompressed body is above the limit of {limits.max_body_bytes} bytes; send fewer images",
        )
    if not inflater.eof:
        raise InputError(400, f"the {encoding} body is truncated; send the complete body")
    return data


def _formats(tensor: oip.RequestInput) -> tuple[list[str] | None, bool]:
    """The formats an ``image`` input's ``content_type`` allows (``None``: any) and whether it is base64."""
    content_type = tensor.parameters.get("content_type")
    if content_type is None:
        return None, False
    text = str(content_type).split(";")[0].strip().lower()
    if text == BASE64:
        return None, True
    if text in ANY_FORMAT:
        return None, False
    if text in MIME_FORMATS:
        return [MIME_FORMATS[text]], False
    known = ", ".join([*MIME_FORMATS, *ANY_FORMAT, BASE64])
    raise InputError(
        415, f"input 'image': content_type {content_type!r} is not supported; use one of: {known}"
    )


def _element_bytes(element: Any, index: int, base64_text: bool) -> bytes:
    if isinstance(element, bytes):
        if not base64_text:
            return element
        element = element.decode("ascii", errors="replace")
    if isinstance(element, dict) and set(element) == {"b64"} and isinstance(element["b64"], str):
        element = element["b64"]
    if not isinstance(element, str):
        raise InputError(
            400,
            f"input 'image' element {index} is a {type(element).__name__}; in JSON send each image file as "
            'base64 text ("iVBORw0..." or {"b64": "iVBORw0..."}), or send the raw bytes as binary data',
        )
    return decode_base64(element, index)


def image_uploads(tensor: oip.RequestInput, raw: bytes | None, limits: Limits) -> list[Upload]:
    """The encoded images of an ``image`` input, as ``/score`` uploads (no filenames)."""
    if tensor.datatype != "BYTES":
        raise InputError(
            400, f"input 'image' must be BYTES (one encoded image file per element), not {tensor.datatype}"
        )
    count = oip.element_count(tensor)
    if count > limits.max_files:
        raise InputError(
            413, f"{count} images in one request, above the limit of {limits.max_files}; split the request"
        )
    if count == 0:
        raise InputError(400, "input 'image' holds no images; send one encoded image file per element")
    _, base64_text = _formats(tensor)
    elements = oip.bytes_elements(tensor, raw)
    return [(None, _element_bytes(e, i, base64_text)) for i, e in enumerate(elements)]


def pixel_input(
    tensor: oip.RequestInput, raw: bytes | None, detector: Detector, limits: Limits
) -> torch.Tensor:
    """The model input of a ``pixels`` (FP32 in [0, 1]) or ``pixels_uint8`` (UINT8) input, RGB ``[N, 3, S, S]``."""
    shape = [-1, *detector.input_shape]
    expected = PIXEL_INPUTS[tensor.name]
    if tensor.datatype != expected:
        other = next((n for n, t in PIXEL_INPUTS.items() if t == tensor.datatype), None)
        hint = (
            f"send {tensor.datatype} pixels as the input {other!r}"
            if other
            else "pixel inputs: "
            + ", ".join(f"{n!r} {t} ({PIXEL_RANGE[t]})" for n, t in PIXEL_INPUTS.items())
        )
        raise InputError(
            400,
            f"input {tensor.name!r} must be {expected} ({PIXEL_RANGE[expected]}), not {tensor.datatype}; {hint} "
            "(GET /v2/models/{name} lists the inputs)",
        )
    if len(tensor.shape) != 4 or tensor.shape[1:] != shape[1:] or tensor.shape[0] < 1:
        raise InputError(
            400,
            f"input {tensor.name!r} has shape {tensor.shape}; this model takes {shape} (N RGB images, channels first, "
            f"at its input side {shape[-1]}); resize them, or send the encoded files as the 'image' input",
        )
    if tensor.shape[0] > limits.max_files:
        raise InputError(
            413, f"{tensor.shape[0]} images in one request, above the limit of {limits.max_files}; split it"
        )
    array = oip.numeric_array(tensor, raw)
    if tensor.datatype == "FP32" and (not np.isfinite(array).all() or array.min() < 0 or array.max() > 1):
        raise InputError(
            400,
            "input 'pixels': FP32 values must be finite and in [0, 1] (RGB / 255); or send UINT8 0..255 as 'pixels_uint8'",
        )
    return detector.preprocess.tensor(torch.from_numpy(np.array(array)))


class _Plan:
    """What one infer request asks for, checked before the model runs."""

    def __init__(self, request: oip.InferenceRequest, name: str, detector: Detector) -> None:
        types = output_types(detector)
        default_binary = oip.flag(request.parameters, "binary_data_output", False, "the request")
        wanted = (
            request.outputs if request.outputs is not None else [oip.RequestOutput(name=n) for n in types]
        )
        self.outputs: list[tuple[str, str]] = []
        self.binary: dict[str, bool] = {}
        for output in wanted:
            if output.name not in types:
                raise InputError(
                    400,
                    f"model {name!r} has no output {output.name!r}; its outputs: {', '.join(types)}"
                    + ("" if detector.has_labels else f" (a {detector.kind} detector has no labels)"),
                )
            self.outputs.append((output.name, types[output.name]))
            where = f"output {output.name!r}"
            self.binary[output.name] = oip.flag(output.parameters, "binary_data", default_binary, where)


def _tensors(prediction: Prediction, plan: _Plan) -> list[oip.Output]:
    values: dict[str, Any] = {
        "score": prediction.scores.astype(np.float32),
        "is_ood": prediction.is_ood.astype(bool),
    }
    if prediction.labels is not None:
        values["label"] = [str(n).encode() for n in prediction.label_names()]
        values["confidence"] = np.asarray(prediction.confidences, dtype=np.float32)
    return [oip.Output(name, datatype, values[name]) for name, datatype in plan.outputs]


async def _infer(request: Request, name: str, version: str | None) -> Response:
    state = request.app.state
    name, detector = _model(request, name, version)
    limits = state.settings.limits
    parsed: dict[str, Any] = {}

    async def prepare() -> DecodedBatch:
        start = time.perf_counter()
        body = await read_body(request, limits)
        infer_request, raw = oip.parse_request(body, request.headers.get(oip.HEADER_LENGTH))
        parsed["request"], parsed["plan"] = infer_request, _Plan(infer_request, name, detector)
        if len(infer_request.inputs) != 1 or infer_request.inputs[0].name not in (IMAGE, *PIXEL_INPUTS):
            sent = ", ".join(repr(t.name) for t in infer_request.inputs)
            raise InputError(
                400,
                f"send exactly one input, 'image' (BYTES: encoded image files), 'pixels' (FP32 "
                f"{[-1, *detector.input_shape]}, RGB in [0, 1]) or 'pixels_uint8' (UINT8, RGB 0..255); got {sent}",
            )
        tensor = infer_request.inputs[0]
        if tensor.name in PIXEL_INPUTS:
            pixels = pixel_input(tensor, raw.get(tensor.name), detector, limits)
            state.metrics.observe_stage("read", time.perf_counter() - start)
            side = detector.input_shape[-1]
            return DecodedBatch(pixels, [(side, side)] * len(pixels))
        formats, _ = _formats(tensor)
        uploads = image_uploads(tensor, raw.get(IMAGE), limits)
        state.metrics.observe_stage("read", time.perf_counter() - start)
        try:
            return await state.decoder.decode(uploads, detector, limits, formats)
        except InputError as err:
            if formats is not None and err.status == 415:
                content_type = tensor.parameters.get("content_type")
                raise InputError(
                    415, f"{err.message} (the input's content_type is {content_type!r})"
                ) from None
            raise

    prediction, _ = await predict(state, name, prepare)
    start = time.perf_counter()
    infer_request, plan = parsed["request"], parsed["plan"]
    head: dict[str, Any] = {"model_name": name, "model_version": detector.spec.version}
    if infer_request.id is not None:
        head["id"] = infer_request.id
    head["parameters"] = {"threshold": float(detector.threshold)}
    body, headers = oip.encode_response(head, _tensors(prediction, plan), plan.binary)
    state.metrics.observe_stage("respond", time.perf_counter() - start)
    return Response(body, headers=headers)


@router.post(
    "/models/{name}/infer",
    dependencies=[Depends(require_api_key)],
    responses=_ERRORS,
    openapi_extra=_INFER_BODY,
    summary="Score images (Open Inference Protocol infer)",
)
async def infer(request: Request, name: ModelName) -> Response:
    """Score the images of an Open Inference Protocol request with model ``name``."""
    return await _infer(request, name, None)


@router.post(
    "/models/{name}/versions/{version}/infer",
    dependencies=[Depends(require_api_key)],
    responses=_ERRORS,
    openapi_extra=_INFER_BODY,
    summary="Score images with one model version (Open Inference Protocol infer)",
)
async def infer_version(request: Request, name: ModelName, version: Version) -> Response:
    """Like ``infer``, and 404 unless model ``name`` serves ``version``."""
    return await _infer(request, name, version)
