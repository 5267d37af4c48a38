"""VOS: virtual outlier synthesis in feature space (Du et al., ICLR 2022), DESIGN.md §5 "VOS".

* :class:`VOSQueue` keeps the last ``capacity`` penultimate features of every class (FIFO).
* :func:`vos_sample` fits class means + one tied covariance to the queues and keeps the lowest-likelihood
  draws of each class Gaussian as virtual outliers.
* :class:`VOSLoss` is the uncertainty loss ``CE(Linear(1,2)(−E_w), ID=1 / virtual=0)``; the 0.1 weight is
  applied by the caller, and inference uses the plain energy, not ``E_w``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import MultivariateNormal

from oodforge.scores import class_means_and_tied_covariance
from trainer.losses.outlier import binary_energy_ce


class VOSQueue(nn.Module):
    """Per-class FIFO queues of features, a ring buffer ``features`` [K, capacity, D] plus ``seen`` [K].

    ``seen[k]`` counts every feature ever pushed for class k; the next one goes to slot
    ``seen[k] % capacity``, so once a queue is full the oldest entry is overwritten. Both are buffers, so
    they move with ``.to(device)`` and are saved in ``state_dict`` (resume keeps the queues).
    """

    features: torch.Tensor
    seen: torch.Tensor

    def __init__(self, num_classes: int, dim: int, capacity: int = 1000) -> None:
        super().__init__()
        if num_classes < 1 or dim < 1 or capacity < 1:
            raise ValueError(
                f"num_classes, dim and capacity must be ≥ 1, got {num_classes}, {dim}, {capacity}"
            )
        self.num_classes = num_classes
        self.dim = dim
        self.capacity = capacity
        self.register_buffer("features", torch.zeros(num_classes, capacity, dim))
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.long))

    @property
    def counts(self) -> torch.Tensor:
        """Number of filled slots per class, [K]."""
        return self.seen.clamp(max=self.capacity)

    def ready(self) -> bool:
        """True once every class queue is full."""
        return bool((self.seen >= self.capacity).all())

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Push ``features`` [B, D] (detached) into the queues of their ``labels`` [B], in batch order."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"VOSQueue expects features [B, {self.dim}], got {tuple(features.shape)}")
        if labels.shape != features.shape[:1]:
            raise ValueError(f"labels must be [B] = [{features.shape[0]}], got shape {tuple(labels.shape)}")
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}), got {labels.min().item()}..{labels.max().item()}"
            )
        features = features.detach().to(self.features)
        labels = labels.to(self.seen.device)
        for k in labels.unique().tolist():
            rows = features[labels == k]
            n = len(rows)
            kept = rows[-self.capacity :]  # of a batch larger than the queue only the newest survive
            start = int(self.seen[k]) + n - len(kept)
            slots = (start + torch.arange(len(kept), device=self.features.device)) % self.capacity
            self.features[k, slots] = kept
            self.seen[k] += n

    def class_features(self, k: int) -> torch.Tensor:
        """The filled features of class ``k``, oldest first, [counts[k], D]."""
        seen = int(self.seen[k])
        if seen <= self.capacity:
            return self.features[k, :seen]
        start = seen % self.capacity
        return torch.cat([self.features[k, start:], self.features[k, :start]])


def fit_tied_gaussian(queue_feats: torch.Tensor, ridge: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means ``μ_k`` [K, D] and tied covariance ``Σ = 1/(K·C) Σ_{k,c} (z_kc − μ_k)(z_kc − μ_k)ᵀ + ridge·I``.

    ``queue_feats`` is [K, C, D]. The ridge (1e-4, as in the VOS code) keeps Σ positive definite when
    C·K ≤ D or features are collinear. Computed in float64.
    """
    if queue_feats.ndim != 3 or queue_feats.shape[1] < 1:
        raise ValueError(f"queue_feats must be [K, C, D] with C ≥ 1, got {tuple(queue_feats.shape)}")
    k, c, d = queue_feats.shape
    labels = torch.arange(k, device=queue_feats.device).repeat_interleave(c)
    means, cov = class_means_and_tied_covariance(queue_feats.reshape(k * c, d), labels)
    return means, cov + ridge * torch.eye(d, dtype=cov.dtype, device=cov.device)


@torch.no_grad()
def vos_sample(
    queue_feats: torch.Tensor,
    n_samples: int = 10000,
    keep: int = 1,
    generator: torch.Generator | None = None,
    ridge: float = 1e-4,
) -> torch.Tensor:
    """Virtual outliers [K·keep, D], class-major (rows ``k·keep … k·keep+keep−1`` come from class k).

    Fits ``N(μ_k, Σ)`` with :func:`fit_tied_gaussian`, draws ``n_samples`` per class
    (``μ_k + L ε``, ``Σ = L Lᵀ``, ``ε ~ N(0, I)`` from ``generator``) and keeps the ``keep`` with the
    lowest ``MultivariateNormal(μ_k, Σ).log_prob``. One class at a time, so memory is O(n_samples·D).
    """
    if not 1 <= keep <= n_samples:
        raise ValueError(f"keep must be in [1, n_samples={n_samples}], got {keep}")
    means, cov = fit_tied_gaussian(queue_feats, ridge)
    scale_tril = torch.linalg.cholesky(cov).to(queue_feats.dtype)
    means = means.to(queue_feats.dtype)
    out = []
    for mu in means:
        gaussian = MultivariateNormal(mu, scale_tril=scale_tril)
        eps = torch.randn(n_samples, mu.shape[0], generator=generator, dtype=mu.dtype, device=mu.device)
        samples = mu + eps @ scale_tril.T
        lowest = gaussian.log_prob(samples).topk(keep, largest=False).indices
        out.append(samples[lowest])
    return torch.cat(out)


class VOSLoss(nn.Module):
    """VOS uncertainty loss ``CE(Linear(1,2)(−E_w), ID=1 / virtual=0)``, ``E_w = −log Σ_k relu(w_k) e^{f_k}``.

    ``w`` [K] is learnable, initialised ~ U(0, 1) as in the VOS code; a class whose ``w_k ≤ 0`` drops out
    of the sum (if all did, ``E_w`` would be +inf). The 0.1 weight is applied by the caller.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes).uniform_(0.0, 1.0))
        self.linear = nn.Linear(1, 2)

    def weighted_energy(self, logits: torch.Tensor) -> torch.Tensor:
        """``E_w = −lse_k(f_k + log relu(w_k))`` [N], with ``log 0 = −inf`` (zero gradient, no NaN)."""
        if logits.ndim != 2 or logits.shape[1] != len(self.weight):
            raise ValueError(f"VOSLoss expects logits [N, {len(self.weight)}], got {tuple(logits.shape)}")
        w = self.weight
        positive = w > 0
        log_w = torch.where(
            positive, torch.log(w.clamp_min(torch.finfo(w.dtype).tiny)), torch.full_like(w, float("-inf"))
        )
        return -torch.logsumexp(logits + log_w, dim=1)

    def forward(self, logits_in: torch.Tensor, logits_virtual: torch.Tensor) -> torch.Tensor:
        """The uncertainty cross-entropy of ID logits (target 1) and virtual-outlier logits (target 0)."""
        return binary_energy_ce(
            self.linear, -self.weighted_energy(logits_in), -self.weighted_energy(logits_virtual)
        )
