"""IsoMax+ head (Macêdo & Ludermir 2021), DESIGN.md §5: an isotropic distance-based classifier head.

Logits ``z_j = −|d_s|·‖ĥ − p̂_j‖`` with L2-normalised feature ``ĥ`` and prototypes ``p̂_j``; the loss uses
the entropic scale 10 in training only; the OOD score is the minimum distance ``max_j z_j``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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


def isomax_loss(logits: torch.Tensor, y: torch.Tensor, entropic_scale: float = 10.0) -> torch.Tensor:
    """IsoMax+ training loss ``CE(entropic_scale · z, y)`` (mean over the batch)."""
    return F.cross_entropy(entropic_scale * logits, y)


def min_distance_score(logits: torch.Tensor) -> torch.Tensor:
    """IsoMax+ score ``max_j z_j`` = −(scaled) distance to the nearest prototype; higher = more ID."""
    return logits.max(dim=1).values
