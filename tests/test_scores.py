"""Post-hoc scores against their written formulas, computed independently here (math / numpy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from oodforge.knn import kth_distance
from oodforge.scores import (
    SCORES,
    Score,
    build_score,
    default_scores,
    energy,
    entropy,
    max_logit,
    msp,
)

LOGITS = [[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]]


def _softmax_row(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


# --------------------------------------------------------------------------- logit scores


def test_msp_max_logit_on_hand_made_logits() -> None:
    logits = torch.tensor(LOGITS)
    expected_msp = [max(_softmax_row(r)) for r in LOGITS]
    np.testing.assert_allclose(msp(logits).numpy(), expected_msp, rtol=1e-6)
    np.testing.assert_allclose(max_logit(logits).numpy(), [3.0, 0.5])
    # by hand: row 0 = e^3 / (e + e^2 + e^3)
    assert msp(logits)[0].item() == pytest.approx(math.e**3 / (math.e + math.e**2 + math.e**3), rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_energy_is_t_logsumexp(temperature: float) -> None:
    expected = [temperature * math.log(sum(math.exp(v / temperature) for v in r)) for r in LOGITS]
    np.testing.assert_allclose(energy(torch.tensor(LOGITS), temperature).numpy(), expected, rtol=1e-6)
    score = build_score("energy", temperature=temperature)
    np.testing.assert_allclose(score(torch.tensor(LOGITS), None).numpy(), expected, rtol=1e-6)
    assert score.params() == {"temperature": temperature}


def test_entropy_is_minus_shannon_entropy() -> None:
    expected = [sum(p * math.log(p) for p in _softmax_row(r)) for r in LOGITS]
    got = entropy(torch.tensor(LOGITS)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert (got <= 0).all()
    uniform = entropy(torch.zeros(1, 4)).item()
    assert uniform == pytest.approx(-math.log(4), rel=1e-6)  # maximal entropy -> lowest score


def test_large_logits_do_not_overflow() -> None:
    big = torch.tensor([[1000.0, 999.0, -1000.0], [5000.0, 5000.0, 5000.0]])
    # shift-invariance by hand: lse(f) = max f + log sum exp(f - max f)
    e = energy(big).numpy()
    assert e[0] == pytest.approx(1000.0 + math.log(1 + math.exp(-1)), rel=1e-6)
    assert e[1] == pytest.approx(5000.0 + math.log(3), rel=1e-6)
    assert energy(big, 0.1).numpy()[0] == pytest.approx(1000.0 + 0.1 * math.log(1 + math.exp(-10)), rel=1e-6)
    m = msp(big).numpy()
    assert m[0] == pytest.approx(1 / (1 + math.exp(-1)), rel=1e-6)
    assert m[1] == pytest.approx(1 / 3, rel=1e-6)
    h = entropy(big).numpy()
    p = 1 / (1 + math.exp(-1))
    assert h[0] == pytest.approx(p * math.log(p) + (1 - p) * math.log(1 - p), rel=1e-5)
    assert h[1] == pytest.approx(-math.log(3), rel=1e-6)
    for name in ("msp", "max_logit", "energy", "entropy"):
        assert torch.isfinite(build_score(name)(big, None)).all(), name


# --------------------------------------------------------------------------- knn


def _brute_kth(queries: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
    d = np.sqrt(((queries[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(-1))
    return np.sort(d, axis=1)[:, k - 1]


def test_kth_nn_distance_on_hand_made_points() -> None:
    bank = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], dtype=np.float32)
    q = np.array([[1, 0], [0, 0]], dtype=np.float32)
    np.testing.assert_allclose(kth_distance(q, bank, 1), [0, 1], atol=1e-6)
    np.testing.assert_allclose(kth_distance(q, bank, 2), [math.sqrt(2), 1], atol=1e-6)
    np.testing.assert_allclose(kth_distance(q, bank, 4), [2, 1], atol=1e-6)
    # exclude_self: the bank queried against itself skips the zero self-distance
    np.testing.assert_allclose(kth_distance(bank, bank, 1, exclude_self=True), [math.sqrt(2)] * 4, atol=1e-6)
    np.testing.assert_allclose(kth_distance(bank, bank, 3, exclude_self=True), [2] * 4, atol=1e-6)
    with pytest.raises(ValueError, match="bank rows"):
        kth_distance(bank, bank, 4, exclude_self=True)


def test_kth_nn_distance_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(300, 8)).astype(np.float32)
    queries = rng.normal(size=(120, 8)).astype(np.float32)
    for k in (1, 7, 50):
        np.testing.assert_allclose(kth_distance(queries, bank, k), _brute_kth(queries, bank, k), rtol=1e-5)
    # small batches give the same answer
    np.testing.assert_allclose(
        kth_distance(queries, bank, 7, batch_size=16), _brute_kth(queries, bank, 7), rtol=1e-5
    )
    # exclude_self == brute force on the bank with the diagonal removed, also with a duplicated row
    dup = np.vstack([bank, bank[:1]])
    d = np.sqrt(((dup[:, None].astype(np.float64) - dup[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    for k in (1, 5):
        expected = np.sort(d, axis=1)[:, k - 1]
        np.testing.assert_allclose(
            kth_distance(dup, dup, k, exclude_self=True), expected, rtol=1e-5, atol=1e-6
        )
    assert kth_distance(dup, dup, 1, exclude_self=True)[0] == 0.0  # its duplicate is a real neighbour


def test_knn_score_hand_made_and_normalised() -> None:
    bank = torch.tensor([[2.0, 0.0], [0.0, 5.0], [-1.0, 0.0], [0.0, -3.0]])  # normalised: the 4 unit axes
    score = build_score("knn", k=2).fit(bank, torch.zeros(4, dtype=torch.long))
    feats = torch.tensor([[10.0, 0.0], [1.0, 1.0]])
    # (1,0): neighbours at 0, √2, √2, 2 -> 2nd = √2 ; (1,1)/√2: two axes at distance sqrt(2 - √2)
    expected = [-math.sqrt(2), -math.sqrt(2 - math.sqrt(2))]
    np.testing.assert_allclose(score(torch.zeros(2, 3), feats).numpy(), expected, rtol=1e-6)
    # scaling the features (query or bank) changes nothing
    np.testing.assert_allclose(score(None, 7.5 * feats).numpy(), expected, rtol=1e-6)
    rescaled = build_score("knn", k=2).fit(0.01 * bank, torch.zeros(4, dtype=torch.long))
    np.testing.assert_allclose(rescaled(None, feats).numpy(), expected, rtol=1e-6)


def test_knn_score_matches_brute_force_on_normalised_features() -> None:
    gen = torch.Generator().manual_seed(1)
    train, test = torch.randn(200, 6, generator=gen) * 4, torch.randn(50, 6, generator=gen)
    score = build_score("knn", k=10).fit(train, torch.zeros(200, dtype=torch.long))
    normed = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    expected = -_brute_kth(normed(test.numpy()), normed(train.numpy()), 10)
    np.testing.assert_allclose(score(None, test).numpy(), expected, rtol=1e-5)


def test_knn_clips_k_to_bank_size() -> None:
    with pytest.warns(UserWarning, match="using k=3"):
        score = build_score("knn", k=50).fit(torch.randn(3, 4), torch.zeros(3))
    assert score.params() == {"k": 3}
    assert score(None, torch.randn(5, 4)).shape == (5,)


# --------------------------------------------------------------------------- mahalanobis


def _mahalanobis_numpy(train: np.ndarray, labels: np.ndarray, test: np.ndarray) -> np.ndarray:
    classes = np.unique(labels)
    means = np.stack([train[labels == c].mean(0) for c in classes])
    centered = train - means[np.searchsorted(classes, labels)]
    inv = np.linalg.inv(centered.T @ centered / len(train))
    dists = [np.einsum("nd,de,ne->n", test - mu, inv, test - mu) for mu in means]
    return -np.min(np.stack(dists, axis=1), axis=1)


def test_mahalanobis_matches_numpy_formula() -> None:
    rng = np.random.default_rng(2)
    labels = np.repeat([0, 1, 4], 100)  # a gap in class ids is fine
    train = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5)) + 3 * labels[:, None]
    test = rng.normal(size=(40, 5)) * 2
    score = build_score("mahalanobis").fit(torch.tensor(train, dtype=torch.float32), torch.tensor(labels))
    got = score(None, torch.tensor(test, dtype=torch.float32)).numpy()
    expected = _mahalanobis_numpy(train.astype(np.float32).astype(np.float64), labels, test)
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    assert got.dtype == np.float32 and (got <= 0).all()


def test_mahalanobis_class_mean_scores_zero() -> None:
    rng = np.random.default_rng(3)
    labels = np.repeat([0, 1], 50)
    train = torch.tensor(rng.normal(size=(100, 4)) + 5 * labels[:, None], dtype=torch.float32)
    score = build_score("mahalanobis").fit(train, torch.tensor(labels))
    means = torch.stack([train[torch.tensor(labels) == c].mean(0) for c in (0, 1)])
    at_mean = score(None, means).numpy()
    np.testing.assert_allclose(at_mean, 0.0, atol=1e-5)
    others = score(None, torch.randn(20, 4)).numpy()
    assert (others < at_mean.min()).all()


def test_mahalanobis_survives_a_singular_covariance() -> None:
    feats = torch.randn(30, 4)
    feats[:, 3] = 0.0  # a dead unit: Σ is singular, pinv handles it
    score = build_score("mahalanobis").fit(feats, torch.arange(30) % 2)
    assert torch.isfinite(score(None, torch.randn(5, 4))).all()


# --------------------------------------------------------------------------- interface


FITTED = {"knn", "mahalanobis", "rmds", "klm", "she", "nnguide", "react", "ash_p", "ash_b", "ash_s", "scale"}
FITTED |= {"dice", "vim", "fdbd"}
LAYER = {"react", "ash_p", "ash_b", "ash_s", "scale", "dice", "vim", "fdbd", "gradnorm"}


def test_registry_lists_all_scores_and_names_match() -> None:
    logit = ["msp", "max_logit", "energy", "entropy", "gen", "klm"]
    feature = ["knn", "mahalanobis", "rmds", "she", "nnguide"]
    layer = ["react", "ash_p", "ash_b", "ash_s", "scale", "dice", "vim", "fdbd", "gradnorm"]
    assert SCORES.names() == sorted([*logit, *feature, *layer, "odin"])
    for name in SCORES:
        cls = SCORES.get(name)
        assert issubclass(cls, Score) and cls.name == name
        assert cls.needs_fit == (name in FITTED), name
        assert cls.needs_layer == (name in LAYER), name
        assert cls.needs_grad == (name == "odin"), name
        assert cls.depends_on_head == (name not in {"knn", "mahalanobis", "rmds"}), name
    assert default_scores() == ["msp", "max_logit", "energy", "entropy", "knn", "mahalanobis"]


def test_build_score_errors() -> None:
    with pytest.raises(KeyError, match="choose one of: ash_b, ash_p, ash_s, dice, energy"):
        build_score("openmax")
    with pytest.raises(TypeError, match="no parameter.*'kk'.*parameters are: k"):
        build_score("knn", kk=5)
    with pytest.raises(TypeError, match="takes no parameters"):
        build_score("msp", temperature=2.0)
    with pytest.raises(ValueError, match="positive integer"):
        build_score("knn", k=0)
    with pytest.raises(ValueError, match="positive"):
        build_score("energy", temperature=0.0)


@pytest.mark.parametrize("name", ["knn", "mahalanobis"])
def test_unfitted_score_raises(name: str) -> None:
    score = build_score(name)
    with pytest.raises(RuntimeError, match=r"call fit\(\.\.\.\) on ID train features first"):
        score(torch.randn(3, 2), torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="not fitted"):
        score.state_dict()


@pytest.mark.parametrize("name", ["msp", "max_logit", "energy", "entropy", "knn", "mahalanobis"])
def test_state_dict_round_trip(name: str) -> None:
    gen = torch.Generator().manual_seed(4)
    feats, labels = torch.randn(60, 6, generator=gen), torch.arange(60) % 3
    logits, test_feats = torch.randn(10, 3, generator=gen), torch.randn(10, 6, generator=gen)
    score = build_score(name, **({"k": 5} if name == "knn" else {})).fit(feats, labels)
    state = score.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert bool(state) == score.needs_fit
    restored = build_score(name, **score.params())
    restored.load_state_dict({k: v.clone() for k, v in state.items()})
    torch.testing.assert_close(restored(logits, test_feats), score(logits, test_feats), rtol=0, atol=0)


def test_safetensors_round_trip(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    score = build_score("mahalanobis").fit(torch.randn(40, 3), torch.arange(40) % 2)
    save_file(score.state_dict(), str(tmp_path / "s.safetensors"))
    restored = build_score("mahalanobis")
    restored.load_state_dict(load_file(str(tmp_path / "s.safetensors")))
    x = torch.randn(7, 3)
    torch.testing.assert_close(restored(None, x), score(None, x), rtol=0, atol=0)


def test_bad_state_raises_value_error() -> None:
    knn = build_score("knn", k=5)
    with pytest.raises(ValueError, match="missing \\['bank'\\]"):
        knn.load_state_dict({})
    with pytest.raises(ValueError, match="unexpected \\['extra'\\]"):
        knn.load_state_dict({"bank": torch.randn(10, 4), "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="\\[M, D\\]"):
        knn.load_state_dict({"bank": torch.randn(10)})
    with pytest.raises(ValueError, match="fewer than k=5"):
        knn.load_state_dict({"bank": torch.randn(3, 4)})
    maha = build_score("mahalanobis")
    with pytest.raises(ValueError, match="missing \\['precision'\\]"):
        maha.load_state_dict({"means": torch.randn(2, 4)})
    with pytest.raises(ValueError, match="must be \\[4, 4\\]"):
        maha.load_state_dict({"means": torch.randn(2, 4), "precision": torch.eye(3)})
    with pytest.raises(ValueError, match="NaN"):
        maha.load_state_dict({"means": torch.full((2, 4), float("nan")), "precision": torch.eye(4)})
    with pytest.raises(ValueError, match="no fitted statistics"):
        build_score("msp").load_state_dict({"bank": torch.zeros(1)})


def test_feature_dimension_mismatch_is_clear() -> None:
    score = build_score("knn", k=2).fit(torch.randn(10, 4), torch.zeros(10))
    with pytest.raises(ValueError, match="fitted on 4-dimensional features, got 5"):
        score(None, torch.randn(3, 5))
    with pytest.raises(ValueError, match="needs the penultimate features"):
        score(torch.randn(3, 2))
