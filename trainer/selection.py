"""Choosing the exported score without test OOD data: ID validation images vs held-out synthetic outliers.

``export.score: auto`` picks, among ``export.candidates``, the score with the lowest FPR@95 (ties: the
higher AUROC) when the ID validation split is the positive class and the held-out part of the synth
dataset's pixel outliers (:func:`oodforge.outliers.is_holdout`; no method trains on them) the negative
one. Only those two sets are read, so replacing a benchmark's test OOD sets cannot change the choice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from oodforge.config import ConfigError
from oodforge.metrics import ood_metrics
from oodforge.outliers import OutlierDataset
from oodforge.scores import Score


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
