"""The method interface and its registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from oodforge.backbones import Classifier
from oodforge.config import StrictModel
from oodforge.registry import Registry


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
    together with the backbone.
    """

    Config: ClassVar[type[StrictModel]] = NoArgs

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__()
        self.ctx = ctx

    def loss(
        self, model: Classifier, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError


METHODS: Registry[type[Method]] = Registry("method")
