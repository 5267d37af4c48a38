"""ReAct, ASH-P/B/S, SCALE and DICE against their formulas, worked out by hand on a 2-class, 4-unit layer.

Expected values use plain Python arithmetic on lists (``_energy``), never the implementation's helpers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from oodforge.backbones import FinalLayer
from oodforge.scores import build_score, energy, kept_count

W = [[1.0, 2.0, 0.5, 1.5], [0.25, 1.25, 0.75, -1.0]]
B = [0.5, -0.5]
LAYER = FinalLayer(weight=torch.tensor(W), bias=torch.tensor(B))
H = [3.0, 1.0, 0.0, 2.0]  # non-negative, as post-ReLU features are
TRAIN = torch.tensor([[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]])  # flattened: 0..7


def _energy(a: list[float]) -> float:
    """lse(W a + b) by hand."""
    logits = [sum(w * x for w, x in zip(row, a, strict=True)) + b for row, b in zip(W, B, strict=True)]
    return math.log(sum(math.exp(v) for v in logits))


def _fit(name: str, **params):
    return build_score(name, **params).fit(TRAIN, None, layer=LAYER)


def _score(score, h: list[float]) -> float:
    return score(None, torch.tensor([h])).item()


def test_kept_count_rounds_half_up() -> None:
    assert [kept_count(4, p) for p in (0, 10, 12.5, 50, 62.5, 90, 99)] == [4, 4, 3, 2, 1, 0, 0]
    assert kept_count(10, 85) == 10 - 9  # 8.5 rounds up to 9
    assert kept_count(128, 90) == 128 - 115


def test_react_by_hand() -> None:
    react = _fit("react", percentile=50)
    # the 50th percentile of 0..7 with linear interpolation is 3.5
    assert react.state_dict()["clip"].item() == pytest.approx(3.5)
    h = [5.0, 1.0, 0.0, 2.0]
    assert _score(react, h) == pytest.approx(_energy([3.5, 1.0, 0.0, 2.0]), rel=1e-6)
    # percentile 100 clips at the largest train activation (7): nothing below it changes -> energy
    full = _fit("react", percentile=100)
    assert full.state_dict()["clip"].item() == 7.0
    assert _score(full, h) == pytest.approx(_energy(h), rel=1e-6)


def test_ash_by_hand() -> None:
    # p = 50 of 4 units keeps the 2 largest: 3 (unit 0) and 2 (unit 3); s1 = 6, s2 = 5
    assert _score(_fit("ash_p", percentile=50), H) == pytest.approx(_energy([3, 0, 0, 2]), rel=1e-6)
    assert _score(_fit("ash_b", percentile=50), H) == pytest.approx(_energy([3, 0, 0, 3]), rel=1e-6)
    e = math.exp(6 / 5)
    assert _score(_fit("ash_s", percentile=50), H) == pytest.approx(_energy([3 * e, 0, 0, 2 * e]), rel=1e-6)


def test_scale_by_hand() -> None:
    # the ASH-S factor exp(s1 / s2) = exp(6 / 5) on the whole, unpruned h
    e = math.exp(6 / 5)
    assert _score(_fit("scale", percentile=50), H) == pytest.approx(_energy([v * e for v in H]), rel=1e-6)


def test_dice_by_hand() -> None:
    # mean train feature (2, 3, 4, 5): contributions W * mean =
    # [[2, 6, 2, 7.5], [0.5, 3.75, 3, -5]]; sparsity 50 keeps the 4 largest: 7.5, 6, 3.75, 3
    dice = _fit("dice", sparsity=50)
    masked = [[0.0, 2.0, 0.0, 1.5], [0.0, 1.25, 0.75, 0.0]]
    torch.testing.assert_close(dice.state_dict()["weight"], torch.tensor(masked))
    logits = [sum(w * x for w, x in zip(row, H, strict=True)) + b for row, b in zip(masked, B, strict=True)]
    assert _score(dice, H) == pytest.approx(math.log(sum(math.exp(v) for v in logits)), rel=1e-6)


@pytest.mark.parametrize(("name", "params"), [("ash_p", {"percentile": 0}), ("dice", {"sparsity": 0})])
def test_no_pruning_is_energy(name: str, params: dict) -> None:
    gen = torch.Generator().manual_seed(0)
    h = torch.rand(16, 4, generator=gen) * 3
    expected = energy(h @ LAYER.weight.T + LAYER.bias).numpy()
    np.testing.assert_allclose(_fit(name, **params)(None, h).numpy(), expected, rtol=1e-6)


def test_scale_and_ash_s_agree_without_pruning() -> None:
    """With p = 0 nothing is pruned, s1 = s2, and both multiply every activation by e."""
    h = torch.rand(16, 4, generator=torch.Generator().manual_seed(1)) * 3
    scale, ash_s = _fit("scale", percentile=0)(None, h), _fit("ash_s", percentile=0)(None, h)
    np.testing.assert_allclose(scale.numpy(), ash_s.numpy(), rtol=1e-6)
    np.testing.assert_allclose(
        scale.numpy(), energy(math.e * h @ LAYER.weight.T + LAYER.bias).numpy(), rtol=1e-6
    )


def test_all_zero_activations_score_the_bias_energy() -> None:
    zero = torch.zeros(1, 4)
    for name in ("ash_p", "ash_b", "ash_s", "scale"):
        assert _fit(name)(None, zero).item() == pytest.approx(_energy([0, 0, 0, 0]), rel=1e-6), name


def test_layer_scores_check_their_inputs() -> None:
    with pytest.raises(ValueError, match=r"needs the final linear layer: fit\(\.\.\., layer=final_layer"):
        build_score("react").fit(TRAIN, None)
    with pytest.raises(ValueError, match="takes 4-dimensional features, got 3"):
        build_score("react").fit(torch.zeros(2, 3), None, layer=LAYER)
    with pytest.raises(ValueError, match=r"percentile must be in \[0, 100\)"):
        build_score("ash_p", percentile=100)
    with pytest.raises(ValueError, match=r"react percentile must be in \[0, 100\]"):
        build_score("react", percentile=101)
    with pytest.raises(ValueError, match="fitted on 4-dimensional features, got 5"):
        _fit("scale")(None, torch.zeros(2, 5))
