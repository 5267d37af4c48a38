"""Backbones: any `transformers` image classifier, wrapped so that it returns logits AND features.

The registry maps a config name to a function that builds a `transformers` model; the default,
``resnet-tiny``, is a small ResNet built from a ``ResNetConfig`` (no download). ``hf`` loads any image
classification model by Hub id or local path with ``from_pretrained``. Every backbone is then wrapped in
:class:`Classifier`: the model's final linear layer is taken out, so one forward pass gives the features
and the logits. The ``HEADS`` registry says what replaces it:

- ``linear`` (default): the model's own linear layer; features are the penultimate ``h``, ``f = W h + b``.
- ``isomax_plus``: IsoMax+ (DESIGN.md §5): ``f_j = −|d_s|·‖ĥ − p̂_j‖`` to learnable prototypes; features = ``h``.
- ``cosine``: a text-aligned head (DESIGN.md §5): a projection ``z = P(h)`` to the width D of fixed class
  anchors T(y) [K, D] and ``f_j = cos(z, T(y_j)) / τ``; the features are the embedding ``z``. The anchors
  are a buffer, so they travel in the weights file.

:func:`final_layer` gives the linear head's ``(W, b)`` to the scores that work in feature space (ReAct,
ViM, ...), with a clear error for the other heads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, PretrainedConfig, ResNetConfig

from oodforge.config import StrictModel
from oodforge.registry import Registry


class HeadConfig(StrictModel):
    """What turns the backbone's features into logits (a ``HEADS`` registry name and its options).

    Attributes:
        name: ``linear`` (the model's own classifier layer), ``cosine`` (projection + cosine to anchors) or
            ``isomax_plus`` (negative scaled distance to learnable prototypes).
        tau: temperature τ of the ``cosine`` head: ``f_j = cos(z, T(y_j)) / τ``.
        embed_dim: width D of the ``cosine`` embedding; taken from the anchors when not set (and checked
            against them when set). Stored in ``detector.json``.
    """

    name: str = "linear"
    tau: float = Field(0.1, gt=0)
    embed_dim: int | None = Field(None, ge=1)

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        if name not in HEADS:
            raise ValueError(f"unknown head {name!r}; choose one of: {', '.join(HEADS.names())}")
        return name


class BackboneConfig(StrictModel):
    """Which backbone to build.

    Attributes:
        name: registry name: ``resnet-tiny`` (built from config) or ``hf`` (``from_pretrained``).
        pretrained: Hub id or local directory for ``hf``.
        revision: Hub revision (branch, tag or commit) for ``hf``.
        options: keyword overrides for the `transformers` config (e.g. ``hidden_sizes: [32, 64]``).
        head: the classification head (:class:`HeadConfig`).
    """

    name: str = "resnet-tiny"
    pretrained: str | None = None
    revision: str | None = None
    options: dict[str, Any] = {}
    head: HeadConfig = HeadConfig()


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


def cosine_logits(z: torch.Tensor, anchors: torch.Tensor, tau: float) -> torch.Tensor:
    """``f_j = cos(z, T(y_j)) / τ`` for embeddings ``z`` [N, D] and anchors ``T`` [K, D] -> [N, K]."""
    return F.normalize(z, dim=1) @ F.normalize(anchors, dim=1).T / tau


ANCHORS_KEY = "head.anchors"  # where a cosine classifier's anchors live in its state dict


class CosineHead(nn.Module):
    """Logits = cosine similarity to fixed class anchors over a temperature (no trainable parameters)."""

    def __init__(self, anchors: torch.Tensor, tau: float) -> None:
        super().__init__()
        self.register_buffer("anchors", anchors.detach().clone().float())
        self.tau = tau

    @property
    def in_features(self) -> int:
        """Width of the embeddings the head takes (the anchors' dimension D)."""
        return self.anchors.shape[1]

    @property
    def out_features(self) -> int:
        """Number of classes (anchors) the head scores."""
        return self.anchors.shape[0]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Cosine logits ``[N, K]`` of embeddings ``z`` ``[N, D]`` against the anchors."""
        return cosine_logits(z, self.anchors, self.tau)


HeadBuilder = Callable[[nn.Linear, HeadConfig, torch.Tensor | None], tuple[nn.Module, nn.Module, HeadConfig]]
HEADS: Registry[HeadBuilder] = Registry("head")
"""Head name -> ``build(fc, cfg, anchors) -> (neck, head, resolved cfg)``, where ``fc`` is the model's own
classifier layer; the classifier computes ``features = neck(h)`` and ``logits = head(features)``."""


@HEADS.register("linear")
def linear_head(
    fc: nn.Linear, cfg: HeadConfig, anchors: torch.Tensor | None
) -> tuple[nn.Module, nn.Module, HeadConfig]:
    """The backbone's own linear classifier: features = ``h``, logits = ``W h + b``."""
    if anchors is not None:
        raise ValueError("the linear head takes no class anchors; use model.head.name=cosine")
    return nn.Identity(), fc, cfg


@HEADS.register("cosine")
def cosine_head(
    fc: nn.Linear, cfg: HeadConfig, anchors: torch.Tensor | None
) -> tuple[nn.Module, nn.Module, HeadConfig]:
    """Projection ``P: h -> z`` (Linear, feature width -> D) and :class:`CosineHead` on the anchors."""
    if anchors is None:
        raise ValueError(
            "the cosine head needs class anchors T(y) [num_classes, D] (the generator's class-token "
            "embeddings); train it with method: teacher, which reads them from method_args.generator"
        )
    if anchors.ndim != 2 or anchors.shape[0] != fc.out_features:
        raise ValueError(
            f"class anchors have shape {tuple(anchors.shape)}; expected [{fc.out_features}, D], one row per class"
        )
    dim = anchors.shape[1]
    if cfg.embed_dim is not None and cfg.embed_dim != dim:
        raise ValueError(f"model.head.embed_dim is {cfg.embed_dim} but the class anchors are {dim}-wide")
    neck = nn.Linear(fc.in_features, dim)
    return neck, CosineHead(anchors, cfg.tau), cfg.model_copy(update={"embed_dim": dim})


class IsoMaxPlusHead(nn.Module):
    """Prototypes [K, D] ~ N(0, 1) and a learnable distance scale ``d_s`` (init 1); forward gives ``z`` ≤ 0."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.num_classes = num_classes
        self.prototypes = nn.Parameter(torch.randn(num_classes, in_features))
        self.distance_scale = nn.Parameter(torch.ones(1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``z_ij = −|d_s|·‖h_i/‖h_i‖ − p_j/‖p_j‖‖`` [N, K]."""
        if features.ndim != 2 or features.shape[1] != self.in_features:
            raise ValueError(
                f"IsoMaxPlusHead expects features [N, {self.in_features}], got {tuple(features.shape)}"
            )
        distances = torch.cdist(
            F.normalize(features, dim=1),
            F.normalize(self.prototypes, dim=1),
            compute_mode="donot_use_mm_for_euclid_dist",
        )
        return -self.distance_scale.abs() * distances


@HEADS.register("isomax_plus")
def isomax_plus_head(
    fc: nn.Linear, cfg: HeadConfig, anchors: torch.Tensor | None
) -> tuple[nn.Module, nn.Module, HeadConfig]:
    """:class:`IsoMaxPlusHead` on the penultimate features ``h`` (the model's linear layer is dropped)."""
    if anchors is not None:
        raise ValueError("the isomax_plus head takes no class anchors")
    return nn.Identity(), IsoMaxPlusHead(fc.in_features, fc.out_features), cfg


class Classifier(nn.Module):
    """A `transformers` image model split into ``body`` (input -> h), ``neck`` (h -> features) and ``head``.

    ``forward`` returns ``(logits, features)`` with ``logits = head(features)``. With the default linear
    head the neck is the identity (features = h) and ``head`` is the model's own ``nn.Linear``.

    Example:
        >>> clf = build_classifier(BackboneConfig(), num_classes=6)
        >>> logits, features = clf(torch.randn(2, 3, 32, 32))
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        head: HeadConfig | None = None,
        anchors: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        head_name = _find_head(model, num_classes)
        fc = model.get_submodule(head_name)
        _set_submodule(model, head_name, nn.Identity())
        self.body = model
        head = head or HeadConfig()
        self.neck, self.head, self.head_config = HEADS.get(head.name)(fc, head, anchors)
        self.num_classes = num_classes

    @property
    def hf_config(self) -> PretrainedConfig:
        """The wrapped Hugging Face model's config."""
        return self.body.config

    @property
    def feature_dim(self) -> int:
        """Width of the features ``forward`` returns (``h`` for the linear head, ``z`` for cosine)."""
        return self.head.in_features

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The features [N, feature_dim] that the head turns into logits."""
        return self.neck(self.body(pixel_values=pixel_values).logits.flatten(1))

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(logits [N, K], features [N, feature_dim])``."""
        z = self.features(pixel_values)
        return self.head(z), z


def build_classifier(
    cfg: BackboneConfig, num_classes: int, anchors: torch.Tensor | None = None
) -> Classifier:
    """Build the configured backbone for ``num_classes`` classes and wrap it as a :class:`Classifier`.

    ``anchors`` (class anchors T(y) [num_classes, D]) are required by, and only by, the cosine head.
    """
    return Classifier(BACKBONES.get(cfg.name)(cfg, num_classes), num_classes, cfg.head, anchors)


@dataclass(frozen=True)
class FinalLayer:
    """A classifier's final linear layer ``f = W h + b``, the one every feature-space score reads.

    ``h`` is the penultimate feature that :meth:`Classifier.forward` returns as its second output
    (with the linear head the neck is the identity, so the features *are* ``h``).

    Attributes:
        weight: ``[K, D]`` W (a detached float32 CPU copy).
        bias: ``[K]`` b (zeros when the layer has no bias).
    """

    weight: torch.Tensor
    bias: torch.Tensor

    @property
    def num_classes(self) -> int:
        """K, the number of logits."""
        return self.weight.shape[0]

    @property
    def feature_dim(self) -> int:
        """D, the width of the penultimate features h."""
        return self.weight.shape[1]

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``W h + b`` [N, K] of features ``h`` [N, D]."""
        return features @ self.weight.T.to(features) + self.bias.to(features)


def final_layer(model: Classifier, needed_by: str | None = None) -> FinalLayer:
    """The final linear layer (W, b) of ``model``, whose input is the features ``model`` returns.

    Args:
        model: A :class:`Classifier`.
        needed_by: Name of the score asking, for the error message.

    Raises:
        ValueError: the head is not ``W h + b`` on the features (a ``cosine`` or ``isomax_plus`` head);
            the message names the head and the scores that work without a linear layer.
    """
    head = model.head
    if not isinstance(head, nn.Linear) or not isinstance(model.neck, nn.Identity):
        name = model.head_config.name
        who = f"score {needed_by!r}" if needed_by else "this score"
        raise ValueError(
            f"{who} needs a linear final layer (W h + b), but this classifier has a {name} head "
            f"(model.head.name={name}); use a logit score (msp, energy, ...) or a feature score "
            "(knn, mahalanobis)"
        )
    weight = head.weight.detach().float().cpu().clone()
    bias = head.bias.detach().float().cpu().clone() if head.bias is not None else torch.zeros(len(weight))
    return FinalLayer(weight=weight, bias=bias)


def config_to_dict(config: PretrainedConfig) -> dict[str, Any]:
    """JSON-able form of a `transformers` config (stored in the detector artifact)."""
    return config.to_dict()


def classifier_from_config(
    config: dict[str, Any], head: HeadConfig | None = None, anchors: torch.Tensor | None = None
) -> Classifier:
    """Rebuild an (untrained) classifier from a stored `transformers` config dict; weights are loaded after.

    Args:
        config: the backbone's `transformers` config as a dict (``detector.json`` ``backbone``).
        head: the head config (``detector.json`` ``head``); linear when not given.
        anchors: the cosine head's class anchors, read from the weights file (``head.anchors``).
    """
    data = dict(config)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise ValueError("stored backbone config has no 'model_type'; the artifact is not from oodforge")
    hf_config = AutoConfig.for_model(model_type, **data)
    model = AutoModelForImageClassification.from_config(hf_config)
    return Classifier(model, hf_config.num_labels, head, anchors)
