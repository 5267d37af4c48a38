"""Choosing the exported score without test OOD data: validation data and held-out synthetic outliers only.

The rule (:func:`select_on_validation`): the positive class is ID val together with every covariate-shifted
copy of it (csID-val, incl. the generator reference's round trips and generated ID images), since csID is
ID; the negatives are the benchmark's validation OOD sets (sources distinct from every test set, OpenOOD
v1.5) or, where a benchmark has none (a user's own folders), the held-out synthetic outliers. A candidate
that rejects more than half of some csID-val set at its own served threshold is dropped (unless all do):
csID rejection is otherwise priced in by the criterion itself, whose positives include csID-val. The winner has the lowest mean FPR@95 over the negative sets, then the highest mean
AUROC. :func:`select_score` below is the older two-set form (ID val vs held-out synth), still used by
``trainer.evaluate --selection-outliers``.

``export.score: auto`` picks, among ``export.candidates``, the score with the lowest FPR@95 (ties: the
higher AUROC) when the ID validation split is the positive class and the held-out part of the synth
dataset's pixel outliers (:func:`oodforge.outliers.is_holdout`; no method trains on them) the negative
one. Only those two sets are read, so replacing a benchmark's test OOD sets cannot change the choice.

When a method trained its logits on the other part of those outliers (OE, energy margins, OAL's pixel
term), the held-out part comes from the very distribution the head was fitted to: a score computed
through the head (energy, MSP, ...) looks better on it than it is on real OOD (measured: OAL with energy
margins has held-out FPR@95 2.6% with energy and 4.7% with KNN, but 25% vs 7% on digits 6-9). Such runs
choose among the scores that do not go through the head (``Score.depends_on_head`` false: knn,
mahalanobis), and the selection record says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from oodforge.config import ConfigError
from oodforge.metrics import ood_metrics, threshold_at_tpr
from oodforge.outliers import OutlierDataset
from oodforge.scores import SCORES, Score


def holdout_images_dir(selection_outliers: Path | None, method_args: dict[str, Any]) -> Path:
    """The synth dataset whose held-out outliers are used: ``export.selection_outliers`` or the method's."""
    path = selection_outliers or method_args.get("outliers")
    if path is None:
        raise ConfigError(
            "export.score: auto needs held-out synthetic outliers: set export.selection_outliers to a synth "
            "dataset (python -m synth generate ...), or name a score instead of auto"
        )
    return Path(path)


def load_holdout(path: Path) -> OutlierDataset:
    """The synth dataset at ``path``, or a :class:`ConfigError` saying how to make it."""
    try:
        return OutlierDataset.load(path)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"export.selection_outliers: {err}") from None


def fair_candidates(names: list[str], head_sees_synth_images: bool) -> tuple[list[str], list[str]]:
    """``(candidates kept, candidates dropped)``: head scores are dropped when the head saw the synth images."""
    if not head_sees_synth_images:
        return list(names), []
    kept = [n for n in names if not getattr(SCORES.get(n), "depends_on_head", True)]
    if not kept:
        raise ConfigError(
            f"export.score: auto: this method trains its logits on the synth images, so only scores that do not "
            f"go through the head can be judged on their held-out part, and export.candidates {names} has none; "
            "add knn or mahalanobis to export.candidates, or name the score"
        )
    return kept, [n for n in names if n not in kept]


MIN_CSID_ACCEPT = 0.5
"""A candidate must accept at least this share of every csID-val set at its served threshold (else it is
broken for real inputs whatever its OOD figures); when none does, all stay."""


def pool_of(table: dict[str, dict[str, Any]], min_csid_accept: float = MIN_CSID_ACCEPT) -> list[str]:
    """The candidates of a selection ``table`` that accept enough of every csID-val set (all, when none does)."""
    pool = [n for n, t in table.items() if t["csid_accept_min"] >= min_csid_accept]
    return pool or list(table)


def pick(table: dict[str, dict[str, Any]], min_csid_accept: float = MIN_CSID_ACCEPT) -> str:
    """The winner of a selection ``table``: lowest validation FPR@95, then highest AUROC, among :func:`pool_of`."""
    return min(pool_of(table, min_csid_accept), key=lambda n: (table[n]["fpr95"], -table[n]["auroc"]))


