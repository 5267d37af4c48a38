"""Anomaly maps in responses: a dense detector's per-pixel scores as a grey PNG the size of the input image.

Encoding resizes each map to its image's size and compresses it (about 4 ms for 256x256, 100 ms for
1024x1024 on one core), so :func:`encode_maps` does it on the event loop only for a few small maps and
in the threadpool otherwise.

Example:
    >>> maps = await encode_maps(detector, prediction, sizes=[(50, 70)])
    >>> maps[0].shape
    (50, 70)
"""

from __future__ import annotations

import base64

import numpy as np
from fastapi.concurrency import run_in_threadpool

from api.schemas import AnomalyMap
from oodforge.dense_detector import MAP_ENCODING, DenseDetector, DensePrediction, anomaly_png

INLINE_MAP_PIXELS = 128 * 128  # fewer output pixels than this in all are encoded on the event loop (~1 ms)


def anomaly_map(detector: DenseDetector, score_map: np.ndarray, size: tuple[int, int]) -> AnomalyMap:
    """One map, resized to ``size`` = (height, width) and encoded as :data:`MAP_ENCODING` says."""
    spec = detector.spec
    png = anomaly_png(score_map, spec.map_range, size=size)
    return AnomalyMap(
        png_base64=base64.b64encode(png).decode("ascii"),
        shape=size,
        encoding=MAP_ENCODING,
        range=spec.map_range,
        pixel_threshold=spec.pixel_threshold,
        pixel_score=spec.pixel_score,
    )


def anomaly_maps(
    detector: DenseDetector, prediction: DensePrediction, sizes: list[tuple[int, int]]
) -> list[AnomalyMap]:
    """The map of every image of ``prediction``, each at its image's ``(height, width)`` in ``sizes``."""
    if len(sizes) != len(prediction.maps):
        raise ValueError(f"{len(prediction.maps)} maps but {len(sizes)} image sizes; pass one size per image")
    return [anomaly_map(detector, m, size) for m, size in zip(prediction.maps, sizes, strict=True)]


async def encode_maps(
    detector: DenseDetector, prediction: DensePrediction, sizes: list[tuple[int, int]]
) -> list[AnomalyMap]:
    """:func:`anomaly_maps`, off the event loop unless the maps are few and small."""
    if sum(h * w for h, w in sizes) <= INLINE_MAP_PIXELS:
        return anomaly_maps(detector, prediction, sizes)
    return await run_in_threadpool(anomaly_maps, detector, prediction, sizes)
