"""k-th nearest-neighbour distances for the boundary sampler and the ID-near filter, with an index choice.

Small banks use exact search (``faiss.IndexFlatL2`` through :func:`oodforge.scores.kth_nn_distance`);
banks above ``ivf_above`` rows use an inverted-file index (``faiss.IndexIVFFlat``), which searches only
the ``nprobe`` closest of ``nlist`` k-means cells. Either runs on GPU 0 when faiss has a GPU.

Example:
    >>> d = kth_distance(z, z, k=300, exclude_self=True)   # ID-to-ID distances, [len(z)] float32
"""

from __future__ import annotations

import math
from typing import Any

import faiss
import numpy as np

from oodforge.scores import kth_nn_distance

GPU_MAX_K = 2048  # faiss GPU search supports k (and nprobe) up to 2048
IVF_ABOVE = 200_000
_TRAIN_POINTS_PER_CELL = 256  # faiss's own k-means sub-sampling cap
_MIN_POINTS_PER_CELL = 39  # below this faiss warns that k-means is under-determined
_gpu_resources: Any = None


def default_nlist(n: int) -> int:
    """Number of IVF cells for ``n`` bank rows: ``round(4·√n)``, at most ``n // 39`` and at least 1."""
    return max(1, min(round(4 * math.sqrt(n)), n // _MIN_POINTS_PER_CELL))


def _to_gpu(index: Any) -> Any:
    global _gpu_resources
    if _gpu_resources is None:
        _gpu_resources = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(_gpu_resources, 0, index)


def _ivf_index(bank: np.ndarray, nlist: int, nprobe: int, use_gpu: bool) -> Any:
    d = bank.shape[1]
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist, faiss.METRIC_L2)
    train = bank
    cap = _TRAIN_POINTS_PER_CELL * nlist
    if len(bank) > cap:  # fixed sub-sample so the index (and every result) is reproducible
        rows = np.sort(np.random.default_rng(0).choice(len(bank), cap, replace=False))
        train = np.ascontiguousarray(bank[rows])
    index.train(train)
    index.add(bank)
    index.nprobe = nprobe
    if use_gpu:
        index = _to_gpu(index)
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    return index


def kth_distance(
    queries: np.ndarray,
    bank: np.ndarray,
    k: int,
    exclude_self: bool = False,
    ivf_above: int = IVF_ABOVE,
    nlist: int | None = None,
    nprobe: int = 16,
    use_gpu: bool = True,
) -> np.ndarray:
    """Euclidean distance from each query to its k-th nearest bank row, ``d_k(q) = ‖q − b_(k)‖₂``.

    Exact (``IndexFlatL2``) when ``len(bank) <= ivf_above``; otherwise approximate with
    ``IndexIVFFlat`` trained on the bank (k-means on at most ``256·nlist`` rows, fixed seed). An
    approximate search can only miss neighbours, so its k-th distance is never below the exact one.
    Queries whose probed cells hold fewer than ``k`` rows fall back to exact search. The returned
    distance is recomputed as ``‖q − b‖₂`` from the chosen neighbour (no squared-distance cancellation).

    Args:
        queries: ``[N, D]`` query points (not normalised here).
        bank: ``[M, D]`` reference points.
        k: neighbour rank (1 = nearest).
        exclude_self: the queries are the bank rows themselves; the self-match is skipped.
        ivf_above: bank size above which the IVF index is used.
        nlist: IVF cells; default :func:`default_nlist` (≈ ``4·√M``).
        nprobe: IVF cells searched per query (more = slower, closer to exact).
        use_gpu: search on GPU 0 when ``faiss.get_num_gpus() > 0`` (and ``k`` ≤ 2048).

    Returns:
        ``[N]`` float32 distances (not squared).

    Raises:
        ValueError: non-2-D or mismatched inputs, ``k < 1``, too few bank rows, or bad IVF settings.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    bank = np.ascontiguousarray(bank, dtype=np.float32)
    gpu = use_gpu and faiss.get_num_gpus() > 0
    if len(bank) <= ivf_above:
        return kth_nn_distance(queries, bank, k, exclude_self=exclude_self, use_gpu=gpu)
    # the flat helper validates shapes and k; reuse it on an empty query set before the IVF path
    kth_nn_distance(queries[:0], bank, k, exclude_self=exclude_self)
    n_search = int(k) + 1 if exclude_self else int(k)
    nlist = default_nlist(len(bank)) if nlist is None else nlist
    if not 1 <= nlist <= len(bank):
        raise ValueError(f"nlist must be between 1 and the bank size {len(bank)}, got {nlist}")
    if nprobe < 1:
        raise ValueError(f"nprobe must be a positive integer, got {nprobe}")
    gpu = gpu and n_search <= GPU_MAX_K
    nprobe = min(nprobe, nlist, GPU_MAX_K) if gpu else min(nprobe, nlist)
    out = np.empty(len(queries), dtype=np.float32)
    if len(queries) == 0:
        return out
    index = _ivf_index(bank, nlist, nprobe, gpu)
    step = max(1, (1 << 24) // n_search)
    for start in range(0, len(queries), step):
        q = queries[start : start + step]
        _, idx = index.search(q, n_search)
        kth = idx[:, n_search - 1]
        found = kth >= 0
        out[start : start + len(q)][found] = np.linalg.norm(q[found] - bank[kth[found]], axis=1)
        if not found.all():  # too few rows in the probed cells: exact search for those queries
            out[start : start + len(q)][~found] = kth_nn_distance(
                q[~found], bank, k, exclude_self=exclude_self, use_gpu=gpu
            )
    return out
