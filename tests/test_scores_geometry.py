"""ViM, fDBD and GradNorm against their formulas, worked out by hand; GradNorm's closed form vs autograd."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from oodforge.backbones import FinalLayer
from oodforge.scores import build_score, energy, gradnorm, vim_origin

# --------------------------------------------------------------------------- ViM

# W = I, b = (-1, -2): the origin o = -W⁺b = (1, 2); the train features around o spread along x
# (±2) more than along y (±1), so with dim = 1 the principal space is x and the residual one y
VIM_LAYER = FinalLayer(weight=torch.eye(2), bias=torch.tensor([-1.0, -2.0]))
VIM_TRAIN = torch.tensor([[3.0, 2.0], [-1.0, 2.0], [1.0, 3.0], [1.0, 1.0]])


def _vim(**params):
    logits = VIM_LAYER(VIM_TRAIN)  # h - o: (2, 0), (-2, 0), (0, 1), (0, -1)
    return build_score("vim", dim=1, **params).fit(VIM_TRAIN, None, logits=logits, layer=VIM_LAYER)


def test_vim_by_hand() -> None:
    score = _vim()
    torch.testing.assert_close(score.state_dict()["origin"], torch.tensor([1.0, 2.0], dtype=torch.float64))
    # alpha = sum of train max logits (2 + 0 + 1 + 0) / sum of residual norms |h_y - 2| (0 + 0 + 1 + 1)
    assert score.state_dict()["alpha"].item() == pytest.approx(1.5)
    h = torch.tensor([[2.0, 4.0]])  # logits (1, 2); residual norm |4 - 2| = 2
    expected = math.log(math.e**1 + math.e**2) - 1.5 * 2
    assert score(VIM_LAYER(h), h).item() == pytest.approx(expected, rel=1e-6)
    assert score.params() == {"dim": 1, "alpha": None}


def test_vim_with_alpha_zero_is_energy_and_origin_zeroes_the_logits() -> None:
    gen = torch.Generator().manual_seed(0)
    train, test = torch.randn(50, 6, generator=gen), torch.randn(9, 6, generator=gen)
    layer = FinalLayer(weight=torch.randn(3, 6, generator=gen), bias=torch.randn(3, generator=gen))
    score = build_score("vim", dim=2, alpha=0.0).fit(train, None, logits=layer(train), layer=layer)
    np.testing.assert_allclose(score(layer(test), test).numpy(), energy(layer(test)).numpy(), rtol=1e-6)
    origin = vim_origin(layer.weight, layer.bias)
    np.testing.assert_allclose(layer(origin[None].float()).numpy(), 0.0, atol=1e-5)  # K < D: full row rank
    assert (
        build_score("vim").fit(train, None, logits=layer(train), layer=layer).params()["dim"] == 3
    )  # D // 2


def test_vim_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="vim dim=2 must be below the feature width D=2"):
        build_score("vim", dim=2).fit(VIM_TRAIN, None, logits=VIM_LAYER(VIM_TRAIN), layer=VIM_LAYER)
    with pytest.raises(ValueError, match="fit needs the ID train logits"):
        build_score("vim", dim=1).fit(VIM_TRAIN, None, layer=VIM_LAYER)
    state = _vim().state_dict()
    with pytest.raises(ValueError, match="is for dim=1, but the score has dim=3"):
        build_score("vim", dim=3).load_state_dict(state)
    with pytest.raises(ValueError, match=r"'residual' must be \[D, R\] with D=2"):
        build_score("vim").load_state_dict({**state, "residual": torch.zeros(3, 1, dtype=torch.float64)})


# --------------------------------------------------------------------------- fDBD


def test_fdbd_by_hand() -> None:
    layer = FinalLayer(
        weight=torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), bias=torch.tensor([0.0, 1.0, 0.0])
    )
    train = torch.tensor([[1.0, 1.0], [-1.0, 1.0]])  # mean (0, 1)
    score = build_score("fdbd").fit(train, None, layer=layer)
    h = torch.tensor([[3.0, 1.0]])  # logits (3, 2, -3): predicted class 0
    # distances to the 0|1 and 0|2 boundaries: |(w0 - w1)·h + b0 - b1| / ‖w0 - w1‖ = 1/√2 and 6/2 = 3,
    # averaged over the K - 1 = 2 other classes, divided by ‖h - mean‖ = 3
    expected = (1 / math.sqrt(2) + 3) / 2 / 3
    assert score(layer(h), h).item() == pytest.approx(expected, rel=1e-6)
    # scaling the logits' gap and the boundary normal together changes nothing
    doubled = FinalLayer(weight=2 * layer.weight, bias=2 * layer.bias)
    score2 = build_score("fdbd").fit(train, None, layer=doubled)
    assert score2(doubled(h), h).item() == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------- GradNorm


def test_gradnorm_by_hand() -> None:
    # K = 2, logits (log 3, 0): p = (3/4, 1/4); Σ|p - 1/2| = 1/2; ‖h‖₁ = 3
    logits, h = torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([[1.0, -2.0]])
    assert gradnorm(logits, h).item() == pytest.approx(0.5 * 3, rel=1e-6)
    assert build_score("gradnorm", temperature=2.0)(logits, h).item() == pytest.approx(
        2 * abs(math.sqrt(3) / (1 + math.sqrt(3)) - 0.5) * 3 / 2, rel=1e-6
    )


@pytest.mark.parametrize("temperature", [1.0, 0.5, 4.0])
def test_gradnorm_closed_form_matches_autograd(temperature: float) -> None:
    gen = torch.Generator().manual_seed(3)
    fc = torch.nn.Linear(5, 4).double()
    h = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    expected = []
    for row in h:
        fc.zero_grad()
        log_p = F.log_softmax(fc(row[None]) / temperature, dim=1)
        uniform = torch.full_like(log_p, 1 / 4)
        kl = (uniform * (uniform.log() - log_p)).sum()  # KL(u ‖ softmax(f / T))
        kl.backward()
        expected.append(fc.weight.grad.abs().sum().item())
    with torch.no_grad():
        got = gradnorm(fc(h), h, temperature)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def test_gradnorm_needs_a_linear_layer_at_fit_but_keeps_nothing() -> None:
    with pytest.raises(ValueError, match="needs the final linear layer"):
        build_score("gradnorm").fit(torch.zeros(3, 2), None)
    score = build_score("gradnorm").fit(torch.zeros(3, 2), None, layer=VIM_LAYER)
    assert score.state_dict() == {} and score.params() == {"temperature": 1.0}
