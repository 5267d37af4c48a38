"""Choosing the exported score without test OOD data: ID validation images vs held-out synthetic outliers.

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

from oodforge.config import ConfigError
from oodforge.metrics import ood_metrics
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
