"""One detector contract: a third kind defined here plugs in without touching any other file; format-1
artifacts still load with the scores they gave; the import graph has no cycles."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from import_graph import cycles, graph
from PIL import Image
from serving import png_bytes, running_server
from torch import nn

from api.app import create_app
from api.settings import load_settings
from oodforge.artifacts import prefixed
from oodforge.config import StrictModel
from oodforge.data.transforms import Preprocess
from oodforge.detector import (
    KINDS,
    ArtifactError,
    ClassifierDetector,
    DenseDetector,
    Detector,
    DetectorSpec,
    Prediction,
    ScoreSpec,
    calibrate,
    make_spec,
    register_kind,
)

HERE = Path(__file__).resolve().parent
V1 = HERE / "data" / "v1"


# ------------------------------------------------------------------ a toy third kind, in this file only
class BrightnessHead(StrictModel):
    """The toy kind's own spec section."""

    gain: float


class Brightness(nn.Module):
    """score = gain_param · mean pixel value: brighter images are 'more ID'."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x.mean(dim=(1, 2, 3))


@register_kind("toy-brightness")
class BrightnessDetector(Detector):
    """A detector kind that no file outside this test knows."""

    Head = BrightnessHead

    @torch.no_grad()
    def predict_pixels(self, pixel_values: torch.Tensor) -> Prediction:
        scores = (self.head.gain * self.model(pixel_values.to(self.device))).double().cpu().numpy()
        return Prediction(scores=scores, is_ood=scores < self.threshold, class_names=self.class_names)

    def describe_score(self) -> dict[str, Any]:
        return {**super().describe_score(), "gain": self.head.gain}

    @classmethod
    def from_parts(
        cls, spec: DetectorSpec, tensors: dict[str, torch.Tensor], device: str | torch.device
    ) -> BrightnessDetector:
        model = Brightness()
        model.load_state_dict(prefixed(tensors, "model"), strict=True)
        return cls(model, spec, device=device)


def toy_images() -> list[Image.Image]:
    return [Image.new("RGB", (20, 30), (v, v, v)) for v in (10, 120, 250)]


def export_toy(path: Path) -> Path:
    model = Brightness()
    with torch.no_grad():
        model.weight.fill_(2.0)
    pre = Preprocess(size=16)
    pixels = torch.stack([pre(im) for im in toy_images()])
    with torch.no_grad():
        threshold, calibration = calibrate(model(pixels).numpy() * 0.5, 0.3)  # accepts the brightest
    spec = make_spec(
        kind="toy-brightness",
        name="toy",
        preprocess=pre,
        class_names=["bright"],
        score=ScoreSpec(name="brightness"),
        threshold=threshold,
        calibration=calibration,
        head=BrightnessHead(gain=0.5),
    )
    return BrightnessDetector(model, spec).save(path)


def test_a_new_kind_exports_loads_and_predicts(tmp_path: Path) -> None:
    path = export_toy(tmp_path / "toy")
    spec = json.loads((path / "detector.json").read_text())
    assert spec["kind"] == "toy-brightness" and spec["head"] == {"gain": 0.5}
    loaded = Detector.load(path)
    assert type(loaded) is BrightnessDetector and KINDS.get("toy-brightness") is BrightnessDetector
    out = loaded.predict(toy_images())
    # hand computation: pixels in [-1, 1] after (x/255 - 0.5)/0.5; score = 0.5 * 2 * mean
    expected = [v / 127.5 - 1 for v in (10, 120, 250)]
    np.testing.assert_allclose(out.scores, expected, rtol=1e-5)
    assert out.is_ood.tolist() == [True, True, False] and out.labels is None
    assert out.label_names() == [None, None, None]
    about = loaded.describe()
    assert about["kind"] == "toy-brightness" and about["score"] == {
        "name": "brightness",
        "params": {},
        "gain": 0.5,
    }
    assert about["threshold"]["value"] == loaded.threshold and about["input"]["shape"] == [3, 16, 16]
    with pytest.raises(ArtifactError, match="is a toy-brightness detector, not a classifier"):
        ClassifierDetector.load(path)


def test_a_new_kind_is_served(tmp_path: Path) -> None:
    """Served in-process (the kind registered by this module) next to a format-1 classifier."""
    root = tmp_path / "served"
    export_toy(root / "toy" / "detector")
    shutil.copytree(V1 / "classifier_knn", root / "ce" / "detector")
    settings = load_settings(environ={}, overrides=[f"detectors_dir={root}", "default_detector=toy"])
    with TestClient(create_app(settings)) as client:
        info = client.get("/detectors/toy").json()
        assert info["kind"] == "toy-brightness" and not info["has_maps"] and not info["has_labels"]
        files = [("files", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(toy_images())]
        body = client.post("/score", files=files).json()
        refused = client.post("/score?maps=true", files=files[:1])
    results = body["results"]
    np.testing.assert_allclose(
        [r["score"] for r in results], [v / 127.5 - 1 for v in (10, 120, 250)], rtol=1e-5
    )
    assert [r["is_ood"] for r in results] == [True, True, False]
    assert all(r["label"] is None and r["confidence"] is None for r in results)
    assert refused.status_code == 400 and "no per-pixel maps" in refused.json()["detail"]


def test_a_plugin_kind_is_served_by_a_real_server(tmp_path: Path) -> None:
    """``OODFORGE_PLUGINS`` names the module that registers the kind (here: this test module)."""
    root = tmp_path / "served"
    export_toy(root / "toy" / "detector")
    env = {
        "OODFORGE_DETECTORS_DIR": str(root),
        "OODFORGE_PLUGINS": "test_detector_contract",
        "PYTHONPATH": str(HERE),
    }
    with running_server(env, tmp_path / "server.log") as server, server.client() as client:
        files = [("files", ("x.png", png_bytes(toy_images()[2]), "image/png"))]
        result = client.post("/score", files=files).json()["results"][0]
    assert result["is_ood"] is False and result["score"] == pytest.approx(250 / 127.5 - 1, rel=1e-5)


def test_a_plugin_kind_loads_in_any_command(tmp_path: Path) -> None:
    """``OODFORGE_PLUGINS`` is read by ``Detector.load`` itself: a fresh process (no server) predicts."""
    import subprocess
    import sys

    path = export_toy(tmp_path / "toy")
    code = (
        "import numpy as np; from PIL import Image; from oodforge.detector import Detector; "
        f"d = Detector.load({str(path)!r}); "
        "print(d.kind, float(d.predict([Image.new('RGB', (16, 16), (250, 250, 250))]).scores[0]))"
    )
    env = {**os.environ, "OODFORGE_PLUGINS": "test_detector_contract", "PYTHONPATH": str(HERE)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kind, score = proc.stdout.split()
    assert kind == "toy-brightness" and float(score) == pytest.approx(250 / 127.5 - 1, rel=1e-5)


def test_an_unknown_kind_says_what_to_do(tmp_path: Path) -> None:
    path = export_toy(tmp_path / "toy")
    spec = json.loads((path / "detector.json").read_text())
    spec["kind"] = "never-registered"
    (path / "detector.json").write_text(json.dumps(spec))
    with pytest.raises(ArtifactError, match="unknown detector kind 'never-registered'.*OODFORGE_PLUGINS"):
        Detector.load(path)


# ------------------------------------------------------------------ format-1 artifacts
@pytest.mark.parametrize("name", ["classifier_knn", "classifier_cosine", "dense"])
def test_format_1_artifacts_load_with_the_scores_they_gave(name: str) -> None:
    """tests/data/v1 was exported by the code before the one contract (commit 'tests/data/v1: ...')."""
    expected = json.loads((V1 / "expected.json").read_text())[name]
    probes = [Image.open(V1 / f"probe_{i}.png") for i in range(4)]
    detector = Detector.load(V1 / name)
    assert json.loads((V1 / name / "detector.json").read_text()).get("format_version") == 1
    out = detector.predict(probes)
    # the dense scores are pooled JS distances near 0 (~7e-5): the segmenter's float sums differ across CPU
    # kernels by ~1e-6 absolute (expected.json was made on an AMD EPYC; an Intel Xeon gives up to 1.2e-6 off)
    atol = 1e-5 if name == "dense" else 1e-9
    np.testing.assert_allclose(out.scores, expected["scores"], rtol=1e-6, atol=atol)
    assert detector.threshold == expected["threshold"] and detector.spec.calibration.split == "val"
    if name == "dense":
        assert isinstance(detector, DenseDetector)
        np.testing.assert_allclose([m.mean() for m in out.maps], expected["map_mean"], rtol=1e-5)
    else:
        assert out.labels.tolist() == expected["labels"]


def test_a_format_1_artifact_re_exports_as_format_2(tmp_path: Path) -> None:
    detector = Detector.load(V1 / "classifier_knn")
    path = detector.save(tmp_path / "again")
    spec = json.loads((path / "detector.json").read_text())
    assert spec["format_version"] == 2 and set(spec["head"]) == {"backbone", "head"}
    np.testing.assert_array_equal(
        Detector.load(path).predict(toy_images()).scores, detector.predict(toy_images()).scores
    )


def test_a_broken_format_1_artifact_says_how_to_re_export(tmp_path: Path) -> None:
    shutil.copytree(V1 / "classifier_knn", tmp_path / "old")
    spec = json.loads((tmp_path / "old" / "detector.json").read_text())
    del spec["backbone"]
    (tmp_path / "old" / "detector.json").write_text(json.dumps(spec))
    with pytest.raises(ArtifactError, match="re-export"):
        Detector.load(tmp_path / "old")


# ------------------------------------------------------------------ the import graph
def test_the_packages_import_each_other_without_cycles() -> None:
    edges = graph()
    assert len(edges) > 50 and "oodforge.detector.base" in edges
    assert cycles(edges) == []


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert cycles(edges) == [["a", "b", "c"]]
