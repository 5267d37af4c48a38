"""Micro-batching: concurrent requests share one forward pass, which runs off the event loop.

Each request submits its pre-processed pixels (``[n, 3, H, W]``). A background task takes the first
waiting job, keeps collecting jobs until the batch holds ``max_batch_size`` images or ``max_wait_ms``
have passed, runs the model once in a worker thread and hands each job its rows back. A request larger
than ``max_batch_size`` is split into several jobs.

Example:
    >>> batcher = MicroBatcher(detector, Batching(max_batch_size=32, max_wait_ms=5))
    >>> await batcher.start()
    >>> prediction = await batcher.submit(pixels)  # same numbers as detector.predict on those images
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from api.settings import Batching
from oodforge.detector import Detector, Prediction


@dataclass
class _Job:
    pixels: torch.Tensor
    future: asyncio.Future[Prediction]


def slice_prediction(prediction: Prediction, start: int, stop: int) -> Prediction:
    return Prediction(
        scores=prediction.scores[start:stop],
        is_ood=prediction.is_ood[start:stop],
        labels=prediction.labels[start:stop],
        confidences=prediction.confidences[start:stop],
        class_names=prediction.class_names,
    )


def concat_predictions(parts: list[Prediction]) -> Prediction:
    return Prediction(
        scores=np.concatenate([p.scores for p in parts]),
        is_ood=np.concatenate([p.is_ood for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        confidences=np.concatenate([p.confidences for p in parts]),
        class_names=parts[0].class_names,
    )


class MicroBatcher:
    """Collects jobs for one detector into batches; ``on_batch(n)`` is called with each batch's size."""

    def __init__(self, detector: Detector, batching: Batching, on_batch: Callable[[int], None] | None = None):
        self.detector = detector
        self.max_batch_size = batching.max_batch_size
        self.max_wait = batching.max_wait_ms / 1000.0
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._carry: deque[_Job] = deque()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{detector.name}")
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._executor.shutdown(wait=True)

    async def submit(self, pixels: torch.Tensor) -> Prediction:
        """Score pre-processed pixels ``[n, 3, H, W]``; returns their :class:`Prediction` in order."""
        if self._task is None:
            raise RuntimeError("MicroBatcher.start() was not awaited")
        loop = asyncio.get_running_loop()
        jobs = []
        for start in range(0, len(pixels), self.max_batch_size):
            job = _Job(pixels[start : start + self.max_batch_size], loop.create_future())
            self._queue.put_nowait(job)
            jobs.append(job)
        return concat_predictions(list(await asyncio.gather(*(j.future for j in jobs))))

    def _infer(self, pixels: torch.Tensor) -> Prediction:
        logits, features = self.detector.forward_batch(pixels)
        return self.detector.predict_from_outputs(logits, features)

    async def _next_job(self, timeout: float | None) -> _Job | None:
        if self._carry:
            return self._carry.popleft()
        if timeout is None:
            return await self._queue.get()
        try:
            return (
                await asyncio.wait_for(self._queue.get(), timeout)
                if timeout > 0
                else self._queue.get_nowait()
            )
        except (asyncio.TimeoutError, asyncio.QueueEmpty):
            return None

    async def _collect(self) -> list[_Job]:
        loop = asyncio.get_running_loop()
        first = await self._next_job(None)
        assert first is not None
        jobs, size = [first], len(first.pixels)
        deadline = loop.time() + self.max_wait
        while size < self.max_batch_size:
            job = await self._next_job(max(0.0, deadline - loop.time()))
            if job is None:
                break
            if size + len(job.pixels) > self.max_batch_size:
                self._carry.append(job)
                break
            jobs.append(job)
            size += len(job.pixels)
        return [j for j in jobs if not j.future.cancelled()]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect()
            if not jobs:
                continue
            pixels = torch.cat([j.pixels for j in jobs])
            if self.on_batch is not None:
                self.on_batch(len(pixels))
            try:
                prediction = await loop.run_in_executor(self._executor, self._infer, pixels)
            except Exception as err:  # noqa: BLE001 - hand the failure to every waiting request
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(err)
                continue
            start = 0
            for job in jobs:
                stop = start + len(job.pixels)
                if not job.future.done():
                    job.future.set_result(slice_prediction(prediction, start, stop))
                start = stop
