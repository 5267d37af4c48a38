"""Turning what clients send into the RGB images the detectors take: one decoder for every caller.

``decode_image(data)`` opens encoded bytes (refusing what is not a still image, is corrupt or breaks a
limit, with :class:`ImageError` carrying an HTTP status and a message saying what to do) and returns
``to_rgb`` of it; the server, ``api.score_dir`` and :meth:`Detector.predict` all go through here, so
the same bytes give the same model input everywhere. ``decode_with_size`` also returns the image's
full-resolution size (what a per-pixel map is drawn at when ``draft`` decoded a JPEG smaller).

``to_rgb`` converts every common mode, after applying the EXIF orientation (``ImageOps.exif_transpose``;
an EXIF block that cannot be read counts as no orientation):

======================  ==========================================================================
mode                    conversion
======================  ==========================================================================
RGB                     as is
L, 1                    grey replicated to three channels (1: 0 -> 0, 1 -> 255)
RGBA, LA, PA, RGBa, La  composited on ``background`` (default black, as the training images)
P                       through its palette; with transparency (a transparent index, or an alpha
                        per palette entry), composited like RGBA
I;16, I;16B, I;16L,     scaled by the real bit depth, ``v · 255 / (2^bits − 1)`` (no clipping):
I;16N, I                16 bits for the I;16 modes and 16-bit PNGs, the TIFF's BitsPerSample, else
                        the smallest of 8/10/12/14/16/24/32 bits that holds the largest value;
                        negative values (signed I) are shifted to start at 0 first
F                       values in [0, 1] are taken as that range, anything else is min-max scaled
                        (NaN and infinities count as 0)
CMYK                    ``R = (255 − C)(255 − K) / 255`` (G from M, B from Y), rounded; Adobe
                        (inverted) CMYK JPEGs are read as such
YCbCr                   JPEG / BT.601 full range: ``R = Y + 1.402 (Cr − 128)``,
                        ``G = Y − 0.344 (Cb − 128) − 0.714 (Cr − 128)``, ``B = Y + 1.772 (Cb − 128)``
LAB, HSV, RGBX          PIL's conversion to RGB
======================  ==========================================================================

With ``draft=S`` a JPEG is decoded at the smallest DCT scale (1/2, 1/4 or 1/8) that keeps both sides at
least ``S`` pixels: several times faster for photos going to a small model input, and slightly different
pixels from a full decode (the server and :meth:`Detector.predict` on bytes both use the model's input
side, so they agree).

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
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
DEFAULT_MAX_PIXELS = 4096 * 4096
BLACK = (0, 0, 0)
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_INT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_BIT_DEPTHS = (8, 10, 12, 14, 16, 24, 32)
_TIFF_BITS_PER_SAMPLE = 258
_EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that turn the picture by 90 degrees


class ImageError(ValueError):
    """An input that cannot be scored: ``status`` is the HTTP status, ``message`` says what to do."""

    def __init__(self, status: int, message: str) -> None:
        """Keep the status next to the message."""
        super().__init__(message)
        self.status = status
        self.message = message

    def __reduce__(self) -> tuple[type[ImageError], tuple[int, str]]:
        """Pickle as ``(status, message)`` (the error can cross a process boundary)."""
        return type(self), (self.status, self.message)


def _container_bits(image: Image.Image) -> int | None:
    """The bit depth the file declares for an integer image (read before any transposition drops it)."""
    if image.mode.startswith("I;16") or (image.format == "PNG" and image.mode == "I"):
        return 16
    tag = getattr(image, "tag_v2", None)
    if image.mode == "I" and tag is not None and _TIFF_BITS_PER_SAMPLE in tag:
        bits = tag[_TIFF_BITS_PER_SAMPLE]
        return int(bits[0] if isinstance(bits, tuple) else bits)
    return None


def _bit_depth(declared: int | None, values: np.ndarray) -> int:
    """The real bit depth of integer pixels: the file's declared depth, else the value range."""
    if declared:
        return declared
    top = float(values.max()) if values.size else 0.0
    return next((b for b in _BIT_DEPTHS if top <= 2**b - 1), 32)


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1 = as stored); an EXIF block PIL cannot read counts as 1."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - malformed EXIF raises many types inside PIL; the pixels are fine
        return 1
    return value if isinstance(value, int) and 2 <= value <= 8 else 1


