"""kNN boundary sampler (NPOS, arXiv 2303.02966; Dream-OOD, arXiv 2309.13415): outlier embeddings of a class.

On one class's L2-normalised ID embeddings ``Z`` (DESIGN.md §5):

1. ``d_k(z_i)`` = k-th NN distance of every ID point to the others; the ``select`` points with the
   largest ``d_k`` are the boundary points ``b``.
2. Per round and boundary point, draw ``n_candidates`` candidates ``c = (b + σε) / ‖b + σε‖``,
   ``ε ~ N(0, I)``; keep the ``keep_per_point`` candidates with the largest k-th NN distance to ``Z``.
3. Repeat rounds until ``n_out`` samples are collected; :func:`rescale` then puts them on the sphere of
   the class anchor ``‖T(y)‖``.

``mode: public`` reproduces the public Dream-OOD/OAL sampler instead: one draw of ``n_candidates``
noise vectors shared by every boundary point of a round, and the selection step's reshape of the
candidates' distances with ``view(n_candidates, -1)`` — the candidates are laid out point by point, so
that reshape mixes up rows and the "farthest" candidates it keeps are, in effect, random
σ-perturbations of the boundary points. ``mode: fixed`` (the default) keeps the farthest candidates.

Example:
    >>> out = boundary_sample(z, n_out=100, params=SamplerParams(), rng=np.random.default_rng(0))
    >>> v = rescale(out.samples, float(np.linalg.norm(anchor)))
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from oodforge.config import StrictModel
from oodforge.knn import kth_distance

log = logging.getLogger(__name__)

_MAX_CANDIDATE_FLOATS = 1 << 24  # candidates held at once (64 MiB of float32); bounds memory for wide D


class SamplerParams(StrictModel):
    """Hyper-parameters of the boundary sampler (the ``sampler:`` config section); defaults from NPOS.

    Attributes:
        k: neighbour rank of the k-th NN distance.
        select: number of boundary points (largest ID-to-ID k-th NN distance).
        n_candidates: candidates drawn around each boundary point per round.
        sigma: standard deviation σ of the Gaussian perturbation (on the unit sphere's scale).
        keep_per_point: candidates kept per boundary point per round (largest distance to the class).
        mode: ``fixed`` (keep the farthest candidates) or ``public`` (the public code's selection, see the
            module docstring).
    """

    k: int = Field(300, ge=1)
    select: int = Field(50, ge=1)
    n_candidates: int = Field(1500, ge=1)
    sigma: float = Field(0.07, gt=0)
    keep_per_point: int = Field(2, ge=1)
    mode: Literal["fixed", "public"] = "fixed"

    @model_validator(mode="after")
    def _keep_le_candidates(self) -> SamplerParams:
        if self.keep_per_point > self.n_candidates:
            raise ValueError(
                f"sampler.keep_per_point ({self.keep_per_point}) cannot exceed sampler.n_candidates "
                f"({self.n_candidates})"
            )
        return self


@dataclass
class BoundarySamples:
    """Output of :func:`boundary_sample` (all arrays have ``n_out`` rows).

    Attributes:
        samples: ``[n_out, D]`` float32 unit-norm outlier embeddings.
        source_index: ``[n_out]`` int64 row of ``z`` of the boundary point each sample was drawn around.
        distance: ``[n_out]`` float32 k-th NN distance of each sample to ``z``.
        boundary_distance: ``[n_out]`` float32 k-th NN distance of the source boundary point to the
            other rows of ``z``.
        params: the parameters actually used (after :func:`effective_params`).
    """

    samples: np.ndarray
    source_index: np.ndarray
    distance: np.ndarray
    boundary_distance: np.ndarray
    params: SamplerParams


def effective_params(params: SamplerParams, n_class: int) -> SamplerParams:
    """Scale the parameters down for a class with ``n_class`` embeddings.

    Rule: ``k' = min(k, n_class − 1)`` (an ID point has only ``n_class − 1`` other points) and
    ``select' = min(select, n_class)``; the other parameters are unchanged.

    Raises:
        ValueError: ``n_class < 2`` (no neighbour distance is defined).
    """
    if n_class < 2:
        raise ValueError(
            f"the boundary sampler needs at least 2 embeddings of a class, got {n_class}; "
            "add ID images of this class or leave it out of synthesis"
        )
    k, select = min(params.k, n_class - 1), min(params.select, n_class)
    if (k, select) != (params.k, params.select):
        log.info(
            "sampler: class of %d embeddings, using k=%d (asked %d), select=%d (asked %d)",
            n_class,
            k,
            params.k,
            select,
            params.select,
        )
    return params.model_copy(update={"k": k, "select": select})


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (float32); zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, np.finfo(np.float32).tiny)


def rescale(samples: np.ndarray, anchor_norm: float | np.ndarray) -> np.ndarray:
    """Put samples on the sphere of the class anchor: ``v = ‖T(y)‖ · s / ‖s‖``.

    Args:
        samples: ``[N, D]`` embeddings.
        anchor_norm: ``‖T(y)‖`` — a positive scalar, or ``[N]`` per-row norms.

    Returns:
        ``[N, D]`` float32 rows of norm ``anchor_norm``.
    """
    norm = np.asarray(anchor_norm, dtype=np.float32)
    if not np.all(np.isfinite(norm)) or np.any(norm <= 0):
        raise ValueError(f"anchor_norm must be positive and finite, got {anchor_norm!r}")
    if norm.ndim == 1:
        norm = norm[:, None]
    return normalize(samples) * norm


def _check_embeddings(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float32)
    if z.ndim != 2 or z.shape[1] == 0:
        raise ValueError(f"z must be a 2-D array of class embeddings [n, D], got shape {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError("z contains NaN or inf values; check the teacher's embeddings")
    return np.ascontiguousarray(normalize(z))


def public_selection(dist: np.ndarray, keep: int) -> np.ndarray:
    """The candidate picks of the public sampler, from distances laid out point by point.

    ``dist`` is ``[P, L]`` (point ``i``'s ``L`` candidates in row ``i``, i.e. flat index ``i·L + j``). The
    public code reshapes the flat distances to ``[L, P]`` (``view(length, -1)``), takes the ``keep``
    largest of each column ``i`` (rows ``r``) and returns candidates ``i·L + r``. Returns ``[P, keep]``
    candidate indices into each row of ``dist``.
    """
    n_points, length = dist.shape
    misread = dist.reshape(-1).reshape(length, n_points)  # what view(length, -1) sees
    rows = np.argsort(-misread, axis=0, kind="stable")[:keep]  # [keep, P]
    return rows.T


def _best_candidates(
    z: np.ndarray, points: np.ndarray, p: SamplerParams, rng: np.random.Generator, use_gpu: bool
) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``points``: the ``keep_per_point`` farthest of ``n_candidates`` perturbations.

    Returns ``[len(points), keep, D]`` samples and ``[len(points), keep]`` distances, best first.
    """
    d = z.shape[1]
    samples, dists = [], []
    chunk = max(1, _MAX_CANDIDATE_FLOATS // (p.n_candidates * d))
    if p.mode == "public":  # its selection mixes candidates across all points of a round: no chunks
        chunk = len(points)
    for start in range(0, len(points), chunk):
        b = points[start : start + chunk]
        if p.mode == "public":  # one noise draw shared by every point (repeat(pic_nums, 1))
            eps = np.broadcast_to(
                rng.standard_normal((1, p.n_candidates, d), dtype=np.float32), (len(b), p.n_candidates, d)
            )
        else:
            eps = rng.standard_normal((len(b), p.n_candidates, d), dtype=np.float32)
        cand = normalize(b[:, None, :] + p.sigma * eps)
        dist = kth_distance(cand.reshape(-1, d), z, p.k, use_gpu=use_gpu).reshape(len(b), p.n_candidates)
        if p.mode == "public":
            best = public_selection(dist, p.keep_per_point)
        else:
            best = np.argsort(-dist, axis=1, kind="stable")[:, : p.keep_per_point]
        samples.append(np.take_along_axis(cand, best[:, :, None], axis=1))
        dists.append(np.take_along_axis(dist, best, axis=1))
    return np.concatenate(samples), np.concatenate(dists)


def boundary_sample(
    z: np.ndarray,
    n_out: int,
    params: SamplerParams,
    rng: np.random.Generator,
    use_gpu: bool = True,
) -> BoundarySamples:
    """Sample ``n_out`` outlier embeddings at the low-density boundary of one class (see module docstring).

    ``z`` is L2-normalised here (a no-op for normalised input); ``params`` are scaled down with
    :func:`effective_params`. A full round yields ``select · keep_per_point`` samples; the last round
    uses only as many boundary points (chosen at random) as it needs. Each round runs one batched FAISS
    search over all its candidates (split only when they exceed 2^24 floats).

    Args:
        z: ``[n, D]`` one class's ID embeddings, ``n >= 2``.
        n_out: number of samples to return.
        params: sampler hyper-parameters.
        rng: the only source of randomness; equal seeds give equal outputs.
        use_gpu: run FAISS on GPU when available.

    Returns:
        :class:`BoundarySamples` with ``n_out`` rows.
    """
    if isinstance(n_out, bool) or int(n_out) != n_out or n_out < 0:
        raise ValueError(f"n_out must be a non-negative integer, got {n_out!r}")
    z = _check_embeddings(z)
    p = effective_params(params, len(z))
    id_dist = kth_distance(z, z, p.k, exclude_self=True, use_gpu=use_gpu)
    boundary = np.argsort(-id_dist, kind="stable")[: p.select]
    per_round = p.select * p.keep_per_point
    samples, sources, dists = [], [], []
    collected = 0
    while collected < n_out:
        remaining = n_out - collected
        if remaining >= per_round:
            points = boundary
        else:
            n_points = -(-remaining // p.keep_per_point)
            points = boundary[np.sort(rng.choice(p.select, n_points, replace=False))]
        cand, dist = _best_candidates(z, z[points], p, rng, use_gpu)
        take = min(remaining, cand.shape[0] * cand.shape[1])
        samples.append(cand.reshape(-1, z.shape[1])[:take])
        dists.append(dist.reshape(-1)[:take])
        sources.append(np.repeat(points, p.keep_per_point)[:take])
        collected += take
    d = z.shape[1]
    source_index = np.concatenate(sources).astype(np.int64) if sources else np.zeros(0, np.int64)
    return BoundarySamples(
        samples=np.concatenate(samples) if samples else np.zeros((0, d), np.float32),
        source_index=source_index,
        distance=np.concatenate(dists) if dists else np.zeros(0, np.float32),
        boundary_distance=id_dist[source_index],
        params=p,
    )
