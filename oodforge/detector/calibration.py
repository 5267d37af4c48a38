"""The one calibration routine: a threshold that accepts a target share of held-out ID images."""

from __future__ import annotations

import numpy as np

from oodforge.detector.spec import Calibration
from oodforge.metrics import threshold_at_tpr


def calibrate(
    id_scores: np.ndarray, target_id_tpr: float = 0.95, split: str = "val"
) -> tuple[float, Calibration]:
    """The threshold accepting ``target_id_tpr`` of the ``split`` ID scores, and its record.

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
    return float(value), Calibration(split=split, target_id_tpr=target_id_tpr, n_samples=len(scores))
