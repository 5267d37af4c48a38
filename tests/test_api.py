"""The HTTP API through a real uvicorn process on localhost: scoring, bad input, auth, metrics, workers."""

from __future__ import annotations

import base64
import re
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serving import detectors_dir, digit_like, metric_value, png_bytes, running_server

from oodforge.detector import Detector

MAX_FILES = 4
MAX_BODY = 100_000
MAX_PIXELS = 64 * 64
KEYS = ("k3y-alpha-0001", "k3y-bravo-0002")


def limits_env(root: Path) -> dict[str, str]:
    return {
        "OODFORGE_DETECTORS_DIR": str(root),
        "OODFORGE_DEFAULT_DETECTOR": "tiny",
        "OODFORGE_LIMITS__MAX_FILES": str(MAX_FILES),
        "OODFORGE_LIMITS__MAX_BODY_BYTES": str(MAX_BODY),
        "OODFORGE_LIMITS__MAX_IMAGE_PIXELS": str(MAX_PIXELS),
        "OODFORGE_BATCHING__MAX_WAIT_MS": "20",
    }


@pytest.fixture(scope="module")
def served(ood_assets, tmp_path_factory):
    root = detectors_dir(
        tmp_path_factory.mktemp("served"), {"tiny": ood_assets.ce, "teacher": ood_assets.teacher}
    )
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with running_server(limits_env(root), log) as server:
        yield server, root


@pytest.fixture(scope="module")
def secured(ood_assets, tmp_path_factory):
    root = detectors_dir(tmp_path_factory.mktemp("secured"), {"tiny": ood_assets.ce})
    log = tmp_path_factory.mktemp("logs") / "secured.log"
    env = limits_env(root) | {"OODFORGE_API_KEYS": ",".join(KEYS)}
    with running_server(env, log) as server:
        yield server


def multipart(*items: tuple[str, bytes]) -> dict:
    return {"files": [("files", (name, data, "application/octet-stream")) for name, data in items]}


# ------------------------------------------------------------------ scoring
def test_one_image_scores_exactly_as_detector_predict(served):
    server, root = served
    image = digit_like(0)
    expected = Detector.load(root / "tiny" / "detector").predict([image])
    with server.client() as client:
        body = client.post("/score", **multipart(("zero.png", png_bytes(image)))).json()
    (result,) = body["results"]
    assert result["index"] == 0 and result["filename"] == "zero.png"
    assert result["score"] == float(expected.scores[0])
    assert result["is_ood"] == bool(expected.is_ood[0])
    assert result["label"] == expected.label_names()[0]
    assert result["confidence"] == pytest.approx(float(expected.confidences[0]), abs=1e-7)
    assert result["threshold"] == body["threshold"]["value"]
    assert body["detector"]["name"] == "tiny" and len(body["detector"]["version"]) == 12
    assert body["threshold"]["target_id_tpr"] == 0.95 and body["threshold"]["split"] == "val"


def test_a_batch_keeps_its_order_in_multipart_and_json(served):
    server, root = served
    images = [digit_like(seed) for seed in (1, 2, 3)]
    expected = Detector.load(root / "teacher" / "detector").predict(images)
    files = [(f"img{i}.png", png_bytes(im)) for i, im in enumerate(images)]
    encoded = [base64.b64encode(data).decode() for _, data in files]
    with server.client() as client:
        via_multipart = client.post("/score", params={"detector": "teacher"}, **multipart(*files)).json()
        via_json = client.post(
            "/score", params={"detector": "teacher"}, json={"images": encoded, "filenames": ["a", "b", "c"]}
        ).json()
    assert [r["index"] for r in via_multipart["results"]] == [0, 1, 2]
    assert [r["filename"] for r in via_multipart["results"]] == ["img0.png", "img1.png", "img2.png"]
    assert [r["filename"] for r in via_json["results"]] == ["a", "b", "c"]
    for body in (via_multipart, via_json):
        assert body["detector"]["name"] == "teacher"
        np.testing.assert_array_equal([r["score"] for r in body["results"]], expected.scores)
        assert [r["label"] for r in body["results"]] == expected.label_names()


def test_data_urls_are_accepted(served):
    server, _ = served
    data = png_bytes(digit_like(4))
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    with server.client() as client:
        plain = client.post("/score", json={"images": [base64.b64encode(data).decode()]}).json()
        as_url = client.post("/score", json={"images": [url]}).json()
    assert as_url["results"][0]["score"] == plain["results"][0]["score"]


