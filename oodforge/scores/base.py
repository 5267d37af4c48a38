"""The :class:`Score` interface, the ``SCORES`` registry and the checks every score shares.

A score declares what it needs with class attributes, so callers never branch on its name:

- ``needs_fit``: :meth:`Score.fit` must run on ID train outputs before scoring (it keeps statistics).
- ``needs_layer``: :meth:`Score.fit` needs the classifier's final linear layer ``f = W h + b``
  (:func:`oodforge.backbones.final_layer`); a cosine or IsoMax+ head cannot serve it.
- ``needs_grad``: the score perturbs the input with gradients, so it scores pixels through the model
  (:meth:`Score.score_pixels`) instead of cached ``(logits, features)``; it runs in its own pass.

Fitted statistics are tensors in :meth:`Score.state_dict` (saved under ``score.*`` in the detector's
``model.safetensors``, covered by its checksum); hyper-parameters are :meth:`Score.params` (saved in
``detector.json``). ``build_score(name, **params).load_state_dict(state)`` rebuilds an equal score.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from oodforge.backbones import FinalLayer
from oodforge.registry import Registry

SCORES: Registry[type[Score]] = Registry("score")
"""Score name -> :class:`Score` subclass; the one list of score names (``--scores all`` reads it)."""

ALL = "all"
"""In a list of score names (``--scores``, ``eval.scores``): every registered score the model can serve."""

Shape = tuple[str | int, ...]


class Score:
    """Base class: an OOD score (higher = more in-distribution) of a batch's logits and/or features.

    Subclasses set ``name`` and the ``needs_*`` flags (module docstring). A score with fitted tensors
    lists them in ``state_shapes`` (``{attribute: symbolic shape}``, e.g. ``{"weight": ("K", "D")}``):
    the base class then saves, checks and restores them; :meth:`fit` sets those attributes.
    Constructor keyword arguments are the score's hyper-parameters and are returned by :meth:`params`.

    Attributes:
        name: Registry name.
        needs_fit: :meth:`fit` must run before scoring.
        needs_layer: :meth:`fit` needs ``layer=final_layer(model)``.
        needs_grad: Scores pixels with :meth:`score_pixels` (a backward pass), not ``(logits, features)``.
        depends_on_head: Whether the score reads the head's output (logits or its layer); ``False``
            for scores of the features alone (knn, mahalanobis, rmds), which ``export.score: auto``
            may still judge when the head was trained on the synthetic outliers (``trainer.selection``).
        default_rank: Position in the default evaluation list (``eval.scores``), ``None`` if not in it.
        state_shapes: Fitted tensors and their shapes (symbols must agree across tensors).
    """

    name: ClassVar[str]
    needs_fit: ClassVar[bool] = False
    needs_layer: ClassVar[bool] = False
    needs_grad: ClassVar[bool] = False
    depends_on_head: ClassVar[bool] = True
    default_rank: ClassVar[int | None] = None
    state_shapes: ClassVar[dict[str, Shape]] = {}

    def __init__(self) -> None:
        """Scores without hyper-parameters take no arguments."""

    def fit(
        self,
        features: torch.Tensor,
        labels: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
        layer: FinalLayer | None = None,
    ) -> Score:
        """Fit statistics on ID train outputs; returns ``self`` (a no-op for scores without any).

        Args:
            features: ``[N, D]`` penultimate features h of the ID train split.
            labels: ``[N]`` integer class ids.
            logits: ``[N, K]`` logits f (scores that read predictions or confidences need them).
            layer: The final linear layer (scores with ``needs_layer``).
        """
        return self

    @property
    def is_fitted(self) -> bool:
        """Whether every fitted tensor in ``state_shapes`` is set (always true for scores without any)."""
        return all(getattr(self, key, None) is not None for key in self.state_shapes)

    def __call__(self, logits: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """``[N]`` scores (higher = more in-distribution) from ``logits [N, K]`` and ``features [N, D]``."""
        raise NotImplementedError

    def score_pixels(
        self, model: nn.Module, pixel_values: torch.Tensor, input_std: Sequence[float] | None = None
    ) -> torch.Tensor:
        """``[N]`` scores of pre-processed pixels through ``model`` (only scores with ``needs_grad``)."""
        raise TypeError(f"score {self.name!r} scores (logits, features); call it as score(logits, features)")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Fitted statistics as tensors (empty for scores without fitting)."""
        self._require_fitted()
        return {key: getattr(self, key).detach().clone() for key in self.state_shapes}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict` output; ``ValueError`` on missing/unexpected keys or wrong shapes."""
        if not self.state_shapes:
            if state:
                raise ValueError(f"score {self.name!r} has no fitted statistics but got keys {sorted(state)}")
            return
        check_state(self.name, state, set(self.state_shapes))
        check_shapes(self.name, state, self.state_shapes)
        for key in self.state_shapes:
            setattr(self, key, state[key].detach().cpu().clone())

    def params(self) -> dict[str, Any]:
        """JSON-able hyper-parameters; ``build_score(name, **params())`` rebuilds an equal score."""
        return {}

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise RuntimeError(f"score {self.name!r} is not fitted; call fit(...) on ID train features first")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


# --------------------------------------------------------------------------- checks shared by the scores


def check_2d(name: str, x: Any) -> torch.Tensor:
    """``x`` as a floating-point ``[N, D]`` tensor, or a ``TypeError``/``ValueError`` naming ``name``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(x.shape)}")
    return x if x.is_floating_point() else x.float()


def check_features(name: str, features: torch.Tensor | None, dim: int) -> torch.Tensor:
    """The features a fitted score is called with, checked against the width it was fitted on."""
    if features is None:
        raise ValueError(f"score {name!r} needs the penultimate features; pass them as the second argument")
    features = check_2d("features", features)
    if features.shape[1] != dim:
        raise ValueError(f"score {name!r} was fitted on {dim}-dimensional features, got {features.shape[1]}")
    return features


def check_logits(name: str, logits: torch.Tensor | None, num_classes: int | None = None) -> torch.Tensor:
    """Logits ``[N, K]`` (``K`` checked when given)."""
    if logits is None:
        raise ValueError(f"score {name!r} needs the logits; pass them as the first argument")
    logits = check_2d("logits", logits)
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(f"score {name!r} was fitted for {num_classes} classes, got {logits.shape[1]} logits")
    return logits


def check_fit_inputs(
    name: str,
    features: torch.Tensor,
    labels: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
    *,
    need_labels: bool = False,
    need_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """ID train ``features`` (and ``labels``/``logits`` when needed) on the CPU, with one row each."""
    features = check_2d("features", features).detach().cpu().float()
    if len(features) == 0:
        raise ValueError(f"{name}: cannot fit on an empty feature set")
    if need_labels:
        if labels is None:
            raise ValueError(f"{name}: fit needs the ID train labels: fit(features, labels, ...)")
        labels = torch.as_tensor(labels).detach().cpu()
        if labels.ndim != 1 or len(labels) != len(features):
            raise ValueError(
                f"{name}: labels must be 1-D with one entry per feature row, "
                f"got shape {tuple(labels.shape)} for {len(features)} features"
            )
        if labels.is_floating_point():
            raise ValueError(f"{name}: labels must be integer class ids")
    if need_logits:
        if logits is None:
            raise ValueError(f"{name}: fit needs the ID train logits: fit(features, labels, logits=...)")
        logits = check_2d("logits", logits).detach().cpu().float()
        if len(logits) != len(features):
            raise ValueError(f"{name}: got {len(logits)} logit rows for {len(features)} feature rows")
    return features, labels, logits


def check_layer(name: str, layer: FinalLayer | None, features: torch.Tensor | None = None) -> FinalLayer:
    """The final layer a ``needs_layer`` score is fitted with (its width checked against ``features``)."""
    if layer is None:
        raise ValueError(
            f"score {name!r} needs the final linear layer: fit(..., layer=final_layer(model)) "
            "(oodforge.backbones.final_layer)"
        )
    if features is not None and features.shape[1] != layer.feature_dim:
        raise ValueError(
            f"score {name!r}: the final layer takes {layer.feature_dim}-dimensional features, "
            f"got {features.shape[1]}"
        )
    return layer


def check_state(name: str, state: dict[str, torch.Tensor], keys: set[str]) -> None:
    """Exactly ``keys``, each a finite floating-point tensor."""
    missing, extra = keys - set(state), set(state) - keys
    if missing or extra:
        raise ValueError(
            f"{name} state must have exactly the keys {sorted(keys)}; "
            f"missing {sorted(missing)}, unexpected {sorted(extra)}"
        )
    for key in keys:
        value = state[key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise ValueError(f"{name} state {key!r} must be a floating-point tensor, got {value!r:.80}")
        if not torch.isfinite(value).all():
            raise ValueError(f"{name} state {key!r} contains NaN or inf values")


def check_shapes(name: str, state: dict[str, torch.Tensor], shapes: dict[str, Shape]) -> None:
    """Each tensor has its symbolic shape; a symbol (``"K"``) means the same size in every tensor."""
    sizes: dict[str, int] = {}
    for key, dims in shapes.items():
        shape = tuple(state[key].shape)
        wanted = "[" + ", ".join(map(str, dims)) + "]"
        ok = len(shape) == len(dims)
        for dim, size in zip(dims, shape, strict=False):
            if isinstance(dim, int):
                ok = ok and size == dim
            else:
                ok = ok and size >= 1 and sizes.setdefault(dim, size) == size
        if not ok:
            bound = ", ".join(f"{k}={v}" for k, v in sizes.items())
            raise ValueError(
                f"{name} state {key!r} must be {wanted}"
                + (f" with {bound}" if bound else "")
                + f", got shape {list(shape)}"
            )


def check_number(name: str, value: Any, *, low: float, high: float, closed_high: bool = True) -> float:
    """A real number in ``[low, high]`` (``[low, high)`` when ``closed_high`` is false)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    inside = low <= value <= high if closed_high else low <= value < high
    if not math.isfinite(value) or not inside:
        interval = f"[{low:g}, {high:g}" + ("]" if closed_high else ")")
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return value


def check_positive(name: str, value: Any) -> float:
    """A finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_count(name: str, value: Any) -> int:
    """A positive integer."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------- building scores by name


def score_parameters(name: str) -> list[str]:
    """The hyper-parameter names score ``name`` takes (``KeyError`` lists the scores for an unknown name)."""
    cls = SCORES.get(name)
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


def check_score_params(name: str, params: dict[str, Any]) -> None:
    """``TypeError`` naming the parameters score ``name`` does not take, and listing the ones it does."""
    accepted = score_parameters(name)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        takes = f"its parameters are: {', '.join(accepted)}" if accepted else "it takes no parameters"
        raise TypeError(f"score {name!r} has no parameter(s) {', '.join(map(repr, unknown))}; {takes}")


def build_score(name: str, **params: Any) -> Score:
    """Build a registered score from its name and hyper-parameters, e.g. ``build_score("knn", k=50)``.

    Raises:
        KeyError: unknown name (the message lists the registered scores).
        TypeError: a parameter the score does not take (the message lists the ones it does).
        ValueError: a parameter with an invalid value.
    """
    check_score_params(name, params)
    return SCORES.get(name)(**params)


def default_scores() -> list[str]:
    """The curated default evaluation list: the scores with a ``default_rank``, in that order."""
    ranked = [(SCORES.get(n).default_rank, n) for n in SCORES]
    return [n for rank, n in sorted((r, n) for r, n in ranked if r is not None)]
