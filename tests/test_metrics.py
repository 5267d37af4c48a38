"""OOD metrics against scikit-learn, hand-made examples and direct implementations of their definitions.

Ours: ID = positive class, step-wise AP; OpenOOD's: OOD = positive class, trapezoid AUPR (higher = more ID).
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from oodforge.metrics import (
    FPR95_DEFINITION,
    OPENOOD_FPR95_DEFINITION,
    accuracy,
    aupr_in,
    aupr_out,
    auroc,
    fpr_at_tpr,
    ood_metrics,
    openood_fpr_at_tpr,
    summarize,
    threshold_at_tpr,
    trapezoid_aupr,
)


def _sklearn(id_s: np.ndarray, ood_s: np.ndarray) -> dict[str, float]:
    y = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))]
    s = np.r_[id_s, ood_s]
    return {
        "auroc": roc_auc_score(y, s),
        "aupr_in": average_precision_score(y, s),
        "aupr_out": average_precision_score(1 - y, -s),
    }


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_auroc_and_aupr_match_sklearn_with_ties(seed: int, decimals: int | None) -> None:
    rng = np.random.default_rng(seed)
    id_s = rng.normal(1.0, 1.5, size=rng.integers(1, 300))
    ood_s = rng.normal(0.0, 1.5, size=rng.integers(1, 300))
    if decimals is not None:
        id_s, ood_s = np.round(id_s, decimals), np.round(ood_s, decimals)
    ref = _sklearn(id_s, ood_s)
    assert auroc(id_s, ood_s) == pytest.approx(ref["auroc"], abs=1e-9)
    assert aupr_in(id_s, ood_s) == pytest.approx(ref["aupr_in"], abs=1e-9)
    assert aupr_out(id_s, ood_s) == pytest.approx(ref["aupr_out"], abs=1e-9)


def test_all_tied_and_single_sample_cases() -> None:
    assert auroc(np.zeros(5), np.zeros(3)) == 0.5
    assert aupr_in(np.zeros(5), np.zeros(3)) == pytest.approx(5 / 8)
    assert auroc([1.0], [0.0]) == 1.0 and auroc([0.0], [1.0]) == 0.0
    assert auroc([np.inf, 1.0], [-np.inf, 1.0]) == pytest.approx(
        roc_auc_score([1, 1, 0, 0], [1e300, 1, -1e300, 1])
    )


def test_threshold_and_fpr_on_hand_made_example() -> None:
    id_s = np.arange(1, 21, dtype=float)  # 20 ID scores 1..20
    # 95% of 20 = 19 -> the 19th largest = 2: scores >= 2 are 19/20 = 95% of ID
    assert threshold_at_tpr(id_s, 0.95) == 2.0
    assert threshold_at_tpr(id_s, 0.9) == 3.0
    assert threshold_at_tpr(id_s, 0.93) == 2.0  # 18.6 -> needs 19 accepted
    assert threshold_at_tpr(id_s, 1.0) == 1.0
    ood = np.array([0.0, 1.5, 2.0, 2.5, 30.0])  # >= 2: 2.0, 2.5, 30 -> 3/5
    assert fpr_at_tpr(id_s, ood) == pytest.approx(0.6)
    assert fpr_at_tpr(id_s, ood, tpr=0.9) == pytest.approx(0.2)  # >= 3: only 30
    # float noise: 0.95 * 100 = 95.00000000000001 must still mean 95 samples
    hundred = np.arange(100, dtype=float)
    assert threshold_at_tpr(hundred, 0.95) == 5.0
    assert threshold_at_tpr(hundred, 0.07) == 93.0


def test_threshold_rule_with_ties_and_permutation() -> None:
    id_s = np.array([5.0, 1.0, 3.0, 3.0, 3.0])
    # 80% of 5 = 4 samples: largest t with fraction(>= t) >= 0.8 is 3 (accepts 4/5)
    assert threshold_at_tpr(id_s, 0.8) == 3.0
    assert threshold_at_tpr(id_s, 0.5) == 3.0  # ties: accepts 4/5 >= 0.5, t=5 would accept only 1/5
    rng = np.random.default_rng(0)
    for _ in range(20):
        s, tpr = np.round(rng.normal(size=rng.integers(1, 50)), 1), rng.uniform(0.01, 1.0)
        t = threshold_at_tpr(s, tpr)
        assert np.mean(s >= t) >= tpr - 1e-12
        larger = s[s > t]
        if len(larger):
            assert np.mean(s >= larger.min()) < tpr


def test_perfect_separation() -> None:
    id_s, ood_s = np.linspace(1, 2, 50), np.linspace(-2, 0.5, 70)
    m = ood_metrics(id_s, ood_s)
    perfect = {"auroc": 1.0, "fpr95": 0.0, "aupr_in": 1.0, "aupr_out": 1.0}
    assert m == {**perfect, "openood": perfect}
    reverse = ood_metrics(ood_s, id_s)
    assert reverse["auroc"] == 0.0 and reverse["fpr95"] == 1.0
    assert reverse["openood"]["auroc"] == 0.0 and reverse["openood"]["fpr95"] == 1.0


def test_invalid_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="empty"):
        auroc(np.array([]), np.array([1.0]))
    with pytest.raises(ValueError, match="NaN"):
        ood_metrics(np.array([1.0, np.nan]), np.array([0.0]))
    with pytest.raises(ValueError, match="NaN"):
        fpr_at_tpr(np.array([1.0]), np.array([np.nan]))
    with pytest.raises(ValueError, match="1-D"):
        auroc(np.ones((2, 2)), np.ones(3))
    with pytest.raises(ValueError, match="tpr"):
        threshold_at_tpr(np.ones(3), 0.0)
    with pytest.raises(ValueError, match="empty"):
        accuracy(np.zeros((0, 3)), np.zeros(0))
    with pytest.raises(ValueError, match="labels"):
        accuracy(np.zeros(3), np.zeros(4))


def test_accuracy_from_logits_and_predictions() -> None:
    logits = np.array([[0.1, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 5.0, 0.0]])
    labels = np.array([1, 0, 0, 1])
    assert accuracy(logits, labels) == 0.75
    assert accuracy(np.array([1, 0, 2, 1]), labels) == 0.75


def test_summarize_groups_near_and_far() -> None:
    rng = np.random.default_rng(5)
    id_s = rng.normal(2, 1, 200)
    sets = {
        "a": (rng.normal(1, 1, 100), "near"),
        "b": (rng.normal(1.5, 1, 80), "near"),
        "b2": (rng.normal(0.0, 1, 90), "near"),
        "c": (rng.normal(-1, 1, 60), "far"),
    }
    out = summarize(id_s, sets)
    assert set(out) == {"ood", "near", "far", "openood"}
    assert set(out["openood"]) == {"ood", "near", "far"}
    for name, (scores, shift) in sets.items():
        metrics = ood_metrics(id_s, scores)
        assert out["openood"]["ood"][name] == metrics.pop("openood")
        assert out["ood"][name] == {**metrics, "shift": shift}
    for block in (out, out["openood"]):
        for key in ("auroc", "fpr95", "aupr_in", "aupr_out"):
            near = np.mean([block["ood"][n][key] for n in ("a", "b", "b2")])
            assert block["near"][key] == pytest.approx(near)
            assert block["far"][key] == pytest.approx(block["ood"]["c"][key])
        assert set(block["near"]) == {"auroc", "fpr95", "aupr_in", "aupr_out"}
    only_far = summarize(id_s, {"c": sets["c"]})
    assert only_far["near"] == {} and only_far["far"]["auroc"] == out["far"]["auroc"]
    assert only_far["openood"]["near"] == {} and only_far["openood"]["far"] == out["openood"]["far"]
    with pytest.raises(ValueError, match="shift 'mid'"):
        summarize(id_s, {"x": (id_s, "mid")})


def test_fpr95_definition_sentence() -> None:
    assert FPR95_DEFINITION == (
        "FPR@95: fraction of OOD samples accepted as in-distribution at the threshold that accepts 95% of "
        "ID samples (ID = positive class)."
    )


def test_openood_definition_sentence() -> None:
    assert "fraction of ID samples flagged as OOD at the threshold that detects 95% of OOD" in (
        OPENOOD_FPR95_DEFINITION
    )
    assert "OOD = positive class" in OPENOOD_FPR95_DEFINITION and "trapezoidal" in OPENOOD_FPR95_DEFINITION


# --------------------------------------------------------------------------- OpenOOD's convention


def _openood_direct(id_s: list[float], ood_s: list[float], tpr: float = 0.95) -> dict[str, float]:
    """OpenOOD's documented definitions, written out with loops: OOD positive on negated scores; a ROC /
    PR point per distinct threshold t ("score >= t" is positive); FPR@95 = FPR at the first ROC point
    (thresholds decreasing) whose TPR reaches 95%; areas by the trapezoid rule."""

    def points(pos: list[float], neg: list[float]) -> list[tuple[int, int]]:
        out = []
        for t in sorted(set(pos + neg), reverse=True):
            out.append((sum(v >= t for v in pos), sum(v >= t for v in neg)))  # (TP, FP)
        return out

    def trapezoid(xy: list[tuple[float, float]]) -> float:  # points in curve order (decreasing t)
        return sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(xy[:-1], xy[1:], strict=True))

    def pr_area(pos: list[float], neg: list[float]) -> float:
        pr = [(tp / len(pos), tp / (tp + fp)) for tp, fp in points(pos, neg)]
        return trapezoid([(0.0, 1.0), *pr])

    ood_pos, id_neg = [-v for v in ood_s], [-v for v in id_s]
    roc = [(fp / len(id_neg), tp / len(ood_pos)) for tp, fp in points(ood_pos, id_neg)]
    return {
        "auroc": trapezoid([(0.0, 0.0), *roc]),
        "fpr95": next(fpr for fpr, t in roc if t >= tpr),
        "aupr_in": pr_area(list(id_s), list(ood_s)),
        "aupr_out": pr_area(ood_pos, id_neg),
    }


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_openood_block_matches_its_definition_with_ties(seed: int, decimals: int | None) -> None:
    rng = np.random.default_rng(seed)
    id_s = rng.normal(1.0, 1.5, size=rng.integers(2, 60))
    ood_s = rng.normal(0.0, 1.5, size=rng.integers(2, 60))
    if decimals is not None:
        id_s, ood_s = np.round(id_s, decimals), np.round(ood_s, decimals)  # many ties, across the sets too
    got = ood_metrics(id_s, ood_s)["openood"]
    expected = _openood_direct(id_s.tolist(), ood_s.tolist())
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-12), key
    # and the scikit-learn calls OpenOOD makes (its roc_curve without dropping collinear points)
    conf, is_ood = np.r_[id_s, ood_s], np.r_[np.zeros(len(id_s)), np.ones(len(ood_s))]
    fpr, tpr, _ = roc_curve(is_ood, -conf, drop_intermediate=False)
    p_in, r_in, _ = precision_recall_curve(1 - is_ood, conf)
    p_out, r_out, _ = precision_recall_curve(is_ood, -conf)
    assert got["fpr95"] == pytest.approx(fpr[np.argmax(tpr >= 0.95)], abs=1e-12)
    assert got["auroc"] == pytest.approx(auc(fpr, tpr), abs=1e-12)
    assert got["aupr_in"] == pytest.approx(auc(r_in, p_in), abs=1e-12)
    assert got["aupr_out"] == pytest.approx(auc(r_out, p_out), abs=1e-12)


def test_openood_on_a_hand_made_example() -> None:
    id_s, ood_s = np.array([4.0, 3.0, 2.0, 1.0]), np.array([2.0, 0.0])
    # negated, OOD positive: -ood = (-2, 0); the largest t detecting 95% (both) is -2; -id >= -2: 2 of 4
    assert openood_fpr_at_tpr(id_s, ood_s) == 0.5
    assert fpr_at_tpr(id_s, ood_s) == 0.5  # ours: t = 1 accepts the 4 ID (>= 95%), and OOD 2.0
    assert openood_fpr_at_tpr(id_s, np.array([0.5, 0.0])) == 0.0
    assert fpr_at_tpr(np.array([4.0, 3.0, 2.0, 1.0]), np.array([3.5, 0.0])) == 0.5
    assert openood_fpr_at_tpr(np.array([4.0, 3.0, 2.0, 1.0]), np.array([3.5, 0.0])) == 0.75
    # PR with ID positive: thresholds 4, 3, 2 (one ID, one OOD tied), 1, 0 ->
    # (R, P) = (1/4, 1), (2/4, 1), (3/4, 3/4), (1, 4/5), (1, 4/6) after the start (0, 1)
    expected = 0.25 * 1 + 0.25 * 1 + 0.25 * (1 + 0.75) / 2 + 0.25 * (0.75 + 0.8) / 2
    assert trapezoid_aupr(id_s, ood_s) == pytest.approx(expected)
    assert aupr_in(id_s, ood_s) == pytest.approx(0.25 + 0.25 + 0.25 * 0.75 + 0.25 * 0.8)  # step-wise
