"""Decoding in processes, through a real uvicorn server: every upload of every request is decoded in the
worker's decode process (``decode_processes=1``, ``decode_inline_bytes=0``), and the answers are those
of in-process decoding: the same scores as ``Detector.predict`` on the same bytes, the same 4xx and
message for every hostile input of ``test_api``'s matrix, and a killed decode process is replaced."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serving import detectors_dir, digit_like, png_bytes, running_server
from test_api import BAD_INPUTS, limits_env, multipart

from oodforge.detector import Detector


def children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return out


def decode_processes(pid: int) -> list[int]:
    """The server's decode processes: its children running multiprocessing's spawn entry point."""
    found = []
    for child in children(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"multiprocessing" in cmdline and b"spawn_main" in cmdline:
            found.append(child)
    return found


@pytest.fixture(scope="module")
def pooled(ood_assets, tmp_path_factory):
    root = detectors_dir(tmp_path_factory.mktemp("pooled"), {"tiny": ood_assets.ce})
    env = limits_env(root) | {
        "OODFORGE_WORKERS": "1",
        "OODFORGE_DECODE_PROCESSES": "1",
        "OODFORGE_DECODE_INLINE_BYTES": "0",
    }
    with running_server(env, tmp_path_factory.mktemp("logs") / "server.log") as server:
        yield server, Detector.load(root / "tiny" / "detector")


def _inputs() -> list[tuple[str, bytes]]:
    rgba = Image.fromarray(np.random.default_rng(3).integers(0, 255, (20, 30, 4), dtype=np.uint8), "RGBA")
    return [
        ("digit.png", png_bytes(digit_like(0))),
        ("photo.jpg", png_bytes(digit_like(1, 64), "JPEG", quality=90)),  # 64 px: decoded at 1/2 (draft)
        ("grey.png", png_bytes(digit_like(2).convert("L"))),
        ("alpha.png", png_bytes(rgba)),
    ]


def test_the_settings_are_reported_and_the_decode_process_runs(pooled):
    server, _ = pooled
    with server.client() as client:
        serving = client.get("/detectors").json()["serving"]
    cores = len(os.sched_getaffinity(0))
    assert serving == {
        "cores": cores,
        "workers": 1,
        "torch_threads": max(1, cores // 2),
        "decode_processes": 1,
        "decode_threads": 1,
    }
    assert len(decode_processes(server.process.pid)) == 1
    assert f"serving with 1 worker(s) on {cores} core(s)" in server.log_text()
    assert "1 decode process(es) per worker" in server.log_text()


def test_scores_equal_detector_predict_on_the_same_bytes(pooled):
    server, detector = pooled
    files = _inputs()
    expected = detector.predict([data for _, data in files])
    with server.client() as client:
        body = client.post("/score", **multipart(*files)).json()
    assert [r["filename"] for r in body["results"]] == [name for name, _ in files]
    np.testing.assert_array_equal([r["score"] for r in body["results"]], expected.scores)
    assert [r["label"] for r in body["results"]] == expected.label_names()
    assert [r["is_ood"] for r in body["results"]] == expected.is_ood.tolist()


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_hostile_inputs_keep_their_4xx_and_message(pooled, case):
    server, _ = pooled
    request, status, message = BAD_INPUTS[case]
    with server.client() as client:
        response = client.post("/score", **request)
        assert response.status_code == status, response.text
        assert message in response.json()["detail"]


def test_the_first_bad_image_of_a_request_is_the_one_named(pooled):
    server, _ = pooled
    files = [_inputs()[0], ("cut.png", png_bytes(digit_like(6))[:300]), ("text.txt", b"plain text")]
    with server.client() as client:
        response = client.post("/score", **multipart(*files))
    assert response.status_code == 400 and "image 1 (cut.png)" in response.json()["detail"]


def test_a_killed_decode_process_is_replaced(pooled):
    server, detector = pooled
    (victim,) = decode_processes(server.process.pid)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while victim in children(server.process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # reaped by the pool's manager thread
    name, data = _inputs()[1]
    with server.client() as client:
        response = client.post("/score", **multipart((name, data)))
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["score"] == float(detector.predict([data]).scores[0])
    assert len(decode_processes(server.process.pid)) == 1 and victim not in children(server.process.pid)
    assert "a decode process died" in server.log_text()
