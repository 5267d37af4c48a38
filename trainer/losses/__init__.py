r"""Loss terms of the training methods (DESIGN.md §5), as pure functions and small ``nn.Module``\ s.

Every docstring states the formula it computes; weights (α, β, γ, δ, λ, 0.1) are applied by the caller.
"""

from trainer.losses.club import CLUB
from trainer.losses.isomax import IsoMaxPlusHead, isomax_loss
from trainer.losses.kd import DTProjector, feature_kd, logit_kd
from trainer.losses.outlier import EnergyHead, binary_energy_ce, energy_margin_loss, oe_loss
from trainer.losses.vos import VOSLoss, VOSQueue, fit_tied_gaussian, vos_sample

__all__ = [
    "CLUB",
    "DTProjector",
    "EnergyHead",
    "IsoMaxPlusHead",
    "VOSLoss",
    "VOSQueue",
    "binary_energy_ce",
    "energy_margin_loss",
    "feature_kd",
    "fit_tied_gaussian",
    "isomax_loss",
    "logit_kd",
    "oe_loss",
    "vos_sample",
]
