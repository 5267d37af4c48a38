"""GEN and KL matching against their formulas, worked out by hand (math only) on tiny examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from oodforge.scores import build_score, generalized_entropy


def _log(probs: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax is ``probs`` (log-probabilities)."""
    return torch.tensor([[math.log(p) for p in row] for row in probs])


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


# --------------------------------------------------------------------------- GEN


def test_gen_by_hand() -> None:
    logits = _log([[1 / 6, 2 / 6, 3 / 6]])
    # gamma 0.5, M 2: the two largest probabilities 1/2 and 1/3
    expected = -(math.sqrt(0.5 * 0.5) + math.sqrt((1 / 3) * (2 / 3)))
    got = build_score("gen", gamma=0.5, m=2)(logits, None)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # gamma 0.1, M 100 (clipped to K = 3): every probability counts
    expected = -sum(p**0.1 * (1 - p) ** 0.1 for p in (1 / 6, 2 / 6, 3 / 6))
    assert build_score("gen")(logits, None).item() == pytest.approx(expected, rel=1e-6)


def test_gen_limits_and_invariances() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 5, generator=gen) * 3
    p = logits.double().softmax(dim=1)
    # gamma = 1, M = K: -sum p(1 - p) = sum p^2 - 1 (minus the Gini impurity)
    np.testing.assert_allclose(
        generalized_entropy(logits, gamma=1.0, m=5).numpy(), (p**2).sum(dim=1).numpy() - 1, rtol=1e-5
    )
    # softmax is shift-invariant, so is GEN; M >= K is the same as M = K
    np.testing.assert_allclose(
        generalized_entropy(logits + 7.0).numpy(), generalized_entropy(logits).numpy(), rtol=1e-5
    )
    np.testing.assert_array_equal(
        generalized_entropy(logits, m=5).numpy(), generalized_entropy(logits).numpy()
    )
    # a one-hot prediction is the most ID (score 0), the uniform one the least
    # (p ≈ e^-30 per other class: p^0.1 ≈ e^-3 each; the top one's (1 - p)^0.1 is 0 in float32)
    one_hot = generalized_entropy(torch.tensor([[30.0, 0.0, 0.0]])).item()
    assert one_hot == pytest.approx(-2 * math.exp(-3), rel=1e-4)
    uniform = generalized_entropy(torch.zeros(1, 5)).item()
    assert uniform == pytest.approx(-5 * (1 / 5) ** 0.1 * (4 / 5) ** 0.1, rel=1e-6)
    assert (generalized_entropy(logits) >= uniform - 1e-6).all()


def test_gen_params_are_checked() -> None:
    assert build_score("gen", gamma=0.2, m=3).params() == {"gamma": 0.2, "m": 3}
    with pytest.raises(ValueError, match="gen gamma must be a positive"):
        build_score("gen", gamma=0.0)
    with pytest.raises(ValueError, match="gen m must be a positive integer"):
        build_score("gen", m=0)


# --------------------------------------------------------------------------- KL matching


TRAIN = [[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.1, 0.8, 0.1]]  # predicted 0, 0, 1; class 2 never


def test_klm_by_hand() -> None:
    score = build_score("klm").fit(torch.zeros(3, 4), torch.tensor([0, 0, 1]), logits=_log(TRAIN))
    d0, d1 = [0.6, 0.25, 0.15], [0.1, 0.8, 0.1]  # mean softmax of the samples predicted as 0 / as 1
    torch.testing.assert_close(score.state_dict()["templates"], torch.tensor([d0, d1], dtype=torch.float64))
    p = [0.2, 0.7, 0.1]
    expected = -min(_kl(p, d0), _kl(p, d1))
    assert score(_log([p]), None).item() == pytest.approx(expected, rel=1e-5)
    # a sample whose softmax is a template matches it exactly: KL 0
    assert score(_log([d0]), None).item() == pytest.approx(0.0, abs=1e-6)
    assert (score(torch.randn(10, 3) * 4, None) <= 1e-6).all()


def test_klm_needs_logits_and_the_right_width() -> None:
    with pytest.raises(ValueError, match="fit needs the ID train logits"):
        build_score("klm").fit(torch.zeros(3, 4), torch.tensor([0, 0, 1]))
    score = build_score("klm").fit(torch.zeros(3, 4), None, logits=_log(TRAIN))
    with pytest.raises(ValueError, match="fitted for 3 classes, got 4 logits"):
        score(torch.zeros(2, 4), None)
