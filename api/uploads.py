"""Reading the images out of a ``POST /score`` body: multipart field ``files`` or JSON ``{"images": [...]}``.

The body is streamed with a byte budget (413 as soon as it is exceeded, before anything is parsed when
``Content-Length`` already says so), then handed to the reader registered for its content type. Each
reader returns ``(filename, bytes)`` pairs; counting and decoding happen in one place afterwards.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NamedTuple

import torch
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from api.images import InputError, decode_base64, decode_upload
from api.schemas import ScoreRequest
from api.settings import Limits
from oodforge.detector import Detector

Upload = tuple[str | None, bytes]
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
    parser = MultiPartParser(
        request.headers,
        limited_stream(request, limits.max_body_bytes),
        max_files=limits.max_files + 1,  # one more than allowed, so that "too many" is ours to report
        max_fields=100,
    )
    try:
        form = await parser.parse()
    except MultiPartException as err:
        if err.message.startswith("Too many files"):
            raise InputError(
                413, f"more than {limits.max_files} images in one request; split it into several requests"
            ) from None
        raise InputError(400, f"malformed multipart body ({err.message}); {HOW_TO}") from None
    try:
        items = form.getlist(FIELD)
        if not items:
            fields = ", ".join(sorted(set(form.keys()))) or "none"
            raise InputError(400, f"no images in the field 'files' (fields sent: {fields}); {HOW_TO}")
        uploads = []
        for item in items:
            if not isinstance(item, UploadFile):
                raise InputError(400, f"the field 'files' holds text, not a file; {HOW_TO}")
            uploads.append((item.filename, await item.read()))
        return uploads
    finally:
        await form.close()


async def _read_json(request: Request, limits: Limits) -> list[Upload]:
    body = b"".join([chunk async for chunk in limited_stream(request, limits.max_body_bytes)])
    try:
        payload = ScoreRequest.model_validate(json.loads(body))
    except (json.JSONDecodeError, UnicodeDecodeError):
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
        sizes: ``(height, width)`` of each decoded image, in upload order (what a dense map is resized to).
    """

    pixels: torch.Tensor
    sizes: list[tuple[int, int]]


def decode_batch(uploads: list[Upload], detector: Detector, limits: Limits) -> DecodedBatch:
    """Decode and pre-process every upload for ``detector``, once each (CPU work: call it off the loop).

    Only one full-size decoded image is held at a time; what is kept of it is its model input and size.
    """
    pixels, sizes = [], []
    background = detector.spec.input.background
    for i, (name, data) in enumerate(uploads):
        image = decode_upload(data, name, limits, index=i, background=background)
        pixels.append(detector.preprocess(image))
        sizes.append((image.height, image.width))
    return DecodedBatch(pixels=torch.stack(pixels), sizes=sizes)
