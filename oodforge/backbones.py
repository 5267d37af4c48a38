"""Backbones: any `transformers` image classifier, wrapped so that it returns logits AND features.

The registry maps a config name to a function that builds a `transformers` model; the default,
``resnet-tiny``, is a small ResNet built from a ``ResNetConfig`` (no download). ``hf`` loads any image
classification model by Hub id or local path with ``from_pretrained``. Every backbone is then wrapped in
:class:`Classifier`: the model's final linear layer (the head) is taken out, so one forward pass gives the
penultimate features ``h`` and the logits ``f = head(h)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, PretrainedConfig, ResNetConfig

from oodforge.config import StrictModel
from oodforge.registry import Registry


class BackboneConfig(StrictModel):
    """Which backbone to build.

    Attributes:
        name: registry name: ``resnet-tiny`` (built from config) or ``hf`` (``from_pretrained``).
        pretrained: Hub id or local directory for ``hf``.
        revision: Hub revision (branch, tag or commit) for ``hf``.
        options: keyword overrides for the `transformers` config (e.g. ``hidden_sizes: [32, 64]``).
    """

    name: str = "resnet-tiny"
    pretrained: str | None = None
    revision: str | None = None
    options: dict[str, Any] = {}


BACKBONES: Registry[Callable[[BackboneConfig, int], nn.Module]] = Registry("backbone")


@BACKBONES.register("resnet-tiny")
def resnet_tiny(cfg: BackboneConfig, num_classes: int) -> nn.Module:
    """A ~0.7 M parameter ResNet for 32x32 inputs, from a ``transformers`` ``ResNetConfig``."""
    options = {
        "num_channels": 3,
        "embedding_size": 32,
        "hidden_sizes": [32, 64, 128],
        "depths": [2, 2, 2],
        "layer_type": "basic",
        "downsample_in_first_stage": False,
        **cfg.options,
    }
    return AutoModelForImageClassification.from_config(ResNetConfig(num_labels=num_classes, **options))


@BACKBONES.register("hf")
def hf_pretrained(cfg: BackboneConfig, num_classes: int) -> nn.Module:
    """Any ``transformers`` image classifier by Hub id or local path; the head is re-sized to our classes."""
    if not cfg.pretrained:
        raise ValueError("backbone 'hf' needs model.pretrained: a Hub id or a local model directory")
    return AutoModelForImageClassification.from_pretrained(
        cfg.pretrained,
        revision=cfg.revision,
        num_labels=num_classes,
        ignore_mismatched_sizes=True,
        **cfg.options,
    )


def _find_head(model: nn.Module, num_classes: int) -> str:
    """Name of the last ``nn.Linear`` producing ``num_classes`` outputs: the classification head."""
    names = [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes
    ]
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no linear layer with {num_classes} outputs to use as head"
        )
    return names[-1]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


class Classifier(nn.Module):
    """A `transformers` image model split into ``body`` (input -> features) and ``head`` (features -> logits).

    Example:
        >>> clf = build_classifier(BackboneConfig(), num_classes=6)
        >>> logits, features = clf(torch.randn(2, 3, 32, 32))
    """

    def __init__(self, model: nn.Module, num_classes: int) -> None:
        super().__init__()
        head_name = _find_head(model, num_classes)
        head = model.get_submodule(head_name)
        _set_submodule(model, head_name, nn.Identity())
        self.body = model
        self.head: nn.Linear = head  # type: ignore[assignment]
        self.num_classes = num_classes

    @property
    def hf_config(self) -> PretrainedConfig:
        return self.body.config

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``h`` [N, D]."""
        return self.body(pixel_values=pixel_values).logits.flatten(1)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(logits [N, K], features [N, D])``."""
        h = self.features(pixel_values)
        return self.head(h), h


def build_classifier(cfg: BackboneConfig, num_classes: int) -> Classifier:
    """Build the configured backbone for ``num_classes`` classes and wrap it as a :class:`Classifier`."""
    return Classifier(BACKBONES.get(cfg.name)(cfg, num_classes), num_classes)


def config_to_dict(config: PretrainedConfig) -> dict[str, Any]:
    """JSON-able form of a `transformers` config (stored in the detector artifact)."""
    return config.to_dict()


def classifier_from_config(config: dict[str, Any]) -> Classifier:
    """Rebuild an (untrained) classifier from a stored `transformers` config dict; weights are loaded after."""
    data = dict(config)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise ValueError("stored backbone config has no 'model_type'; the artifact is not from oodforge")
    hf_config = AutoConfig.for_model(model_type, **data)
    model = AutoModelForImageClassification.from_config(hf_config)
    return Classifier(model, hf_config.num_labels)
