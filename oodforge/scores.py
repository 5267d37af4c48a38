"""Post-hoc OOD scores (DESIGN.md §5): higher score = more in-distribution.

Every score is a :class:`Score` object with one interface, so callers never branch on its name::

    score = build_score("knn", k=50).fit(train_features, train_labels)   # fit() is a no-op for logit scores
    values = score(logits, features)                                      # [N] tensor, higher = more ID
    tensors, params = score.state_dict(), score.params()                  # -> safetensors / JSON

The math lives in pure functions (:func:`msp`, :func:`max_logit`, :func:`energy`, :func:`entropy`,
:func:`oodforge.knn.kth_distance`, :func:`mahalanobis_distances`); the classes only hold fitted statistics.
A score that needs more than ``(logits, features)`` (e.g. a head's parameters) keeps them as tensors in
its state and gets them in an extra fitting step of its own; the call signature stays the same.
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from oodforge.knn import KNNIndex
from oodforge.registry import Registry

# --------------------------------------------------------------------------- pure functions on logits


def msp(logits: torch.Tensor) -> torch.Tensor:
    """Maximum softmax probability, ``max_k softmax(f)_k`` (Hendrycks & Gimpel, arXiv 1610.02136).

    Args:
        logits: ``[N, K]`` logits f.

    Returns:
        ``[N]`` scores in ``[1/K, 1]``.
    """
    return logits.softmax(dim=1).amax(dim=1)


def max_logit(logits: torch.Tensor) -> torch.Tensor:
    """Maximum logit, ``max_k f_k`` (Hendrycks et al., arXiv 1911.11132)."""
    return logits.amax(dim=1)


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Negative free energy, ``T · logsumexp(f / T)`` (Liu et al., arXiv 2010.03759).

    Computed with a stable logsumexp, so large logits do not overflow.
    """
    return temperature * torch.logsumexp(logits / temperature, dim=1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Negative entropy of the softmax, ``−H(p) = Σ_k p_k log p_k`` with ``p = softmax(f)`` (always ≤ 0)."""
    log_p = logits.log_softmax(dim=1)
    p = log_p.exp()
    return torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(dim=1)


# --------------------------------------------------------------------------- pure functions on features


def mahalanobis_distances(
    features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor
) -> torch.Tensor:
    """Squared Mahalanobis distance to every class mean, ``(h − μ_c)ᵀ Σ⁻¹ (h − μ_c)``.

    Expanded as ``hᵀPh − 2 hᵀPμ_c + μ_cᵀPμ_c`` (``P = Σ⁻¹``) in float64 so that many classes cost one
    matrix product; clamped at 0 (P is positive semi-definite).

    Args:
        features: ``[N, D]`` features h.
        means: ``[C, D]`` class means μ_c.
        precision: ``[D, D]`` symmetric precision matrix P.

    Returns:
        ``[N, C]`` float64 squared distances.
    """
    h = features.double()
    mu = means.to(h.device, torch.float64)
    p = precision.to(h.device, torch.float64)
    hp = h @ p
    quad_h = (hp * h).sum(dim=1, keepdim=True)
    quad_mu = ((mu @ p) * mu).sum(dim=1)
    return (quad_h - 2.0 * hp @ mu.T + quad_mu).clamp_min(0.0)


def class_means_and_tied_covariance(
    features: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means ``μ_c`` and one shared covariance ``Σ = 1/N Σ_i (h_i − μ_{y_i})(h_i − μ_{y_i})ᵀ`` (float64).

    Classes are the distinct values of ``labels`` in sorted order; absent class ids are skipped.
    """
    h = features.double()
    classes, inverse = torch.unique(labels, sorted=True, return_inverse=True)
    counts = torch.bincount(inverse, minlength=len(classes)).to(h)
    means = torch.zeros(len(classes), h.shape[1], dtype=h.dtype, device=h.device)
    means.index_add_(0, inverse, h)
    means /= counts[:, None]
    centered = h - means[inverse]
    return means, centered.T @ centered / len(h)


# --------------------------------------------------------------------------- the common interface

SCORES: Registry[type[Score]] = Registry("score")


def _check_2d(name: str, x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(x.shape)}")
    return x if x.is_floating_point() else x.float()


class Score:
    """Base class: an OOD score computed from a batch's logits and/or penultimate features.

    Subclasses set ``name`` (the registry name) and, if they have fitted statistics, ``needs_fit = True``
    and override :meth:`fit`, :meth:`state_dict`, :meth:`load_state_dict` and :meth:`is_fitted`.
    Constructor keyword arguments are the score's hyper-parameters and are returned by :meth:`params`.
    """

    name: ClassVar[str]
    needs_fit: ClassVar[bool] = False

    def __init__(self) -> None:
        """Scores without hyper-parameters take no arguments."""

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> Score:
        """Fit statistics on ID train ``features`` ``[N, D]`` and ``labels`` ``[N]``; returns ``self``."""
        return self

    @property
    def is_fitted(self) -> bool:
        return True

    def __call__(self, logits: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """``[N]`` scores (higher = more in-distribution) from ``logits [N, K]`` and ``features [N, D]``."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Fitted statistics as tensors (empty for scores without fitting)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict` output; ``ValueError`` on missing/unexpected keys or wrong shapes."""
        if state:
            raise ValueError(f"score {self.name!r} has no fitted statistics but got keys {sorted(state)}")

    def params(self) -> dict[str, float | int]:
        """JSON-able hyper-parameters; ``build_score(name, **params())`` rebuilds an equal score."""
        return {}

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise RuntimeError(f"score {self.name!r} is not fitted; call fit(...) on ID train features first")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


def _check_state(name: str, state: dict[str, torch.Tensor], keys: set[str]) -> None:
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


@SCORES.register("msp")
class MSP(Score):
    """Maximum softmax probability; see :func:`msp`."""

    name = "msp"

    def __call__(self, logits: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        return msp(_check_2d("logits", logits))


@SCORES.register("max_logit")
class MaxLogit(Score):
    """Maximum logit; see :func:`max_logit`."""

    name = "max_logit"

    def __call__(self, logits: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        return max_logit(_check_2d("logits", logits))


@SCORES.register("energy")
class Energy(Score):
    """Negative free energy ``T · logsumexp(f / T)``; see :func:`energy`.

    Args:
        temperature: T > 0 (default 1, as in DESIGN.md §5).
    """

    name = "energy"

    def __init__(self, temperature: float = 1.0) -> None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"energy temperature must be a positive number, got {temperature!r}")
        if not math.isfinite(temperature):
            raise ValueError(f"energy temperature must be finite, got {temperature!r}")
        self.temperature = float(temperature)

    def __call__(self, logits: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        return energy(_check_2d("logits", logits), self.temperature)

    def params(self) -> dict[str, float | int]:
        return {"temperature": self.temperature}


@SCORES.register("entropy")
class Entropy(Score):
    """Negative softmax entropy; see :func:`entropy`."""

    name = "entropy"

    def __call__(self, logits: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        return entropy(_check_2d("logits", logits))


def _features(name: str, features: torch.Tensor | None, dim: int) -> torch.Tensor:
    if features is None:
        raise ValueError(f"score {name!r} needs the penultimate features; pass them as the second argument")
    features = _check_2d("features", features)
    if features.shape[1] != dim:
        raise ValueError(f"score {name!r} was fitted on {dim}-dimensional features, got {features.shape[1]}")
    return features


@SCORES.register("knn")
class KNN(Score):
    """Deep nearest neighbours (Sun et al., arXiv 2204.06507): ``−‖ĥ − b̂_(k)‖₂``.

    ``ĥ = h / ‖h‖`` and ``b̂_(k)`` is the k-th nearest of the L2-normalised ID train features (the bank);
    see :class:`oodforge.knn.KNNIndex` (built once when fitted or loaded). Search runs on GPU when
    faiss-gpu is installed.

    Args:
        k: neighbour rank (default 50); clipped to the bank size at :meth:`fit`, with a warning.
    """

    name = "knn"
    needs_fit = True

    def __init__(self, k: int = 50) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"knn k must be a positive integer, got {k!r}")
        self.k = int(k)
        self.bank: np.ndarray | None = None
        self._index: KNNIndex | None = None

    @property
    def is_fitted(self) -> bool:
        return self.bank is not None

    def _set_bank(self, bank: np.ndarray) -> None:
        self.bank = bank
        self._index = KNNIndex(bank)

    def fit(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> KNN:
        features = _check_2d("features", features)
        if len(features) == 0:
            raise ValueError("knn: cannot fit on an empty feature set")
        if self.k > len(features):
            warnings.warn(
                f"knn: k={self.k} exceeds the {len(features)} ID train features; using k={len(features)}",
                stacklevel=2,
            )
            self.k = len(features)
        self._set_bank(_normalize(features))
        return self

    def __call__(self, logits: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        self._require_fitted()
        assert self._index is not None
        features = _features(self.name, features, self._index.dim)
        dist = self._index.kth_distance(_normalize(features), self.k)
        return -torch.from_numpy(dist).to(features.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        self._require_fitted()
        return {"bank": torch.from_numpy(self.bank.copy())}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        _check_state(self.name, state, {"bank"})
        bank = state["bank"]
        if bank.ndim != 2 or len(bank) == 0:
            raise ValueError(
                f"knn state 'bank' must be a non-empty [M, D] tensor, got shape {tuple(bank.shape)}"
            )
        if len(bank) < self.k:
            raise ValueError(f"knn state 'bank' has {len(bank)} rows, fewer than k={self.k}")
        self._set_bank(np.ascontiguousarray(bank.detach().cpu().numpy(), dtype=np.float32))

    def params(self) -> dict[str, float | int]:
        return {"k": self.k}


def _normalize(features: torch.Tensor) -> np.ndarray:
    """L2-normalise rows and return them as a float32 C-contiguous numpy array (FAISS's input)."""
    return np.ascontiguousarray(F.normalize(features.detach().float(), dim=1).cpu().numpy())


@SCORES.register("mahalanobis")
class Mahalanobis(Score):
    """Mahalanobis score (Lee et al., arXiv 1807.03888): ``−min_c (h − μ_c)ᵀ Σ⁻¹ (h − μ_c)``.

    Class means ``μ_c`` and one tied covariance ``Σ`` (features centred by their class mean, divided
    by N) come from ID train features; ``Σ⁻¹`` is the pseudo-inverse ``torch.linalg.pinv(Σ,
    hermitian=True)`` so that singular directions (dead units, D > N) do not blow up. Statistics are
    kept in float64.
    """

    name = "mahalanobis"
    needs_fit = True

    def __init__(self) -> None:
        self.means: torch.Tensor | None = None
        self.precision: torch.Tensor | None = None

    @property
    def is_fitted(self) -> bool:
        return self.means is not None and self.precision is not None

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> Mahalanobis:
        features = _check_2d("features", features).detach().cpu()
        labels = torch.as_tensor(labels).detach().cpu()
        if labels.ndim != 1 or len(labels) != len(features):
            raise ValueError(
                f"mahalanobis: labels must be 1-D with one entry per feature row, "
                f"got shape {tuple(labels.shape)} for {len(features)} features"
            )
        if len(features) == 0:
            raise ValueError("mahalanobis: cannot fit on an empty feature set")
        if labels.is_floating_point():
            raise ValueError("mahalanobis: labels must be integer class ids")
        means, cov = class_means_and_tied_covariance(features, labels)
        self.means, self.precision = means, torch.linalg.pinv(cov, hermitian=True)
        return self

    def __call__(self, logits: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        self._require_fitted()
        assert self.means is not None and self.precision is not None
        features = _features(self.name, features, self.means.shape[1])
        dist = mahalanobis_distances(features, self.means, self.precision)
        return -dist.amin(dim=1).float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        self._require_fitted()
        return {"means": self.means.clone(), "precision": self.precision.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        _check_state(self.name, state, {"means", "precision"})
        means, precision = state["means"], state["precision"]
        if means.ndim != 2 or len(means) == 0:
            raise ValueError(
                f"mahalanobis state 'means' must be a non-empty [C, D] tensor, got {tuple(means.shape)}"
            )
        d = means.shape[1]
        if tuple(precision.shape) != (d, d):
            raise ValueError(
                f"mahalanobis state 'precision' must be [{d}, {d}] to match 'means', got {tuple(precision.shape)}"
            )
        self.means = means.detach().cpu().double()
        self.precision = precision.detach().cpu().double()


def build_score(name: str, **params: Any) -> Score:
    """Build a registered score from its name and hyper-parameters, e.g. ``build_score("knn", k=50)``.

    Raises:
        KeyError: unknown name (the message lists the registered scores).
        TypeError: a parameter the score does not take (the message lists the ones it does).
        ValueError: a parameter with an invalid value.
    """
    cls = SCORES.get(name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        takes = f"its parameters are: {', '.join(accepted)}" if accepted else "it takes no parameters"
        raise TypeError(f"score {name!r} has no parameter(s) {', '.join(map(repr, unknown))}; {takes}")
    return cls(**params)
