"""Pre-processing and augmentation with plain torch + PIL (no torchvision).

``Preprocess`` is pure data so that it travels inside the detector artifact: the served model
pre-processes exactly as the trained one did.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from oodforge.config import StrictModel


class Preprocess(StrictModel):
    """RGB, resize to ``size`` x ``size`` (bilinear) if needed, scale to [0, 1], normalise by mean/std."""

    size: int = 32
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=x.dtype).view(-1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(-1, 3, 1, 1)
        return (x - mean) / std

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """One PIL image (any mode, any size) -> float tensor ``[3, size, size]``."""
        image = image.convert("RGB")
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        return self._normalise(x.unsqueeze(0))[0]

    def tensor(self, images: torch.Tensor) -> torch.Tensor:
        """A batch ``[N, 3, H, W]``, uint8 0..255 or float 0..1 -> normalised ``[N, 3, size, size]``."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return self._normalise(x)


def augment(image: torch.Tensor, generator: torch.Generator, pad: int = 2, hflip: bool = False) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (edge padding, then crop), optional horizontal flip."""
    if pad > 0:
        _, h, w = image.shape
        padded = F.pad(image.unsqueeze(0), (pad, pad, pad, pad), mode="replicate")[0]
        dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=generator))
        image = padded[:, dy : dy + h, dx : dx + w]
    if hflip and bool(torch.rand((), generator=generator) < 0.5):
        image = image.flip(-1)
    return image


class TransformedSet(Dataset):
    """An :class:`ImageSet` as tensors; augmentation is seeded by ``(seed, epoch, index)`` so that a
    resumed or multi-process run sees exactly the images an uninterrupted one would."""

    def __init__(self, images, preprocess: Preprocess, augment: bool = False, seed: int = 0, hflip: bool = False):
        self.images = images
        self.preprocess = preprocess
        self.augment = augment
        self.seed = seed
        self.hflip = hflip
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.images[i]
        x = self.preprocess(image)
        if self.augment:
            g = torch.Generator().manual_seed(hash((self.seed, self.epoch, int(i))) & 0x7FFF_FFFF_FFFF_FFFF)
            x = augment(x, g, hflip=self.hflip)
        return x, label
