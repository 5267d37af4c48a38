"""Dense detectors through a real uvicorn process: served beside a classifier, with opt-in anomaly maps."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from serving import detectors_dir, metric_value, png_bytes, run_batcher, running_server

from oodforge.data.transforms import Preprocess
from oodforge.dense import PoolingSpec
from oodforge.detector import (
    MAP_ENCODING,
    Calibration,
    DenseDetector,
    DenseHead,
    Prediction,
    ScoreSpec,
    anomaly_png,
    make_spec,
)
from oodforge.segmenters import SegmenterConfig, build_segmenter

SEG_CLASSES = ["background", "0", "1", "2", "3", "4", "5"]
WIDE = (50, 70)  # (height, width) of the first test image: not square
LARGE = (120, 160)  # more output pixels than api.maps.INLINE_MAP_PIXELS: encoded in the threadpool


def scene(seed: int, size: tuple[int, int]) -> Image.Image:
    """An RGB image of ``size`` = (height, width): a smooth gradient with noise, so maps vary in space."""
    rng = np.random.default_rng(seed)
    h, w = size
    ramp = np.linspace(0, 255, w)[None, :, None] * np.linspace(0.2, 1.0, h)[:, None, None]
    pixels = np.clip(ramp + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def save_dense(path: Path, images: list[Image.Image]) -> Path:
    """A tiny dense detector whose map range and threshold are calibrated on ``images``.

    The display range spans the images' pixel scores (so the PNGs use the grey levels) and the image
    threshold falls between the first two images' scores (one verdict each way).
    """
    torch.manual_seed(0)
    seg = build_segmenter(SegmenterConfig(name="fcn-tiny", options={"widths": [8, 8, 8]}), len(SEG_CLASSES))

    def spec(threshold: float, map_range: tuple[float, float]):
        head = DenseHead(
            segmenter=seg.architecture(),
            pooling=PoolingSpec(),
            pixel_threshold=threshold,
            map_range=map_range,
        )
        return make_spec(
            kind="dense",
            name="dense",
            preprocess=Preprocess(size=64),
            class_names=SEG_CLASSES,
            score=ScoreSpec(name="js"),
            threshold=threshold,
            calibration=Calibration(n_samples=len(images)),
            head=head,
        )

    raw = DenseDetector(seg, spec(0.0, (0.0, 1.0))).predict(images)
    lo, hi = np.quantile(raw.maps, [0.05, 0.95])
    threshold = float(raw.scores[:2].mean())
    return DenseDetector(seg, spec(threshold, (float(lo), float(hi)))).save(path)


@pytest.fixture(scope="module")
def served(ood_assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dense")
    images = [scene(0, WIDE), scene(1, LARGE), scene(2, (64, 64))]
    dense = save_dense(tmp / "artifacts" / "dense", images)
    root = detectors_dir(tmp / "served", {"ce": ood_assets.ce, "dense": dense})
    env = {"OODFORGE_DETECTORS_DIR": str(root), "OODFORGE_BATCHING__MAX_WAIT_MS": "20"}
    with running_server(env, tmp / "server.log") as server:
        yield server, DenseDetector.load(root / "dense" / "detector")


def files(*images: tuple[str, Image.Image]) -> dict:
    return {"files": [("files", (name, png_bytes(im), "image/png")) for name, im in images]}


def map_pixels(anomaly_map: dict) -> np.ndarray:
    """The map's PNG as a uint8 array; checks it is 8-bit grey at the size the map declares."""
    png = Image.open(io.BytesIO(base64.b64decode(anomaly_map["png_base64"])))
    assert png.format == "PNG" and png.mode == "L"
    assert [png.height, png.width] == anomaly_map["shape"]
    return np.asarray(png)


