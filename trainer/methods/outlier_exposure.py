"""``oe`` and ``energy_margin``: fine-tuning on the pixel outliers of a synth dataset.

    L = CE(f_in, y) + λ·term(f_in, f_out)

with ``term`` = Outlier Exposure (Hendrycks et al. 2019, λ = 0.5) or the energy margins of Liu et al.
2020 (λ = 0.1, margins ``m_in``/``m_out``). ID and outlier images go through the model in one forward
pass. Both papers fine-tune a trained classifier: the configs start from ``runs/ce/detector``
(``init_from``).

    accelerate launch trainer/train_oal.py --config configs/train/oe.yaml
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from oodforge.backbones import Classifier
from oodforge.data import Benchmark
from trainer.config import TrainConfig
from trainer.methods.base import METHODS, Method, Plan
from trainer.methods.pixel import (
    PixelOutlierArgs,
    build_term,
    joint_forward,
    load_outliers,
    pixel_set,
)


class PixelOutlierMethod(Method):
    """CE on ID plus one weighted term of :data:`~trainer.methods.pixel.PIXEL_TERMS` on ID and outlier logits."""

    Config = PixelOutlierArgs
    TERM: ClassVar[str]

    def setup(self, config: TrainConfig, data: Benchmark) -> Plan:
        """The configured classifier, the term, and the synth dataset's images as the ``pixel`` set."""
        args: PixelOutlierArgs = self.args
        self.term, self.weight = build_term(self.TERM, args, args.weight)  # invalid options fail here
        plan = super().setup(config, data)
        plan.outliers = {"pixel": pixel_set(load_outliers(args.outliers), config)}
        plan.outlier_batch_size = args.outlier_batch_size
        plan.head_sees_synth_images = True
        return plan

    def loss(
        self,
        model: Classifier,
        batch: tuple[torch.Tensor, torch.Tensor],
        outliers: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``CE(f_in, y) + λ·term(f_in, f_out)``, ID and outlier images in one forward pass."""
        images, labels = batch
        logits_in, _, logits_out, _ = joint_forward(model, images, outliers["pixel"])
        ce = F.cross_entropy(logits_in, labels)
        term = self.term(logits_in, logits_out)
        return ce + self.weight * term, {"ce": ce.item(), self.TERM: term.item()}


@METHODS.register("oe")
class OutlierExposure(PixelOutlierMethod):
    """L = CE + λ·mean(lse(f_out) − mean_k f_out,k), λ = 0.5."""

    TERM = "oe"


@METHODS.register("energy_margin")
class EnergyMargin(PixelOutlierMethod):
    """L = CE + 0.1·(mean relu(E_in − m_in)² + mean relu(m_out − E_out)²), E = −lse(f)."""

    TERM = "energy_margin"
