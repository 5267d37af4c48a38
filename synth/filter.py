"""ID-near filter (DESIGN.md §5): reject outlier candidates that sit too close to the ID data.

``τ_ID`` is the q-quantile (default 0.95) of the ID-to-ID k-th NN distances of the L2-normalised ID
bank; a candidate (an outlier embedding, or a generated image embedded by the teacher) is rejected when
its k-th NN distance to the bank is below ``τ_ID``. Every decision carries a reason for metadata.jsonl.

Example:
    >>> tau = id_threshold(bank, k=50)
    >>> result = filter_near(candidates, bank, k=50, threshold=tau)
    >>> result.keep, result.reason[0]
    (array([ True, False, ...]), 'kept')
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from oodforge.knn import kth_distance
from synth.sampler import normalize

log = logging.getLogger(__name__)

KEPT = "kept"


@dataclass
class FilterResult:
    """Per-candidate decisions of :func:`filter_near`.

    Attributes:
        keep: ``[N]`` bool, True when the candidate is far enough from the ID bank.
        distance: ``[N]`` float32 k-th NN distance of the normalised candidate to the normalised bank.
        reason: ``"kept"`` or ``"near_id: knn distance 0.123 < threshold 0.456"`` per candidate.
        k: the neighbour rank used (after clipping to the bank size).
        threshold: the threshold compared against.
    """

    keep: np.ndarray
    distance: np.ndarray
    reason: list[str]
    k: int
    threshold: float


def _bank(bank: np.ndarray) -> np.ndarray:
    bank = np.asarray(bank, dtype=np.float32)
    if bank.ndim != 2 or len(bank) < 2:
        raise ValueError(f"the ID bank must be a 2-D array [M, D] with M >= 2 rows, got shape {bank.shape}")
    if not np.all(np.isfinite(bank)):
        raise ValueError("the ID bank contains NaN or inf values; check the teacher's embeddings")
    return np.ascontiguousarray(normalize(bank))


def clip_k(k: int, bank_size: int) -> int:
    """``min(k, bank_size − 1)`` (ID-to-ID distances exclude the point itself), logging a warning if clipped."""
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > bank_size - 1:
        log.warning(
            "ID-near filter: k=%d needs more than the %d ID embeddings; using k=%d",
            k,
            bank_size,
            bank_size - 1,
        )
        return bank_size - 1
    return int(k)


def id_threshold(bank: np.ndarray, k: int, quantile: float = 0.95, use_gpu: bool = True) -> float:
    """``τ_ID = quantile_q({d_k(b_i) : b_i ∈ bank})``, ``d_k`` = k-th NN distance to the other bank rows.

    Args:
        bank: ``[M, D]`` ID embeddings (L2-normalised here).
        k: neighbour rank; clipped to ``M − 1`` with a logged warning.
        quantile: q in ``(0, 1]`` (numpy's default linear interpolation).
        use_gpu: run FAISS on GPU when available.

    Returns:
        The threshold ``τ_ID``.
    """
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    bank = _bank(bank)
    k = clip_k(k, len(bank))
    dist = kth_distance(bank, bank, k, exclude_self=True, use_gpu=use_gpu)
    return float(np.quantile(dist.astype(np.float64), quantile))


def filter_near(
    candidates: np.ndarray, bank: np.ndarray, k: int, threshold: float, use_gpu: bool = True
) -> FilterResult:
    """Keep candidates whose k-th NN distance to the ID bank is at least ``threshold``.

    ``keep_i = d_k(ĉ_i) ≥ τ_ID`` with ``ĉ_i = c_i / ‖c_i‖`` and ``d_k`` the k-th NN distance to the
    normalised bank.

    Args:
        candidates: ``[N, D]`` candidate embeddings (L2-normalised here).
        bank: ``[M, D]`` ID embeddings (L2-normalised here).
        k: neighbour rank; clipped to ``M − 1`` with a logged warning, as in :func:`id_threshold`.
        threshold: ``τ_ID`` from :func:`id_threshold`.
        use_gpu: run FAISS on GPU when available.

    Returns:
        :class:`FilterResult` with one decision and reason per candidate.
    """
    bank = _bank(bank)
    candidates = np.asarray(candidates, dtype=np.float32)
    if candidates.ndim != 2 or candidates.shape[1] != bank.shape[1]:
        raise ValueError(
            f"candidates must be [N, {bank.shape[1]}] to match the ID bank, got shape {candidates.shape}"
        )
    k = clip_k(k, len(bank))
    dist = kth_distance(normalize(candidates), bank, k, use_gpu=use_gpu)
    keep = dist >= threshold
    reason = [
        KEPT if ok else f"near_id: knn distance {d:.3f} < threshold {threshold:.3f}"
        for ok, d in zip(keep.tolist(), dist.tolist(), strict=True)
    ]
    return FilterResult(keep=keep, distance=dist, reason=reason, k=k, threshold=float(threshold))
