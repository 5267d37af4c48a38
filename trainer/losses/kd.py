"""Knowledge-distillation terms of the OAL student loss (DESIGN.md §5, Gao et al. arXiv 2406.16525).

``L_OAL = CE + α·logit_kd(f_S, f_T) + β·feature_kd(h_S, DT(h_T)) + ...``; the weights α, β are applied
by the caller. Both terms are ``KL(teacher ‖ student)`` averaged over the batch (``batchmean``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _check_pair(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.ndim != 2 or student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher {what} must both be [N, D] with the same shape, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )


def _kl_teacher_student(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``1/N Σ_i Σ_k p_T,ik (log p_T,ik − log p_S,ik)`` with p = softmax over dim 1."""
    return F.kl_div(
        F.log_softmax(student, dim=1), F.log_softmax(teacher, dim=1), reduction="batchmean", log_target=True
    )


def logit_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Logit distillation ``KL(softmax f_T ‖ softmax f_S)``, mean over the batch.

    ``= 1/N Σ_i Σ_k softmax(f_T,i)_k · (log softmax(f_T,i)_k − log softmax(f_S,i)_k)``; zero iff the two
    softmaxes agree. The teacher is not detached here: pass ``teacher_logits`` computed under ``no_grad``.
    """
    _check_pair(student_logits, teacher_logits, "logits")
    return _kl_teacher_student(student_logits, teacher_logits)


def feature_kd(student_feat: torch.Tensor, teacher_feat_projected: torch.Tensor) -> torch.Tensor:
    """Feature distillation ``KL(softmax DT(h_T) ‖ softmax h_S)``, mean over the batch.

    Same form as :func:`logit_kd`, on penultimate features: ``teacher_feat_projected = DT(h_T)`` is
    [N, D_S]. It is deliberately not detached, so the projector DT is trained by this term (as in the OAL
    code).
    """
    _check_pair(student_feat, teacher_feat_projected, "features")
    return _kl_teacher_student(student_feat, teacher_feat_projected)


class DTProjector(nn.Module):
    """DT: teacher feature [N, D_T] → student feature space [N, D_S] = BN1d(D_T) → Linear → ReLU → BN1d(D_S)."""

    def __init__(self, teacher_dim: int, student_dim: int) -> None:
        super().__init__()
        self.teacher_dim = teacher_dim
        self.student_dim = student_dim
        self.net = nn.Sequential(
            nn.BatchNorm1d(teacher_dim),
            nn.Linear(teacher_dim, student_dim),
            nn.ReLU(),
            nn.BatchNorm1d(student_dim),
        )

    def forward(self, teacher_feat: torch.Tensor) -> torch.Tensor:
        """Project teacher features ``[N, D_T]`` into the student's feature space ``[N, D_S]``."""
        if teacher_feat.ndim != 2 or teacher_feat.shape[1] != self.teacher_dim:
            raise ValueError(
                f"DTProjector expects teacher features [N, {self.teacher_dim}], got {tuple(teacher_feat.shape)}"
            )
        return self.net(teacher_feat)
