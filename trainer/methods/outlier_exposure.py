"""``oe`` and ``energy_margin``: fine-tuning on the pixel outliers of a synth dataset.

    L = CE(f_in, y) + λ·term(f_in, f_out)

with ``term`` = Outlier Exposure (Hendrycks et al. 2019, λ = 0.5) or the energy margins of Liu et al.
2020 (λ = 0.1, margins ``m_in``/``m_out``). ID and outlier images go through the model in one forward
pass. Both papers fine-tune a trained classifier: the configs start from ``runs/ce/detector``
(``init_from``).

    accelerate launch trainer/train_oal.py --config configs/train/oe.yaml
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from oodforge.backbones import Classifier
from trainer.methods.base import METHODS, Method, MethodContext
from trainer.methods.pixel import DEFAULT_WEIGHTS, PIXEL_TERMS, PixelOutlierArgs, joint_forward, pixel_set

if TYPE_CHECKING:
    from trainer.config import TrainConfig


class PixelOutlierMethod(Method):
    """CE on ID plus one weighted term of :data:`~trainer.methods.pixel.PIXEL_TERMS` on ID and outlier logits."""

    Config = PixelOutlierArgs
    TERM: ClassVar[str]

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.term = PIXEL_TERMS.get(self.TERM)(ctx.args)
        self.weight = ctx.args.weight if ctx.args.weight is not None else DEFAULT_WEIGHTS[self.TERM]

    @classmethod
    def check(cls, args: PixelOutlierArgs, config: TrainConfig) -> None:
        pixel_set(args.outliers, config)  # missing or empty outlier datasets fail before the run dir exists
        PIXEL_TERMS.get(cls.TERM)(args)  # and so do invalid term options

    @classmethod
    def outlier_sets(
        cls, args: PixelOutlierArgs, config: TrainConfig, class_names: list[str]
    ) -> dict[str, Dataset]:
        return {"pixel": pixel_set(args.outliers, config)}

    def loss(
        self,
        model: Classifier,
        batch: tuple[torch.Tensor, torch.Tensor],
        outliers: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, float]]:
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
