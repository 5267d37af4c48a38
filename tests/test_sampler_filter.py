"""kNN boundary sampler, ID-near filter and the FAISS index choice, checked against brute-force numpy."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from oodforge.config import ConfigError, validate
from oodforge.knn import default_nlist, kth_distance
from synth.filter import filter_near, id_threshold
from synth.sampler import SamplerParams, boundary_sample, effective_params, rescale


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(n: int, d: int, n_clusters: int, spread: float, seed: int) -> np.ndarray:
    """Unit vectors around ``n_clusters`` random centres."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((n_clusters, d)))
    return unit(centres[rng.integers(0, n_clusters, n)] + spread * rng.standard_normal((n, d)))


def brute_kth(queries: np.ndarray, bank: np.ndarray, k: int, exclude_self: bool = False) -> np.ndarray:
    dist = np.linalg.norm(queries[:, None, :].astype(np.float64) - bank[None, :, :], axis=2)
    if exclude_self:
        np.fill_diagonal(dist, np.inf)
    return np.sort(dist, axis=1)[:, k - 1]


# --------------------------------------------------------------------------- knn index


@pytest.fixture(scope="module")
def big_bank() -> np.ndarray:
    return clustered(10_000, 16, n_clusters=20, spread=0.2, seed=0)


def test_ivf_agrees_with_exact_search(big_bank: np.ndarray) -> None:
    queries = clustered(300, 16, n_clusters=20, spread=0.25, seed=1)
    exact = kth_distance(queries, big_bank, k=20, ivf_above=len(big_bank))  # flat
    ivf = kth_distance(queries, big_bank, k=20, ivf_above=1000, nprobe=16)
    coarse = kth_distance(queries, big_bank, k=20, ivf_above=1000, nprobe=1)
    assert ivf.dtype == np.float32 and ivf.shape == (300,)
    # an approximate search can only miss neighbours: never below the exact k-th distance
    assert np.all(ivf >= exact - 1e-5) and np.all(coarse >= exact - 1e-5)
    assert np.mean(ivf / exact - 1) < 0.03 and np.quantile(ivf / exact - 1, 0.9) < 0.06
    assert np.any(coarse > exact + 1e-4)  # nprobe=1 really is approximate, so the IVF path ran
    # probing every cell is exact again, also for ID-to-ID distances
    nlist = default_nlist(len(big_bank))
    full = kth_distance(queries, big_bank, k=20, ivf_above=1000, nprobe=nlist)
    np.testing.assert_allclose(full, exact, rtol=1e-6)
    sub = big_bank[:500]
    np.testing.assert_allclose(
        kth_distance(sub, sub, k=5, exclude_self=True, ivf_above=100, nprobe=1000),
        brute_kth(sub, sub, 5, exclude_self=True),
        rtol=1e-5,
    )


def test_flat_matches_brute_force_and_nlist_rule() -> None:
    bank = clustered(300, 8, 3, 0.3, seed=2)
    q = clustered(40, 8, 3, 0.5, seed=3)
    np.testing.assert_allclose(kth_distance(q, bank, 7), brute_kth(q, bank, 7), rtol=1e-5)
    assert default_nlist(200_000) == round(4 * np.sqrt(200_000)) and default_nlist(100) == 2
    with pytest.raises(ValueError, match="nlist"):
        kth_distance(q, bank, 3, ivf_above=10, nlist=10_000)


# --------------------------------------------------------------------------- filter


def test_threshold_is_quantile_of_brute_force_knn_distances() -> None:
    bank = clustered(300, 16, 3, 0.3, seed=4) * 5.0  # not normalised on purpose: the filter normalises
    expected = np.quantile(brute_kth(unit(bank), unit(bank), 10, exclude_self=True), 0.95)
    assert id_threshold(bank, k=10) == pytest.approx(expected, rel=1e-5)
    expected_50 = np.quantile(brute_kth(unit(bank), unit(bank), 10, exclude_self=True), 0.5)
    assert id_threshold(bank, k=10, quantile=0.5) == pytest.approx(expected_50, rel=1e-5)


def test_filter_rejects_near_id_and_keeps_far_candidates() -> None:
    rng = np.random.default_rng(5)
    bank = clustered(300, 16, 3, 0.1, seed=4)
    tau = id_threshold(bank, k=10)
    interior = np.argsort(brute_kth(bank, bank, 10, exclude_self=True))[:40]  # ID points inside the data
    near = bank[interior] + 1e-3 * rng.standard_normal((40, 16))
    opposite = -bank[:20]  # far side of the sphere
    far_cluster = clustered(20, 16, 1, 0.05, seed=99)  # a tight cluster in a new direction
    result = filter_near(np.concatenate([near, opposite, far_cluster]), bank, k=10, threshold=tau)
    assert not result.keep[:40].any() and result.keep[40:].all()
    assert result.distance.dtype == np.float32 and result.k == 10 and result.threshold == tau
    np.testing.assert_allclose(result.distance[:40], brute_kth(unit(near), bank, 10), rtol=1e-4)
    assert result.reason[50] == "kept"
    d0 = result.distance[0]
    assert result.reason[0] == f"near_id: knn distance {d0:.3f} < threshold {tau:.3f}"


def test_filter_clips_k_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    bank = clustered(12, 8, 2, 0.3, seed=6)
    with caplog.at_level(logging.WARNING, logger="synth.filter"):
        tau = id_threshold(bank, k=50)
        result = filter_near(-bank[:3], bank, k=50, threshold=tau)
    assert "using k=11" in caplog.text and result.k == 11
    assert tau == pytest.approx(np.quantile(brute_kth(bank, bank, 11, exclude_self=True), 0.95), rel=1e-5)
    with pytest.raises(ValueError, match=r"\[N, 8\]"):
        filter_near(np.ones((2, 4)), bank, k=3, threshold=tau)


