"""CLUB mutual-information upper bound (Cheng et al., ICML 2020) for the OAL contrastive terms.

The variational conditional is ``q(y|x) = N(μ(x), diag e^{ℓ(x)})`` with two MLPs from :data:`Q_NETWORKS`;
``ℓ`` ends in a ``tanh`` so the log-variance stays in (−1, 1). In OAL, ``x`` is the outlier vector (kNN
embedding or pooled SD latent) and ``y`` the student feature ``h_S``: the public code calls
``CLUB(outliers, feature)``.

q networks (``hidden`` = the hidden width; the public OAL code passes ``hidden_size=512`` and its MLPs use
``hidden_size // 2 = 256``):

- ``mlp`` (the public ``CLUB``, used for the kNN pool): ``μ: x → hidden → y``, ``ℓ: x → hidden → y → tanh``;
- ``deep`` (the public ``DEEP_CLUB``, used for the SD latent pool): ``μ: x → x/2 → x/4 → hidden → y``
  (ReLU between), ``ℓ: x → hidden → y → tanh``.

Pairing: ``x`` [N, D_x] and ``y`` [N, D_y] are paired row by row (row i of the sampled outlier batch goes
with row i of the ID batch), so both batches must have the same size N; the trainer draws N outliers per
ID batch. How ``q`` is trained (``club_q_training: joint|alternate``) is the trainer's business: ``joint``
lets the student loss's gradient reach μ and ℓ (as the public code does), ``alternate`` additionally
minimises :meth:`CLUB.learning_loss` on detached inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def club_estimate(mu: torch.Tensor, logvar: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The CLUB estimate from ``q``'s outputs ``μ``, ``ℓ`` [N, D] and ``y`` [N, D] (see :meth:`CLUB.forward`).

    A pure function, so a caller can pass ``μ`` and ``ℓ`` detached (``club_q_training: alternate``: the
    estimate trains only the network that produced ``y``).
    """
    inv_two_var = 0.5 * torch.exp(-logvar)
    positive = ((mu - y) ** 2 * inv_two_var).sum(dim=1)
    y_mean = y.mean(dim=0)
    y_var = ((y - y_mean) ** 2).mean(dim=0)
    negative = ((y_var + (y_mean - mu) ** 2) * inv_two_var).sum(dim=1)
    return (negative - positive).mean()


def _mlp(widths: list[int]) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return layers


def mlp_networks(x_dim: int, y_dim: int, hidden: int) -> tuple[nn.Module, nn.Module]:
    """``μ: x → hidden → y`` and ``ℓ: x → hidden → y → tanh`` (the public code's ``CLUB``)."""
    return nn.Sequential(*_mlp([x_dim, hidden, y_dim])), nn.Sequential(
        *_mlp([x_dim, hidden, y_dim]), nn.Tanh()
    )


def deep_networks(x_dim: int, y_dim: int, hidden: int) -> tuple[nn.Module, nn.Module]:
    """``μ: x → x/2 → x/4 → hidden → y`` and ``ℓ: x → hidden → y → tanh`` (the public ``DEEP_CLUB``)."""
    mu = nn.Sequential(*_mlp([x_dim, max(1, x_dim // 2), max(1, x_dim // 4), hidden, y_dim]))
    return mu, nn.Sequential(*_mlp([x_dim, hidden, y_dim]), nn.Tanh())


Q_NETWORKS: dict[str, Callable[[int, int, int], tuple[nn.Module, nn.Module]]] = {
    "mlp": mlp_networks,
    "deep": deep_networks,
}
"""q-network name -> ``build(x_dim, y_dim, hidden) -> (μ network, ℓ network)``."""


class CLUB(nn.Module):
    """CLUB estimator of ``I(x; y)`` with a Gaussian ``q(y|x)``.

    Args:
        x_dim: width of the conditioning input x (the outlier vector).
        y_dim: width of y (the student feature ``h_S``).
        hidden_size: hidden width of the q networks (256 in the public code).
        network: a key of :data:`Q_NETWORKS` (``mlp`` or ``deep``).
    """

    def __init__(self, x_dim: int, y_dim: int, hidden_size: int = 256, network: str = "mlp") -> None:
        """Build q's two networks."""
        super().__init__()
        if network not in Q_NETWORKS:
            raise ValueError(f"unknown CLUB q network {network!r}; choose one of: {', '.join(Q_NETWORKS)}")
        self.x_dim = x_dim
        self.y_dim = y_dim
        self.network = network
        self.mu, self.logvar = Q_NETWORKS[network](x_dim, y_dim, hidden_size)

    def mu_logvar(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(μ(x), ℓ(x))``, both [N, D_y]."""
        return self.mu(x), self.logvar(x)

    def _check(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.x_dim:
            raise ValueError(f"CLUB expects x of shape [N, {self.x_dim}], got {tuple(x.shape)}")
        if y.ndim != 2 or y.shape[1] != self.y_dim:
            raise ValueError(f"CLUB expects y of shape [N, {self.y_dim}], got {tuple(y.shape)}")
        if x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise ValueError(
                f"CLUB pairs x and y row by row, so they need the same non-zero batch size; got "
                f"{x.shape[0]} and {y.shape[0]} rows (draw as many outliers as there are ID rows)"
            )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """CLUB estimate ``mean_i[ −Σ_d (μ_id − y_id)²/(2e^{ℓ_id}) + Σ_d mean_j (y_jd − μ_id)²/(2e^{ℓ_id}) ]``.

        The all-pairs term uses the exact identity
        ``mean_j (y_jd − μ_id)² = mean_j (y_jd − ȳ_d)² + (ȳ_d − μ_id)²``, so memory is O(N·D) instead of
        the O(N²·D) of the reference code; value and gradient are the same.
        """
        self._check(x, y)
        return club_estimate(*self.mu_logvar(x), y)

    def log_likelihood(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean Gaussian log-likelihood ``mean_i Σ_d [−(y_id − μ_id)²/(2e^{ℓ_id}) − ℓ_id/2 − log(2π)/2]``."""
        self._check(x, y)
        mu, logvar = self.mu_logvar(x)
        per_dim = -0.5 * (mu - y) ** 2 * torch.exp(-logvar) - 0.5 * logvar - 0.5 * math.log(2 * math.pi)
        return per_dim.sum(dim=1).mean()

    def learning_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Loss that fits ``q`` by maximum likelihood: ``−log_likelihood(x, y)``."""
        return -self.log_likelihood(x, y)
