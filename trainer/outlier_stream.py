"""Endless, resumable outlier batches next to the ID loader.

A method that trains on outliers declares named datasets (:meth:`trainer.methods.Method.outlier_sets`);
the loop gives each its own ``DataLoader`` (prepared by Accelerate, so it is sharded over processes like
the ID loader) and draws one batch of every stream per step. A stream never runs dry: at its end it
starts its next epoch with a new shuffle. Batch ``s`` of the run is batch ``s mod n`` of epoch
``s div n`` (``n`` batches per epoch), so ``--resume`` at global step ``s`` continues with exactly the
batches an uninterrupted run would have drawn.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from accelerate import Accelerator
from torch.utils.data import ConcatDataset, DataLoader, Dataset


class OutlierStream:
    """Cycles over a prepared loader; :meth:`start` positions it at a global step.

    Args:
        accelerator: the run's accelerator (prepares the loader, skips batches on resume).
        dataset: the outlier dataset (items are tensors, or tuples whose first element is the tensor).
        batch_size: rows per batch (per process).
        name: for error messages.
    """

    def __init__(self, accelerator: Accelerator, dataset: Dataset, batch_size: int, name: str) -> None:
        size = len(dataset)  # type: ignore[arg-type]
        if size == 0:
            raise ValueError(
                f"outlier set {name!r} is empty; generate outliers or turn off the term that uses it"
            )
        needed = batch_size * accelerator.num_processes
        if size < needed:  # repeat a small set so that one batch per process can be drawn
            copies = math.ceil(needed / size)
            accelerator.print(
                f"outlier set {name!r} has {size} items, fewer than one batch of {batch_size} per process: "
                f"each epoch repeats it {copies} times (generate more outliers for more variety)"
            )
            dataset = ConcatDataset([dataset] * copies)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True)
        self.accelerator = accelerator
        self.loader = accelerator.prepare(loader)
        self.dataset = dataset
        self.name = name
        self._epoch = 0
        self._iter: Iterator[Any] | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def _open(self, epoch: int, skip: int = 0) -> None:
        self._epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        self.loader.set_epoch(epoch)
        batches = self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader
        self._iter = iter(batches)

    def start(self, global_step: int) -> None:
        """Position the stream so the next batch is the one of ``global_step`` (0 for a fresh run)."""
        self._open(global_step // len(self), global_step % len(self))

    def next(self) -> Any:
        """The next outlier batch (its first field when items are tuples); a new epoch starts at the end."""
        if self._iter is None:
            self.start(0)
        try:
            batch = next(self._iter)  # type: ignore[arg-type]
        except StopIteration:
            self._open(self._epoch + 1)
            batch = next(self._iter)  # type: ignore[arg-type]
        return batch[0] if isinstance(batch, (list, tuple)) else batch
