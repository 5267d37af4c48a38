"""ODIN against its formula on a hand-built linear "image" model, and an ODIN detector end to end."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from oodforge.backbones import BackboneConfig, build_classifier
from oodforge.data.transforms import Preprocess
from oodforge.detector import ClassifierDetector, Detector
from oodforge.scores import build_score, msp, odin

TINY = {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]}


def _linear_model() -> nn.Module:
    """Logits ``A x`` of a 1-channel, 1x2 "image" x, with A = [[1, 2], [-1, 1]]."""
    fc = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[1.0, 2.0], [-1.0, 1.0]]))
    return nn.Sequential(nn.Flatten(), fc).eval()


def _softmax_max(logits: list[float], t: float) -> float:
    exps = [math.exp(v / t) for v in logits]
    return max(exps) / sum(exps)


def test_odin_by_hand() -> None:
    # x = (1, 0): f = (1, -1), ŷ = 0. ∇_x(-log S_0) = Aᵀ(p - e_0) / T = Aᵀ(-p_1, p_1) / T = (-2p_1, -p_1) / T,
    # so sign = (-1, -1) and x̃ = x + ε/σ · (1, 1) = (1.2, 0.2) for ε = 0.1, σ = 0.5: f̃ = (1.6, -1.0)
    x = torch.tensor([[[[1.0, 0.0]]]])
    got = odin(_linear_model(), x, temperature=2.0, epsilon=0.1, input_std=[0.5])
    assert got.item() == pytest.approx(_softmax_max([1.6, -1.0], 2.0), rel=1e-6)
    # without the pre-processing's σ the step is ε itself: x̃ = (1.1, 0.1), f̃ = (1.3, -1.0)
    got = build_score("odin", temperature=2.0, epsilon=0.1).score_pixels(_linear_model(), x)
    assert got.item() == pytest.approx(_softmax_max([1.3, -1.0], 2.0), rel=1e-6)


def test_odin_without_perturbation_is_tempered_msp() -> None:
    model = _linear_model()
    x = torch.randn(6, 1, 1, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = msp(model(x) / 10.0)
    np.testing.assert_allclose(
        odin(model, x, temperature=10.0, epsilon=0.0).numpy(), expected.numpy(), rtol=1e-6
    )


def test_odin_needs_pixels_not_outputs() -> None:
    score = build_score("odin")
    assert score.needs_grad and score.params() == {"temperature": 1000.0, "epsilon": 0.0014}
    with pytest.raises(TypeError, match="needs input gradients.*score_pixels"):
        score(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"odin epsilon must be in \[0, 1\]"):
        build_score("odin", epsilon=-0.1)


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def test_an_odin_detector_scores_with_gradients_when_served(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_classifier(BackboneConfig(options=TINY), 3).eval()
    score = build_score("odin", temperature=100.0, epsilon=0.01)
    pre = Preprocess(mean=(0.5, 0.4, 0.3), std=(0.5, 0.25, 0.2))
    detector = ClassifierDetector.create(
        name="odin", model=model, score=score, preprocess=pre, class_names=["a", "b", "c"],
        val_scores=np.linspace(0.3, 0.4, 20),
    )  # fmt: skip
    loaded = Detector.load(detector.save(tmp_path / "odin"))
    images = _images(5)
    out = loaded.predict(images)  # under Detector.predict's no_grad: gradients are enabled locally
    pixels = loaded.pixels(images)
    expected = odin(loaded.model, pixels, 100.0, 0.01, input_std=pre.std).numpy()
    np.testing.assert_allclose(out.scores, expected, rtol=1e-6)
    np.testing.assert_allclose(loaded.predict(images, batch_size=2).scores, out.scores, rtol=1e-5)
    with torch.no_grad():
        logits, _ = loaded.model(pixels)
    np.testing.assert_array_equal(out.labels, logits.argmax(dim=1).numpy())  # unperturbed predictions
    assert not any(p.grad is not None for p in loaded.model.parameters())  # no gradient left on the weights