def _oriented(image: Image.Image) -> Image.Image:
    """``image`` with its EXIF orientation applied (the same object when there is none)."""
    if _orientation(image) == 1:
        return image
    try:
        return ImageOps.exif_transpose(image) or image
    except Exception:  # noqa: BLE001 - see _orientation
        return image


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1), mode="RGB")


def _integer_to_rgb(image: Image.Image, declared_bits: int | None) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    if values.size and values.min() < 0:  # signed 32-bit data: shift to start at 0
        values = values - values.min()
    scale = 255.0 / (2 ** _bit_depth(declared_bits, values) - 1)
    return _grey_to_rgb(np.round(values * scale).clip(0, 255).astype(np.uint8))


def _float_to_rgb(image: Image.Image) -> Image.Image:
    values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if not (lo >= 0.0 and hi <= 1.0):  # outside [0, 1]: min-max
        values = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    return _grey_to_rgb(np.round(values * 255.0).astype(np.uint8))


def _composite(image: Image.Image, background: Sequence[int]) -> Image.Image:
    rgba = (image.convert("LA") if image.mode == "La" else image).convert("RGBA")
    base = Image.new("RGBA", rgba.size, (*tuple(int(v) for v in background), 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def to_rgb(image: Image.Image, background: Sequence[int] = BLACK) -> Image.Image:
    """``image`` as 8-bit RGB: EXIF orientation applied, any mode converted (see the module table).

    Args:
        image: A decoded PIL image of any mode.
        background: RGB that transparent pixels are composited on.

    Returns:
        An ``RGB`` image (the same object when it already is RGB with no EXIF orientation).

    Raises:
        ImageError: 415 for a mode PIL cannot convert to RGB.
    """
    declared_bits = _container_bits(image)  # the file's tags do not survive a transposition
    image = _oriented(image)
    mode = image.mode
    if mode == "RGB":
        return image
    try:
        if (mode == "P" and "transparency" in image.info) or mode in _ALPHA_MODES:
            return _composite(image, background)
        if mode in _INT_MODES:
            return _integer_to_rgb(image, declared_bits)
        if mode == "F":
            return _float_to_rgb(image)
        return image.convert("RGB")
    except (ValueError, OSError, TypeError) as err:
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


class Decoded(NamedTuple):
    """A decoded upload: the RGB image the detector takes and the picture's full-resolution size.

    Attributes:
        image: RGB, EXIF orientation applied; smaller than ``size`` when ``draft`` decoded a JPEG at a
            reduced scale.
        size: ``(width, height)`` of the full-resolution image with its EXIF orientation applied.
    """

    image: Image.Image
    size: tuple[int, int]


def decode_with_size(
    data: bytes,
    what: str = "image",
    *,
    formats: Sequence[str] = DEFAULT_FORMATS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: Sequence[int] = BLACK,
    draft: int | None = None,
) -> Decoded:
    """:func:`decode_image`, also returning the full-resolution size (see :class:`Decoded`)."""
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
    width, height = image.size
    if draft and image.format == "JPEG":
        scale = min(width, height) / draft
        if scale >= 2:
            factor = 2 ** min(3, int(math.log2(scale)))
            image.draft(image.mode, (width // factor, height // factor))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
    except Exception as err:  # noqa: BLE001 - truncated/corrupt data surfaces as OSError, SyntaxError, ...
        raise ImageError(
            400, f"{what} is truncated or corrupt ({type(err).__name__}: {err}); re-send the complete file"
        ) from None
    size = (height, width) if _orientation(image) in _SWAPS_SIDES else (width, height)
    return Decoded(to_rgb(image, background), size)


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
    return decode_with_size(
        data, what, formats=formats, max_pixels=max_pixels, background=background, draft=draft
    ).image
