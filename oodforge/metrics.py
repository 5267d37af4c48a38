"""OOD detection metrics (DESIGN.md §5), higher scores mean more ID, in two conventions from the same arrays.

- **ours** (ID positive, step-wise AP): FPR@95 is the share of OOD samples accepted at the threshold that
  accepts 95% of ID; AUPR-in/out are average precision (step-wise), as ``sklearn.metrics
  .average_precision_score``. AUROC is rank-based (ties count ½).
- **OpenOOD** (OOD positive, trapezoid AUPR), as OpenOOD v1.5 reports it: the scores are negated and OOD
  is the positive class, so FPR@95 is the share of ID samples flagged as OOD at the threshold that
  detects 95% of OOD; AUPR-in/out are the trapezoidal areas under ``sklearn.metrics
  .precision_recall_curve`` (ID resp. OOD positive). AUROC is the same number in both.

Pure numpy, floats out; nothing here calls scikit-learn (the tests compare against it).

Example:
    >>> ood_metrics(id_scores, ood_scores)
    {'auroc': 0.97, 'fpr95': 0.12, 'aupr_in': 0.98, 'aupr_out': 0.95,
     'openood': {'auroc': 0.97, 'fpr95': 0.15, 'aupr_in': 0.98, 'aupr_out': 0.95}}
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

FPR95_DEFINITION = (
    "FPR@95: fraction of OOD samples accepted as in-distribution at the threshold that accepts 95% of "
    "ID samples (ID = positive class)."
)
OPENOOD_FPR95_DEFINITION = (
    "OpenOOD FPR@95: fraction of ID samples flagged as OOD at the threshold that detects 95% of OOD "
    "samples (OOD = positive class, scores negated); OpenOOD AUPR-in/out: trapezoidal area under the "
    "precision-recall curve with ID/OOD positive."
)
OURS_LABEL = "ours: ID positive, step-wise AP"
OPENOOD_LABEL = "OpenOOD: OOD positive, trapezoid AUPR"
OPENOOD = "openood"  # the key of the OpenOOD block in ood_metrics / summarize
METRIC_KEYS = ("auroc", "fpr95", "aupr_in", "aupr_out")
SHIFTS = ("near", "far")


def _as_scores(name: str, scores: Any) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of scores, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty; every metric needs at least one score")
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains {int(np.isnan(arr).sum())} NaN score(s); check the model outputs")
    return arr


def _check_tpr(tpr: float) -> float:
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr!r}")
    return float(tpr)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values`` in ascending order; tied values share their average rank."""
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    # start index of each run of equal values, and the run each sorted element belongs to
    new_run = np.r_[True, sorted_vals[1:] != sorted_vals[:-1]]
    starts = np.flatnonzero(new_run)
    ends = np.r_[starts[1:], len(values)]
    run_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = run_rank[np.cumsum(new_run) - 1]
    return ranks


def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Area under the ROC curve with ID positive: ``P(s_id > s_ood) + ½·P(s_id = s_ood)``.

    Computed as the Mann–Whitney U statistic ``(R_id − n_id(n_id+1)/2) / (n_id·n_ood)`` with ``R_id`` the
    sum of the ID scores' average ranks in the pooled sample (ties count ½).
    """
    pos, neg = _as_scores("id_scores", id_scores), _as_scores("ood_scores", ood_scores)
    ranks = _average_ranks(np.concatenate([pos, neg]))
    n_pos, n_neg = len(pos), len(neg)
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def average_precision(pos_scores: np.ndarray, neg_scores: np.ndarray) -> float:
    """Step-wise average precision ``AP = Σ_n (R_n − R_{n−1}) · P_n`` over distinct score thresholds.

    Identical to ``sklearn.metrics.average_precision_score`` (no interpolation): thresholds are the
    distinct scores in decreasing order; at each, ``P_n`` and ``R_n`` are the precision and recall of
    "score ≥ threshold" with ``pos_scores`` as the positive class.
    """
    pos, neg = _as_scores("positive scores", pos_scores), _as_scores("negative scores", neg_scores)
    scores = np.concatenate([pos, neg])
    is_pos = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    order = np.argsort(-scores, kind="mergesort")
    scores, is_pos = scores[order], is_pos[order]
    last_of_run = np.r_[scores[1:] != scores[:-1], True]  # last index of each run of equal scores
    tps = np.cumsum(is_pos)[last_of_run]
    predicted = np.flatnonzero(last_of_run) + 1.0
    precision = tps / predicted
    recall_gain = np.diff(np.r_[0.0, tps]) / len(pos)
    return float(np.sum(recall_gain * precision))


def aupr_in(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Area under the precision-recall curve with ID positive (average precision on the scores)."""
    return average_precision(id_scores, ood_scores)


