"""Scores that reshape the penultimate activations (or the last layer) and take the energy of the result.

They are ReAct, ASH-P / ASH-B / ASH-S, SCALE and DICE. Each needs the final linear layer
``f = W h + b`` (:func:`oodforge.backbones.final_layer`): it keeps ``W`` and ``b`` in its state, so the
artifact is self-contained, and scores ``energy(W a(h) + b) = lse(W a(h) + b)`` for its shaping ``a``.
ASH and SCALE assume non-negative activations (the post-ReLU, pooled features of a ResNet), as their
papers do.

Percentile rule shared by ASH, SCALE and DICE: of ``n`` values, the ``n − ⌊n·p/100 + ½⌋`` largest are
kept (``p = 0`` keeps all of them; ties are broken by :func:`torch.topk`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from oodforge.backbones import FinalLayer
from oodforge.scores.base import (
    SCORES,
    Score,
    check_features,
    check_fit_inputs,
    check_layer,
    check_number,
)
from oodforge.scores.logit import energy

# --------------------------------------------------------------------------- pure functions


def kept_count(n: int, percentile: float) -> int:
    """How many of ``n`` values survive pruning at ``percentile``: ``n − ⌊n·p/100 + ½⌋``."""
    return n - math.floor(n * percentile / 100.0 + 0.5)


def top_mask(values: torch.Tensor, percentile: float) -> torch.Tensor:
    """``[N, D]`` 0/1 mask of the ``kept_count(D, p)`` largest entries of each row."""
    k = kept_count(values.shape[1], percentile)
    mask = torch.zeros_like(values)
    if k > 0:
        mask.scatter_(1, values.topk(k, dim=1).indices, 1.0)
    return mask


def react_clip(features: torch.Tensor, clip: float | torch.Tensor) -> torch.Tensor:
    """ReAct's rectification ``h̄ = min(h, c)`` (Sun et al., arXiv 2111.12797)."""
    return features.clamp(max=float(clip))


def ash_prune(features: torch.Tensor, percentile: float) -> torch.Tensor:
    """ASH-P: keep each sample's top ``(100 − p)%`` activations, zero the rest (arXiv 2209.09858)."""
    return features * top_mask(features, percentile)


def ash_binarize(features: torch.Tensor, percentile: float) -> torch.Tensor:
    """ASH-B: the kept activations all become ``s₁ / k`` (``s₁ = Σ_d h_d``, k kept), the rest 0."""
    mask = top_mask(features, percentile)
    return mask * (features.sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp_min(1.0))