def test_detector_listing_and_health(served):
    server, _ = served
    with server.client() as client:
        listing = client.get("/detectors").json()
        one = client.get("/detectors/teacher").json()
        assert client.get("/healthz").json() == {"status": "ok", "detectors": [], "failed": {}}
        ready = client.get("/readyz")
    assert listing["default"] == "tiny"
    assert [d["detector"]["name"] for d in listing["detectors"]] == ["teacher", "tiny"]
    assert one["classes"] == ["0", "1", "2", "3", "4", "5"] and one["score"]["name"] == "energy"
    assert one["input_size"] == 32 and one["default"] is False
    assert ready.status_code == 200 and ready.json()["detectors"] == ["teacher", "tiny"]


# ------------------------------------------------------------------ bad input
def _png_with_size(width: int, height: int) -> bytes:
    """A real PNG whose header claims ``width`` x ``height`` (a decompression bomb's calling card)."""
    data = bytearray(png_bytes(Image.new("RGB", (8, 8))))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _corrupt_png() -> bytes:
    data = bytearray(png_bytes(digit_like(5)))
    idat = data.index(b"IDAT") + 4
    data[idat + 10 : idat + 60] = bytes(50)  # zero the middle of the compressed stream
    return bytes(data)


def _truncated_jpeg() -> bytes:
    data = png_bytes(digit_like(6, 48), "JPEG")
    return data[: len(data) * 3 // 4]  # header intact, scan data cut


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), color) for color in ((255, 0, 0), (0, 0, 255))]
    return png_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)


