"""The method interface and its registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

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


class Method(nn.Module):
    """Base class: ``loss(model, batch)`` returns the total loss and named scalar parts for logging.

    Sub-modules registered on the method (``self.head = nn.Linear(...)``) are trained and checkpointed
    together with the backbone. Two class-level hooks run before training: :meth:`check` (fail fast on a
    missing input, before the run directory is touched) and :meth:`build_model` (the classifier to train).
    """

    Config: ClassVar[type[StrictModel]] = NoArgs

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

    def loss(
        self, model: Classifier, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError


METHODS: Registry[type[Method]] = Registry("method")
