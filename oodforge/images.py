"""Turning what clients send into the RGB images the detectors take: one decoder for every caller.

``decode_image(data)`` opens encoded bytes (refusing what is not a still image, is corrupt or breaks a
limit, with :class:`ImageError` carrying an HTTP status and a message saying what to do) and returns
``to_rgb`` of it; the server, ``api.score_dir`` and :meth:`Detector.predict` all go through here, so
the same bytes give the same model input everywhere.

``to_rgb`` converts every common mode, after applying the EXIF orientation:

======================  ==========================================================================
mode                    conversion
======================  ==========================================================================
RGB                     as is
L, 1                    grey replicated to three channels (1: 0 -> 0, 1 -> 255)
RGBA, LA, PA, RGBa, La  composited on ``background`` (default black, as the training images)
P                       through its palette; with a transparent index, composited like RGBA
I;16, I;16B, I;16L,     scaled by the real bit depth, ``v · 255 / (2^bits − 1)`` (no clipping):
I;16N, I                16 bits for the I;16 modes and 16-bit PNGs, the TIFF's BitsPerSample, else
                        the smallest of 8/10/12/14/16/24/32 bits that holds the largest value
F                       values in [0, 1] are taken as that range, anything else is min-max scaled
CMYK, YCbCr, LAB, HSV   PIL's conversion to RGB
======================  ==========================================================================

Example:
    >>> image = decode_image(open("scan.png", "rb").read())
    >>> image.mode
    'RGB'
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
DEFAULT_MAX_PIXELS = 4096 * 4096
BLACK = (0, 0, 0)
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_INT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_BIT_DEPTHS = (8, 10, 12, 14, 16, 24, 32)
_TIFF_BITS_PER_SAMPLE = 258


class ImageError(ValueError):
    """An input that cannot be scored: ``status`` is the HTTP status, ``message`` says what to do."""

    def __init__(self, status: int, message: str) -> None:
        """Keep the status next to the message."""
        super().__init__(message)
        self.status = status
        self.message = message


def _bit_depth(image: Image.Image, values: np.ndarray) -> int:
    """The real bit depth of an integer image: container depth where known, else the value range."""
    if image.mode.startswith("I;16") or (image.format == "PNG" and image.mode == "I"):
        return 16
    tag = getattr(image, "tag_v2", None)
    if tag is not None and _TIFF_BITS_PER_SAMPLE in tag:
        bits = tag[_TIFF_BITS_PER_SAMPLE]
        return int(bits[0] if isinstance(bits, tuple) else bits)
    top = float(values.max()) if values.size else 0.0
    return next((b for b in _BIT_DEPTHS if top <= 2**b - 1), 32)


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1), mode="RGB")


def _integer_to_rgb(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    if values.size and values.min() < 0:  # signed 32-bit data: shift to start at 0
        values = values - values.min()
    scale = 255.0 / (2 ** _bit_depth(image, values) - 1)
    return _grey_to_rgb(np.round(values * scale).clip(0, 255).astype(np.uint8))


def _float_to_rgb(image: Image.Image) -> Image.Image:
    values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if not (lo >= 0.0 and hi <= 1.0):  # outside [0, 1]: min-max
        values = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    return _grey_to_rgb(np.round(values * 255.0).astype(np.uint8))


def _composite(image: Image.Image, background: Sequence[int]) -> Image.Image:
    rgba = image.convert("RGBA")
    base = Image.new("RGBA", rgba.size, (*tuple(int(v) for v in background), 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def to_rgb(image: Image.Image, background: Sequence[int] = BLACK) -> Image.Image:
    """``image`` as 8-bit RGB: EXIF orientation applied, any mode converted (see the module table).

    Args:
        image: A decoded PIL image of any mode.
        background: RGB that transparent pixels are composited on.

    Returns:
        An ``RGB`` image (the same object when it already is RGB with no EXIF rotation).

    Raises:
        ImageError: 415 for a mode PIL cannot convert to RGB.
    """
    image = ImageOps.exif_transpose(image) or image
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        return _composite(image, background)
    if mode in _ALPHA_MODES:
        return _composite(image, background)
    if mode in _INT_MODES:
        return _integer_to_rgb(image)
    if mode == "F":
        return _float_to_rgb(image)
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise ImageError(
            415, f"image mode {mode} cannot be converted to RGB ({err}); send RGB, grey or RGBA"
        ) from None


def _check_size(image: Image.Image, what: str, max_pixels: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            413,
            f"{what} is {width}x{height} = {width * height} pixels, above the limit of {max_pixels}; "
            "resize it first (the detector works at a small size anyway)",
        )
    if width == 0 or height == 0:
        raise ImageError(400, f"{what} has no pixels ({width}x{height}); send an image with content")
    if getattr(image, "n_frames", 1) > 1:
        raise ImageError(
            415, f"{what} is animated ({image.n_frames} frames); send a single frame as PNG or JPEG"
        )


def decode_image(
    data: bytes,
    what: str = "image",
    *,
    formats: Sequence[str] = DEFAULT_FORMATS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: Sequence[int] = BLACK,
    draft: int | None = None,
) -> Image.Image:
    """Open, check and fully decode one encoded image; returns it as RGB (:func:`to_rgb`).

    Args:
        data: The file's bytes.
        what: How messages name the image (``"image 3 (cat.png)"``).
        formats: PIL format names accepted (others get 415).
        max_pixels: Largest width x height, checked from the header before decoding (413 above).
        background: RGB that transparent pixels are composited on.
        draft: If set, JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) whose sides stay at
            least this many pixels (much faster for large photos going to a small model input).

    Raises:
        ImageError: 400 empty, truncated or corrupt data; 413 too many pixels or a decompression bomb;
            415 not an image of an accepted format, animated, or an unconvertible mode.
    """
    if not data:
        raise ImageError(400, f"{what} is empty (0 bytes); send the image file's content")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data), formats=list(formats))
    except Image.DecompressionBombError:
        raise ImageError(
            413, f"{what} has more pixels than PIL will open (decompression bomb); resize it first"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(
            415, f"{what} is not a recognised image; send one of: {', '.join(formats)}"
        ) from None
    except Exception as err:  # noqa: BLE001 - a malformed header can raise almost anything inside PIL
        raise ImageError(
            400, f"{what} has a corrupt header ({type(err).__name__}); re-encode the file"
        ) from None
    _check_size(image, what, max_pixels)
    if draft and image.format == "JPEG":
        scale = min(image.size) / draft
        if scale >= 2:
            factor = 2 ** min(3, int(math.log2(scale)))
            image.draft(image.mode, (image.size[0] // factor, image.size[1] // factor))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
    except Exception as err:  # noqa: BLE001 - truncated/corrupt data surfaces as OSError, SyntaxError, ...
        raise ImageError(
            400, f"{what} is truncated or corrupt ({type(err).__name__}: {err}); re-send the complete file"
        ) from None
    return to_rgb(image, background)
