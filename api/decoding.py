"""Decoding one upload into model input: the code a decode process runs, kept light to import.

A decode process (:class:`api.pipeline.Decoder` with ``decode_processes > 0``) imports only this module
and what it needs (PIL, numpy, torch for the resize; not FastAPI, transformers or the detectors), so it
starts fast. :func:`prepare_one` is also what the server runs in its own threads and what
:func:`api.uploads.decode_one` calls, so every path makes the same pixels from the same bytes.

Example:
    >>> recipe = Recipe.of(detector, limits)
    >>> image = prepare_one((None, data), 0, recipe, limits)
    >>> image.pixels.shape, image.size
    (torch.Size([3, 32, 32]), (480, 640))
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from api.images import decode_upload
from api.settings import Limits
from oodforge.data.transforms import Preprocess

if TYPE_CHECKING:
    from oodforge.detector import Detector

Upload = tuple[str | None, bytes]


class DecodedImage(NamedTuple):
    """One upload as model input, its full-resolution ``(height, width)`` and the seconds each step took."""

    pixels: torch.Tensor
    size: tuple[int, int]
    decode_s: float
    preprocess_s: float


class Recipe(NamedTuple):
    """What decoding an upload for one detector needs, small and picklable (sent to decode processes).

    Attributes:
        preprocess: The detector's pre-processing.
        background: RGB that transparent pixels are composited on.
        draft: The model input side when ``limits.jpeg_draft`` (JPEGs decoded at a reduced scale), else None.
    """

    preprocess: Preprocess
    background: tuple[int, ...]
    draft: int | None

    @classmethod
    def of(cls, detector: Detector, limits: Limits) -> Recipe:
        """The recipe of ``detector`` under ``limits`` (the same choices ``Detector.predict`` makes on bytes)."""
        draft = detector.input_shape[-1] if limits.jpeg_draft else None
        return cls(detector.preprocess, tuple(detector.spec.input.background), draft)


def prepare_one(
    upload: Upload, index: int, recipe: Recipe, limits: Limits, formats: Sequence[str] | None = None
) -> DecodedImage:
    """Decode one upload and pre-process it as ``recipe`` says; :class:`InputError` for a bad image.

    A plain function of picklable arguments, so a decode process can run it; only this image's full-size
    decode is held, until its model input is made.
    """
    name, data = upload
    start = time.perf_counter()
    decoded = decode_upload(
        data, name, limits, index=index, background=recipe.background, draft=recipe.draft, formats=formats
    )
    decoded_at = time.perf_counter()
    pixels = recipe.preprocess(decoded.image)
    width, height = decoded.size
    return DecodedImage(pixels, (height, width), decoded_at - start, time.perf_counter() - decoded_at)


PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent ends


def child_init() -> None:
    """Set up a decode process: one torch thread; Ctrl+C is the parent's business.

    On Linux it also ends with its parent, however the parent ends (a worker killed with SIGKILL leaves
    no decode process behind).
    """
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def child_ready() -> int:
    """A no-op task: once it returns, the decode process has started."""
    return 0


def prepare_slice(
    uploads: list[Upload], first: int, recipe: Recipe, limits: Limits, formats: Sequence[str] | None
) -> list[tuple[np.ndarray, tuple[int, int], float, float]]:
    """Decode consecutive uploads (``first`` = the position of the first) in a decode process.

    Pixels travel back as numpy arrays: plain bytes through the pipe (a torch tensor would be moved
    through shared memory and a file descriptor). The first bad image raises its :class:`InputError`.
    """
    out = []
    for k, upload in enumerate(uploads):
        image = prepare_one(upload, first + k, recipe, limits, formats)
        out.append((image.pixels.numpy(), image.size, image.decode_s, image.preprocess_s))
    return out