def resized(score_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    x = torch.from_numpy(score_map)[None, None]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


# ------------------------------------------------------------------ listing
def test_both_kinds_are_listed(served):
    server, detector = served
    with server.client() as client:
        listing = client.get("/detectors").json()
        one = client.get("/detectors/dense").json()
    assert {d["detector"]["name"]: d["kind"] for d in listing["detectors"]} == {
        "ce": "classifier",
        "dense": "dense",
    }
    assert listing["default"] == "ce" and listing["failed"] == {}
    assert one["classes"] == SEG_CLASSES and one["input_size"] == 64
    assert one["score"] == {
        "name": "js",
        "pooling": {"name": "quantile", "q": 0.01},
        "pixel_threshold": detector.head.pixel_threshold,
        "map_range": list(detector.head.map_range),
    }
    assert one["threshold"]["score"] == "js" and one["threshold"]["value"] == detector.threshold
    assert one["detector"]["version"] == detector.spec.version


# ------------------------------------------------------------------ scoring with maps
def test_maps_have_each_images_size_and_the_scores_are_predicts(served):
    server, detector = served
    images = [scene(0, WIDE), scene(1, LARGE)]
    with server.client() as client:
        response = client.post(
            "/score",
            params={"detector": "dense", "maps": "true"},
            **files(("a.png", images[0]), ("b.png", images[1])),
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["detector"]["name"] == "dense" and body["threshold"]["score"] == "js"
    for image, result in zip(images, body["results"], strict=True):
        expected = detector.predict(image)
        assert result["score"] == pytest.approx(float(expected.scores[0]), abs=1e-5)
        assert result["is_ood"] == bool(expected.is_ood[0])
        assert result["label"] is None and result["confidence"] is None
        anomaly = result["map"]
        assert anomaly["shape"] == [image.height, image.width]
        assert anomaly["encoding"] == MAP_ENCODING and anomaly["pixel_score"] == "js"
        assert anomaly["range"] == list(detector.head.map_range)
        assert anomaly["pixel_threshold"] == detector.head.pixel_threshold
        pixels = map_pixels(anomaly)
        reference = Image.open(
            io.BytesIO(anomaly_png(expected.maps[0], detector.head.map_range, anomaly["shape"]))
        )
        assert np.abs(pixels.astype(int) - np.asarray(reference).astype(int)).max() <= 1
    assert {r["is_ood"] for r in body["results"]} == {True, False}  # the threshold lies between them


def test_the_map_encodes_the_scores(served):
    """PNG value = round(255 * clip((hi - score) / (hi - lo))): lower score, higher value."""
    server, detector = served
    image = scene(0, WIDE)
    with server.client() as client:
        result = client.post(
            "/score", params={"detector": "dense", "maps": True}, **files(("a.png", image))
        ).json()
    pixels = map_pixels(result["results"][0]["map"]).astype(int)
    scores = resized(detector.predict(image).maps[0], WIDE)
    lo, hi = detector.head.map_range
    formula = np.round(255 * np.clip((hi - scores) / (hi - lo), 0, 1))
    assert np.abs(pixels - formula).max() <= 1
    by_score = pixels.ravel()[np.argsort(scores.ravel(), kind="stable")]
    assert np.all(np.diff(by_score) <= 1)  # non-increasing in the score (1 level of float noise allowed)
    assert pixels.max() - pixels.min() > 128  # the calibrated range spreads the map over the grey levels


def test_json_bodies_give_the_same_maps(served):
    server, _ = served
    images = [scene(0, WIDE), scene(2, (64, 64))]
    params = {"detector": "dense", "maps": "true"}
    encoded = [base64.b64encode(png_bytes(im)).decode() for im in images]
    with server.client() as client:
        via_json = client.post(
            "/score", params=params, json={"images": encoded, "filenames": ["x", None]}
        ).json()
        via_multipart = client.post(
            "/score", params=params, **files(("x", images[0]), ("y", images[1]))
        ).json()
    assert [r["filename"] for r in via_json["results"]] == ["x", None]
    for a, b in zip(via_json["results"], via_multipart["results"], strict=True):
        assert a["score"] == pytest.approx(b["score"], abs=1e-6) and a["map"]["shape"] == b["map"]["shape"]
        assert np.abs(map_pixels(a["map"]).astype(int) - map_pixels(b["map"]).astype(int)).max() <= 1
    assert [r["map"]["shape"] for r in via_json["results"]] == [list(WIDE), [64, 64]]


def test_without_maps_there_is_no_map_and_the_body_is_small(served):
    server, detector = served
    image = scene(1, LARGE)
    with server.client() as client:
        plain = client.post("/score", params={"detector": "dense"}, **files(("a.png", image)))
        off = client.post("/score", params={"detector": "dense", "maps": "false"}, **files(("a.png", image)))
        with_map = client.post(
            "/score", params={"detector": "dense", "maps": "true"}, **files(("a.png", image))
        )
    for response in (plain, off):
        (result,) = response.json()["results"]
        assert "map" not in result and result["label"] is None and result["confidence"] is None
        assert result["score"] == with_map.json()["results"][0]["score"]
    assert len(with_map.content) > 5 * len(plain.content)


def test_concurrent_requests_get_their_own_maps(served):
    server, detector = served
    sizes = [(40 + 7 * i, 30 + 11 * i) for i in range(8)]
    images = [scene(10 + i, size) for i, size in enumerate(sizes)]

    def post(image: Image.Image) -> dict:
        with server.client() as client:
            return client.post(
                "/score", params={"detector": "dense", "maps": 1}, **files(("a.png", image))
            ).json()

    with ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(post, images))
    expected = detector.predict(images)
    for i, (image, body) in enumerate(zip(images, bodies, strict=True)):
        (result,) = body["results"]
        assert result["map"]["shape"] == [image.height, image.width]
        assert result["score"] == pytest.approx(float(expected.scores[i]), abs=1e-5)
        reference = anomaly_png(expected.maps[i], detector.head.map_range, sizes[i])
        diff = map_pixels(result["map"]).astype(int) - np.asarray(Image.open(io.BytesIO(reference))).astype(
            int
        )
        assert np.abs(diff).max() <= 1


# ------------------------------------------------------------------ classifiers are unchanged
def test_maps_on_a_classifier_are_a_400_that_says_what_to_do(served):
    server, _ = served
    image = files(("a.png", scene(0, (32, 32))))
    with server.client() as client:
        refused = client.post("/score", params={"detector": "ce", "maps": "true"}, **image)
        default = client.post("/score", params={"maps": "true"}, **image)  # the default is ce
        plain = client.post("/score", params={"detector": "ce"}, **image)
    for response in (refused, default):
        assert response.status_code == 400
        detail = response.json()["detail"]
        assert detail.startswith(
            "detector 'ce' is a classifier: it has no per-pixel maps; maps come from dense "
        )
        assert "dense" in detail.split(":", 1)[1] and "leave out maps=true" in detail
    (result,) = plain.json()["results"]
    assert "map" not in result and isinstance(result["label"], str) and 0 <= result["confidence"] <= 1


def test_metrics_count_both_kinds(served):
    server, _ = served
    with server.client() as client:
        before = client.get("/metrics").text
        client.post(
            "/score", params={"detector": "dense", "maps": "true"}, **files(("a.png", scene(3, WIDE)))
        )
        client.post(
            "/score", params={"detector": "dense"}, **files(("a", scene(4, WIDE)), ("b", scene(5, WIDE)))
        )
        client.post("/score", params={"detector": "ce"}, **files(("a.png", scene(6, WIDE))))
        client.post("/score", params={"detector": "ce", "maps": "true"}, **files(("a.png", scene(6, WIDE))))
        after = client.get("/metrics").text

    def delta(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    assert delta("oodforge_images_scored_total", detector="dense") == 3
    assert delta("oodforge_images_scored_total", detector="ce") == 1
    assert delta("oodforge_batch_size_sum", detector="dense") == 3
    assert delta("oodforge_errors_total", path="/score", status="400") == 1
    assert metric_value(after, "oodforge_errors_total", status="500") == 0


def test_the_openapi_schema_documents_maps(served):
    server, _ = served
    with server.client() as client:
        schema = client.get("/openapi.json").json()
    (maps,) = [p for p in schema["paths"]["/score"]["post"]["parameters"] if p["name"] == "maps"]
    assert maps["schema"]["type"] == "boolean" and maps["schema"]["default"] is False
    assert "anomaly map" in maps["description"] and "classifier detector answers 400" in maps["description"]
    components = schema["components"]["schemas"]
    result = components.get("ImageResult") or components["ImageResult-Output"]
    assert "map" not in result["required"] and result["properties"]["map"]["$ref"].endswith("/AnomalyMap")
    assert set(components["AnomalyMap"]["required"]) == {
        "png_base64",
        "shape",
        "encoding",
        "range",
        "pixel_threshold",
        "pixel_score",
    }
    assert "kind" in (components.get("DetectorInfo") or components["DetectorInfo-Output"])["required"]


# ------------------------------------------------------------------ the batcher on its own
def test_the_batcher_slices_maps_per_job(served):
    _, detector = served
    jobs = [
        torch.stack([detector.preprocess(scene(20 + i + j, WIDE)) for j in range(i + 1)]) for i in range(3)
    ]

    results, sizes = run_batcher(detector, jobs, max_batch_size=4)
    assert sizes == [3, 3]  # the 1- and 2-image jobs share a batch; the 3-image one would overfill it
    for pixels, result in zip(jobs, results, strict=True):
        alone = detector.predict_pixels(pixels)
        assert isinstance(result, Prediction) and result.maps.shape == (len(pixels), 64, 64)
        np.testing.assert_allclose(result.maps, alone.maps, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(result.scores, alone.scores, rtol=1e-5, atol=1e-5)


def test_slicing_and_joining_keep_every_array_field():
    whole = Prediction(
        scores=np.arange(5.0),
        is_ood=np.arange(5) % 2 == 0,
        maps=np.arange(5 * 4).reshape(5, 2, 2).astype(np.float32),
    )
    parts = [whole.rows(0, 2), whole.rows(2, 5)]
    assert [len(p.maps) for p in parts] == [2, 3]
    assert parts[0].labels is None and parts[1].label_names() == [None] * 3
    joined = Prediction.concat(parts)
    for name in ("scores", "is_ood", "maps"):
        np.testing.assert_array_equal(getattr(joined, name), getattr(whole, name))
