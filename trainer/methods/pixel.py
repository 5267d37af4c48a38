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
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field
from torch import nn
from torch.utils.data import Dataset

from oodforge.backbones import Classifier
from oodforge.config import ConfigError, StrictModel
from oodforge.data.transforms import TransformedSet
from oodforge.outliers import OutlierDataset
from oodforge.registry import Registry
from trainer.config import TrainConfig
from trainer.losses.outlier import EnergyHead, energy_margin_loss, oe_loss

GENERATE = "python -m synth generate --config configs/synth/mnist_open.yaml --out runs/outliers"


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
        """The OE loss on ``logits_out`` (``logits_in`` is unused)."""
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
        """The squared-hinge margin loss on ID and outlier energies."""
        return energy_margin_loss(logits_in, logits_out, self.m_in, self.m_out)


@dataclass(frozen=True)
class PixelTerm:
    """A registered pixel-outlier term: how to build it and the weight its paper uses."""

    build: Callable[[PixelTermArgs], nn.Module]
    weight: float


PIXEL_TERMS: Registry[PixelTerm] = Registry("pixel-outlier term")
PIXEL_TERMS.register("oe")(PixelTerm(lambda args: OETerm(), weight=0.5))
PIXEL_TERMS.register("energy_margin")(
    PixelTerm(lambda args: EnergyMarginTerm(args.m_in, args.m_out), weight=0.1)
)
# Dream-OOD's public training script weighs its energy head 2.5 on CIFAR-100 (1.0 on ImageNet-100)
PIXEL_TERMS.register("energy_head")(PixelTerm(lambda args: EnergyHead(), weight=2.5))


def check_term(name: str | None) -> str | None:
    """``name`` if it is a registered pixel term (or ``None``); a ``ValueError`` listing them otherwise."""
    if name is not None and name not in PIXEL_TERMS:
        raise ValueError(f"unknown pixel term {name!r}; choose one of: {', '.join(PIXEL_TERMS.names())}")
    return name


def build_term(name: str, args: PixelTermArgs, weight: float | None) -> tuple[nn.Module, float]:
    """The term ``name`` built from ``args`` and its weight (the paper's when ``weight`` is ``None``)."""
    term = PIXEL_TERMS.get(name)
    return term.build(args), term.weight if weight is None else weight


def load_outliers(path: Path) -> OutlierDataset:
    """The synth dataset at ``path``, or a :class:`ConfigError` that says how to make it."""
    try:
        return OutlierDataset.load(path)
    except FileNotFoundError as err:
        raise ConfigError(f"method_args.outliers: {err}. Create it with `{GENERATE}`") from None
    except ValueError as err:
        raise ConfigError(f"method_args.outliers: {err}") from None


def pixel_set(outliers: OutlierDataset, config: TrainConfig) -> Dataset:
    """The kept, not held-out pixel outliers of a synth dataset, preprocessed (and augmented) like ID train.

    The held-out part is for score selection (:func:`oodforge.outliers.is_holdout`).
    """
    try:
        images = outliers.images("train")
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

    outliers: Path = Path("runs/outliers")
    weight: float | None = Field(None, ge=0)
    outlier_batch_size: int | None = Field(None, ge=1)