def _ratio(s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """``s₁ / s₂``, 1 where ``s₂ = 0`` (an all-zero activation vector: any factor leaves it zero)."""
    return torch.where(s2 != 0, s1 / torch.where(s2 != 0, s2, torch.ones_like(s2)), torch.ones_like(s1))


def ash_scale(features: torch.Tensor, percentile: float) -> torch.Tensor:
    """ASH-S: prune as ASH-P, then multiply what is kept by ``exp(s₁ / s₂)``.

    ``s₁`` is the sum of the activations before pruning and ``s₂`` after it.
    """
    h = features.double()
    pruned = h * top_mask(h, percentile)
    ratio = _ratio(h.sum(dim=1, keepdim=True), pruned.sum(dim=1, keepdim=True))
    return (pruned * ratio.exp()).to(features.dtype)


def scale_shaping(features: torch.Tensor, percentile: float) -> torch.Tensor:
    """SCALE: ``h · exp(s₁ / s₂)`` with the ASH-S ratio but *no* pruning (Xu et al., arXiv 2310.00227)."""
    h = features.double()
    ratio = _ratio(h.sum(dim=1, keepdim=True), (h * top_mask(h, percentile)).sum(dim=1, keepdim=True))
    return (h * ratio.exp()).to(features.dtype)


def dice_weight(weight: torch.Tensor, mean_features: torch.Tensor, sparsity: float) -> torch.Tensor:
    """DICE's sparsified weight ``M ⊙ W`` (Sun & Li, arXiv 2111.09805).

    The contribution of unit d to class k is ``V_kd = W_kd · h̄_d`` with ``h̄`` the mean ID train
    feature; ``M`` keeps the ``kept_count(K·D, p)`` largest contributions over the whole matrix.
    """
    contribution = weight * mean_features[None, :]
    mask = top_mask(contribution.reshape(1, -1), sparsity).reshape(weight.shape)
    return weight * mask


def shaped_energy(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``lse(W a + b)`` of already shaped activations ``a`` (float64, returned as float32)."""
    logits = features.double() @ weight.double().T + bias.double()
    return energy(logits).float()


# --------------------------------------------------------------------------- registered scores


class _LayerScore(Score):
    """A score that keeps the final layer's ``W`` [K, D] and ``b`` [K] and scores energies through it."""

    needs_fit = True
    needs_layer = True
    state_shapes = {"weight": ("K", "D"), "bias": ("K",)}

    def __init__(self, percentile: float) -> None:
        self.percentile = check_number(f"{self.name} percentile", percentile, low=0.0, high=100.0)
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def fit(
        self,
        features: torch.Tensor,
        labels: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
        layer: FinalLayer | None = None,
    ) -> Score:
        features, _, _ = check_fit_inputs(self.name, features)
        layer = check_layer(self.name, layer, features)
        self.weight, self.bias = layer.weight.clone(), layer.bias.clone()
        self._fit_statistics(features)
        return self

    def _fit_statistics(self, features: torch.Tensor) -> None:
        """Fit what the shaping needs beyond ``W`` and ``b`` (nothing by default)."""

    def shape(self, features: torch.Tensor) -> torch.Tensor:
        """The shaped activations ``a(h)``."""
        raise NotImplementedError

    def __call__(self, logits: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        self._require_fitted()
        assert self.weight is not None and self.bias is not None
        features = check_features(self.name, features, self.weight.shape[1])
        return shaped_energy(self.shape(features), self.weight, self.bias)

    def params(self) -> dict[str, float | int]:
        return {"percentile": self.percentile}


@SCORES.register("react")
class ReAct(_LayerScore):
    """ReAct: ``lse(W min(h, c) + b)``, clipping the activations at a percentile ``c`` of ID train ones.

    ``c`` is the ``percentile``-th percentile of all ID train activations (every unit of every sample,
    linear interpolation as :func:`numpy.percentile`).

    Args:
        percentile: p in [0, 100] (default 90, the paper's). With p = 100, c is the largest train
            activation, so features within the train range score exactly their energy.
    """

    name = "react"
    state_shapes = {"weight": ("K", "D"), "bias": ("K",), "clip": ()}

    def __init__(self, percentile: float = 90.0) -> None:
        super().__init__(percentile)
        self.clip: torch.Tensor | None = None

    def _fit_statistics(self, features: torch.Tensor) -> None:
        self.clip = torch.tensor(float(np.percentile(features.numpy().ravel(), self.percentile)))

    def shape(self, features: torch.Tensor) -> torch.Tensor:
        """``min(h, c)`` elementwise, with ``c`` the clip fitted on ID train."""
        assert self.clip is not None
        return react_clip(features, self.clip)


class _PercentileShaping(_LayerScore):
    """Per-sample shaping at a pruning percentile in [0, 100)."""

    def __init__(self, percentile: float = 90.0) -> None:
        super().__init__(percentile)
        check_number(f"{self.name} percentile", percentile, low=0.0, high=100.0, closed_high=False)


@SCORES.register("ash_p")
class AshP(_PercentileShaping):
    """ASH-P (Djurisic et al., arXiv 2209.09858): ``lse(W ash_p(h) + b)``; see :func:`ash_prune`.

    Args:
        percentile: pruning percentile p in [0, 100) (default 90); p = 0 is plain energy.
    """

    name = "ash_p"

    def shape(self, features: torch.Tensor) -> torch.Tensor:
        """Keep each sample's top ``(100 − p)%`` activations, zero the rest; see :func:`ash_prune`."""
        return ash_prune(features, self.percentile)


@SCORES.register("ash_b")
class AshB(_PercentileShaping):
    """ASH-B: ``lse(W ash_b(h) + b)``; see :func:`ash_binarize`.

    Args:
        percentile: pruning percentile p in [0, 100) (default 90).
    """

    name = "ash_b"

    def shape(self, features: torch.Tensor) -> torch.Tensor:
        """Set each sample's kept activations to ``s₁ / k``, the rest to 0; see :func:`ash_binarize`."""
        return ash_binarize(features, self.percentile)


@SCORES.register("ash_s")
class AshS(_PercentileShaping):
    """ASH-S: ``lse(W ash_s(h) + b)``; see :func:`ash_scale`.

    Args:
        percentile: pruning percentile p in [0, 100) (default 90).
    """

    name = "ash_s"

    def shape(self, features: torch.Tensor) -> torch.Tensor:
        """Prune as ASH-P and scale what is kept by ``exp(s₁ / s₂)``; see :func:`ash_scale`."""
        return ash_scale(features, self.percentile)


@SCORES.register("scale")
class Scale(_PercentileShaping):
    """SCALE: ``lse(W h·exp(s₁/s₂) + b)``; see :func:`scale_shaping`.

    Args:
        percentile: percentile p in [0, 100) of the activations whose sum is s₂ (default 85, the
            paper's ImageNet setting). p = 0 multiplies every h by e, as ASH-S with p = 0 does.
    """

    name = "scale"

    def __init__(self, percentile: float = 85.0) -> None:
        super().__init__(percentile)

    def shape(self, features: torch.Tensor) -> torch.Tensor:
        """``h · exp(s₁ / s₂)`` per sample, without pruning; see :func:`scale_shaping`."""
        return scale_shaping(features, self.percentile)


@SCORES.register("dice")
class DICE(_LayerScore):
    """DICE: ``lse((M ⊙ W) h + b)``; see :func:`dice_weight` (the stored ``weight`` is ``M ⊙ W``).

    Args:
        sparsity: p in [0, 100): the share of weights dropped (default 90, the paper's CIFAR setting);
            p = 0 is plain energy.
    """

    name = "dice"

    def __init__(self, sparsity: float = 90.0) -> None:
        super().__init__(check_number("dice sparsity", sparsity, low=0.0, high=100.0, closed_high=False))

    def _fit_statistics(self, features: torch.Tensor) -> None:
        assert self.weight is not None
        self.weight = dice_weight(self.weight, features.mean(dim=0), self.percentile)

    def shape(self, features: torch.Tensor) -> torch.Tensor:
        """The activations unchanged (DICE sparsifies the stored weight instead)."""
        return features

    def params(self) -> dict[str, float | int]:
        """The share of weights dropped, as ``sparsity``."""
        return {"sparsity": self.percentile}
