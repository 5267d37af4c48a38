"""Scores that need input gradients, so they score pixels through the model: ODIN.

They cannot be computed from cached ``(logits, features)``: evaluation runs them in a separate pass
over the images (``trainer.classifier_eval``), and a served detector whose score has ``needs_grad``
computes them in :meth:`~oodforge.detector.ClassifierDetector.predict_pixels` with gradients enabled
locally.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from oodforge.scores.base import SCORES, Score, check_number, check_positive
from oodforge.scores.logit import msp


def _logits(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    out = model(pixel_values)
    return out[0] if isinstance(out, tuple) else out


def odin(
    model: nn.Module,
    pixel_values: torch.Tensor,
    temperature: float = 1000.0,
    epsilon: float = 0.0014,
    input_std: Sequence[float] | None = None,
) -> torch.Tensor:
    """ODIN (Liang et al., arXiv 1706.02690): temperature scaling plus an input perturbation.

    ``x̃ = x − ε · sign(∇_x [−log S_ŷ(x; T)]) / σ`` and ``score = max_k S_k(x̃; T)``, with
    ``S(x; T) = softmax(f(x) / T)`` and ``ŷ = argmax_k f_k(x)``: a step that raises the predicted
    class's tempered softmax, which helps ID inputs more than OOD ones. ``ε`` is in image units
    (pixels in [0, 1]); the model sees normalised pixels ``(x − m) / σ``, so the step in its input is
    divided by the per-channel ``σ`` (``input_std``; none = the input is not normalised). ``ε = 0``
    gives MSP of ``f / T``.

    Args:
        model: Returns logits ``[N, K]`` (or a tuple whose first item they are); in eval mode.
        pixel_values: ``[N, C, H, W]`` pre-processed pixels on the model's device.
        temperature: T > 0 (default 1000, the paper's).
        epsilon: perturbation size ε ≥ 0 (default 0.0014, the paper's CIFAR/DenseNet value).
        input_std: Per-channel σ of the pre-processing.

    Returns:
        ``[N]`` float32 scores on the CPU, in ``[1/K, 1]``.
    """
    with torch.enable_grad():
        x = pixel_values.detach().float().clone().requires_grad_(True)
        logits = _logits(model, x)
        loss = F.cross_entropy(logits / temperature, logits.argmax(dim=1), reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    step = grad.sign()
    if input_std is not None:
        step = step / torch.tensor(list(input_std), dtype=step.dtype, device=step.device).view(1, -1, 1, 1)
    with torch.no_grad():
        perturbed = _logits(model, x.detach() - epsilon * step)
    return msp(perturbed.double() / temperature).float().cpu()


@SCORES.register("odin")
class ODIN(Score):
    """ODIN; see :func:`odin`. Needs gradients: call :meth:`score_pixels`, not ``score(logits, features)``.

    Args:
        temperature: T > 0 (default 1000).
        epsilon: ε ≥ 0 in image units (default 0.0014).
    """

    name = "odin"
    needs_grad = True

    def __init__(self, temperature: float = 1000.0, epsilon: float = 0.0014) -> None:
        self.temperature = check_positive("odin temperature", temperature)
        self.epsilon = check_number("odin epsilon", epsilon, low=0.0, high=1.0)

    def __call__(self, logits: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """Always raise TypeError: ODIN needs input gradients, so use :meth:`score_pixels`."""
        raise TypeError(
            "score 'odin' needs input gradients, so it cannot be computed from logits and features; "
            "call score.score_pixels(model, pixel_values, input_std) (trainer.evaluate runs it in its "
            "own gradient pass, a served detector does it in predict_pixels)"
        )

    def score_pixels(
        self, model: nn.Module, pixel_values: torch.Tensor, input_std: Sequence[float] | None = None
    ) -> torch.Tensor:
        """``[N]`` ODIN scores of pre-processed pixels, perturbed through ``model``."""
        return odin(model, pixel_values, self.temperature, self.epsilon, input_std)

    def params(self) -> dict[str, float | int]:
        """The temperature and perturbation size."""
        return {"temperature": self.temperature, "epsilon": self.epsilon}
