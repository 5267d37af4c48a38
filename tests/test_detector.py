"""The detector artifact: save/load round trip, predict on PIL and tensors, clear errors on damage."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oodforge.backbones import BackboneConfig, build_classifier
from oodforge.data.transforms import Preprocess
from oodforge.detector import ArtifactError, ClassifierDetector, Detector, calibrate, score_histogram
from oodforge.scores import build_score

TINY = {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]}


@pytest.fixture(scope="module")
def detector() -> Detector:
    torch.manual_seed(0)
    model = build_classifier(BackboneConfig(options=TINY), num_classes=3).eval()
    bank = torch.randn(40, 16)
    score = build_score("knn", k=5).fit(bank, torch.arange(40) % 3)
    return ClassifierDetector.create(
        name="tiny",
        model=model,
        score=score,
        preprocess=Preprocess(),
        class_names=["a", "b", "c"],
        val_scores=np.full(10, -1.0),
    )


def images(n: int = 5) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def test_round_trip_gives_identical_scores(detector: Detector, tmp_path: Path) -> None:
    path = detector.save(tmp_path / "det")
    assert sorted(p.name for p in path.iterdir()) == ["detector.json", "model.safetensors"]
    loaded = Detector.load(path)
    a, b = detector.predict(images()), loaded.predict(images())
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert loaded.threshold == -1.0 and loaded.class_names == ["a", "b", "c"]
    spec = json.loads((path / "detector.json").read_text())
    assert spec["score"] == {"name": "knn", "params": {"k": 5}}
    assert spec["threshold"] == -1.0 and spec["kind"] == "classifier" and spec["format_version"] == 2
    assert spec["calibration"]["target_id_tpr"] == 0.95 and spec["calibration"]["split"] == "val"
    assert "torch" in spec["provenance"]["versions"]


def test_predict_outputs_are_consistent(detector: Detector) -> None:
    out = detector.predict(images(4))
    assert out.scores.shape == (4,) and out.is_ood.dtype == bool
    np.testing.assert_array_equal(out.is_ood, out.scores < detector.threshold)
    assert np.all((out.confidences > 0) & (out.confidences <= 1))
    assert set(out.label_names()) <= {"a", "b", "c"}


def test_tensor_and_pil_inputs_agree(detector: Detector) -> None:
    ims = images(3)
    as_tensor = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in ims])
    np.testing.assert_allclose(
        detector.predict(ims).scores, detector.predict(as_tensor).scores, rtol=1e-5, atol=1e-5
    )


def test_other_sizes_and_modes_are_converted(detector: Detector) -> None:
    grey = Image.fromarray(np.full((50, 70), 128, dtype=np.uint8), mode="L")
    rgba = Image.new("RGBA", (20, 20), (10, 200, 30, 128))
    assert detector.predict([grey, rgba]).scores.shape == (2,)


def test_tampered_weights_are_refused(detector: Detector, tmp_path: Path) -> None:
    path = detector.save(tmp_path / "det")
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        Detector.load(path)


def test_missing_and_broken_files(detector: Detector, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="does not exist"):
        Detector.load(tmp_path / "nowhere")
    path = detector.save(tmp_path / "det")
    (path / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match="model.safetensors is missing"):
        Detector.load(path)
    path = detector.save(tmp_path / "det2")
    (path / "detector.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        Detector.load(path)
    path = detector.save(tmp_path / "det3")
    spec = json.loads((path / "detector.json").read_text())
    del spec["threshold"]
    (path / "detector.json").write_text(json.dumps(spec))
    with pytest.raises(ArtifactError, match="threshold"):
        Detector.load(path)


def test_artifact_without_head_config_loads_as_linear(detector: Detector, tmp_path: Path) -> None:
    """detector.json written before heads were configurable has no ``head``: it is the linear head."""
    path = detector.save(tmp_path / "det")
    spec = json.loads((path / "detector.json").read_text())
    assert spec["head"].pop("head") == {"name": "linear", "tau": 0.1, "embed_dim": None}
    (path / "detector.json").write_text(json.dumps(spec))
    loaded = Detector.load(path)
    assert loaded.head.head.name == "linear"
    np.testing.assert_array_equal(loaded.predict(images()).scores, detector.predict(images()).scores)


def test_save_replaces_atomically(detector: Detector, tmp_path: Path) -> None:
    path = detector.save(tmp_path / "det")
    detector.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["det"]
    Detector.load(path)


def test_the_calibration_scores_histogram_is_stored_and_old_artifacts_load_without_it(
    detector: Detector, tmp_path: Path
) -> None:
    rng = np.random.default_rng(3)
    val = np.concatenate([rng.normal(size=200), [np.nan]])  # a non-finite score is left out of the bins
    calibrated = ClassifierDetector(detector.model, detector.score, detector.spec.model_copy())
    threshold, calibrated.spec.calibration = calibrate(val[np.isfinite(val)], 0.9)
    path = calibrated.save(tmp_path / "det")
    stored = json.loads((path / "detector.json").read_text())["calibration"]["histogram"]
    expected_counts, expected_edges = np.histogram(val[:200], bins=40)
    assert stored["counts"] == expected_counts.tolist() and sum(stored["counts"]) == 200
    np.testing.assert_allclose(stored["edges"], expected_edges)
    assert stored["edges"][0] == val[:200].min() and stored["edges"][-1] == val[:200].max()
    assert "histogram" not in Detector.load(path).describe()["threshold"]  # describe() stays small
    assert score_histogram(val).counts == stored["counts"]  # nan dropped
    assert score_histogram(np.full(5, 2.0)).model_dump() == {"edges": [1.5, 2.5], "counts": [5]}
    assert score_histogram(np.array([np.inf])) is None
    spec = json.loads((path / "detector.json").read_text())
    del spec["calibration"]["histogram"]  # as written before the histogram existed
    (path / "detector.json").write_text(json.dumps(spec))
    assert Detector.load(path).spec.calibration.histogram is None