BAD_INPUTS = {
    "not an image": (
        multipart(("notes.txt", b"this is plain text, not pixels")),
        415,
        "not a recognised image",
    ),
    "zero bytes": (multipart(("empty.png", b"")), 400, "empty"),
    "truncated": (multipart(("cut.png", png_bytes(digit_like(6))[:300])), 400, "truncated or corrupt"),
    "truncated jpeg": (
        multipart(("cut.jpg", _truncated_jpeg())),
        400,
        "truncated or corrupt",
    ),
    "corrupt": (multipart(("bad.png", _corrupt_png())), 400, "corrupt"),
    "animated": (multipart(("anim.gif", _animated_gif())), 415, "animated"),
    "above pixel limit": (
        multipart(("big.png", png_bytes(Image.new("RGB", (65, 65))))),
        413,
        "above the limit",
    ),
    "decompression bomb": (multipart(("bomb.png", _png_with_size(100_000, 100_000))), 413, "pixels"),
    "body above byte limit": (multipart(("huge.png", bytes(MAX_BODY + 1))), 413, "request body is above"),
    "too many files": (
        multipart(*[(f"{i}.png", png_bytes(digit_like(i))) for i in range(MAX_FILES + 1)]),
        413,
        "above the limit of 4",
    ),
    "far too many files": (multipart(*[(f"{i}.png", b"x") for i in range(3 * MAX_FILES)]), 413, "split it"),
    "too many json images": ({"json": {"images": ["aGk="] * (MAX_FILES + 1)}}, 413, "above the limit"),
    "bad base64": ({"json": {"images": ["not base64 at all!"]}}, 400, "not valid base64"),
    "json without images": ({"json": {"pictures": []}}, 422, "images"),
    "json that is not json": (
        {"content": b"{oops", "headers": {"content-type": "application/json"}},
        400,
        "not valid JSON",
    ),
    "no images": ({"json": {"images": []}}, 400, "no images"),
    "wrong field": ({"files": [("image", ("a.png", b"x", "image/png"))]}, 400, "field 'files'"),
    "wrong content type": (
        {"content": b"abc", "headers": {"content-type": "text/plain"}},
        415,
        "content type",
    ),
    "unknown detector": ({"params": {"detector": "nope"}, **multipart(("a.png", b"x"))}, 404, "available: "),
    "detector outside the directory": (
        {"params": {"detector": "../tiny"}, **multipart(("a.png", b"x"))},
        404,
        "unknown detector '../tiny'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_its_4xx_and_a_message(served, case):
    server, _ = served
    request, status, message = BAD_INPUTS[case]
    with server.client() as client:
        response = client.post("/score", **request)
        assert response.status_code == status, response.text
        assert message in response.json()["detail"]
        assert client.get("/healthz").status_code == 200  # still standing


def test_detector_names_cannot_leave_the_directory(served):
    server, _ = served
    with server.client() as client:
        for name in ("..", "..%2Ftiny", "%2e%2e", "tiny%2F..%2F..%2Fteacher"):
            assert client.get(f"/detectors/{name}").status_code == 404
        assert client.get("/detectors/tiny").status_code == 200


# ------------------------------------------------------------------ metrics
def test_metrics_count_what_was_sent(served):
    server, _ = served
    with server.client() as client:
        before = client.get("/metrics").text
        client.post("/score", **multipart(*[(f"{i}.png", png_bytes(digit_like(i))) for i in range(3)]))
        client.post("/score", **multipart(("x.png", png_bytes(digit_like(9)))))
        client.post("/score", **multipart(("x.txt", b"text")))
        after = client.get("/metrics").text

    def delta(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    assert delta("oodforge_images_scored_total", detector="tiny") == 4
    verdicts = delta("oodforge_verdicts_total", detector="tiny", verdict="ood") + delta(
        "oodforge_verdicts_total", detector="tiny", verdict="id"
    )
    assert verdicts == 4
    assert delta("oodforge_requests_total", path="/score", status="200") == 2
    assert delta("oodforge_errors_total", path="/score", status="415") == 1
    assert delta("oodforge_batch_size_sum", detector="tiny") == 4
    assert delta("oodforge_request_latency_seconds_count", path="/score") == 3
    assert metric_value(after, "oodforge_errors_total", status="500") == 0
    assert delta("oodforge_stage_seconds_count", stage="decode") == 2  # once per request that decoded
    assert delta("oodforge_stage_seconds_count", stage="respond") == 2
    assert (
        delta("oodforge_stage_seconds_count", stage="queue") == 2
        and delta("oodforge_stage_seconds_sum", stage="model") > 0
    )


def test_concurrent_requests_share_batches(served):
    server, _ = served
    before = server.client().get("/metrics").text
    data = png_bytes(digit_like(11))
    with server.client() as client, ThreadPoolExecutor(8) as pool:
        codes = list(
            pool.map(lambda _: client.post("/score", **multipart(("a.png", data))).status_code, range(16))
        )
    after = server.client().get("/metrics").text
    assert codes == [200] * 16
    images = metric_value(after, "oodforge_batch_size_sum", detector="tiny") - metric_value(
        before, "oodforge_batch_size_sum", detector="tiny"
    )
    batches = metric_value(after, "oodforge_batch_size_count", detector="tiny") - metric_value(
        before, "oodforge_batch_size_count", detector="tiny"
    )
    assert images == 16 and batches < 16  # at least two requests rode in one forward pass


# ------------------------------------------------------------------ auth
def test_auth_on(secured):
    image = multipart(("a.png", png_bytes(digit_like(0))))
    with secured.client() as client:
        assert client.post("/score", **image).status_code == 401
        assert client.get("/detectors").status_code == 401
        assert client.get("/detectors/tiny").status_code == 401
        wrong = client.post("/score", headers={"Authorization": "Bearer wrong-key-xyz"}, **image)
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        basic = client.post("/score", headers={"Authorization": f"Basic {KEYS[0]}"}, **image)
        assert basic.status_code == 401
        for key in KEYS:
            headers = {"Authorization": f"Bearer {key}"}
            assert client.post("/score", headers=headers, **image).status_code == 200
            assert client.get("/detectors", headers=headers).status_code == 200
        for open_path in ("/healthz", "/readyz", "/metrics"):
            assert client.get(open_path).status_code == 200
    log = secured.log_text()
    assert "POST /score" in log  # the access log is there...
    assert not any(secret in log for secret in (*KEYS, "wrong-key-xyz"))  # ...and holds no key


def test_auth_off_needs_no_header(served):
    server, _ = served
    with server.client() as client:
        assert client.post("/score", **multipart(("a.png", png_bytes(digit_like(0))))).status_code == 200


# ------------------------------------------------------------------ several workers
def test_several_workers_share_one_metrics_view(ood_assets, tmp_path):
    root = detectors_dir(tmp_path / "dets", {"tiny": ood_assets.ce})
    metrics_dir = tmp_path / "prom"
    metrics_dir.mkdir()
    env = limits_env(root) | {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    data = png_bytes(digit_like(3))
    with running_server(env, tmp_path / "workers.log", workers=2) as server:
        deadline = time.monotonic() + 60  # /readyz answers once the first worker is up; wait for the second
        while len(re.findall(r"Application startup complete", server.log_text())) < 2:
            assert time.monotonic() < deadline, server.log_text()
            time.sleep(0.2)
        with server.client() as client, ThreadPoolExecutor(6) as pool:
            codes = list(
                pool.map(lambda _: client.post("/score", **multipart(("a.png", data))).status_code, range(24))
            )
            text = client.get("/metrics").text
        pids = set(re.findall(r"Started server process \[(\d+)\]", server.log_text()))
    assert codes == [200] * 24
    assert len(pids) >= 2  # both workers came up
    assert metric_value(text, "oodforge_images_scored_total", detector="tiny") == 24
