"""The ID training stream as one pre-processed tensor on the device: shuffled, batched and augmented there.

Every image is decoded and pre-processed once (:class:`oodforge.data.transforms.Preprocess`, the
evaluation and serving path), so a training step does no per-sample PIL work; each epoch draws a seeded
permutation, each batch is augmented on the device (:func:`oodforge.data.augment.shift_batch` and
:class:`oodforge.data.augment.CovariateAugment`) with a generator seeded by ``(seed, epoch, step)``.
The stream is therefore the same on every resume, and under ``accelerate launch`` each process takes
every ``world``-th index of the permutation (a distributed sampler's split).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from oodforge.data.augment import CovariateAugment, shift_batch
from oodforge.data.base import ArrayImageSet, ImageSet
from oodforge.data.transforms import Preprocess, item_seed
from oodforge.progress import progress

PERMUTATION = 2**31  # the item index item_seed gets for an epoch's permutation (steps are below it)


def preprocess_all(images: ImageSet, preprocess: Preprocess, chunk: int = 1024) -> torch.Tensor:
    """``[N, 3, S, S]`` float tensor of every image, exactly as :meth:`Preprocess.__call__` makes each one."""
    if isinstance(images, ArrayImageSet):  # uniform uint8 arrays: pre-process in chunks
        parts = [
            preprocess.tensor(
                torch.from_numpy(np.ascontiguousarray(images.images[i : i + chunk])).permute(0, 3, 1, 2)
            )
            for i in range(0, len(images), chunk)
        ]
        return torch.cat(parts) if parts else torch.zeros(0, 3, preprocess.size, preprocess.size)
    return torch.stack(
        [preprocess(images[i][0]) for i in progress(range(len(images)), desc=f"decode {images.name}")]
    )


class TensorBatches:
    """Batches ``(x, y)`` of the ID training images, held on ``device``.

    Args:
        sets: The image sets to train on (the ID train split, plus any labelled reference images).
        preprocess: The model's pre-processing.
        batch_size: Images per batch and process.
        seed: Seed of the shuffle and of the augmentation.
        shift: Largest random translation in pixels (0: none).
        hflip: Random left-right flips.
        covariate: Covariate-shift augmentation (``p: 0``: none).
        device: Where the tensors live and the augmentation runs.
        rank: This process's index; ``world``: the number of processes.
    """

    def __init__(
        self,
        sets: Sequence[ImageSet],
        preprocess: Preprocess,
        batch_size: int,
        seed: int,
        shift: int = 2,
        hflip: bool = False,
        covariate: CovariateAugment | None = None,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.x = torch.cat([preprocess_all(s, preprocess) for s in sets]).to(device)
        self.y = torch.from_numpy(np.concatenate([np.asarray(s.labels, dtype=np.int64) for s in sets])).to(
            device
        )
        self.batch_size, self.seed, self.shift, self.hflip = batch_size, seed, shift, hflip
        self.covariate = covariate or CovariateAugment()
        self.rank, self.world = rank, world
        self.epoch = 0
        if len(self) == 0:
            raise ValueError(
                f"{len(self.x)} training images are too few for one batch of {batch_size} per process "
                f"({world} process(es)); lower train.batch_size"
            )

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle and augmentation of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return (len(self.x) // self.world) // self.batch_size

    def _order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, PERMUTATION))
        return torch.randperm(len(self.x), generator=g)[self.rank :: self.world]

    def batches(self, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This epoch's batches from step ``skip`` on (a resumed run skips the ones it trained on)."""
        order = self._order().to(self.x.device)
        for step in range(skip, len(self)):
            idx = order[step * self.batch_size : (step + 1) * self.batch_size]
            g = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, step))
            x = shift_batch(self.x[idx], g, self.shift, self.hflip)
            yield self.covariate(x, g), self.y[idx]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches()