# --------------------------------------------------------------------------- sampler

PARAMS = SamplerParams(k=20, select=10, n_candidates=200, sigma=0.07, keep_per_point=2)


def test_samples_lie_beyond_their_boundary_points() -> None:
    z = clustered(400, 16, 2, 0.3, seed=7)
    out = boundary_sample(z, n_out=45, params=PARAMS, rng=np.random.default_rng(0))
    assert out.samples.shape == (45, 16) and out.samples.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out.samples, axis=1), 1.0, atol=1e-5)
    assert len(out.source_index) == len(out.distance) == len(out.boundary_distance) == 45
    # the distances reported are the true k-th NN distances
    np.testing.assert_allclose(out.distance, brute_kth(out.samples, z, 20), rtol=1e-4)
    id_dist = brute_kth(z, z, 20, exclude_self=True)
    np.testing.assert_allclose(out.boundary_distance, id_dist[out.source_index], rtol=1e-4)
    # sources are the `select` ID points with the largest k-th NN distance
    assert set(out.source_index) <= set(np.argsort(-id_dist)[:10])
    assert out.distance.mean() > out.boundary_distance.mean()
    assert np.mean(out.distance > out.boundary_distance) >= 0.9
    # a full round uses every boundary point keep_per_point times (45 = 2 rounds of 20 + 5)
    assert np.all(np.bincount(out.source_index[:40], minlength=400)[np.argsort(-id_dist)[:10]] == 4)


def test_sampler_is_deterministic_given_the_seed() -> None:
    z = clustered(200, 8, 2, 0.3, seed=8)
    a = boundary_sample(z, 30, PARAMS, np.random.default_rng(3))
    b = boundary_sample(z, 30, PARAMS, np.random.default_rng(3))
    c = boundary_sample(z, 30, PARAMS, np.random.default_rng(4))
    np.testing.assert_array_equal(a.samples, b.samples)
    np.testing.assert_array_equal(a.source_index, b.source_index)
    assert not np.array_equal(a.samples, c.samples)


def test_small_class_scales_defaults_down() -> None:
    z = clustered(20, 8, 1, 0.3, seed=9)
    assert effective_params(SamplerParams(), 20).model_dump() == {
        "k": 19,
        "select": 20,
        "n_candidates": 1500,
        "sigma": 0.07,
        "keep_per_point": 2,
        "mode": "fixed",
    }
    out = boundary_sample(z, 50, SamplerParams(n_candidates=100), np.random.default_rng(0))
    assert out.samples.shape == (50, 8) and out.params.k == 19 and out.params.select == 20
    assert out.source_index.max() < 20
    with pytest.raises(ValueError, match="at least 2 embeddings"):
        boundary_sample(z[:1], 5, SamplerParams(), np.random.default_rng(0))
    empty = boundary_sample(z, 0, SamplerParams(), np.random.default_rng(0))
    assert empty.samples.shape == (0, 8)


def test_rescale_and_params_validation() -> None:
    s = unit(np.random.default_rng(0).standard_normal((5, 4)))
    np.testing.assert_allclose(np.linalg.norm(rescale(s, 3.5), axis=1), 3.5, rtol=1e-6)
    np.testing.assert_allclose(
        np.linalg.norm(rescale(2 * s, np.arange(1, 6)), axis=1), np.arange(1, 6), rtol=1e-6
    )
    np.testing.assert_allclose(unit(rescale(s, 3.5)), s, atol=1e-6)
    with pytest.raises(ValueError, match="positive"):
        rescale(s, 0.0)
    with pytest.raises(ConfigError, match="keep_per_point"):
        validate(SamplerParams, {"n_candidates": 1, "keep_per_point": 2})
    with pytest.raises(ConfigError, match="unknown key 'sigmaa'"):
        validate(SamplerParams, {"sigmaa": 0.1})


def test_public_selection_reproduces_the_view_reshape() -> None:
    """Point i's candidates are row i (flat i*L + j); view(L, -1) reads the flat list as [L, P]."""
    from synth.sampler import public_selection

    dist = np.array([[0.0, 5.0, 1.0], [9.0, 2.0, 3.0]])  # flat 0 5 1 9 2 3 -> [[0, 5], [1, 9], [2, 3]]
    assert public_selection(dist, 1).tolist() == [[2], [1]]  # column maxima: rows 2 and 1
    assert public_selection(dist, 2).tolist() == [[2, 1], [1, 0]]
    # the fixed sampler keeps each point's own farthest candidates instead: 5.0 (j=1) and 9.0 (j=0)
    assert np.argsort(-dist, axis=1)[:, 0].tolist() == [1, 0]


def test_public_mode_keeps_nearer_candidates_than_the_fixed_one() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(120, 16)).astype(np.float32)
    params = {"k": 10, "select": 10, "n_candidates": 300, "use_gpu": False}
    far = {}
    for mode in ("fixed", "public"):
        p = SamplerParams(
            k=params["k"], select=params["select"], n_candidates=params["n_candidates"], mode=mode
        )
        out = boundary_sample(z, 40, p, np.random.default_rng(1), use_gpu=False)
        assert out.samples.shape == (40, 16) and np.allclose(
            np.linalg.norm(out.samples, axis=1), 1, atol=1e-5
        )
        far[mode] = float(out.distance.mean())
    assert far["public"] < far["fixed"]  # the fixed mode keeps the farthest; public keeps misread picks
