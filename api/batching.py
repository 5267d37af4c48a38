"""Micro-batching: concurrent requests share one forward pass, which runs off the event loop.

Each request submits its pre-processed pixels (``[n, 3, H, W]``). A background task takes the first
waiting job, keeps collecting jobs until the batch holds ``max_batch_size`` images or ``max_wait_ms``
have passed (it stops waiting at once when no other request is queued or announced as on its way, so
a lone request pays no wait), runs the model once in a worker thread and hands each job its rows back. A request larger
than ``max_batch_size`` is split into several jobs.

The batcher works for every detector kind: it calls ``detector.predict_pixels`` and hands each job its
rows of the :class:`~oodforge.detector.Prediction` (``Prediction.rows``; maps included).

Example:
    >>> batcher = MicroBatcher(detector, Batching(max_batch_size=32, max_wait_ms=5))
    >>> await batcher.start()
    >>> with batcher.announce():  # while the request body is read and decoded
    ...     pixels = decode(...)
    ...     pending = batcher.submit(pixels)
    >>> prediction = await pending  # same numbers as detector.predict on those images
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from api.settings import Batching
from oodforge.detector import Detector, Prediction


@dataclass
class _Job:
    pixels: torch.Tensor
    future: asyncio.Future[Prediction]
    submitted: float  # perf_counter() when queued


_WAKE = object()  # queued when the last announced request has submitted (or given up)


async def _joined(jobs: list[_Job]) -> Prediction:
    return Prediction.concat(list(await asyncio.gather(*(j.future for j in jobs))))


class MicroBatcher:
    """Collects jobs for one detector into batches.

    ``on_batch(n)`` is called with each batch's size; ``on_stage(stage, seconds)`` with each job's wait
    for its batch (``"queue"``) and each batch's forward pass (``"model"``, timed in the inference thread,
    so it is the model's time, not the thread hop's).
    """

    def __init__(
        self,
        detector: Detector,
        batching: Batching,
        on_batch: Callable[[int], None] | None = None,
        on_stage: Callable[[str, float], None] | None = None,
    ) -> None:
        self.detector = detector
        self.max_batch_size = batching.max_batch_size
        self.max_wait = batching.max_wait_ms / 1000.0
        self.on_batch = on_batch
        self.on_stage = on_stage
        self._queue: asyncio.Queue[_Job | object] = asyncio.Queue()
        self._carry: deque[_Job] = deque()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{detector.name}")
        self._task: asyncio.Task[None] | None = None
        self._incoming = 0

    async def start(self) -> None:
        """Start the background batching task (once; later calls do nothing)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Cancel the batching task and shut down its worker thread, dropping queued work."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._executor.shutdown(wait=False, cancel_futures=True)

    @contextlib.contextmanager
    def announce(self) -> Iterator[None]:
        """Mark a request that is on its way (reading, decoding): an open batch waits for it."""
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1
            if self._incoming == 0:
                self._queue.put_nowait(_WAKE)  # an open batch stops waiting for nobody

    def submit(self, pixels: torch.Tensor) -> asyncio.Future[Prediction]:
        """Queue pre-processed pixels ``[n, 3, H, W]`` now; the future gives their :class:`Prediction`."""
        if self._task is None:
            raise RuntimeError("MicroBatcher.start() was not awaited")
        loop = asyncio.get_running_loop()
        jobs, now = [], time.perf_counter()
        for start in range(0, len(pixels), self.max_batch_size):
            job = _Job(pixels[start : start + self.max_batch_size], loop.create_future(), now)
            self._queue.put_nowait(job)
            jobs.append(job)
        return asyncio.ensure_future(_joined(jobs))

    def _infer(self, pixels: torch.Tensor) -> Prediction:
        return self.detector.predict_pixels(pixels)

    async def _next_item(self, timeout: float | None) -> _Job | object | None:
        """A job or a wake-up marker; ``None`` when ``timeout`` passes first."""
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
        first = await self._next_item(None)
        while not isinstance(first, _Job):
            first = await self._next_item(None)
        jobs, size = [first], len(first.pixels)
        deadline = loop.time() + self.max_wait
        while size < self.max_batch_size:
            if not self._carry and self._queue.empty() and self._incoming == 0:
                break  # nobody else is on the way: waiting would only add latency
            item = await self._next_item(max(0.0, deadline - loop.time()))
            if item is None:
                break
            if not isinstance(item, _Job):
                continue  # a wake-up: check again who is still on the way
            if size + len(item.pixels) > self.max_batch_size:
                self._carry.append(item)
                break
            jobs.append(item)
            size += len(item.pixels)
        return [j for j in jobs if not j.future.cancelled()]

    @property
    def alive(self) -> bool:
        """False once the background task has ended (``/readyz`` turns 503)."""
        return self._task is not None and not self._task.done()

    def _batch(self, jobs: list[_Job]) -> tuple[Prediction, float]:
        """The batch's prediction and its forward pass's seconds (timed in the inference thread)."""
        pixels = torch.cat([j.pixels for j in jobs])
        if self.on_batch is not None:
            self.on_batch(len(pixels))
        start = time.perf_counter()
        prediction = self._infer(pixels)
        return prediction, time.perf_counter() - start

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect()
            if not jobs:
                continue
            started = time.perf_counter()
            try:
                prediction, forward_s = await loop.run_in_executor(self._executor, self._batch, jobs)
            except Exception as err:  # noqa: BLE001 - hand the failure to every waiting request, go on
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(err)
                continue
            if self.on_stage is not None:
                self.on_stage("model", forward_s)
                for job in jobs:
                    self.on_stage("queue", started - job.submitted)
            start = 0
            for job in jobs:
                stop = start + len(job.pixels)
                if not job.future.done():
                    job.future.set_result(prediction.rows(start, stop))
                start = stop
