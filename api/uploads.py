"""Reading the images out of a ``POST /score`` body: multipart field ``files`` or JSON ``{"images": [...]}``.

The body is streamed with a byte budget (413 as soon as it is exceeded, before anything is parsed when
``Content-Length`` already says so), then handed to the reader registered for its content type. Each
reader returns ``(filename, bytes)`` pairs; counting and decoding happen in one place afterwards
(:func:`api.decoding.prepare_one`, run for each image by :class:`api.pipeline.Decoder`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import NamedTuple

import orjson
import torch
from pydantic import ValidationError
from starlette.requests import Request

from api.decoding import DecodedImage, Recipe, Upload, prepare_one
from api.images import InputError, decode_base64
from api.multipart import MultipartError, read_multipart
from api.schemas import ScoreRequest
from api.settings import Limits
from oodforge.detector import Detector

FIELD = "files"
HOW_TO = (
    "send multipart/form-data with one or more files in the field 'files' "
    '(curl -F files=@image.png ...), or application/json {"images": ["<base64>", ...]}'
)


async def limited_stream(request: Request, max_bytes: int) -> AsyncIterator[bytes]:
    """The request body in chunks; :class:`InputError` 413 once more than ``max_bytes`` arrived."""
    too_large = InputError(
        413, f"request body is above the limit of {max_bytes} bytes; send fewer or smaller images per request"
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_bytes:
            raise too_large
        yield chunk


async def _read_multipart(request: Request, limits: Limits) -> list[Upload]:
    try:
        parts = await read_multipart(
            request.headers.get("content-type", ""),
            limited_stream(request, limits.max_body_bytes),
            max_files=limits.max_files,
        )
    except MultipartError as err:
        if err.too_many_files:
            raise InputError(
                413,
                f"{limits.max_files + 1} or more images in one request, above the limit of {limits.max_files}; "
                "split it into several requests",
            ) from None
        raise InputError(400, f"malformed multipart body ({err.message}); {HOW_TO}") from None
    items = [part for part in parts if part.name == FIELD]
    if not items:
        fields = ", ".join(sorted({part.name for part in parts})) or "none"
        raise InputError(400, f"no images in the field 'files' (fields sent: {fields}); {HOW_TO}")
    if any(part.filename is None for part in items):
        raise InputError(400, f"the field 'files' holds text, not a file; {HOW_TO}")
    return [(part.filename, part.data) for part in items]


async def _read_json(request: Request, limits: Limits) -> list[Upload]:
    body = b"".join([chunk async for chunk in limited_stream(request, limits.max_body_bytes)])
    try:
        payload = ScoreRequest.model_validate(orjson.loads(body))
    except orjson.JSONDecodeError:
        raise InputError(400, f"the body is not valid JSON; {HOW_TO}") from None
    except ValidationError as err:
        where = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors()[:3])
        raise InputError(422, f"the JSON body does not match the schema ({where}); {HOW_TO}") from None
    names = payload.filenames or []
    if names and len(names) != len(payload.images):
        raise InputError(
            422, f"'filenames' has {len(names)} entries for {len(payload.images)} images; send one per image"
        )
    if len(payload.images) > limits.max_files:
        raise _too_many(len(payload.images), limits)
    return [(names[i] if names else None, decode_base64(text, i)) for i, text in enumerate(payload.images)]


READERS: dict[str, Callable[[Request, Limits], Awaitable[list[Upload]]]] = {
    "multipart/form-data": _read_multipart,
    "application/json": _read_json,
}


def _too_many(count: int, limits: Limits) -> InputError:
    return InputError(
        413,
        f"{count} images in one request, above the limit of {limits.max_files}; split it into several requests",
    )


async def read_uploads(request: Request, limits: Limits) -> list[Upload]:
    """The ``(filename, bytes)`` of every image in the request, in order; :class:`InputError` otherwise."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    reader = READERS.get(content_type)
    if reader is None:
        raise InputError(415, f"unsupported content type {content_type or '(none)'!r}; {HOW_TO}")
    uploads = await reader(request, limits)
    if not uploads:
        raise InputError(400, f"the request holds no images; {HOW_TO}")
    if len(uploads) > limits.max_files:
        raise _too_many(len(uploads), limits)
    return uploads


class DecodedBatch(NamedTuple):
    """The model input of a request's images and each image's original size.

    Attributes:
        pixels: Pre-processed pixels ``[n, 3, S, S]``, in upload order.
        sizes: ``(height, width)`` of each image at full resolution, in upload order (what a dense map is
            resized to).
    """

    pixels: torch.Tensor
    sizes: list[tuple[int, int]]


def decode_one(
    upload: Upload, index: int, detector: Detector, limits: Limits, formats: Sequence[str] | None = None
) -> DecodedImage:
    """Decode one upload for ``detector`` and pre-process it (:func:`prepare_one` with its :class:`Recipe`).

    JPEGs are decoded at a reduced scale when ``limits.jpeg_draft`` (as ``Detector.predict`` does on bytes).
    """
    return prepare_one(upload, index, Recipe.of(detector, limits), limits, formats)


def decode_batch(
    uploads: list[Upload], detector: Detector, limits: Limits, formats: Sequence[str] | None = None
) -> DecodedBatch:
    """Decode and pre-process every upload for ``detector``, one after the other, in this thread."""
    recipe = Recipe.of(detector, limits)
    images = [prepare_one(u, i, recipe, limits, formats) for i, u in enumerate(uploads)]
    return DecodedBatch(torch.stack([im.pixels for im in images]), [im.size for im in images])
