"""The path every scoring request takes, whatever its protocol (``/score``, ``/v2``): decode, batch, predict.

:class:`Decoder` decodes and pre-processes uploads away from the model: in a pool of ``processes``
processes (each with its own GIL, so decoding never stalls the event loop or the model's thread), or,
with ``processes=0``, in ``threads`` threads of the worker (PIL and torch release the GIL while they
work). A few small images are cheaper to decode on the event loop than to send anywhere. Either way the
decoding function is :func:`api.uploads.prepare_one`, so the pixels, and the scores, are the same.
:func:`predict` announces the request to the detector's micro-batcher while its input is read and
prepared, so an open batch waits for it, then submits the pixels.

Example:
    >>> decoder = Decoder(threads=1, processes=2); await decoder.start()
    >>> prediction, batch = await predict(app.state, "oal", lambda: decoder.decode(uploads, detector, limits))
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import torch

from api.decoding import DecodedImage, Recipe, child_init, child_ready, prepare_one, prepare_slice
from api.metrics import ServerMetrics
from api.settings import Limits
from api.uploads import DecodedBatch, Upload
from oodforge.detector import Detector, Prediction

log = logging.getLogger("oodforge.api")

INLINE_DECODE_BYTES = (
    16 * 1024
)  # default: requests this small are decoded on the event loop (a hop costs more)


def _slices(count: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` (at most ``count``) contiguous ``(start, stop)`` ranges covering ``range(count)``."""
    parts = max(1, min(parts, count))
    bounds = [round(i * count / parts) for i in range(parts + 1)]
    return list(itertools.pairwise(bounds))


class Decoder:
    """Decodes uploads for a detector in ``processes`` processes (or ``threads`` threads), recording stage times."""

    def __init__(
        self,
        threads: int = 1,
        processes: int = 0,
        metrics: ServerMetrics | None = None,
        inline_bytes: int = INLINE_DECODE_BYTES,
    ) -> None:
        """Make the pool (processes start in :meth:`start`); requests of at most ``inline_bytes`` decode inline."""
        self.threads = threads
        self.processes = processes
        self.inline_bytes = inline_bytes
        self.metrics = metrics
        self.pool: Executor = self._new_pool()

    def _new_pool(self) -> Executor:
        if self.processes > 0:
            return ProcessPoolExecutor(
                max_workers=self.processes,
                mp_context=multiprocessing.get_context("spawn"),  # no fork of a threaded server
                initializer=child_init,
            )
        return ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="decode")

    async def start(self) -> None:
        """Start every decode process now (each imports torch once), not on the first requests."""
        if self.processes > 0:
            loop = asyncio.get_running_loop()
            await asyncio.gather(
                *(loop.run_in_executor(self.pool, child_ready) for _ in range(self.processes))
            )

    def close(self) -> None:
        """Stop the pool: queued work is dropped, and the decode processes are waited for (they end at once)."""
        self.pool.shutdown(wait=self.processes > 0, cancel_futures=True)

    def _restart(self, err: BaseException) -> None:
        log.error("a decode process died (%s); starting a new pool", err)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = self._new_pool()

    async def _in_processes(self, uploads: list[Upload], recipe: Recipe, *args: Any) -> list[DecodedImage]:
        """Decode in the process pool, one slice of the uploads per process.

        A dead pool is restarted and the request tried once more (a process killed while idle must not
        fail requests forever).
        """
        loop = asyncio.get_running_loop()
        for attempt in range(2):
            try:
                futures = [
                    loop.run_in_executor(self.pool, prepare_slice, uploads[a:b], a, recipe, *args)
                    for a, b in _slices(len(uploads), self.processes)
                ]
                parts = await asyncio.gather(*futures, return_exceptions=True)
                first = next((r for r in parts if isinstance(r, BaseException)), None)  # by position
                if first is not None:
                    raise first
            except BrokenProcessPool as err:
                self._restart(err)
                if attempt == 1:
                    raise RuntimeError("the decode processes died twice on this request") from err
                continue
            return [
                DecodedImage(torch.from_numpy(pixels), size, decode_s, preprocess_s)
                for part in parts
                if isinstance(part, list)
                for pixels, size, decode_s, preprocess_s in part
            ]
        raise AssertionError("unreachable")

    async def _in_threads(self, uploads: list[Upload], recipe: Recipe, *args: Any) -> list[DecodedImage]:
        loop = asyncio.get_running_loop()
        futures = [
            loop.run_in_executor(self.pool, prepare_one, u, i, recipe, *args) for i, u in enumerate(uploads)
        ]
        done = await asyncio.gather(*futures, return_exceptions=True)
        failed = next((r for r in done if isinstance(r, BaseException)), None)
        if failed is not None:
            raise failed
        return [r for r in done if isinstance(r, DecodedImage)]

    async def decode(
        self,
        uploads: list[Upload],
        detector: Detector,
        limits: Limits,
        formats: Sequence[str] | None = None,
    ) -> DecodedBatch:
        """Every upload as model input, in order; the first failing image (by position) raises its error."""
        recipe = Recipe.of(detector, limits)
        if sum(len(data) for _, data in uploads) <= self.inline_bytes:
            images = [prepare_one(u, i, recipe, limits, formats) for i, u in enumerate(uploads)]
        elif self.processes > 0:
            images = await self._in_processes(uploads, recipe, limits, formats)
        else:
            images = await self._in_threads(uploads, recipe, limits, formats)
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