def select_on_validation(
    scores: dict[str, Score],
    outputs: dict[str, Any],
    tpr: float = 0.95,
    holdout: Any | None = None,
    head_sees_synth_images: bool = False,
    min_csid_accept: float = MIN_CSID_ACCEPT,
    val_ood_shifts: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The selection record of :func:`select_on_validation`'s rule (module docstring) over fitted ``scores``.

    Args:
        scores: Fitted candidate scores by name (no gradient scores).
        outputs: Network outputs with ``val``, ``csid-val/<shift>`` and ``valood/<set>`` keys (nothing else
            is read).
        tpr: ID acceptance rate of FPR@95 and of the served threshold.
        holdout: Outputs on the held-out synthetic outliers: the negatives when there is no validation OOD.
        head_sees_synth_images: The head trained on the other part of those outliers: with them as the
            negatives, scores through the head are not fair candidates (:func:`fair_candidates`).
        min_csid_accept: The csID-val acceptance a candidate needs.
        val_ood_shifts: ``near`` / ``far`` of each validation OOD set: the criterion averages within each
            shift, then over the shifts, so near and far weigh the same whatever their set counts.

    Returns:
        ``chosen``, the criterion, every candidate's figures, the dropped candidates with the reason.
    """
    val_ood = sorted(k for k in outputs if k.startswith("valood/"))
    val_ood_shifts = val_ood_shifts or {}
    csid = sorted(k for k in outputs if k.startswith("csid-val/"))
    names, dropped = list(scores), {}
    if val_ood:
        negatives = {k.split("/", 1)[1]: outputs[k] for k in val_ood}
        shifts = {n: val_ood_shifts.get(n, "far") for n in negatives}
    elif holdout is not None:
        negatives = {"held-out synthetic outliers": holdout}
        shifts = {"held-out synthetic outliers": "near"}
        names, unfair = fair_candidates(names, head_sees_synth_images)
        dropped = {
            n: "computed through the head, which was trained on the other part of these outliers"
            for n in unfair
        }
    else:
        raise ConfigError(
            "export.score: auto needs validation OOD sets (a benchmark's val_ood) or held-out synthetic outliers "
            "(export.selection_outliers); name a score instead of auto"
        )
    table: dict[str, dict[str, Any]] = {}
    for name in names:
        score = scores[name]
        val = score(outputs["val"].logits, outputs["val"].features).numpy()
        shifted = {k.split("/", 1)[1]: score(outputs[k].logits, outputs[k].features).numpy() for k in csid}
        threshold = threshold_at_tpr(val, tpr)
        positives = np.concatenate([val, *shifted.values()])
        per = {
            n: ood_metrics(positives, score(o.logits, o.features).numpy(), tpr) for n, o in negatives.items()
        }
        table[name] = {
            "fpr95": _group_mean(per, shifts, "fpr95"),
            "auroc": _group_mean(per, shifts, "auroc"),
            "per_set": {n: {"fpr95": m["fpr95"], "auroc": m["auroc"]} for n, m in per.items()},
            "csid_accept_min": float(min((np.mean(v >= threshold) for v in shifted.values()), default=1.0)),
        }
    pool = pool_of(table, min_csid_accept)
    for n in table:
        if n not in pool:
            dropped[n] = (
                f"rejects more than half of a csID-val set ({100 * table[n]['csid_accept_min']:.1f}% accepted)"
            )
    chosen = pick(table, min_csid_accept)
    return {
        "chosen": chosen,
        "criterion": "lowest FPR@95 (then highest AUROC), averaged within near and far, then over them: ID val ∪ csID-val vs "
        + ("the validation OOD sets" if val_ood else "the held-out synthetic outliers")
        + f"; a candidate must accept >= {100 * min_csid_accept:.0f}% of every csID-val set at its served threshold",
        "id_split": "val",
        "positives": ["val", *csid],
        "negatives": list(negatives),
        "candidates": table,
        "dropped": dropped,
    }


def _group_mean(per: dict[str, dict[str, Any]], shifts: dict[str, str], key: str) -> float:
    """Mean of ``key`` within each shift group, then over the groups."""
    groups: dict[str, list[float]] = {}
    for name, m in per.items():
        groups.setdefault(shifts[name], []).append(m[key])
    return float(np.mean([np.mean(v) for v in groups.values()]))


def select_score(
    scores: dict[str, Score],
    val: Any,
    holdout: Any,
    tpr: float = 0.95,
) -> tuple[str, dict[str, dict[str, float]]]:
    """The best of ``scores`` on ``val`` (ID) vs ``holdout`` (synthetic outliers), and every candidate's metrics.

    Args:
        scores: Fitted candidate scores by name.
        val: Network outputs (``logits``, ``features``) on the ID validation split.
        holdout: Network outputs on the held-out synthetic outliers.
        tpr: ID acceptance rate of FPR@95.

    Returns:
        ``(name, {name: {"fpr95", "auroc"}})``; the name minimises ``(fpr95, -auroc)``, ties broken by the
        candidates' order.
    """
    table: dict[str, dict[str, float]] = {}
    for name, score in scores.items():
        m = ood_metrics(
            score(val.logits, val.features).numpy(), score(holdout.logits, holdout.features).numpy(), tpr
        )
        table[name] = {"fpr95": m["fpr95"], "auroc": m["auroc"]}
    best = min(table, key=lambda n: (table[n]["fpr95"], -table[n]["auroc"]))
    return best, table
