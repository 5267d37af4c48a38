"""The one k-nearest-neighbour primitive: FAISS k-th NN distances, exact or IVF, on GPU when there is one.

Used by the ``knn`` OOD score, the boundary sampler and the ID-near filter. A :class:`KNNIndex` is built
once over a bank and answers many queries (the ``knn`` score keeps one for its whole life, so a served
detector does not rebuild it per request). Banks up to ``ivf_above`` rows are searched exactly
(``faiss.IndexFlatL2``); larger ones with an inverted-file index (``faiss.IndexIVFFlat``), which
searches only the ``nprobe`` closest of ``nlist`` k-means cells, so its k-th distance can only be at or
above the exact one. The returned distance of the chosen neighbour is recomputed as ``‖q − b‖₂`` in
float32, which avoids the cancellation error of FAISS's ``‖q‖² + ‖b‖² − 2q·b`` for near-duplicates.

Example:
    >>> index = KNNIndex(bank)                        # [M, D]
    >>> d = index.kth_distance(queries, k=50)         # [N] float32
    >>> d_id = kth_distance(z, z, k=300, exclude_self=True)
"""

from __future__ import annotations

import math
from typing import Any

import faiss
import numpy as np

GPU_MAX_K = 2048  # faiss GPU search supports k (and nprobe) up to 2048
IVF_ABOVE = 200_000
_TRAIN_POINTS_PER_CELL = 256  # faiss's own k-means sub-sampling cap
_MIN_POINTS_PER_CELL = 39  # below this faiss warns that k-means is under-determined
_RESULT_ENTRIES = 1 << 24  # [batch, k] neighbour ids held per search call
_gpu_resources: Any = None


