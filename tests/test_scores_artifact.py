"""Every score survives the detector artifact (same scores after save + load), and the final-layer accessor
refuses heads that are not ``W h + b`` with an error that names the head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from oodforge.backbones import BackboneConfig, HeadConfig, build_classifier, final_layer
from oodforge.data import ArrayImageSet
from oodforge.data.transforms import Preprocess
from oodforge.detector import ClassifierDetector, Detector
from oodforge.scores import SCORES, build_score
from trainer.classifier_eval import collect, expand_scores, fit_scores

TINY = {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]}
PARAMS = {"knn": {"k": 5}, "nnguide": {"k": 5}, "vim": {"dim": 8}}
ONE_PASS = [n for n in SCORES if not SCORES.get(n).needs_grad]
FITTED = [n for n in ONE_PASS if SCORES.get(n).needs_fit or SCORES.get(n).needs_layer]
LAYER_SCORES = sorted(n for n in SCORES if SCORES.get(n).needs_layer)
pytestmark = pytest.mark.filterwarnings("ignore:she. no correctly classified")


def _images(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_classifier(BackboneConfig(options=TINY), 3).eval()


@pytest.fixture(scope="module")
def train(model):
    pixels = np.random.default_rng(1).integers(0, 255, (60, 32, 32, 3), dtype=np.uint8)
    images = ArrayImageSet("train", pixels, np.arange(60) % 3)
    return collect(model, images, Preprocess(), batch_size=16)


def test_final_layer_is_the_linear_head(model) -> None:
    layer = final_layer(model)
    torch.testing.assert_close(layer.weight, model.head.weight.detach())
    torch.testing.assert_close(layer.bias, model.head.bias.detach())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        logits, features = model(x)
    torch.testing.assert_close(layer(features), logits, rtol=1e-5, atol=1e-5)
    assert (layer.num_classes, layer.feature_dim) == (3, model.feature_dim)


@pytest.mark.parametrize("name", FITTED)
def test_fitted_score_round_trips_through_the_artifact(name: str, model, train, tmp_path: Path) -> None:
    (score,) = fit_scores([name], PARAMS, train).values()
    val = score(train.logits, train.features).numpy()
    detector = ClassifierDetector.create(
        name=name,
        model=model,
        score=score,
        preprocess=Preprocess(),
        class_names=["a", "b", "c"],
        val_scores=val,
    )
    path = detector.save(tmp_path / name)
    weights = load_file(path / "model.safetensors")
    assert {k[len("score.") :] for k in weights if k.startswith("score.")} == set(score.state_dict())
    loaded = Detector.load(path)  # verifies the checksum, which covers the score's statistics
    assert loaded.spec.score.params == score.params() and loaded.threshold == detector.threshold
    test = _images(7, 2)
    served = loaded.predict(test).scores
    np.testing.assert_array_equal(served, detector.predict(test).scores)
    with torch.no_grad():
        logits, features = model(loaded.pixels(test))
    np.testing.assert_allclose(served, score(logits, features).numpy(), rtol=1e-6)


@pytest.mark.parametrize("name", ONE_PASS)
def test_state_dict_round_trip_of_every_score(name: str, train) -> None:
    (score,) = fit_scores([name], PARAMS, train).values()
    state = score.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert bool(state) == score.needs_fit, name
    restored = build_score(name, **score.params())
    restored.load_state_dict({k: v.clone() for k, v in state.items()})
    torch.testing.assert_close(restored(train.logits, train.features), score(train.logits, train.features))
    if state:
        key = next(iter(state))
        with pytest.raises(ValueError, match=f"missing \\['{key}'\\]"):
            build_score(name, **score.params()).load_state_dict({k: v for k, v in state.items() if k != key})


@pytest.mark.parametrize("head", ["cosine", "isomax_plus"])
def test_layer_scores_name_the_head_that_cannot_serve_them(head: str, train) -> None:
    cfg = BackboneConfig(options=TINY, head=HeadConfig(name=head))
    anchors = torch.randn(3, 12) if head == "cosine" else None
    other = build_classifier(cfg, 3, anchors=anchors).eval()
    message = (
        f"score 'react' needs a linear final layer (W h + b), but this classifier has a {head} head "
        f"(model.head.name={head}); use a logit score (msp, energy, ...) or a feature score (knn, mahalanobis)"
    )
    with pytest.raises(ValueError) as err:
        final_layer(other, needed_by="react")
    assert str(err.value) == message
    outputs = collect(other, train.source.images, Preprocess(), batch_size=32)
    with pytest.raises(ValueError) as err:
        fit_scores(["react"], {}, outputs)
    assert str(err.value) == message
    names, skipped = expand_scores(["all"], other)
    assert sorted(skipped) == LAYER_SCORES
    assert all(f"has a {head} head" in reason for reason in skipped.values())
    assert set(names) == set(SCORES) - set(LAYER_SCORES)
    fitted = fit_scores(["all"], PARAMS, outputs)  # every score it can serve, fitted
    assert "knn" in fitted and "vim" not in fitted and "odin" in fitted
