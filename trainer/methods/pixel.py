"""Training on pixel-space outliers (a synth dataset's kept images): the shared pieces.

* :data:`PIXEL_TERMS` — the outlier terms, each an ``nn.Module`` ``term(logits_in, logits_out) -> loss``
  (unweighted): ``oe`` (Outlier Exposure), ``energy_margin`` (energy-bounded learning), ``energy_head``
  (Dream-OOD's logistic head on the energy). DESIGN.md §5 "Pixel outliers in training".
* :func:`pixel_set` — the outlier images as a training set (same preprocessing and augmentation as ID).
* :func:`joint_forward` — ID and outlier images through the model in **one** forward pass, so
  BatchNorm sees one batch (separate passes corrupt its running statistics).

The methods ``oe`` and ``energy_margin`` (:mod:`trainer.methods.outlier_exposure`) and OAL's optional
pixel term use them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field
from torch import nn
from torch.utils.data import Dataset

from oodforge.backbones import Classifier
from oodforge.config import ConfigError, StrictModel
from oodforge.data.transforms import TransformedSet
from oodforge.outliers import OutlierDataset
from oodforge.registry import Registry
from trainer.losses.outlier import EnergyHead, energy_margin_loss, oe_loss

if TYPE_CHECKING:
    from trainer.config import TrainConfig

PixelTermName = Literal["oe", "energy_margin", "energy_head"]
DEFAULT_WEIGHTS: dict[str, float] = {"oe": 0.5, "energy_margin": 0.1, "energy_head": 0.1}
GENERATE = "python -m synth generate --config configs/synth/mnist_open.yaml --out outliers/mnist-open"


class PixelTermArgs(StrictModel):
    """Options of a pixel-outlier term.

    Attributes:
        m_in: ``energy_margin``: ID energies above this are penalised (Liu et al. 2020 use −23 on CIFAR-10).
        m_out: ``energy_margin``: outlier energies below this are penalised (−5 in the paper).
    """

    m_in: float = -23.0
    m_out: float = -5.0


class OETerm(nn.Module):
    """Outlier Exposure: cross-entropy from the uniform distribution on the outliers' logits."""

    def forward(self, logits_in: torch.Tensor, logits_out: torch.Tensor) -> torch.Tensor:
        return oe_loss(logits_out)


class EnergyMarginTerm(nn.Module):
    """Squared-hinge energy margins on ID (``m_in``) and outlier (``m_out``) energies."""

    def __init__(self, m_in: float, m_out: float) -> None:
        super().__init__()
        if m_in >= m_out:
            raise ConfigError(
                f"energy margins need m_in < m_out (ID energy is lower), got {m_in} and {m_out}"
            )
        self.m_in, self.m_out = m_in, m_out

    def forward(self, logits_in: torch.Tensor, logits_out: torch.Tensor) -> torch.Tensor:
        return energy_margin_loss(logits_in, logits_out, self.m_in, self.m_out)


PIXEL_TERMS: Registry[Callable[[PixelTermArgs], nn.Module]] = Registry("pixel-outlier term")
PIXEL_TERMS.register("oe")(lambda args: OETerm())
PIXEL_TERMS.register("energy_margin")(lambda args: EnergyMarginTerm(args.m_in, args.m_out))
PIXEL_TERMS.register("energy_head")(lambda args: EnergyHead())


def load_outliers(path: Path) -> OutlierDataset:
    """The synth dataset at ``path``, or a :class:`ConfigError` that says how to make it."""
    try:
        return OutlierDataset.load(path)
    except FileNotFoundError as err:
        raise ConfigError(f"method_args.outliers: {err}. Create it with `{GENERATE}`") from None
    except ValueError as err:
        raise ConfigError(f"method_args.outliers: {err}") from None


def pixel_set(path: Path, config: TrainConfig) -> Dataset:
    """The kept pixel outliers of the synth dataset at ``path``, preprocessed (and augmented) like ID train."""
    try:
        images = load_outliers(path).images()
    except ValueError as err:
        raise ConfigError(f"method_args.outliers: {err}") from None
    return TransformedSet(
        images,
        config.preprocess,
        augment=config.train.augment,
        seed=config.seed + 1,
        hflip=config.train.hflip,
    )


def joint_forward(
    model: Classifier, images: torch.Tensor, outliers: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits_in, features_in, logits_out, features_out)`` from one forward pass over both batches."""
    logits, features = model(torch.cat([images, outliers.to(images.dtype)]))
    n = len(images)
    return logits[:n], features[:n], logits[n:], features[n:]


class PixelOutlierArgs(PixelTermArgs):
    """Shared ``method_args`` of methods trained on a synth dataset's images.

    Attributes:
        outliers: the synth outlier dataset directory (its kept images are used).
        weight: weight of the outlier term; the method's paper value when unset.
        outlier_batch_size: outlier images per step (per process); the ID batch size when unset.
    """

    outliers: Path = Path("outliers/mnist-open")
    weight: float | None = Field(None, ge=0)
    outlier_batch_size: int | None = Field(None, ge=1)
