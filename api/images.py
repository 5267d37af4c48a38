"""Turning untrusted request bytes into RGB PIL images, or a 4xx that says what to do.

Every way an upload can be wrong ends in :class:`InputError` with an HTTP status and a message:
empty (400), bad base64 (400), not an image (415), an unsupported mode or an animation (415),
more pixels than the limit (413, checked from the header before any pixel is decoded), and a
truncated or corrupt file (400). Nothing here raises anything else for bad bytes.

Example:
    >>> image = decode_image(data, "cat.png", Limits())
    >>> image.mode
    'RGB'
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, UnidentifiedImageError

from api.settings import Limits


class InputError(Exception):
    """A request the client must fix: ``status`` is the HTTP status, ``message`` says what to do."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _name(filename: str | None, index: int) -> str:
    return f"image {index} ({filename})" if filename else f"image {index}"


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


def decode_image(data: bytes, filename: str | None, limits: Limits, index: int = 0) -> Image.Image:
    """Open, check and fully decode one image; returns it in RGB."""
    what = _name(filename, index)
    if not data:
        raise InputError(400, f"{what} is empty (0 bytes); send the image file's content")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data), formats=limits.image_formats)
    except Image.DecompressionBombError:
        raise InputError(
            413, f"{what} has more pixels than PIL will open (decompression bomb); resize it first"
        ) from None
    except UnidentifiedImageError:
        raise InputError(
            415, f"{what} is not a recognised image; send one of: {', '.join(limits.image_formats)}"
        ) from None
    except Exception as err:  # noqa: BLE001 - a malformed header can raise almost anything inside PIL
        raise InputError(
            400, f"{what} has a corrupt header ({type(err).__name__}); re-encode the file"
        ) from None

    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise InputError(
            413,
            f"{what} is {width}x{height} = {width * height} pixels, above the limit of "
            f"{limits.max_image_pixels}; resize it first (the detector works at a small size anyway)",
        )
    if width == 0 or height == 0:
        raise InputError(400, f"{what} has no pixels ({width}x{height}); send an image with content")
    if getattr(image, "n_frames", 1) > 1:
        raise InputError(
            415, f"{what} is animated ({image.n_frames} frames); send a single frame as PNG or JPEG"
        )
    if image.mode not in limits.image_modes:
        raise InputError(
            415,
            f"{what} has mode {image.mode}, which this server does not accept (accepted: "
            f"{', '.join(limits.image_modes)}); convert it to 8-bit RGB first, e.g. "
            "PIL.Image.open(path).convert('RGB'), or ask the operator to add the mode to limits.image_modes",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
            return image.convert("RGB")
    except Exception as err:  # noqa: BLE001 - truncated/corrupt data surfaces as OSError, SyntaxError, ...
        raise InputError(
            400, f"{what} is truncated or corrupt ({type(err).__name__}: {err}); re-send the complete file"
        ) from None
