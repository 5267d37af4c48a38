"""One background thread that runs write jobs in order, so that generation does not wait for the disk.

PNG encoding, ``safetensors`` part files and journal fsyncs release the GIL, so the next batch's UNet
steps run while the previous batch is written. The queue is bounded (a slow disk slows generation down
instead of filling memory), jobs run in submission order (the journal stays in candidate order), and an
error in a job is raised again in the caller's thread at the next :meth:`Background.submit` or at
:meth:`Background.close`.

Example:
    >>> with Background() as bg:
    ...     bg.submit(writer.add_latents, "sd", ids, latents, records)
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

_STOP = object()


class Background:
    """A single worker thread with a bounded FIFO of jobs; ``max_pending`` jobs may wait."""

    def __init__(self, max_pending: int = 2, name: str = "outlier-writer") -> None:
        self._jobs: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._reported = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            if self._error is None:  # after a failure, later jobs are dropped (they may depend on it)
                fn, args = job
                try:
                    fn(*args)
                except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
                    self._error = err

    def _raise(self) -> None:
        if self._error is not None and not self._reported:
            self._reported = True
            raise self._error

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)``; blocks while ``max_pending`` jobs wait. Raises a previous job's error."""
        self._raise()
        self._jobs.put((fn, args))

    def close(self) -> None:
        """Wait for every queued job, stop the thread and raise the first job error, if any."""
        if self._thread.is_alive():
            self._jobs.put(_STOP)
            self._thread.join()
        self._raise()

    def __enter__(self) -> Background:
        """The running writer."""
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Drain the queue; a job error is raised unless the block already raised."""
        if exc is None:
            self.close()
            return
        with contextlib.suppress(BaseException):  # the block's own exception wins
            self.close()
