"""Segmenters: fully convolutional models that give logits per pixel, from a registry.

``SEGMENTERS`` maps a config name to a :class:`SegmenterKind`, which knows how to build the model from a
:class:`SegmenterConfig`, how to describe the built model as JSON (stored in the dense detector
artifact) and how to rebuild it from that JSON with no download:

- ``fcn-tiny`` (default): a small encoder-decoder (strided convs to 1/4 resolution, dilated context
  convs, bilinear upsampling with skip connections), ~0.1 M parameters, fast on CPU at 64x64.
- ``segformer``: a `transformers` SegFormer, built from a ``SegformerConfig`` (``options`` override its
  fields) or loaded with ``from_pretrained`` from a Hub id or local directory (``pretrained``).

Every segmenter is wrapped in :class:`Segmenter`, whose ``forward`` returns logits ``[N, K, H, W]`` at the
input's resolution (SegFormer predicts at 1/4 and is upsampled bilinearly).

Example:
    >>> seg = build_segmenter(SegmenterConfig(), num_classes=7)
    >>> seg(torch.randn(2, 3, 64, 64)).shape
    torch.Size([2, 7, 64, 64])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from transformers import SegformerConfig, SegformerForSemanticSegmentation

from oodforge.config import StrictModel
from oodforge.registry import Registry


class SegmenterConfig(StrictModel):
    """Which segmenter to build.

    Attributes:
        name: ``fcn-tiny`` or ``segformer``.
        pretrained: Hub id or local directory of a SegFormer checkpoint (``segformer`` only).
        revision: Hub revision of ``pretrained``.
        options: Overrides of the architecture's fields (``TinyFCNConfig`` or ``SegformerConfig``).
    """

    name: str = "fcn-tiny"
    pretrained: str | None = None
    revision: str | None = None
    options: dict[str, Any] = {}


class TinyFCNConfig(StrictModel):
    """Architecture of :class:`TinyFCN`: widths at full, 1/2 and 1/4 resolution, dilations at 1/4."""

    num_classes: int = Field(7, ge=2)
    widths: tuple[int, int, int] = (16, 32, 64)
    dilations: tuple[int, ...] = (1, 2, 4)


def _conv(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class TinyFCN(nn.Module):
    """A small U-shaped FCN: 64x64 input -> 1/2 -> 1/4 (dilated convs for context) -> back up with skips."""

    def __init__(self, config: TinyFCNConfig) -> None:
        super().__init__()
        self.config = config
        w1, w2, w3 = config.widths
        self.stem = _conv(3, w1)
        self.down1 = nn.Sequential(_conv(w1, w2, stride=2), _conv(w2, w2))
        self.down2 = nn.Sequential(
            _conv(w2, w3, stride=2), *(_conv(w3, w3, dilation=d) for d in config.dilations)
        )
        self.up1 = _conv(w3 + w2, w2)
        self.up2 = _conv(w2 + w1, w1)
        self.classifier = nn.Conv2d(w1, config.num_classes, 1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Per-pixel class logits ``[N, C, H, W]`` of images ``[N, 3, H, W]``."""
        x1 = self.stem(pixel_values)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        y = self.up1(torch.cat([F.interpolate(x3, size=x2.shape[-2:], mode="bilinear"), x2], dim=1))
        y = self.up2(torch.cat([F.interpolate(y, size=x1.shape[-2:], mode="bilinear"), x1], dim=1))
        return self.classifier(y)


@dataclass(frozen=True)
class SegmenterKind:
    """How one registered architecture is built, described as JSON and rebuilt from that JSON."""

    build: Callable[[SegmenterConfig, int], nn.Module]
    describe: Callable[[nn.Module], dict[str, Any]]
    rebuild: Callable[[dict[str, Any]], nn.Module]


SEGMENTERS: Registry[SegmenterKind] = Registry("segmenter")


def _fcn_build(cfg: SegmenterConfig, num_classes: int) -> nn.Module:
    if cfg.pretrained:
        raise ValueError("segmenter fcn-tiny is built from config; model.pretrained is for segformer only")
    return TinyFCN(TinyFCNConfig(num_classes=num_classes, **cfg.options))


SEGMENTERS.register("fcn-tiny")(
    SegmenterKind(
        build=_fcn_build,
        describe=lambda m: m.config.model_dump(mode="json"),
        rebuild=lambda d: TinyFCN(TinyFCNConfig.model_validate(d)),
    )
)


class SegformerLogits(nn.Module):
    """A ``SegformerForSemanticSegmentation`` that returns its logits tensor (at 1/4 resolution)."""

    def __init__(self, model: SegformerForSemanticSegmentation) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Per-pixel class logits of images ``[N, 3, H, W]`` (at the model's output resolution)."""
        return self.model(pixel_values=pixel_values).logits


def _segformer_build(cfg: SegmenterConfig, num_classes: int) -> nn.Module:
    if cfg.pretrained:
        model = SegformerForSemanticSegmentation.from_pretrained(
            cfg.pretrained,
            revision=cfg.revision,
            num_labels=num_classes,
            ignore_mismatched_sizes=True,
            **cfg.options,
        )
    else:
        tiny = {"hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1], "decoder_hidden_size": 64}
        model = SegformerForSemanticSegmentation(
            SegformerConfig(num_labels=num_classes, **{**tiny, **cfg.options})
        )
    return SegformerLogits(model)


def _segformer_rebuild(data: dict[str, Any]) -> nn.Module:
    return SegformerLogits(SegformerForSemanticSegmentation(SegformerConfig.from_dict(data)))


SEGMENTERS.register("segformer")(
    SegmenterKind(
        build=_segformer_build,
        describe=lambda m: m.model.config.to_dict(),
        rebuild=_segformer_rebuild,
    )
)


class Segmenter(nn.Module):
    """A registered segmentation model whose ``forward`` gives logits ``[N, K, H, W]`` at input resolution."""

    def __init__(self, name: str, model: nn.Module) -> None:
        super().__init__()
        self.name = name
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Per-pixel class logits ``[N, C, H, W]``, upsampled to the input's size when needed."""
        logits = self.model(pixel_values)
        if logits.shape[-2:] != pixel_values.shape[-2:]:
            logits = F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
        return logits

    def architecture(self) -> dict[str, Any]:
        """JSON that :func:`segmenter_from_architecture` turns back into this model (untrained)."""
        return {"name": self.name, "config": SEGMENTERS.get(self.name).describe(self.model)}


def build_segmenter(cfg: SegmenterConfig, num_classes: int) -> Segmenter:
    """Build the configured segmenter for ``num_classes`` classes (background included)."""
    return Segmenter(cfg.name, SEGMENTERS.get(cfg.name).build(cfg, num_classes))


def segmenter_from_architecture(architecture: dict[str, Any]) -> Segmenter:
    """Rebuild an untrained segmenter from :meth:`Segmenter.architecture` (weights are loaded after)."""
    try:
        name, config = architecture["name"], architecture["config"]
    except (KeyError, TypeError):
        raise ValueError(
            "the stored segmenter architecture needs 'name' and 'config' (Segmenter.architecture()); "
            "re-export the detector with trainer/train_dense.py"
        ) from None
    return Segmenter(name, SEGMENTERS.get(name).rebuild(config))
