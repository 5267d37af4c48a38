"""The dense OOD training loss of NFlowJS (Grcić, Bevandić & Šegvić).

CE on inlier pixels plus a bounded Jensen-Shannon term that pushes the prediction on negative (pasted)
pixels towards the uniform.

``L = mean_{inlier px} CE(f, y) + β · mean_{negative px} JS(U ‖ softmax f)``, β = 0.03 by default.
JS ≤ ln 2, so unlike OE's KL(U ‖ p) a few hard negatives cannot dominate the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from oodforge.dense import js_to_uniform

VOID = 255


@dataclass
class DenseLoss:
    """The total loss and its two terms (the terms are detached, for logging)."""

    total: torch.Tensor
    ce: torch.Tensor
    js: torch.Tensor


def dense_ood_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    negative: torch.Tensor,
    beta: float = 0.03,
    ignore_index: int = VOID,
) -> DenseLoss:
    """``mean CE over inlier pixels + β · mean JS(U ‖ softmax) over negative pixels``.

    Args:
        logits: ``[N, K, H, W]``.
        labels: ``[N, H, W]`` class ids; ``ignore_index`` pixels are left out of the CE term.
        negative: ``[N, H, W]`` bool, the pasted negative pixels (left out of the CE term whatever their
            label, and the only pixels of the JS term).
        beta: Weight of the JS term.
        ignore_index: The void label.

    Returns:
        :class:`DenseLoss`; a term without pixels is 0 (with a graph, so ``backward`` always works).
    """
    if (
        logits.ndim != 4
        or labels.shape != logits.shape[:1] + logits.shape[2:]
        or negative.shape != labels.shape
    ):
        raise ValueError(
            f"expected logits [N, K, H, W] with labels and negative [N, H, W]; got {tuple(logits.shape)}, "
            f"{tuple(labels.shape)} and {tuple(negative.shape)}"
        )
    target = labels.long().masked_fill(negative, ignore_index)
    valid = target != ignore_index
    per_pixel = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    ce = per_pixel.sum() / valid.sum().clamp_min(1)
    js_map = js_to_uniform(logits)
    js = (js_map * negative).sum() / negative.sum().clamp_min(1)
    return DenseLoss(total=ce + beta * js, ce=ce.detach(), js=js.detach())
