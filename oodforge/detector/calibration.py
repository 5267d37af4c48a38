"""The one calibration routine: a threshold that accepts a target share of held-out ID images."""

from __future__ import annotations

import numpy as np

from oodforge.detector.spec import Calibration, ScoreHistogram
from oodforge.metrics import threshold_at_tpr

HISTOGRAM_BINS = 40
"""Bins of the calibration-score histogram stored in the artifact (``calibration.histogram``)."""


def score_histogram(scores: np.ndarray, bins: int = HISTOGRAM_BINS) -> ScoreHistogram | None:
    """Bin edges and counts of the finite ``scores`` (``None`` when there are none).

    Equal-width bins over ``[min, max]`` (``numpy.histogram``); when every score is the same the one
    bin is widened by 0.5 on each side so that it has a width.
    """
    finite = np.asarray(scores, dtype=np.float64).reshape(-1)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return None
    lo, hi = float(finite.min()), float(finite.max())
    if lo == hi:
        lo, hi, bins = lo - 0.5, hi + 0.5, 1
    counts, edges = np.histogram(finite, bins=bins, range=(lo, hi))
    return ScoreHistogram(edges=edges.tolist(), counts=counts.tolist())


def calibrate(
    id_scores: np.ndarray, target_id_tpr: float = 0.95, split: str = "val"
) -> tuple[float, Calibration]:
    """The threshold accepting ``target_id_tpr`` of the ``split`` ID scores, and its record.

    The record keeps a :func:`score_histogram` of those scores, so a plot can show the threshold on
    the distribution it was chosen from.

    ``threshold`` is the largest ``t`` with ``fraction(id_scores >= t) >= target_id_tpr``
    (:func:`oodforge.metrics.threshold_at_tpr`); a sample is OOD when its score is below it. Only ID
    data (never test OOD) may be passed here.

    Args:
        id_scores: ``[N]`` scores of held-out ID images (higher = more ID).
        target_id_tpr: Share of those images to accept.
        split: Name of the split the scores come from (recorded in the artifact).

    Returns:
        ``(threshold, calibration)``.

    Example:
        >>> calibrate(np.arange(100.0), 0.95)[0]
        5.0
    """
    scores = np.asarray(id_scores, dtype=np.float64).reshape(-1)
    value = threshold_at_tpr(scores, target_id_tpr)
    record = Calibration(
        split=split, target_id_tpr=target_id_tpr, n_samples=len(scores), histogram=score_histogram(scores)
    )
    return float(value), record