def default_nlist(n: int) -> int:
    """Number of IVF cells for ``n`` bank rows: ``round(4·√n)``, at most ``n // 39`` and at least 1."""
    return max(1, min(round(4 * math.sqrt(n)), n // _MIN_POINTS_PER_CELL))


def gpu_available() -> bool:
    """Whether the installed FAISS can search on a GPU (faiss-gpu and a visible device)."""
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def _to_gpu(index: Any) -> Any:
    global _gpu_resources
    if _gpu_resources is None:
        _gpu_resources = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(_gpu_resources, 0, index)


def _as_rows(name: str, x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {x.shape}")
    return x


def _check_k(k: int) -> int:
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


class KNNIndex:
    """A FAISS index over ``bank`` that answers k-th nearest-neighbour distance queries.

    Args:
        bank: ``[M, D]`` reference points (not normalised here; callers L2-normalise where the method
            asks for it).
        ivf_above: Bank size above which the IVF index is used.
        nlist: IVF cells; default :func:`default_nlist` (≈ ``4·√M``).
        nprobe: IVF cells searched per query (more = slower, closer to exact).
        use_gpu: Search on GPU 0 when FAISS has one (and ``k`` ≤ 2048); otherwise on the CPU.
    """

    def __init__(
        self,
        bank: np.ndarray,
        *,
        ivf_above: int = IVF_ABOVE,
        nlist: int | None = None,
        nprobe: int = 16,
        use_gpu: bool = True,
    ) -> None:
        """Build the index (IVF k-means training happens here, on a fixed sub-sample)."""
        self.bank = _as_rows("bank", bank)
        self.gpu = use_gpu and gpu_available()
        self.ivf = len(self.bank) > ivf_above
        if nprobe < 1:
            raise ValueError(f"nprobe must be a positive integer, got {nprobe}")
        self.nlist = (default_nlist(len(self.bank)) if nlist is None else nlist) if self.ivf else 1
        if self.ivf and not 1 <= self.nlist <= len(self.bank):
            raise ValueError(f"nlist must be between 1 and the bank size {len(self.bank)}, got {nlist}")
        self.nprobe = min(nprobe, self.nlist, GPU_MAX_K)
        self._cpu = self._build()
        self._gpu: Any = None

    @property
    def dim(self) -> int:
        """Width D of the bank rows."""
        return self.bank.shape[1]

    def __len__(self) -> int:
        """Number of bank rows."""
        return len(self.bank)

    def _build(self) -> Any:
        d = self.dim
        if not self.ivf:
            index = faiss.IndexFlatL2(d)
            index.add(self.bank)
            return index
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, self.nlist, faiss.METRIC_L2)
        train = self.bank
        cap = _TRAIN_POINTS_PER_CELL * self.nlist
        if len(self.bank) > cap:  # fixed sub-sample so the index (and every result) is reproducible
            rows = np.sort(np.random.default_rng(0).choice(len(self.bank), cap, replace=False))
            train = np.ascontiguousarray(self.bank[rows])
        index.train(train)
        index.add(self.bank)
        index.nprobe = self.nprobe
        return index

    def _index(self, n_search: int) -> Any:
        if not (self.gpu and n_search <= GPU_MAX_K):
            return self._cpu
        if self._gpu is None:
            self._gpu = _to_gpu(self._cpu)
            if self.ivf:
                faiss.GpuParameterSpace().set_index_parameter(self._gpu, "nprobe", self.nprobe)
        return self._gpu

    def kth_distance(
        self, queries: np.ndarray, k: int, exclude_self: bool = False, batch_size: int | None = None
    ) -> np.ndarray:
        """Euclidean distance from each query to its k-th nearest bank row, ``d_k(q) = ‖q − b_(k)‖₂``.

        Args:
            queries: ``[N, D]`` query points.
            k: Neighbour rank (1 = nearest).
            exclude_self: The queries are the bank rows themselves (ID-to-ID distances): the self-match
                is skipped by searching ``k + 1`` neighbours and taking the last. Exact also with
                duplicate rows: one zero-distance copy is dropped, the others count as neighbours.
            batch_size: Queries per FAISS call (bounds the ``[batch, k]`` result memory).

        Returns:
            ``[N]`` float32 distances (not squared).

        Raises:
            ValueError: non-2-D or mismatched inputs, ``k < 1`` or a bank with too few rows.
        """
        queries = _as_rows("queries", queries)
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {queries.shape[1]} but the bank has {self.dim}")
        k = _check_k(k)
        n_search = k + 1 if exclude_self else k
        if n_search > len(self.bank):
            extra = " (k + 1 with exclude_self)" if exclude_self else ""
            raise ValueError(
                f"k={k}{extra} needs at least {n_search} bank rows, the bank has {len(self.bank)}"
            )
        out = np.empty(len(queries), dtype=np.float32)
        if len(queries) == 0:
            return out
        index = self._index(n_search)
        step = batch_size or max(1, _RESULT_ENTRIES // n_search)
        for start in range(0, len(queries), step):
            q = queries[start : start + step]
            _, idx = index.search(q, n_search)
            kth = idx[:, n_search - 1]
            found = kth >= 0
            part = out[start : start + len(q)]
            part[found] = np.linalg.norm(q[found] - self.bank[kth[found]], axis=1)
            if not found.all():  # IVF: too few rows in the probed cells, exact search for those queries
                exact = KNNIndex(self.bank, ivf_above=len(self.bank), use_gpu=self.gpu)
                part[~found] = exact.kth_distance(q[~found], k, exclude_self=exclude_self)
        return out


def kth_distance(
    queries: np.ndarray,
    bank: np.ndarray,
    k: int,
    exclude_self: bool = False,
    batch_size: int | None = None,
    **index_options: Any,
) -> np.ndarray:
    """:meth:`KNNIndex.kth_distance` on a one-off index over ``bank`` (``index_options``: its arguments)."""
    index = KNNIndex(bank, **index_options)
    return index.kth_distance(queries, k, exclude_self=exclude_self, batch_size=batch_size)
