"""Pre-processing and augmentation with plain torch + PIL (no torchvision).

``Preprocess`` is pure data so that it travels inside the detector artifact: the served model
pre-processes exactly as the trained one did. PIL images and tensor batches go through the same
code (``tensor``), so both inputs give identical model inputs.

Example:
    >>> pre = Preprocess(size=32)
    >>> ds = TransformedSet(bench.train, pre, augment=True, seed=0)
    >>> ds.set_epoch(3)
    >>> x, y = ds[0]  # x: float [3, 32, 32], the same in every process and on every resume
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field, field_validator
from torch.utils.data import Dataset

from oodforge.config import StrictModel
from oodforge.data.base import ImageSet, RawGeometry


class Preprocess(StrictModel):
    """RGB, resize to ``size`` x ``size`` (bilinear, antialiased) if needed, scale to [0, 1], normalise.

    Attributes:
        size: Side of the square model input.
        mean: Per-channel mean subtracted after scaling to [0, 1].
        std: Per-channel standard deviation divided by after subtracting the mean.
        raw: The benchmark's raw source geometry: inputs of its raw size are padded as the training
            copies were, before the resize (``None``: every input is resized). Set by the trainer from
            the benchmark when the config leaves it out.
    """

    size: int = Field(32, ge=1)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    raw: RawGeometry | None = None

    @field_validator("std")
    @classmethod
    def _positive_std(cls, std: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(std) <= 0:
            raise ValueError(f"preprocess.std must be positive in every channel, got {std}")
        return std

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """One PIL image (any mode, any size) -> float tensor ``[3, size, size]``."""
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        x = torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0)
        return self.tensor(x)[0]

    def tensor(self, images: torch.Tensor) -> torch.Tensor:
        """A batch ``[N, 3, H, W]``, uint8 0..255 or float 0..1 -> normalised float ``[N, 3, size, size]``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"expected images [N, 3, H, W], got shape {tuple(images.shape)}; add a batch dimension with "
                "x.unsqueeze(0) or move channels first with x.permute(0, 3, 1, 2)"
            )
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if self.raw is not None and x.shape[-2:] == (self.raw.side, self.raw.side):
            x = self.raw.pad(x)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(
                x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True
            )
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


def augment(
    image: torch.Tensor,
    generator: torch.Generator,
    pad: int = 2,
    hflip: bool = False,
    padding: Literal["edge", "zero"] = "edge",
) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (pad, then crop back), optionally a random h-flip.

    Args:
        image: One image ``[C, H, W]``.
        generator: Source of randomness; the same generator state gives the same result.
        pad: Largest shift in pixels; 0 disables the shift.
        hflip: Flip left-right with probability 1/2.
        padding: ``edge`` repeats the border pixels, ``zero`` fills with 0.

    Returns:
        The augmented image, same shape as ``image``.
    """
    if image.ndim != 3:
        raise ValueError(f"augment takes one image [C, H, W], got shape {tuple(image.shape)}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if pad > 0:
        _, h, w = image.shape
        mode = "replicate" if padding == "edge" else "constant"
        padded = F.pad(image.unsqueeze(0), (pad, pad, pad, pad), mode=mode)[0]
        dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=generator))
        image = padded[:, dy : dy + h, dx : dx + w]
    if hflip and bool(torch.rand((), generator=generator) < 0.5):
        image = image.flip(-1)
    return image


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed that depends only on ``(seed, epoch, index)`` (not on process, hash seed or global RNG)."""
    entropy = [v % 2**64 for v in (seed, epoch, index)]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


class TransformedSet(Dataset):
    """An :class:`ImageSet` as ``(float tensor [3, S, S], label)`` pairs, optionally augmented.

    The augmentation of item ``i`` is seeded by ``(seed, epoch, i)``, so a resumed or multi-worker run
    sees exactly the images an uninterrupted single-process one would. Call ``set_epoch`` once per epoch.

    Args:
        images: The image set.
        preprocess: Turns each PIL image into a normalised tensor.
        augment: Apply a random shift (and flip if ``hflip``) after pre-processing.
        seed: Seed of the augmentation.
        hflip: Also flip left-right at random (off for digits, on for natural images).
    """

    def __init__(
        self,
        images: ImageSet,
        preprocess: Preprocess,
        augment: bool = False,
        seed: int = 0,
        hflip: bool = False,
    ) -> None:
        self.images = images
        self.preprocess = preprocess
        self.augment = augment
        self.seed = seed
        self.hflip = hflip
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation of epoch ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.images[i]
        x = self.preprocess(image)
        if self.augment:
            generator = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, int(i)))
            x = augment(x, generator, hflip=self.hflip)
        return x, int(label)
