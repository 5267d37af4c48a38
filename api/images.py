"""Untrusted request bytes -> RGB images, or a 4xx that says what to do.

The decoding itself is :func:`oodforge.images.decode_image` — the same function, with the same JPEG
draft setting, that ``Detector.predict`` uses on bytes — so a served score equals the library's on the
same file. Here: the HTTP error type, base64, and how uploads are named in messages and answers.

Example:
    >>> decoded = decode_upload(data, "cat.png", Limits(), index=0, draft=32)
    >>> decoded.image.mode, decoded.size
    ('RGB', (640, 480))
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

from api.settings import Limits
from oodforge.images import BLACK, Decoded, ImageError, decode_with_size

MAX_FILENAME_CHARS = 255  # filenames echoed back in answers are shortened to this (keeping the end)


class InputError(Exception):
    """A request the client must fix: ``status`` is the HTTP status, ``message`` says what to do."""

    def __init__(self, status: int, message: str) -> None:
        """Keep the status next to the message."""
        super().__init__(message)
        self.status = status
        self.message = message

    def __reduce__(self) -> tuple[type[InputError], tuple[int, str]]:
        """Pickle as ``(status, message)``: the error travels back from a decode process intact."""
        return type(self), (self.status, self.message)


def image_label(filename: str | None, index: int) -> str:
    """How messages name an upload: ``image 3 (cat.png)``, with very long names shortened."""
    if not filename:
        return f"image {index}"
    short = filename if len(filename) <= 120 else filename[:100] + "…" + filename[-19:]
    return f"image {index} ({short})"


def short_filename(filename: str | None) -> str | None:
    """``filename`` as answers echo it: at most :data:`MAX_FILENAME_CHARS` characters, start and end kept."""
    if filename is None or len(filename) <= MAX_FILENAME_CHARS:
        return filename
    tail = 48  # keeps the extension and any numbering at the end
    return filename[: MAX_FILENAME_CHARS - tail - 1] + "…" + filename[-tail:]


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
    draft: int | None = None,
    formats: Sequence[str] | None = None,
) -> Decoded:
    """Open, check and decode one uploaded image as RGB; :class:`InputError` otherwise.

    Args:
        data: The file's bytes.
        filename: The upload's name, for messages.
        limits: ``max_image_pixels`` and ``image_formats`` apply.
        index: Position of the image in the request, for messages.
        background: RGB that transparent pixels are composited on (the detector's).
        draft: The model input side, to decode JPEGs at a reduced scale (``limits.jpeg_draft``).
        formats: Accept only these of ``limits.image_formats`` (a client-declared content type).
    """
    allowed = limits.image_formats if formats is None else [f for f in formats if f in limits.image_formats]
    try:
        return decode_with_size(
            data,
            image_label(filename, index),
            formats=allowed,
            max_pixels=limits.max_image_pixels,
            background=background,
            draft=draft,
        )
    except ImageError as err:
        raise InputError(err.status, err.message) from None
