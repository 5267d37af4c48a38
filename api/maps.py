"""Per-pixel maps in responses: a detector's map of each image as a grey PNG the size of that image.

Encoding resizes each map to its image's size and compresses it (about 4 ms for 256x256, 100 ms for
1024x1024 on one core), so :func:`encode_maps` does it on the event loop only for a few small maps and
in the threadpool otherwise. What the PNG means is the detector kind's business
(:meth:`Detector.render_map`).

Example:
    >>> maps = await encode_maps(detector, prediction, sizes=[(50, 70)])
    >>> maps[0].shape
    (50, 70)
"""

from __future__ import annotations

import base64

from fastapi.concurrency import run_in_threadpool

from api.schemas import AnomalyMap
from oodforge.detector import Detector, Prediction

INLINE_MAP_PIXELS = 128 * 128  # fewer output pixels than this in all are encoded on the event loop (~1 ms)


def anomaly_maps(
    detector: Detector, prediction: Prediction, sizes: list[tuple[int, int]]
) -> list[AnomalyMap]:
    """The map of every image of ``prediction``, each at its image's ``(height, width)`` in ``sizes``."""
    if prediction.maps is None:
        raise ValueError(f"detector {detector.name!r} returned no maps")
    if len(sizes) != len(prediction.maps):
        raise ValueError(f"{len(prediction.maps)} maps but {len(sizes)} image sizes; pass one size per image")
    out = []
    for score_map, size in zip(prediction.maps, sizes, strict=True):
        rendered = detector.render_map(score_map, size)
        png = rendered.pop("png")
        out.append(AnomalyMap(png_base64=base64.b64encode(png).decode("ascii"), shape=size, **rendered))
    return out


async def encode_maps(
    detector: Detector, prediction: Prediction, sizes: list[tuple[int, int]]
) -> list[AnomalyMap]:
    """:func:`anomaly_maps`, off the event loop unless the maps are few and small."""
    if sum(h * w for h, w in sizes) <= INLINE_MAP_PIXELS:
        return anomaly_maps(detector, prediction, sizes)
    return await run_in_threadpool(anomaly_maps, detector, prediction, sizes)
