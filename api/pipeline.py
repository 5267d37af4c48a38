"""The path every scoring request takes, whatever its protocol (``/score``, ``/v2``): decode, batch, predict.

:class:`Decoder` decodes and pre-processes uploads in its own thread pool (PIL and torch release the
GIL, so images decode in parallel with each other and with the event loop; a few small ones are cheaper
to decode on the loop). :func:`predict` announces the request to the detector's micro-batcher while its
input is read and prepared, so an open batch waits for it, then submits the pixels.

Example:
    >>> prediction, batch = await predict(app.state, "oal", lambda: decoder.decode(uploads, detector, limits))
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from api.metrics import ServerMetrics
from api.settings import Limits
from api.uploads import DecodedBatch, DecodedImage, Upload, decode_one
from oodforge.detector import Detector, Prediction

INLINE_DECODE_BYTES = 16 * 1024  # requests this small are decoded on the event loop (a thread hop costs more)


class Decoder:
    """Decodes uploads for a detector in a pool of ``threads`` threads, recording stage times."""

    def __init__(self, threads: int, metrics: ServerMetrics | None = None) -> None:
        """Start the pool."""
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")
        self.metrics = metrics

    def close(self) -> None:
        """Stop the pool (queued work is dropped)."""
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def decode(
        self,
        uploads: list[Upload],
        detector: Detector,
        limits: Limits,
        formats: Sequence[str] | None = None,
    ) -> DecodedBatch:
        """Every upload as model input, in order; the first failing image (by position) raises its error."""
        args = (detector, limits, formats)
        if sum(len(data) for _, data in uploads) <= INLINE_DECODE_BYTES:
            images = [decode_one(u, i, *args) for i, u in enumerate(uploads)]
        else:
            loop = asyncio.get_running_loop()
            futures = [
                loop.run_in_executor(self.pool, decode_one, u, i, *args) for i, u in enumerate(uploads)
            ]
            done = await asyncio.gather(*futures, return_exceptions=True)
            failed = next((r for r in done if isinstance(r, BaseException)), None)
            if failed is not None:
                raise failed
            images = [r for r in done if isinstance(r, DecodedImage)]
        if self.metrics is not None:
            self.metrics.observe_stage("decode", sum(im.decode_s for im in images))
            self.metrics.observe_stage("preprocess", sum(im.preprocess_s for im in images))
        pixels = (
            images[0].pixels.unsqueeze(0) if len(images) == 1 else torch.stack([im.pixels for im in images])
        )
        return DecodedBatch(pixels, [im.size for im in images])


async def predict(
    state: Any, name: str, prepare: Callable[[], Awaitable[DecodedBatch]]
) -> tuple[Prediction, DecodedBatch]:
    """Run ``prepare()`` (read and decode the request) announced to ``name``'s batcher, then score it.

    Args:
        state: The app's state (``batchers``, ``metrics``).
        name: The detector's served name.
        prepare: Reads the request and returns its model input; its 4xx errors pass through.
    """
    batcher = state.batchers[name]
    with batcher.announce():  # an open batch waits for this request while it is read and decoded
        batch = await prepare()
        pending = batcher.submit(batch.pixels)
    prediction = await pending
    state.metrics.observe_verdicts(name, prediction.is_ood)
    return prediction, batch
