"""``vos``: virtual outlier synthesis in feature space (Du et al., ICLR 2022), DESIGN.md §5 "VOS".

Every step pushes the ID features into per-class FIFO queues (capacity 1000). Once every queue is full,
class-conditional Gaussians with one tied covariance are fitted to them, 10 000 samples are drawn per
class and the lowest-likelihood one of each class is a virtual outlier; the head turns it into logits
and the uncertainty loss separates ID from virtual rows by their weighted energy:

    L = CE(f_in, y) + 0.1·CE(Linear(1,2)(−E_w), ID=1 / virtual=0),  E_w = −log Σ_k relu(w_k) e^{f_k}

Inference uses the plain energy. Trains from scratch like ``ce`` (no outlier data needed).

    accelerate launch trainer/train_oal.py --config configs/train/vos.yaml
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field

from oodforge.backbones import Classifier
from oodforge.config import StrictModel
from oodforge.data import Benchmark
from trainer.config import TrainConfig
from trainer.losses.vos import VOSLoss, VOSQueue, vos_sample
from trainer.methods.base import METHODS, Method, Plan


class VOSArgs(StrictModel):
    """``method_args`` of ``vos``.

    Attributes:
        weight: weight of the uncertainty loss.
        capacity: features kept per class queue; the loss starts once every queue is full.
        n_samples: Gaussian draws per class and step.
        keep: lowest-likelihood draws kept per class (virtual outliers per class and step).
        start_epoch: first epoch (0-based) of the uncertainty loss; before it the queues only fill. The
            public VOS code starts at epoch 40 of 100; 6 of our 15 epochs is the same share.
    """

    weight: float = Field(0.1, ge=0)
    capacity: int = Field(1000, ge=2)
    n_samples: int = Field(10000, ge=1)
    keep: int = Field(1, ge=1)
    start_epoch: int = Field(6, ge=0)


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Rows of every process concatenated (the tensor itself in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


@METHODS.register("vos")
class VirtualOutlierSynthesis(Method):
    """CE plus the VOS uncertainty loss on virtual outliers sampled from the class queues."""

    Config = VOSArgs

    def setup(self, config: TrainConfig, data: Benchmark) -> Plan:
        """The configured classifier, the class queues and the uncertainty head."""
        plan = super().setup(config, data)
        num_classes = len(data.class_names)
        self.queue = VOSQueue(num_classes, plan.model.feature_dim, self.args.capacity)
        self.uncertainty = VOSLoss(num_classes)
        plan.find_unused_parameters = True  # the uncertainty head gets no gradient until the queues fill
        return plan

    def loss(
        self,
        model: Classifier,
        batch: tuple[torch.Tensor, torch.Tensor],
        outliers: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """CE, plus the uncertainty loss once every class queue is full."""
        images, labels = batch
        logits, features = model(images)
        ce = F.cross_entropy(logits, labels)
        args = self.args
        # every process pushes every process's features, so the queues stay identical
        self.queue.update(gather_rows(features.detach()), gather_rows(labels))
        if not self.queue.ready() or getattr(self, "epoch", 0) < args.start_epoch:
            return ce, {"ce": ce.item(), "vos": 0.0}
        virtual = vos_sample(self.queue.features, args.n_samples, args.keep)
        vos = self.uncertainty(logits, model.head(virtual))
        return ce + args.weight * vos, {"ce": ce.item(), "vos": vos.item()}
