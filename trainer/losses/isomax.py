"""IsoMax+ head (Macêdo & Ludermir 2021), DESIGN.md §5: an isotropic distance-based classifier head.

Logits ``z_j = −|d_s|·‖ĥ − p̂_j‖`` with L2-normalised feature ``ĥ`` and prototypes ``p̂_j``; the loss uses
the entropic scale 10 in training only; the OOD score is the minimum distance ``max_j z_j`` (the
``max_logit`` score of the exported detector). The head
itself lives in :mod:`oodforge.backbones` (``model.head.name: isomax_plus``) so detector artifacts rebuild it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from oodforge.backbones import IsoMaxPlusHead

__all__ = ["IsoMaxPlusHead", "isomax_loss"]


def isomax_loss(logits: torch.Tensor, y: torch.Tensor, entropic_scale: float = 10.0) -> torch.Tensor:
    """IsoMax+ training loss ``CE(entropic_scale · z, y)`` (mean over the batch)."""
    return F.cross_entropy(entropic_scale * logits, y)
