"""Scores of the logits alone: MSP, MaxLogit, Energy, Entropy, GEN and KL matching (KLM).

Notation: ``f`` = logits ``[N, K]``, ``p = softmax(f)``, ``lse`` = logsumexp; higher = more in-distribution.
"""

from __future__ import annotations

import torch

from oodforge.backbones import FinalLayer
from oodforge.scores.base import (
    SCORES,
    Score,
    check_2d,
    check_count,
    check_fit_inputs,
    check_logits,
    check_positive,
)

# --------------------------------------------------------------------------- pure functions


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


def generalized_entropy(logits: torch.Tensor, gamma: float = 0.1, m: int = 100) -> torch.Tensor:
    """GEN score ``−Σ_{j ∈ top-M} p_j^γ (1 − p_j)^γ`` over the M largest softmax probabilities.

    Liu, Lochman & Zach, "GEN: Pushing the Limits of Softmax-Based Out-of-Distribution Detection",
    CVPR 2023. The probabilities are those of the full softmax (not renormalised over the top M);
    ``M`` is clipped to K. ``γ = 1`` gives ``Σ p_j² − 1`` when ``M = K`` (minus the Gini impurity).
    """
    p = logits.softmax(dim=1)
    top = p.topk(min(m, p.shape[1]), dim=1).values
    return -(top.pow(gamma) * (1.0 - top).clamp_min(0.0).pow(gamma)).sum(dim=1)


def kl_matching(logits: torch.Tensor, templates: torch.Tensor) -> torch.Tensor:
    """KL matching ``−min_c KL(p ‖ d_c) = −min_c Σ_k p_k (log p_k − log d_ck)`` (arXiv 1911.11132).

    Args:
        logits: ``[N, K]`` logits f; ``p = softmax(f)``.
        templates: ``[C, K]`` class templates ``d_c`` (mean ID softmax of the samples predicted as c).

    Returns:
        ``[N]`` scores ≤ 0. Template entries are floored at 1e-12, so a zero in ``d_c`` costs a
        large but finite penalty.
    """
    log_p = logits.double().log_softmax(dim=1)
    p = log_p.exp()
    neg_entropy = torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(dim=1, keepdim=True)
    cross = p @ templates.double().clamp_min(1e-12).log().T  # [N, C]: Σ_k p_k log d_ck
    return -(neg_entropy - cross).amin(dim=1).float()


# --------------------------------------------------------------------------- registered scores


@SCORES.register("msp")
class MSP(Score):
    """Maximum softmax probability; see :func:`msp`."""

    name = "msp"
    default_rank = 0

    def __call__(self, logits: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """``[N]`` maximum softmax probabilities of ``logits`` ``[N, K]`` (features unused)."""
        return msp(check_2d("logits", logits))


@SCORES.register("max_logit")
class MaxLogit(Score):
    """Maximum logit; see :func:`max_logit`."""

    name = "max_logit"
    default_rank = 1

    def __call__(self, logits: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """``[N]`` maximum logits of ``logits`` ``[N, K]`` (features unused)."""
        return max_logit(check_2d("logits", logits))


@SCORES.register("energy")
class Energy(Score):
    """Negative free energy ``T · logsumexp(f / T)``; see :func:`energy`.

    Args:
        temperature: T > 0 (default 1, as in DESIGN.md §5).
    """

    name = "energy"
    default_rank = 2

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = check_positive("energy temperature", temperature)

    def __call__(self, logits: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """``[N]`` negative free energies of ``logits`` ``[N, K]`` (features unused)."""
        return energy(check_2d("logits", logits), self.temperature)

    def params(self) -> dict[str, float | int]:
        """The temperature."""
        return {"temperature": self.temperature}


@SCORES.register("entropy")
class Entropy(Score):
    """Negative softmax entropy; see :func:`entropy`."""

    name = "entropy"
    default_rank = 3

    def __call__(self, logits: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """``[N]`` negative softmax entropies of ``logits`` ``[N, K]`` (features unused)."""
        return entropy(check_2d("logits", logits))


@SCORES.register("gen")
class GEN(Score):
    """Generalized entropy over the top-M probabilities; see :func:`generalized_entropy`.

    Args:
        gamma: γ > 0 (default 0.1, the paper's).
        m: M, how many of the largest probabilities count (default 100, clipped to K).
    """

    name = "gen"

    def __init__(self, gamma: float = 0.1, m: int = 100) -> None:
        self.gamma = check_positive("gen gamma", gamma)
        self.m = check_count("gen m", m)

    def __call__(self, logits: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """``[N]`` GEN scores of ``logits`` ``[N, K]`` (features unused)."""
        return generalized_entropy(check_2d("logits", logits), self.gamma, self.m)

    def params(self) -> dict[str, float | int]:
        """The exponent γ and the number M of top probabilities."""
        return {"gamma": self.gamma, "m": self.m}


@SCORES.register("klm")
class KLMatching(Score):
    """KL matching (Hendrycks et al., arXiv 1911.11132); see :func:`kl_matching`.

    Fitting: for each class c predicted on ID train (``argmax f = c``), the template ``d_c`` is the
    mean softmax of those samples; classes never predicted get no template.
    """

    name = "klm"
    needs_fit = True
    state_shapes = {"templates": ("C", "K")}

    def __init__(self) -> None:
        self.templates: torch.Tensor | None = None

    def fit(
        self,
        features: torch.Tensor,
        labels: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
        layer: FinalLayer | None = None,
    ) -> KLMatching:
        """Keep the mean softmax of each predicted class as its template (needs ``logits``); return self."""
        _, _, logits = check_fit_inputs(self.name, features, labels, logits, need_logits=True)
        assert logits is not None
        p = logits.double().softmax(dim=1)
        predicted = p.argmax(dim=1)
        rows = [p[predicted == c].mean(dim=0) for c in range(p.shape[1]) if (predicted == c).any()]
        self.templates = torch.stack(rows)
        return self

    def __call__(self, logits: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """``[N]`` KL-matching scores of ``logits`` ``[N, K]`` against the fitted templates."""
        self._require_fitted()
        assert self.templates is not None
        return kl_matching(check_logits(self.name, logits, self.templates.shape[1]), self.templates)
