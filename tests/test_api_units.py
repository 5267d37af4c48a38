"""The API's parts on their own: settings, image decoding, key comparison, micro-batching, detector table."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from serving import digit_like, png_bytes, run_batcher

from api.auth import key_matches
from api.batching import MicroBatcher
from api.detectors import DetectorTable, discover
from api.images import MAX_FILENAME_CHARS, InputError, decode_base64, decode_upload, short_filename
from api.multipart import MultipartError, read_multipart
from api.routes import score_body
from api.schemas import ScoreResponse
from api.settings import (
    Batching,
    Limits,
    Resources,
    decode_threads,
    env_overrides,
    inference_threads,
    load_settings,
    resources,
)
from oodforge.config import ConfigError
from oodforge.detector import Detector

# ------------------------------------------------------------------ settings


def test_environment_variables_map_to_dotted_keys():
    overrides, raw = env_overrides(
        {
            "OODFORGE_LIMITS__MAX_FILES": "8",
            "OODFORGE_DEFAULT_DETECTOR": "ce",
            "OODFORGE_API_KEYS": "yes,0123",
            "OODFORGE_SERVE_CONFIG": "x.yaml",
            "HOME": "/root",
        }
    )
    assert overrides == ["default_detector=ce", "limits.max_files=8"]
    assert raw == {"api_keys": "yes,0123"}


def test_yaml_then_environment_then_overrides(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text(
        "detectors_dir: from-yaml\ndefault_detector: a\nlimits:\n  max_files: 3\n  max_body_bytes: 10\n"
    )
    env = {
        "OODFORGE_SERVE_CONFIG": str(config),
        "OODFORGE_LIMITS__MAX_FILES": "5",
        "OODFORGE_API_KEYS": "yes, 0123 ,",
    }
    settings = load_settings(environ=env, overrides=["default_detector=b"])
    assert str(settings.detectors_dir) == "from-yaml"
    assert settings.limits.max_files == 5 and settings.limits.max_body_bytes == 10  # env wins, yaml kept
    assert settings.default_detector == "b"
    assert [k.get_secret_value() for k in settings.api_keys] == ["yes", "0123"]  # verbatim strings
    assert "0123" not in repr(settings)  # keys never print


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OODFORGE_LIMITS__MAX_FILEZ": "3"}, "unknown key 'limits.max_filez'"),
        ({"OODFORGE_LIMITS__MAX_FILES": "-1"}, "limits.max_files"),
        ({"OODFORGE_LIMITS__IMAGE_FORMATS": "[PNG, PSD]"}, "are not supported"),
        ({"OODFORGE_SERVE_CONFIG": "/nonexistent/serve.yaml"}, "does not exist"),
    ],
)
def test_wrong_settings_name_the_key(env, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(environ=env)


def test_the_shipped_serve_config_is_valid():
    settings = load_settings("configs/serve/demo.yaml", environ={})
    assert settings.default_detector == "oal" and "JPEG" in settings.limits.image_formats


# ------------------------------------------------------------------ images


def test_formats_outside_the_list_are_refused():
    data = png_bytes(digit_like(0), "BMP")
    assert decode_upload(data, "x", Limits()).size == (28, 28)
    with pytest.raises(InputError) as err:
        decode_upload(data, "x", Limits(), formats=["PNG"])  # a client-declared content type narrows them
    assert err.value.status == 415
    with pytest.raises(InputError) as err:
        decode_upload(data, "x", Limits(image_formats=["PNG"]))
    assert err.value.status == 415 and "PNG" in err.value.message


def test_base64_variants():
    assert decode_base64("aGVs\nbG8=", 0) == b"hello"
    assert decode_base64("data:image/png;base64,aGVsbG8=", 0) == b"hello"
    for bad in ("aGVsbG8", "data:image/png,aGVsbG8=", "!!!!"):
        with pytest.raises(InputError) as err:
            decode_base64(bad, 3)
        assert err.value.status == 400 and "image 3" in err.value.message


def test_pixel_limit_is_checked_before_decoding():
    data = png_bytes(Image.new("L", (50, 40)))
    assert decode_upload(data, "x", Limits(max_image_pixels=2000)).image.size == (50, 40)
    with pytest.raises(InputError) as err:
        decode_upload(data, "x", Limits(max_image_pixels=1999))
    assert err.value.status == 413 and "50x40" in err.value.message


def test_long_filenames_are_shortened_keeping_both_ends():
    assert short_filename(None) is None and short_filename("a.png") == "a.png"
    name = "x" * 3000 + "-0042.png"
    short = short_filename(name)
    assert len(short) == MAX_FILENAME_CHARS and short.startswith("xxx") and short.endswith("-0042.png")


# ------------------------------------------------------------------ multipart


def _multipart(files: list[tuple[str, bytes]], data: dict | None = None) -> tuple[str, bytes]:
    import httpx

    request = httpx.Request("POST", "http://x/", files=[("files", f) for f in files], data=data)
    return request.headers["content-type"], request.read()


async def _chunks(body: bytes, size: int = 777):
    for start in range(0, len(body), size):
        yield body[start : start + size]


def test_multipart_parts_with_very_long_filenames():
    content_type, body = _multipart([("é" * 5000 + ".png", b"\x89PNG-1"), ("b.png", b"2")], {"note": "hi"})
    parts = asyncio.run(read_multipart(content_type, _chunks(body), max_files=2))
    assert [(p.name, p.filename, p.data) for p in parts] == [
        ("note", None, b"hi"),
        ("files", "é" * 5000 + ".png", b"\x89PNG-1"),
        ("files", "b.png", b"2"),
    ]


@pytest.mark.parametrize(
    ("mangle", "max_files", "message"),
    [
        (lambda ct, body: (ct, body[: len(body) // 2]), 4, "ends before its closing boundary"),
        (lambda ct, body: ("multipart/form-data", body), 4, "no boundary"),
        (lambda ct, body: (ct, body.replace(b"form-data;", b"inline;", 1)), 4, "Content-Disposition"),
        (lambda ct, body: (ct, body), 1, "more than 1 files"),
        (lambda ct, body: (ct, b"garbage" + body), 4, "invalid multipart data"),
    ],
)
def test_malformed_multipart_says_what_is_wrong(mangle, max_files, message):
    content_type, body = mangle(*_multipart([("a.png", b"1"), ("b.png", b"2")]))
    with pytest.raises(MultipartError) as err:
        asyncio.run(read_multipart(content_type, _chunks(body), max_files=max_files))
    assert message in err.value.message
    content_type, body = _multipart([("n" * 70_000, b"1")])
    with pytest.raises(MultipartError, match="longer than 65536 bytes"):
        asyncio.run(read_multipart(content_type, _chunks(body), max_files=4))


def test_the_score_body_matches_its_schema(ood_assets):
    detector = Detector.load(ood_assets.ce)
    images = [png_bytes(digit_like(i)) for i in range(3)]
    prediction = detector.predict(images)
    body = score_body(
        "tiny", detector, [("a" * 400, images[0]), (None, images[1]), ("c", images[2])], prediction
    )
    parsed = ScoreResponse.model_validate_json(body)
    assert [r.filename for r in parsed.results] == [short_filename("a" * 400), None, "c"]
    assert [r.score for r in parsed.results] == prediction.scores.tolist()
    assert parsed.detector.name == "tiny" and parsed.threshold.value == detector.threshold


# ------------------------------------------------------------------ auth


def test_key_matches_only_exact_keys():
    keys = ["alpha", "bravo"]
    assert key_matches("alpha", keys) and key_matches("bravo", keys)
    for token in ("alph", "alphaa", "Alpha", "", "charlie"):
        assert not key_matches(token, keys)
    assert not key_matches("alpha", [])


# ------------------------------------------------------------------ micro-batching


def _pixels(detector: Detector, seeds: list[int]) -> torch.Tensor:
    return torch.stack([detector.preprocess(digit_like(s)) for s in seeds])


def test_concurrent_jobs_share_a_batch_and_get_their_own_rows(ood_assets):
    detector = Detector.load(ood_assets.ce)
    jobs = [_pixels(detector, [i, i + 10]) for i in range(6)]

    results, sizes = run_batcher(detector, jobs, max_batch_size=8)
    assert sizes == [8, 4]  # four 2-image jobs fill the first batch, the other two wait for the next
    for pixels, result in zip(jobs, results, strict=True):
        alone = detector.predict_from_outputs(*detector.forward_batch(pixels))
        np.testing.assert_allclose(result.scores, alone.scores, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(result.labels, alone.labels)


def test_a_request_larger_than_a_batch_is_split(ood_assets):
    detector = Detector.load(ood_assets.ce)
    sizes: list[int] = []
    pixels = _pixels(detector, list(range(10)))

    async def main():
        batcher = MicroBatcher(detector, Batching(max_batch_size=4, max_wait_ms=0), on_batch=sizes.append)
        await batcher.start()
        try:
            return await batcher.submit(pixels)
        finally:
            await batcher.stop()

    result = asyncio.run(main())
    assert sizes == [4, 4, 2] and len(result.scores) == 10
    whole = detector.predict_from_outputs(*detector.forward_batch(pixels))
    np.testing.assert_allclose(result.scores, whole.scores, rtol=1e-5, atol=1e-5)


def test_a_failing_batch_fails_its_requests_and_the_batcher_goes_on(ood_assets):
    detector = Detector.load(ood_assets.ce)
    good = _pixels(detector, [0])

    async def main():
        batcher = MicroBatcher(detector, Batching(max_batch_size=4, max_wait_ms=0))
        await batcher.start()
        try:
            with pytest.raises(RuntimeError):
                await batcher.submit(torch.zeros(1, 3, 5))  # wrong rank: the model raises
            return await batcher.submit(good)
        finally:
            await batcher.stop()

    assert len(asyncio.run(main()).scores) == 1


# ------------------------------------------------------------------ detector table


def test_discovery_finds_both_layouts_and_skips_links_outside(ood_assets, tmp_path):
    root = tmp_path / "dets"
    shutil.copytree(ood_assets.ce, root / "plain")
    shutil.copytree(ood_assets.ce, root / "run" / "detector")
    (root / "empty").mkdir()
    os.symlink(ood_assets.teacher, root / "escape")
    found = discover(root)
    assert sorted(found) == ["plain", "run"]
    assert found["run"].name == "detector"
    assert sorted(discover(root, ["run"])) == ["run"]


def test_a_broken_artifact_is_reported_and_the_rest_still_serve(ood_assets, tmp_path):
    root = tmp_path / "dets"
    shutil.copytree(ood_assets.ce, root / "ce")
    shutil.copytree(ood_assets.ce, root / "oal")
    (root / "oal" / "model.safetensors").write_bytes(b"broken")
    table = DetectorTable.load(load_settings(environ={}, overrides=[f"detectors_dir={root}"]))
    assert sorted(table.detectors) == ["ce"] and "checksum" in table.failed["oal"]
    assert table.default == "ce" and table.ready  # oal would be preferred, but it did not load
    pinned = DetectorTable.load(
        load_settings(environ={}, overrides=[f"detectors_dir={root}", "default_detector=oal"])
    )
    assert not pinned.ready and "oal" in pinned.failed


def test_workers_share_the_cores_among_their_torch_threads():
    settings = load_settings(environ={})
    # defaults: a worker per 4 cores; of its share of the cores, half to torch, all to decode processes
    assert resources(settings, {}, cores=2) == Resources(2, 1, 1, 2, 1)
    assert resources(settings, {}, cores=1) == Resources(1, 1, 1, 1, 1)
    assert resources(settings, {}, cores=16) == Resources(16, 4, 2, 4, 1)
    assert resources(settings, {"WEB_CONCURRENCY": "2"}, cores=2) == Resources(2, 2, 1, 1, 1)
    assert resources(settings, {"WEB_CONCURRENCY": "4"}, cores=32) == Resources(32, 4, 4, 8, 1)
    assert resources(settings, {"WEB_CONCURRENCY": "8"}, cores=2) == Resources(2, 8, 1, 1, 1)
    assert resources(settings, {"WEB_CONCURRENCY": "junk"}, cores=2).workers == 1
    pinned = load_settings(
        environ={"OODFORGE_WORKERS": "3", "OODFORGE_TORCH_THREADS": "2", "OODFORGE_DECODE_PROCESSES": "0"}
    )
    assert resources(pinned, {"WEB_CONCURRENCY": "8"}, cores=16) == Resources(16, 3, 2, 0, 1)
    assert inference_threads(pinned, {}) == 2
    assert decode_threads(load_settings(environ={"OODFORGE_DECODE_THREADS": "5"}), {}) == 5
    assert resources(settings, {}).cores == len(os.sched_getaffinity(0))  # taskset / cpusets count


def test_a_lone_request_does_not_wait_and_an_announced_one_is_waited_for(ood_assets):
    detector = Detector.load(ood_assets.ce)
    sizes: list[int] = []
    stages: list[str] = []
    one, two = _pixels(detector, [0]), _pixels(detector, [1])

    async def main():
        batcher = MicroBatcher(
            detector,
            Batching(max_batch_size=8, max_wait_ms=3000),
            on_batch=sizes.append,
            on_stage=lambda stage, seconds: stages.append(stage),
        )
        await batcher.start()
        try:
            start = time.perf_counter()
            await batcher.submit(one)  # nobody else queued or announced: runs at once
            lone = time.perf_counter() - start
            start = time.perf_counter()
            with batcher.announce():  # a request still reading its body...
                first = batcher.submit(one)
                await asyncio.sleep(0.2)  # ...keeps the open batch waiting
                second = batcher.submit(two)
            await asyncio.gather(first, second)  # and its end wakes the batch up before max_wait
            return lone, time.perf_counter() - start
        finally:
            await batcher.stop()

    lone, announced = asyncio.run(main())
    assert sizes == [1, 2]
    assert stages == ["model", "queue", "model", "queue", "queue"]  # a model time per batch, a wait per job
    assert lone < 1.0 and 0.2 <= announced < 1.5  # far below the 3 s max_wait either way


def test_the_launcher_passes_overrides_to_the_workers_and_refuses_wrong_keys():
    from api.__main__ import override_env

    assert override_env(["workers=2", "limits.max_files=8"]) == {
        "OODFORGE_WORKERS": "2",
        "OODFORGE_LIMITS__MAX_FILES": "8",
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("OODFORGE_")}
    wrong = subprocess.run(
        [sys.executable, "-m", "api", "--set", "decode_processes=-1", "--set", "limits.max_filez=3"],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )
    assert wrong.returncode != 0 and "decode_processes" in wrong.stderr and "uvicorn" not in wrong.stdout