def aupr_out(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Area under the precision-recall curve with OOD positive (average precision on negated scores)."""
    return average_precision(-_as_scores("ood_scores", ood_scores), -_as_scores("id_scores", id_scores))


def threshold_at_tpr(id_scores: np.ndarray, tpr: float = 0.95) -> float:
    """The largest threshold ``t`` with ``fraction(id_scores >= t) >= tpr``.

    Rule: sort the n ID scores in decreasing order ``s_(1) ≥ … ≥ s_(n)`` and return ``s_(m)`` with
    ``m = ⌈tpr · n⌉`` (``tpr · n`` is taken with a 1e-9 tolerance so float noise such as
    ``0.95 · 100 = 95.00000000000001`` does not add a sample). At least ``tpr`` of the ID scores are
    ``>= t`` (more only when scores tie at ``t``), and any larger threshold accepts fewer than ``tpr``.
    A sample is called OOD when ``score < t``.
    """
    scores = _as_scores("id_scores", id_scores)
    tpr = _check_tpr(tpr)
    m = min(max(math.ceil(tpr * len(scores) - 1e-9), 1), len(scores))
    return float(-np.partition(-scores, m - 1)[m - 1])


def fpr_at_tpr(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float = 0.95) -> float:
    """Fraction of OOD samples with ``score >= threshold_at_tpr(id_scores, tpr)`` (accepted as ID)."""
    ood = _as_scores("ood_scores", ood_scores)
    return float(np.mean(ood >= threshold_at_tpr(id_scores, tpr)))


def accuracy(logits_or_preds: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy: ``mean(argmax_k f_k == y)`` for ``[N, K]`` logits, ``mean(pred == y)`` for ``[N]``."""
    preds = np.asarray(logits_or_preds)
    labels = np.asarray(labels).reshape(-1)
    if preds.ndim == 2:
        preds = preds.argmax(axis=1)
    elif preds.ndim != 1:
        raise ValueError(f"expected [N, K] logits or [N] predictions, got shape {preds.shape}")
    if len(preds) == 0:
        raise ValueError("accuracy of an empty set is undefined")
    if len(preds) != len(labels):
        raise ValueError(f"got {len(preds)} predictions but {len(labels)} labels")
    return float(np.mean(preds == labels))


def trapezoid_aupr(pos_scores: np.ndarray, neg_scores: np.ndarray) -> float:
    """Trapezoidal area under the precision-recall curve, as ``auc(*precision_recall_curve(...)[1::-1])``.

    The curve has one point per distinct score threshold t (``score ≥ t`` predicted positive), with
    precision ``TP/(TP+FP)`` and recall ``TP/P``, plus the point (recall 0, precision 1); the area is
    ``Σ_n (R_n − R_{n−1}) · (P_n + P_{n−1}) / 2`` over the points in increasing recall. Points past full
    recall add no area, so it does not matter whether the curve stops there.
    """
    pos, neg = _as_scores("positive scores", pos_scores), _as_scores("negative scores", neg_scores)
    scores = np.concatenate([pos, neg])
    is_pos = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    order = np.argsort(-scores, kind="mergesort")
    scores, is_pos = scores[order], is_pos[order]
    last_of_run = np.r_[scores[1:] != scores[:-1], True]
    tps = np.cumsum(is_pos)[last_of_run]
    predicted = np.flatnonzero(last_of_run) + 1.0
    precision = np.r_[1.0, tps / predicted]
    recall = np.r_[0.0, tps / len(pos)]
    return float(np.sum(np.diff(recall) * (precision[1:] + precision[:-1]) / 2.0))


def openood_fpr_at_tpr(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float = 0.95) -> float:
    """OpenOOD's FPR@95: the share of ID samples flagged as OOD at the threshold detecting ``tpr`` of OOD.

    OOD is the positive class and the scores are negated: ``t = threshold_at_tpr(−ood, tpr)`` is the
    largest threshold with ``fraction(−ood ≥ t) ≥ tpr`` (the first point of the full ROC curve whose TPR
    reaches ``tpr``), and the result is ``fraction(−id ≥ t)``.
    """
    id_s, ood_s = _as_scores("id_scores", id_scores), _as_scores("ood_scores", ood_scores)
    return float(np.mean(-id_s >= threshold_at_tpr(-ood_s, tpr)))


def openood_metrics(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float = 0.95) -> dict[str, float]:
    """``{"auroc", "fpr95", "aupr_in", "aupr_out"}`` in OpenOOD's convention (module docstring)."""
    id_s, ood_s = _as_scores("id_scores", id_scores), _as_scores("ood_scores", ood_scores)
    return {
        "auroc": auroc(-ood_s, -id_s),
        "fpr95": openood_fpr_at_tpr(id_s, ood_s, tpr),
        "aupr_in": trapezoid_aupr(id_s, ood_s),
        "aupr_out": trapezoid_aupr(-ood_s, -id_s),
    }


def ood_metrics(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float = 0.95) -> dict[str, Any]:
    """Our ``{"auroc", "fpr95", "aupr_in", "aupr_out"}`` for one OOD set, plus OpenOOD's under ``"openood"``.

    ``"openood"`` holds the same four in OpenOOD's convention; ``fpr95`` is the FPR at ``tpr``.
    """
    id_scores, ood_scores = _as_scores("id_scores", id_scores), _as_scores("ood_scores", ood_scores)
    return {
        "auroc": auroc(id_scores, ood_scores),
        "fpr95": fpr_at_tpr(id_scores, ood_scores, tpr),
        "aupr_in": aupr_in(id_scores, ood_scores),
        "aupr_out": aupr_out(id_scores, ood_scores),
        OPENOOD: openood_metrics(id_scores, ood_scores, tpr),
    }


def summarize(
    id_scores: np.ndarray, ood: dict[str, tuple[np.ndarray, str]], tpr: float = 0.95
) -> dict[str, dict[str, Any]]:
    """Metrics per OOD set plus their unweighted means over the near and the far sets, in both conventions.

    Args:
        id_scores: ``[N]`` scores of the ID test set.
        ood: ``{set name: (scores, shift)}`` with shift ``"near"`` or ``"far"``.
        tpr: ID (ours) / OOD (OpenOOD) detection rate of ``fpr95``.

    Returns:
        ``{"ood": {name: {auroc, fpr95, aupr_in, aupr_out, "shift"}}, "near": {mean of the four},
        "far": {...}, "openood": {"ood": {name: {the four}}, "near": {...}, "far": {...}}}``: ours at
        the top level, OpenOOD's in the ``"openood"`` block of the same layout; a group without sets
        is ``{}``.
    """
    id_scores = _as_scores("id_scores", id_scores)
    per_set: dict[str, dict[str, Any]] = {}
    openood: dict[str, dict[str, Any]] = {}
    for name, (scores, shift) in ood.items():
        if shift not in SHIFTS:
            raise ValueError(f"OOD set {name!r} has shift {shift!r}; it must be one of {', '.join(SHIFTS)}")
        try:
            metrics = ood_metrics(id_scores, scores, tpr)
        except ValueError as err:
            raise ValueError(f"OOD set {name!r}: {err}") from None
        openood[name] = metrics.pop(OPENOOD)
        per_set[name] = {**metrics, "shift": shift}
    out: dict[str, dict[str, Any]] = {"ood": per_set}
    block: dict[str, dict[str, Any]] = {"ood": openood}
    for shift in SHIFTS:
        group = [n for n, m in per_set.items() if m["shift"] == shift]
        out[shift] = _mean([per_set[n] for n in group])
        block[shift] = _mean([openood[n] for n in group])
    out[OPENOOD] = block
    return out


def _mean(group: list[dict[str, Any]]) -> dict[str, float]:
    return {key: float(np.mean([m[key] for m in group])) for key in METRIC_KEYS} if group else {}
