"""Losses on real (pixel / latent) outliers, DESIGN.md §5 "Pixel outliers in training".

* :func:`oe_loss` — Outlier Exposure (Hendrycks et al. 2019), weight λ applied by the caller.
* :func:`energy_margin_loss` — energy-bounded learning (Liu et al. 2020), weight 0.1 applied by the caller.
* :class:`EnergyHead` — Dream-OOD's logistic head on the energy, weight β applied by the caller.

Energy is ``E(f) = −lse(f)`` (low energy = in-distribution).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _check_logits(name: str, logits: torch.Tensor) -> None:
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"{name} must be non-empty logits [N, K], got shape {tuple(logits.shape)}")


def oe_loss(logits_out: torch.Tensor) -> torch.Tensor:
    """Outlier Exposure: ``mean_i (lse(f_i) − 1/K Σ_k f_ik)``.

    This is the cross-entropy from the uniform target ``u = 1/K`` to ``softmax f``:
    ``CE(u, softmax f) = log K + KL(u ‖ softmax f)``, so its minimum is ``log K`` (not 0), reached exactly
    when a row's logits are constant. Constants do not change the gradient.
    """
    _check_logits("logits_out", logits_out)
    return (torch.logsumexp(logits_out, dim=1) - logits_out.mean(dim=1)).mean()


def energy_margin_loss(
    logits_in: torch.Tensor, logits_out: torch.Tensor, m_in: float, m_out: float
) -> torch.Tensor:
    """Squared-hinge energy margins ``mean_i relu(E_in,i − m_in)² + mean_j relu(m_out − E_out,j)²``.

    ``E = −lse(f)``. ID energies above ``m_in`` and outlier energies below ``m_out`` are penalised; the two
    means are over their own batches. The 0.1 weight of DESIGN.md is applied by the caller.
    """
    _check_logits("logits_in", logits_in)
    _check_logits("logits_out", logits_out)
    e_in = -torch.logsumexp(logits_in, dim=1)
    e_out = -torch.logsumexp(logits_out, dim=1)
    return F.relu(e_in - m_in).pow(2).mean() + F.relu(m_out - e_out).pow(2).mean()


def binary_energy_ce(head: nn.Linear, score_in: torch.Tensor, score_out: torch.Tensor) -> torch.Tensor:
    """``CE(head([s_in; s_out]), [1…1; 0…0])`` over all rows: ID rows are class 1, outlier rows class 0."""
    scores = torch.cat([score_in, score_out]).unsqueeze(1)
    targets = torch.cat(
        [
            torch.ones(len(score_in), dtype=torch.long, device=scores.device),
            torch.zeros(len(score_out), dtype=torch.long, device=scores.device),
        ]
    )
    return F.cross_entropy(head(scores), targets)


class EnergyHead(nn.Module):
    """Dream-OOD energy head: ``CE(Linear(1,2)([lse f_in; lse f_out]), [1, 0])``.

    The scalar ``lse f`` (= −energy) of every ID row and outlier row goes through one ``Linear(1, 2)``;
    ID rows have target 1 and outlier rows target 0, and the cross-entropy is the mean over all rows.
    The β weight is applied by the caller.
    """

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(1, 2)

    def forward(self, logits_in: torch.Tensor, logits_out: torch.Tensor) -> torch.Tensor:
        """The energy-head cross-entropy of ID logits (target 1) and outlier logits (target 0)."""
        _check_logits("logits_in", logits_in)
        _check_logits("logits_out", logits_out)
        return binary_energy_ce(
            self.linear, torch.logsumexp(logits_in, dim=1), torch.logsumexp(logits_out, dim=1)
        )
