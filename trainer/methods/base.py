"""The method interface, its registry, and the :class:`Plan` a method hands the training loop.

A method has two parts: :meth:`Method.setup`, run once before the run directory is touched, which
loads everything the method needs (each resource once: teacher, outlier datasets), builds the model it
trains and its own modules, and fails with a :class:`~oodforge.config.ConfigError` naming what is
missing; and :meth:`Method.loss`, which turns one batch (plus one batch of every outlier set) into the
loss and its named parts.

Example:
    >>> method = build_method("oal", {"alpha": 4.0})
    >>> plan = method.setup(config, bench)
    >>> loss, parts = method.loss(plan.model, (images, labels), {"knn": knn_rows})
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import ValidationError
from torch import nn
from torch.utils.data import Dataset

from oodforge.backbones import Classifier, build_classifier
from oodforge.config import ConfigError, StrictModel
from oodforge.data import Benchmark
from oodforge.registry import Registry
from trainer.config import TrainConfig


class NoArgs(StrictModel):
    """A method without options (any key in ``method_args`` is an error)."""


@dataclass
class Plan:
    """What the loop trains, as the method's :meth:`Method.setup` built it.

    Attributes:
        model: The classifier to train (``init_from`` weights are loaded into it by the loop).
        param_groups: Optimizer groups for the method's own modules (``{"params": [...], "lr": ...}``);
            method parameters in no group train at the run's learning rate.
        outliers: Named outlier datasets; the loop draws one batch of each per step.
        outlier_batch_size: Rows per outlier batch (the ID batch size when ``None``).
        find_unused_parameters: Some parameters get no gradient on some steps (DDP must know).
        head_sees_synth_images: A loss term trains the logits on the synth dataset's pixel outliers, so
            the held-out part of those outliers is no fair judge of scores computed through the head
            (energy, MSP, ...): ``export.score: auto`` then chooses among feature-space scores only.
    """

    model: Classifier
    param_groups: list[dict[str, Any]] = field(default_factory=list)
    outliers: dict[str, Dataset] = field(default_factory=dict)
    outlier_batch_size: int | None = None
    find_unused_parameters: bool = False
    head_sees_synth_images: bool = False


class Method(nn.Module):
    """Base class: :meth:`setup` once, then :meth:`loss` per step.

    Sub-modules registered on the method in :meth:`setup` (``self.head = nn.Linear(...)``) are trained
    and checkpointed together with the backbone.
    """

    Config: ClassVar[type[StrictModel]] = NoArgs

    def __init__(self, args: StrictModel) -> None:
        """Keep the validated ``method_args``."""
        super().__init__()
        self.args = args

    def setup(self, config: TrainConfig, data: Benchmark) -> Plan:
        """Build the model this method trains (by default the configured backbone and head)."""
        return Plan(model=build_classifier(config.model, len(data.class_names)))

    def set_epoch(self, epoch: int) -> None:
        """Called by the loop at the start of every epoch (0-based), also when a run resumes."""
        self.epoch = epoch

    def loss(
        self,
        model: Classifier,
        batch: tuple[torch.Tensor, torch.Tensor],
        outliers: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss of one step and its named parts; ``outliers`` holds a batch of every outlier set."""
        raise NotImplementedError


METHODS: Registry[type[Method]] = Registry("method")


def build_method(name: str, method_args: dict[str, Any]) -> Method:
    """The registered method ``name`` with its validated ``method_args``; :class:`ConfigError` otherwise."""
    try:
        cls = METHODS.get(name)
    except KeyError as err:
        raise ConfigError(f"method: {err.args[0]}") from None
    try:
        args = cls.Config.model_validate(method_args)
    except ValidationError as err:
        parts = []
        for e in err.errors():
            where = "method_args." + ".".join(str(p) for p in e["loc"])
            parts.append(
                f"unknown key '{where}'" if e["type"] == "extra_forbidden" else f"{where}: {e['msg']}"
            )
        raise ConfigError("; ".join(parts)) from None
    return cls(args)
