"""``isomax_plus``: IsoMax+ (Macêdo & Ludermir 2021), DESIGN.md §5.

The model gets the IsoMax+ head, ``z_j = −|d_s|·‖ĥ − p̂_j‖`` to learnable prototypes, and is trained with
``CE(10·z, y)`` (the entropic scale is for training only). Its score is the minimum distance
``max_j z_j``, which is the ``max_logit`` score of the exported detector. Trains from scratch like ``ce``.

    accelerate launch trainer/train_oal.py --config configs/train/isomax_plus.yaml
"""

from __future__ import annotations

import torch
from pydantic import Field

from oodforge.backbones import Classifier, HeadConfig, build_classifier
from oodforge.config import ConfigError, StrictModel
from oodforge.data import Benchmark
from trainer.config import TrainConfig
from trainer.losses.isomax import isomax_loss
from trainer.methods.base import METHODS, Method, Plan


class IsoMaxArgs(StrictModel):
    """``method_args`` of ``isomax_plus``.

    Attributes:
        entropic_scale: the scale of the logits in the training loss (10 in the paper).
    """

    entropic_scale: float = Field(10.0, gt=0)


@METHODS.register("isomax_plus")
class IsoMaxPlus(Method):
    """L = CE(entropic_scale · z, y) with the IsoMax+ head."""

    Config = IsoMaxArgs

    def setup(self, config: TrainConfig, data: Benchmark) -> Plan:
        """The backbone with the IsoMax+ head."""
        if config.model.head not in (HeadConfig(), HeadConfig(name="isomax_plus")):
            raise ConfigError(
                "model.head: isomax_plus builds its own head; remove model.head from the config"
            )
        model_cfg = config.model.model_copy(update={"head": HeadConfig(name="isomax_plus")})
        return Plan(model=build_classifier(model_cfg, len(data.class_names)))

    def loss(
        self,
        model: Classifier,
        batch: tuple[torch.Tensor, torch.Tensor],
        outliers: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``CE(entropic_scale · z, y)``."""
        images, labels = batch
        logits, _ = model(images)
        loss = isomax_loss(logits, labels, self.args.entropic_scale)
        return loss, {"isomax": loss.item()}
