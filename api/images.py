"""Untrusted request bytes -> RGB images, or a 4xx that says what to do.

The decoding itself is :func:`oodforge.images.decode_image` — the same function ``Detector.predict``
uses on bytes — so a served score equals the library's on the same file. Here: the HTTP error type
and base64.

Example:
    >>> image = decode_upload(data, "cat.png", Limits(), index=0)
    >>> image.mode
    'RGB'
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

from PIL import Image

from api.settings import Limits
from oodforge.images import BLACK, ImageError, decode_image


class InputError(Exception):
    """A request the client must fix: ``status`` is the HTTP status, ``message`` says what to do."""

    def __init__(self, status: int, message: str) -> None:
        """Keep the status next to the message."""
        super().__init__(message)
        self.status = status
        self.message = message


def image_label(filename: str | None, index: int) -> str:
    """How messages name an upload: ``image 3 (cat.png)``, with very long names shortened."""
    if not filename:
        return f"image {index}"
    short = filename if len(filename) <= 120 else filename[:100] + "…" + filename[-19:]
    return f"image {index} ({short})"


def decode_base64(text: str, index: int) -> bytes:
    """Standard base64, optionally as a ``data:image/...;base64,`` URL; whitespace is ignored."""
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or ";base64" not in header:
            raise InputError(
                400, f"image {index}: a data URL must be base64-encoded (data:image/png;base64,...)"
            )
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(
            400,
            f"image {index} is not valid base64; send the file's bytes encoded with standard base64 "
            "(e.g. base64.b64encode(open(path, 'rb').read()).decode())",
        ) from None


def decode_upload(
    data: bytes,
    filename: str | None,
    limits: Limits,
    index: int = 0,
    background: Sequence[int] = BLACK,
) -> Image.Image:
    """Open, check and fully decode one uploaded image as RGB; :class:`InputError` otherwise."""
    try:
        return decode_image(
            data,
            image_label(filename, index),
            formats=limits.image_formats,
            max_pixels=limits.max_image_pixels,
            background=background,
        )
    except ImageError as err:
        raise InputError(err.status, err.message) from None
