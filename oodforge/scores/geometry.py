"""Scores built on the geometry of the final linear layer ``f = W h + b``: ViM, fDBD and GradNorm.

All three need a linear head (:func:`oodforge.backbones.final_layer`); they read the logits the model
returns (which are ``W h + b``) and keep in their state only what the layer adds (ViM: the origin and
the residual subspace; fDBD: the pairwise distances of the class weight vectors; GradNorm: nothing).
"""

from __future__ import annotations

import torch

from oodforge.backbones import FinalLayer
from oodforge.scores.base import (
    SCORES,
    Score,
    check_2d,
    check_count,
    check_features,
    check_fit_inputs,
    check_layer,
    check_logits,
    check_number,
    check_positive,
)

# --------------------------------------------------------------------------- pure functions


def vim_origin(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """ViM's origin ``o = −W⁺ b`` [D] (float64): where all logits are 0 when W has full row rank."""
    return -torch.linalg.pinv(weight.double()) @ bias.double()


def residual_basis(features: torch.Tensor, origin: torch.Tensor, dim: int) -> torch.Tensor:
    """Orthonormal basis ``R`` [D, D − dim] of the residual space (float64).

    The principal space is spanned by the ``dim`` leading eigenvectors of
    ``1/N Σ_i (h_i − o)(h_i − o)ᵀ``; ``R`` spans the remaining ones.
    """
    x = features.double() - origin
    _, vectors = torch.linalg.eigh(x.T @ x / len(x))  # eigenvalues ascending
    return vectors[:, : x.shape[1] - dim]


def residual_norm(features: torch.Tensor, origin: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``‖x^{P⊥}‖ = ‖Rᵀ (h − o)‖`` [N] (float64)."""
    return ((features.double() - origin) @ residual).norm(dim=1)


def vim(
    logits: torch.Tensor,
    features: torch.Tensor,
    origin: torch.Tensor,
    residual: torch.Tensor,
    alpha: float | torch.Tensor,
) -> torch.Tensor:
    """Virtual-logit matching score ``lse(f) − α ‖Rᵀ (h − o)‖`` (Wang et al., arXiv 2203.10807).

    The paper's OOD score is the softmax probability ``p₀`` of the virtual logit ``f₀ = α‖x^{P⊥}‖``
    among ``(f₀, f)``; ``−log p₀ = softplus(lse(f) − f₀)`` is increasing in ``lse(f) − f₀``, so this
    score ranks samples exactly as ``1 − p₀`` does. With ``α = 0`` it is the energy.
    """
    lse = torch.logsumexp(logits.double(), dim=1)
    return (lse - float(alpha) * residual_norm(features, origin, residual)).float()


def weight_distances(weight: torch.Tensor) -> torch.Tensor:
    """``‖w_k − w_j‖`` [K, K] for the rows of ``W`` (float64)."""
    w = weight.double()
    return (w[:, None, :] - w[None, :, :]).norm(dim=2)


def fdbd(
    logits: torch.Tensor, features: torch.Tensor, distances: torch.Tensor, mean: torch.Tensor
) -> torch.Tensor:
    """The fDBD score (Liu & Qin, arXiv 2312.11536).

    ``1/(K−1) Σ_{j≠ŷ} (f_ŷ − f_j) / ‖w_ŷ − w_j‖  /  ‖h − μ‖``: the mean feature-space distance from h to
    the decision boundaries between its predicted class ŷ and every other class
    (``|(w_ŷ − w_j)ᵀh + b_ŷ − b_j| / ‖w_ŷ − w_j‖``, with ``f_ŷ − f_j ≥ 0``), divided by the distance of h
    to the mean ID train feature μ. Zero denominators are floored at 1e-12.
    """
    f = logits.double()
    k = f.shape[1]
    top, predicted = f.max(dim=1)
    gaps = top[:, None] - f  # f_ŷ − f_j, 0 at j = ŷ
    to_boundary = gaps / distances.double()[predicted].clamp_min(1e-12)
    mean_distance = to_boundary.sum(dim=1) / (k - 1)  # the j = ŷ term is 0
    spread = (features.double() - mean.double()).norm(dim=1).clamp_min(1e-12)
    return (mean_distance / spread).float()


def gradnorm(logits: torch.Tensor, features: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """GradNorm ``‖∂ KL(u ‖ softmax(f/T)) / ∂W‖₁`` in closed form (Huang et al., arXiv 2110.00218).

    With ``f = W h + b`` and ``u`` uniform over K classes, ``KL(u ‖ p) = −log K − (1/K) Σ_k log p_k`` and
    ``∂KL/∂f_k = (p_k − 1/K) / T``, so ``∂KL/∂W_kd = (p_k − 1/K) h_d / T`` is an outer product and its
    L1 norm factorises: ``S = (1/T) · Σ_k |p_k − 1/K| · Σ_d |h_d|``. No backward pass is needed, so it
    runs in the one pass over cached logits and features.
    """
    p = (logits.double() / temperature).softmax(dim=1)
    spread = (p - 1.0 / p.shape[1]).abs().sum(dim=1)
    return (spread * features.double().abs().sum(dim=1) / temperature).float()


# --------------------------------------------------------------------------- registered scores


@SCORES.register("vim")
class ViM(Score):
    """Virtual-logit matching; see :func:`vim`.

    Fitting (ID train features and logits, and the final layer): ``o = −W⁺ b``; ``R`` from
    :func:`residual_basis`; ``α = Σ_i max_k f_ik / Σ_i ‖Rᵀ(h_i − o)‖`` unless ``alpha`` is given.

    Args:
        dim: dimension of the principal subspace, 1 ≤ dim < D (default: ⌊D/2⌋, set at fit time; the
            paper uses 1000 of 2048 for ResNet-50).
        alpha: a fixed α ≥ 0 instead of the fitted one (0 gives the energy).
    """

    name = "vim"
    needs_fit = True
    needs_layer = True
    state_shapes = {"origin": ("D",), "residual": ("D", "R"), "alpha": ()}

    def __init__(self, dim: int | None = None, alpha: float | None = None) -> None:
        self.dim = None if dim is None else check_count("vim dim", dim)
        self.fixed_alpha = None if alpha is None else check_number("vim alpha", alpha, low=0.0, high=1e12)
        self.origin: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None
        self.alpha: torch.Tensor | None = None

    def fit(
        self,
        features: torch.Tensor,
        labels: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
        layer: FinalLayer | None = None,
    ) -> ViM:
        """Fit the origin ``o``, residual basis ``R`` and ``α`` on ID train (needs logits and the layer)."""
        features, _, logits = check_fit_inputs(self.name, features, labels, logits, need_logits=True)
        assert logits is not None
        layer = check_layer(self.name, layer, features)
        width = features.shape[1]
        dim = self.dim if self.dim is not None else max(1, width // 2)
        if dim >= width:
            raise ValueError(
                f"vim dim={dim} must be below the feature width D={width}; set vim.dim < {width}"
            )
        self.dim = dim
        self.origin = vim_origin(layer.weight, layer.bias)
        self.residual = residual_basis(features, self.origin, dim)
        if self.fixed_alpha is not None:
            alpha = self.fixed_alpha
        else:
            norms = residual_norm(features, self.origin, self.residual)
            alpha = float(logits.double().amax(dim=1).sum() / norms.sum().clamp_min(1e-12))
        self.alpha = torch.tensor(alpha, dtype=torch.float64)
        return self

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the fitted tensors, checking the residual basis matches ``dim`` when it is set."""
        residual = state.get("residual")
        if self.dim is not None and isinstance(residual, torch.Tensor) and residual.ndim == 2:
            stored = residual.shape[0] - residual.shape[1]
            if stored != self.dim:
                raise ValueError(
                    f"vim state 'residual' is for dim={stored}, but the score has dim={self.dim}"
                )
        super().load_state_dict(state)
        assert self.residual is not None
        self.dim = self.residual.shape[0] - self.residual.shape[1]

    def __call__(self, logits: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """``[N]`` ViM scores of ``logits`` ``[N, K]`` and ``features`` ``[N, D]``."""
        self._require_fitted()
        assert self.origin is not None and self.residual is not None and self.alpha is not None
        features = check_features(self.name, features, len(self.origin))
        logits = check_logits(self.name, logits)
        return vim(logits, features, self.origin, self.residual, self.alpha)

    def params(self) -> dict[str, float | int | None]:
        """The subspace dimension and the fixed α (``None`` when fitted)."""
        return {"dim": self.dim, "alpha": self.fixed_alpha}


@SCORES.register("fdbd")
class FDBD(Score):
    """Fast decision-boundary distance; see :func:`fdbd`.

    Fitting: the pairwise distances ``‖w_k − w_j‖`` of the final layer's class vectors and the mean
    ID train feature μ.
    """

    name = "fdbd"
    needs_fit = True
    needs_layer = True
    state_shapes = {"distances": ("K", "K"), "mean": ("D",)}

    def __init__(self) -> None:
        self.distances: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None

    def fit(
        self,
        features: torch.Tensor,
        labels: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
        layer: FinalLayer | None = None,
    ) -> FDBD:
        """Keep the class-weight distances ``‖w_k − w_j‖`` and the ID train feature mean μ (needs K ≥ 2)."""
        features, _, _ = check_fit_inputs(self.name, features)
        layer = check_layer(self.name, layer, features)
        if layer.num_classes < 2:
            raise ValueError("fdbd needs at least 2 classes (a decision boundary)")
        self.distances = weight_distances(layer.weight)
        self.mean = features.double().mean(dim=0)
        return self

    def __call__(self, logits: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """``[N]`` fDBD scores of ``logits`` ``[N, K]`` and ``features`` ``[N, D]``."""
        self._require_fitted()
        assert self.distances is not None and self.mean is not None
        features = check_features(self.name, features, len(self.mean))
        logits = check_logits(self.name, logits, len(self.distances))
        return fdbd(logits, features, self.distances, self.mean)


@SCORES.register("gradnorm")
class GradNorm(Score):
    """GradNorm in closed form; see :func:`gradnorm`.

    It needs a linear head (the gradient is the one of ``W`` in ``f = W h + b``, with ``h`` the features
    the model returns), which :meth:`fit` checks, but it keeps nothing: the logits and features of the
    one pass are enough.

    Args:
        temperature: T > 0 (default 1, the paper's).
    """

    name = "gradnorm"
    needs_layer = True

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = check_positive("gradnorm temperature", temperature)

    def fit(
        self,
        features: torch.Tensor,
        labels: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
        layer: FinalLayer | None = None,
    ) -> GradNorm:
        """Only check that a final layer is given and matches the features' width; nothing is kept."""
        check_layer(self.name, layer, check_fit_inputs(self.name, features)[0])
        return self

    def __call__(self, logits: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """``[N]`` GradNorm scores of ``logits`` ``[N, K]`` and ``features`` ``[N, D]`` (both required)."""
        logits = check_logits(self.name, logits)
        if features is None:
            raise ValueError(
                "score 'gradnorm' needs the penultimate features; pass them as the second argument"
            )
        return gradnorm(logits, check_2d("features", features), self.temperature)

    def params(self) -> dict[str, float | int]:
        """The temperature."""
        return {"temperature": self.temperature}
