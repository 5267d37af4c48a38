"""``ce``: the cross-entropy baseline (also the teacher / starting checkpoint of the OOD methods)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from oodforge.backbones import Classifier
from trainer.methods.base import METHODS, Method


@METHODS.register("ce")
class CrossEntropy(Method):
    """L = CE(f(x), y)."""

    def loss(
        self,
        model: Classifier,
        batch: tuple[torch.Tensor, torch.Tensor],
        outliers: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Cross-entropy of the batch's logits."""
        images, labels = batch
        logits, _ = model(images)
        loss = F.cross_entropy(logits, labels)
        return loss, {"ce": loss.item()}
