"""Scores of the features, fitted on ID train features: KNN, Mahalanobis, RMDS, SHE and NNGuide.

None of them needs a linear head: they work on whatever features the classifier returns (``h`` for a
linear or IsoMax+ head, the embedding ``z`` for a cosine head). Notation: ``h`` = features ``[N, D]``,
``ĥ = h / ‖h‖``, ``f`` = logits, ``ŷ = argmax_k f_k``; higher = more in-distribution.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from oodforge.backbones import FinalLayer
from oodforge.knn import KNNIndex
from oodforge.scores.base import (
    SCORES,
    Score,
    check_2d,
    check_count,
    check_features,
    check_fit_inputs,
    check_logits,
    check_state,
)

# --------------------------------------------------------------------------- pure functions


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


def relative_mahalanobis(
    features: torch.Tensor,
    means: torch.Tensor,
    precision: torch.Tensor,
    background_mean: torch.Tensor,
    background_precision: torch.Tensor,
) -> torch.Tensor:
    """RMDS score ``−min_c [MD_c(h) − MD_0(h)]`` (Ren et al., arXiv 2106.09022).

    ``MD_c`` is the squared Mahalanobis distance to class c (class means, tied covariance) and ``MD_0``
    the one to a single Gaussian fitted on all ID train features (the "background"), so
    ``score = MD_0(h) − min_c MD_c(h)``.
    """
    md = mahalanobis_distances(features, means, precision).amin(dim=1)
    md0 = mahalanobis_distances(features, background_mean[None], background_precision)[:, 0]
    return (md0 - md).float()


def hopfield_energy(features: torch.Tensor, logits: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """SHE score ``⟨h, S_ŷ⟩``: the inner product of h with the stored pattern of its predicted class.

    Zhang et al., "Out-of-Distribution Detection based on In-Distribution Data Patterns Memorization
    with Modern Hopfield Energy", ICLR 2023 (the simplified Hopfield energy). ``patterns`` ``[K, D]``
    holds ``S_k``, the mean ID train feature of class k.
    """
    return (features * patterns.to(features)[logits.argmax(dim=1)]).sum(dim=1)


def nn_guidance(
    features: torch.Tensor, logits: torch.Tensor, bank: torch.Tensor, k: int, batch_size: int = 4096
) -> torch.Tensor:
    """NNGuide score ``lse(f) · (1/k) Σ_{top-k i} ⟨ĥ, b_i⟩`` (Park et al., arXiv 2309.14888).

    ``b_i = lse(f_i) · ĥ_i`` is the bank of ID train features scaled by their energy confidence; the
    guidance is the mean of the k largest inner products of the normalised query with the bank.
    """
    queries = F.normalize(features.float(), dim=1)
    bank = bank.to(queries)
    guidance = torch.cat([(q @ bank.T).topk(k, dim=1).values.mean(dim=1) for q in queries.split(batch_size)])
    return torch.logsumexp(logits.float(), dim=1) * guidance


def _normalize(features: torch.Tensor) -> np.ndarray:
    """L2-normalise rows and return them as a float32 C-contiguous numpy array (FAISS's input)."""
    return np.ascontiguousarray(F.normalize(features.detach().float(), dim=1).cpu().numpy())


def _clip_k(name: str, k: int, n: int) -> int:
    if k > n:
        warnings.warn(f"{name}: k={k} exceeds the {n} ID train features; using k={n}", stacklevel=3)
        return n
    return k


# --------------------------------------------------------------------------- registered scores


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
    depends_on_head = False
    default_rank = 4

    def __init__(self, k: int = 50) -> None:
        self.k = check_count("knn k", k)
        self.bank: np.ndarray | None = None
        self._index: KNNIndex | None = None

    @property
    def is_fitted(self) -> bool:
        """Whether the bank of ID train features is set."""
        return self.bank is not None

    def _set_bank(self, bank: np.ndarray) -> None:
        self.bank = bank
        self._index = KNNIndex(bank)

    def fit(
        self,
        features: torch.Tensor,
        labels: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
        layer: FinalLayer | None = None,
    ) -> KNN:
        """Keep the L2-normalised ID train features as the bank (``k`` clipped to its size); return self."""
        features, _, _ = check_fit_inputs("knn", features)
        self.k = _clip_k("knn", self.k, len(features))
        self._set_bank(_normalize(features))
        return self

    def __call__(self, logits: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """``[N]`` negative distances of the normalised ``features`` to their k-th nearest bank row."""
        self._require_fitted()
        assert self._index is not None
        features = check_features(self.name, features, self._index.dim)
        dist = self._index.kth_distance(_normalize(features), self.k)
        return -torch.from_numpy(dist).to(features.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The bank as ``{"bank": [M, D]}``."""
        self._require_fitted()
        return {"bank": torch.from_numpy(self.bank.copy())}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the bank (at least ``k`` rows) and rebuild its search index."""
        check_state(self.name, state, {"bank"})
        bank = state["bank"]
        if bank.ndim != 2 or len(bank) == 0:
            raise ValueError(
                f"knn state 'bank' must be a non-empty [M, D] tensor, got shape {tuple(bank.shape)}"
            )
        if len(bank) < self.k:
            raise ValueError(f"knn state 'bank' has {len(bank)} rows, fewer than k={self.k}")
        self._set_bank(np.ascontiguousarray(bank.detach().cpu().numpy(), dtype=np.float32))

    def params(self) -> dict[str, float | int]:
        """The neighbour rank ``k``."""
        return {"k": self.k}


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
    depends_on_head = False
    default_rank = 5

    def __init__(self) -> None:
        self.means: torch.Tensor | None = None
        self.precision: torch.Tensor | None = None

    @property
    def is_fitted(self) -> bool:
        """Whether the class means and the precision are set."""
        return self.means is not None and self.precision is not None

    def fit(
        self,
        features: torch.Tensor,
        labels: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
        layer: FinalLayer | None = None,
    ) -> Mahalanobis:
        """Fit the class means and the tied covariance's pseudo-inverse (needs ``labels``); return self."""
        features, labels, _ = check_fit_inputs(self.name, features, labels, need_labels=True)
        means, cov = class_means_and_tied_covariance(features, labels)
        self.means, self.precision = means, torch.linalg.pinv(cov, hermitian=True)
        return self

    def __call__(self, logits: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """``[N]`` negative Mahalanobis distances of ``features`` to the nearest class mean."""
        self._require_fitted()
        assert self.means is not None and self.precision is not None
        features = check_features(self.name, features, self.means.shape[1])
        dist = mahalanobis_distances(features, self.means, self.precision)
        return -dist.amin(dim=1).float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The class means ``[C, D]`` and precision ``[D, D]``."""
        self._require_fitted()
        return {"means": self.means.clone(), "precision": self.precision.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the class means and precision, checking their shapes agree."""
        check_state(self.name, state, {"means", "precision"})
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


@SCORES.register("rmds")
class RelativeMahalanobis(Score):
    """Relative Mahalanobis distance score; see :func:`relative_mahalanobis`.

    Fitting: class means and the tied covariance as in :class:`Mahalanobis`; the background Gaussian
    has the mean of all ID train features and their covariance around it (divided by N). Both
    precisions are pseudo-inverses; statistics are float64.
    """

    name = "rmds"
    needs_fit = True
    depends_on_head = False
    state_shapes = {
        "means": ("C", "D"),
        "precision": ("D", "D"),
        "background_mean": ("D",),
        "background_precision": ("D", "D"),
    }

    def __init__(self) -> None:
        self.means: torch.Tensor | None = None
        self.precision: torch.Tensor | None = None
        self.background_mean: torch.Tensor | None = None
        self.background_precision: torch.Tensor | None = None

    def fit(
        self,
        features: torch.Tensor,
        labels: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
        layer: FinalLayer | None = None,
    ) -> RelativeMahalanobis:
        """Fit the class Gaussians and the background one (needs ``labels``); return self."""
        features, labels, _ = check_fit_inputs(self.name, features, labels, need_labels=True)
        means, cov = class_means_and_tied_covariance(features, labels)
        background_mean, background_cov = class_means_and_tied_covariance(
            features, torch.zeros(len(features), dtype=torch.long)
        )
        self.means, self.precision = means, torch.linalg.pinv(cov, hermitian=True)
        self.background_mean = background_mean[0]
        self.background_precision = torch.linalg.pinv(background_cov, hermitian=True)
        return self

    def __call__(self, logits: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """``[N]`` relative Mahalanobis scores of ``features``."""
        self._require_fitted()
        assert self.means is not None
        features = check_features(self.name, features, self.means.shape[1])
        return relative_mahalanobis(
            features, self.means, self.precision, self.background_mean, self.background_precision
        )


@SCORES.register("she")
class SHE(Score):
    """Simplified Hopfield energy; see :func:`hopfield_energy`.

    Fitting: ``S_k`` = mean feature of the ID train samples of class k that the classifier gets right
    (``argmax f = y = k``); a class with no correct sample falls back to all its samples (a warning
    says so), and a class absent from the train labels gets a zero pattern.
    """

    name = "she"
    needs_fit = True
    state_shapes = {"patterns": ("K", "D")}

    def __init__(self) -> None:
        self.patterns: torch.Tensor | None = None

    def fit(
        self,
        features: torch.Tensor,
        labels: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
        layer: FinalLayer | None = None,
    ) -> SHE:
        """Fit one pattern per class from ID train (needs ``labels`` and ``logits``); return self."""
        features, labels, logits = check_fit_inputs(
            self.name, features, labels, logits, need_labels=True, need_logits=True
        )
        assert labels is not None and logits is not None
        correct = logits.argmax(dim=1) == labels
        patterns = torch.zeros(logits.shape[1], features.shape[1])
        fallback = []
        for k in range(logits.shape[1]):
            rows = correct & (labels == k)
            if not rows.any():
                rows = labels == k
                fallback.append(k)
            if rows.any():
                patterns[k] = features[rows].mean(dim=0)
        if fallback:
            warnings.warn(
                f"she: no correctly classified ID train sample of class(es) {fallback}; their patterns "
                "are the mean of all their samples",
                stacklevel=2,
            )
        self.patterns = patterns
        return self

    def __call__(self, logits: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """``[N]`` SHE scores ``⟨h, S_ŷ⟩``: each feature's inner product with its predicted class pattern."""
        self._require_fitted()
        assert self.patterns is not None
        features = check_features(self.name, features, self.patterns.shape[1])
        logits = check_logits(self.name, logits, self.patterns.shape[0])
        return hopfield_energy(features, logits, self.patterns)


@SCORES.register("nnguide")
class NNGuide(Score):
    """Nearest-neighbour guidance; see :func:`nn_guidance`.

    Fitting stores the bank ``b_i = lse(f_i) · ĥ_i`` of the ID train features.

    Args:
        k: number of nearest neighbours averaged (default 10, the paper's); clipped to the bank size.
    """

    name = "nnguide"
    needs_fit = True
    state_shapes = {"bank": ("M", "D")}

    def __init__(self, k: int = 10) -> None:
        self.k = check_count("nnguide k", k)
        self.bank: torch.Tensor | None = None

    def fit(
        self,
        features: torch.Tensor,
        labels: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
        layer: FinalLayer | None = None,
    ) -> NNGuide:
        """Keep the bank ``lse(f_i) · ĥ_i`` of ID train (needs ``logits``; ``k`` clipped); return self."""
        features, _, logits = check_fit_inputs(self.name, features, labels, logits, need_logits=True)
        assert logits is not None
        self.k = _clip_k(self.name, self.k, len(features))
        self.bank = F.normalize(features, dim=1) * torch.logsumexp(logits, dim=1, keepdim=True)
        return self

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the bank, which must hold at least ``k`` rows."""
        bank = state.get("bank")
        if isinstance(bank, torch.Tensor) and bank.ndim == 2 and len(bank) < self.k:
            raise ValueError(f"nnguide state 'bank' has {len(bank)} rows, fewer than k={self.k}")
        super().load_state_dict(state)

    def __call__(self, logits: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """``[N]`` NNGuide scores of ``logits`` ``[N, K]`` and ``features`` ``[N, D]``."""
        self._require_fitted()
        assert self.bank is not None
        features = check_features(self.name, features, self.bank.shape[1])
        logits = check_2d("logits", logits)
        return nn_guidance(features, logits, self.bank, self.k)

    def params(self) -> dict[str, float | int]:
        """The number of neighbours ``k``."""
        return {"k": self.k}
