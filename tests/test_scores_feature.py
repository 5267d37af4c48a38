"""RMDS, SHE and NNGuide against their formulas, worked out by hand (math only) on tiny examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from oodforge.scores import build_score

# --------------------------------------------------------------------------- RMDS


def test_rmds_by_hand_in_one_dimension() -> None:
    # class 0 at {-3, -1} (mean -2), class 1 at {1, 3} (mean 2): within-class variance 1;
    # all four around their mean 0: variance (9 + 1 + 1 + 9) / 4 = 5
    train = torch.tensor([[-3.0], [-1.0], [1.0], [3.0]])
    score = build_score("rmds").fit(train, torch.tensor([0, 0, 1, 1]))
    h = 0.5
    md_classes = min((h + 2) ** 2 / 1, (h - 2) ** 2 / 1)  # 2.25
    md_background = h**2 / 5  # 0.05
    expected = -(md_classes - md_background)
    assert score(None, torch.tensor([[h]])).item() == pytest.approx(expected, rel=1e-6)
    assert score(None, torch.tensor([[-2.0]])).item() == pytest.approx(4 / 5, rel=1e-6)  # a class mean


def test_rmds_with_one_class_is_zero_and_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    train = torch.tensor(rng.normal(size=(50, 3)), dtype=torch.float32)
    one = build_score("rmds").fit(train, torch.zeros(50, dtype=torch.long))  # class = background
    np.testing.assert_allclose(one(None, torch.randn(6, 3)).numpy(), 0.0, atol=1e-4)

    labels = np.repeat([0, 1], 25)
    x = train.double().numpy() + 4 * labels[:, None]
    score = build_score("rmds").fit(torch.tensor(x, dtype=torch.float32), torch.tensor(labels))
    xf = x.astype(np.float32).astype(np.float64)
    means = np.stack([xf[labels == c].mean(0) for c in (0, 1)])
    within = sum((xf[labels == c] - means[c]).T @ (xf[labels == c] - means[c]) for c in (0, 1)) / 50
    total = (xf - xf.mean(0)).T @ (xf - xf.mean(0)) / 50
    test = rng.normal(size=(8, 3)) * 3
    md = np.stack([np.einsum("nd,de,ne->n", test - m, np.linalg.inv(within), test - m) for m in means], 1)
    md0 = np.einsum("nd,de,ne->n", test - xf.mean(0), np.linalg.inv(total), test - xf.mean(0))
    got = score(None, torch.tensor(test, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(got, -(md.min(1) - md0), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- SHE


def test_she_by_hand() -> None:
    features = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 5.0], [0.0, 2.0]])
    labels = torch.tensor([0, 0, 0, 1])
    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 2.0]])  # sample 2 is misclassified
    score = build_score("she").fit(features, labels, logits=logits)
    # stored patterns: S_0 = mean of the correct class-0 samples = (2, 0); S_1 = (0, 2)
    torch.testing.assert_close(score.state_dict()["patterns"], torch.tensor([[2.0, 0.0], [0.0, 2.0]]))
    h = torch.tensor([[3.0, 1.0], [3.0, 1.0]])
    got = score(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), h)  # predicted 0, then 1
    np.testing.assert_allclose(got.numpy(), [3 * 2 + 1 * 0, 3 * 0 + 1 * 2])


def test_she_falls_back_to_all_samples_of_a_class_with_none_correct() -> None:
    features = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    with pytest.warns(UserWarning, match=r"class\(es\) \[1\]"):
        score = build_score("she").fit(
            features, torch.tensor([0, 1]), logits=torch.tensor([[1.0, 0], [1.0, 0]])
        )
    torch.testing.assert_close(score.state_dict()["patterns"], torch.tensor([[1.0, 0.0], [0.0, 4.0]]))


# --------------------------------------------------------------------------- NNGuide


def test_nnguide_by_hand() -> None:
    # one-logit "classifiers": lse(f) = f, so the train confidences are 2, 3, 1
    features = torch.tensor([[2.0, 0.0], [0.0, 5.0], [-1.0, 0.0]])
    logits = torch.tensor([[2.0], [3.0], [1.0]])
    score = build_score("nnguide", k=2).fit(features, None, logits=logits)
    # bank = confidence * normalised feature: (2, 0), (0, 3), (-1, 0)
    torch.testing.assert_close(
        score.state_dict()["bank"], torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    )
    # query (1, 1) -> (1, 1)/√2: inner products √2, 3/√2, -1/√2; top-2 mean (3 + 2)/(2√2); times lse = 4
    expected = 4 * (3 + 2) / (2 * math.sqrt(2))
    query = torch.tensor([[1.0, 1.0]])
    assert score(torch.tensor([[4.0]]), query).item() == pytest.approx(expected, rel=1e-6)
    assert score(torch.tensor([[4.0]]), 10 * query).item() == pytest.approx(expected, rel=1e-6)  # scale-free


def test_nnguide_clips_k_and_checks_its_bank() -> None:
    with pytest.warns(UserWarning, match="using k=3"):
        score = build_score("nnguide", k=10).fit(torch.randn(3, 2), None, logits=torch.randn(3, 4))
    assert score.params() == {"k": 3}
    with pytest.raises(ValueError, match="fewer than k=5"):
        build_score("nnguide", k=5).load_state_dict({"bank": torch.randn(3, 2)})
