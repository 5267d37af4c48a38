"""The method interface and its registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

from oodforge.backbones import Classifier, build_classifier
from oodforge.config import StrictModel
from oodforge.registry import Registry

if TYPE_CHECKING:
    from trainer.config import TrainConfig


class NoArgs(StrictModel):
    """A method without options (any key in ``method_args`` is an error)."""


@dataclass
class MethodContext:
    """What a method may need to build itself: the validated args, class count and the run's config."""

    args: Any
    num_classes: int
    config: Any
    feature_dim: int = 0  # width of the model's features h (what the method's heads/projectors take)


class Method(nn.Module):
    """Base class: ``loss(model, batch)`` returns the total loss and named scalar parts for logging.

    Sub-modules registered on the method (``self.head = nn.Linear(...)``) are trained and checkpointed
    together with the backbone. Class-level hooks run before training: :meth:`check` (fail fast on a
    missing input, before the run directory is touched), :meth:`build_model` (the classifier to train) and
    :meth:`outlier_sets` (named outlier datasets; the loop passes one batch of each to :meth:`loss`).
    """

    Config: ClassVar[type[StrictModel]] = NoArgs
    find_unused_parameters: ClassVar[bool] = False  # True if some parameters get no gradient on some steps

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__()
        self.ctx = ctx

    @classmethod
    def check(cls, args: Any, config: TrainConfig) -> None:
        """Raise :class:`~oodforge.config.ConfigError` if something the method needs is missing."""

    @classmethod
    def build_model(cls, args: Any, config: TrainConfig, class_names: list[str]) -> Classifier:
        """The classifier this method trains; by default the configured backbone with its head."""
        return build_classifier(config.model, len(class_names))

    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups of the method's own trainable modules (at the run's lr by default)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    @classmethod
    def outlier_sets(cls, args: Any, config: TrainConfig, class_names: list[str]) -> dict[str, Dataset]:
        """Named outlier datasets this method trains on (none by default)."""
        return {}

    @classmethod
    def outlier_batch_size(cls, args: Any, config: TrainConfig) -> int:
        """Rows per outlier batch; the ID batch size unless the method's args say otherwise."""
        return getattr(args, "outlier_batch_size", None) or config.train.batch_size

    def loss(
        self,
        model: Classifier,
        batch: tuple[torch.Tensor, torch.Tensor],
        outliers: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss of one step and its named parts; ``outliers`` holds a batch of every outlier set."""
        raise NotImplementedError


METHODS: Registry[type[Method]] = Registry("method")
