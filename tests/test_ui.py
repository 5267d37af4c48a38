"""/ui over HTTP: pages and static files, the detector card's histogram, the gallery's data and its guards,
auth, and every hostile input of the API's matrix sent the way the page uploads (it posts to /score)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_api import BAD_INPUTS, KEYS, limits_env
from test_images import HOSTILE
from ui_assets import N_KEPT, N_KNN, N_REJECTED, REJECT_REASON, serving_in_thread

from api.ui import STATIC
from oodforge.detector import Detector


@pytest.fixture(scope="module")
def server(ui_assets):
    with serving_in_thread(limits_env(ui_assets.detectors)) as running:
        yield running


@pytest.fixture(scope="module")
def secured(ui_assets):
    with serving_in_thread(
        limits_env(ui_assets.detectors) | {"OODFORGE_API_KEYS": ",".join(KEYS)}
    ) as running:
        yield running


def test_the_pages_and_every_file_they_load_are_served(server):
    with server.client() as client:
        for page in ("/ui", "/ui/outliers"):
            response = client.get(page)
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
            assets = re.findall(r'(?:src|href)="(/ui/static/[^"]+)"', response.text)
            assert any(a.endswith(".js") for a in assets) and any(a.endswith(".css") for a in assets)
            for asset in assets:
                assert client.get(asset).status_code == 200, asset
        assert client.get("/ui/static/../__init__.py").status_code == 404
        assert client.get("/ui/static/%2e%2e/__init__.py").status_code == 404


def test_the_page_uploads_through_score_itself():
    """The matrix below is valid for the page only because the page sends exactly this request."""
    source = (STATIC / "detector.js").read_text()
    assert "`/score?detector=${encodeURIComponent(name)}`" in source
    assert 'body.append("files", file, file.name)' in source and 'method: "POST", body' in source


def test_the_detector_card_carries_the_calibration_histogram(server, ui_assets):
    with server.client() as client:
        card = client.get("/ui/api/detectors/tiny").json()
        api_info = client.get("/detectors/tiny").json()
        old = client.get("/ui/api/detectors/old").json()
        missing = client.get("/ui/api/detectors/nope")
    counts, edges = np.histogram(ui_assets.val_scores, bins=40)
    assert card["histogram"]["counts"] == counts.tolist() and sum(card["histogram"]["counts"]) == 60
    np.testing.assert_allclose(card["histogram"]["edges"], edges)
    assert card["no_histogram"] is None and card["info"] == api_info
    detector = Detector.load(ui_assets.detectors / "tiny" / "detector")
    assert card["info"]["threshold"]["value"] == detector.threshold
    assert card["provenance"]["training"]["method"] == "oal" and card["preprocess"]["size"] == 32
    assert card["outliers"] == [{"dir": str(ui_assets.outliers), "available": True, "why": None}]
    assert old["histogram"] is None and "no histogram in this artifact" in old["no_histogram"]
    assert old["outliers"] == [] and old["info"]["threshold"]["value"] == detector.threshold
    assert missing.status_code == 404 and "available: old, tiny" in missing.json()["detail"]


def _page_request(case: dict) -> dict:
    """A matrix request as the page sends it: POST /score with ?detector=<the selected one>."""
    return {**case, "params": {"detector": "tiny", **case.get("params", {})}}


MATRIX = {f"api: {k}": v for k, v in BAD_INPUTS.items()} | {
    f"image: {k}": ({"files": {"files": (f"{k}.bin", data)}}, status, message)
    for k, (data, status, message) in HOSTILE.items()
}


@pytest.mark.parametrize("case", list(MATRIX))
def test_every_hostile_input_gets_the_same_4xx_through_the_pages_upload(server, case):
    request, status, message = MATRIX[case]
    with server.client() as client:
        through_page = client.post("/score", **_page_request(request))
        direct = client.post("/score", **request)
    assert through_page.status_code == direct.status_code == status, through_page.text
    assert message in through_page.json()["detail"]
    if "params" not in request:  # the same detector answered both: the same message
        assert through_page.json() == direct.json()


def test_the_gallery_pages_and_filters(server, ui_assets):
    base = {"dir": str(ui_assets.outliers)}
    with server.client() as client:

        def page(**params):
            response = client.get("/ui/api/outliers", params=base | params)
            assert response.status_code == 200, response.text
            return response.json()

        everything = page(per_page=200)
        pixel = page(pool="pixel", per_page=7)
        last = page(pool="pixel", per_page=7, page=99)
        rejected = page(kept="rejected")
        kept_one = page(kept="kept", source_class="1", pool="pixel")
        knn = page(pool="knn")
        datasets = client.get("/ui/api/datasets").json()
        bad_filter = client.get("/ui/api/outliers", params=base | {"kept": "maybe"})
    assert everything["total"] == N_KEPT + N_REJECTED + N_KNN and everything["pools"] == ["knn", "pixel"]
    assert (
        everything["classes"] == ["0", "1", "2"]
        and everything["card"]["counts"]["pixel"]["rejected"] == N_REJECTED
    )
    assert pixel["total"] == 40 and pixel["pages"] == math.ceil(40 / 7) and len(pixel["records"]) == 7
    assert [r["id"] for r in pixel["records"]] == [f"px-{i:04d}" for i in range(7)]
    assert last["page"] == 6 and [r["id"] for r in last["records"]] == [f"px-{i:04d}" for i in range(35, 40)]
    assert rejected["total"] == N_REJECTED
    assert all(
        not r["kept"] and r["reason"] == REJECT_REASON and not r["has_image"] for r in rejected["records"]
    )
    assert kept_one["total"] == len([i for i in range(N_KEPT) if i % 3 == 1])
    assert all(r["kept"] and r["has_image"] and r["source_class"] == 1 for r in kept_one["records"])
    assert knn["total"] == N_KNN and not any(r["has_image"] for r in knn["records"])
    assert datasets == [
        {"dir": str(ui_assets.outliers), "available": True, "why": None, "detectors": ["tiny"]}
    ]
    assert bad_filter.status_code == 422


def test_gallery_images_are_only_files_its_metadata_lists_inside_it(server, ui_assets, tmp_path):
    outliers = ui_assets.outliers
    crafted = tmp_path / "crafted"
    shutil.copytree(outliers, crafted)
    secret = tmp_path / "secret.png"
    secret.write_bytes((outliers / "images" / "px-0000.png").read_bytes())
    lines = [json.loads(line) for line in (crafted / "metadata.jsonl").read_text().splitlines()]
    escapes = {"px-0000": "../secret.png", "px-0001": "images/../../secret.png", "px-0002": str(secret)}
    for record in lines:
        record["file_name"] = escapes.get(record["id"], record["file_name"])
    (crafted / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (crafted / "images" / "px-0003.png").unlink()
    os.symlink(secret, crafted / "images" / "px-0003.png")  # listed, but its target is outside
    with server.client() as client:

        def image(directory: Path | str, record_id: str):
            return client.get("/ui/api/outliers/image", params={"dir": str(directory), "id": record_id})

        good = image(outliers, "px-0004")
        assert good.status_code == 200 and good.headers["content-type"] == "image/png"
        assert good.content == (outliers / "images" / "px-0004.png").read_bytes()
        assert "no image" in image(outliers, f"px-{N_KEPT:04d}").json()["detail"]  # rejected: no file
        for record_id in ("nope", "../card.json", "images/px-0004.png", "knn-0000"):
            assert image(outliers, record_id).status_code == 404, record_id
        for record_id in ("px-0000", "px-0001", "px-0002", "px-0003"):
            assert image(crafted, record_id).status_code == 404, record_id
        assert image(crafted, "px-0004").status_code == 200  # the rest of that dataset is still served
        listed = client.get(
            "/ui/api/outliers", params={"dir": str(crafted), "pool": "pixel", "per_page": 5}
        ).json()
        assert [r["has_image"] for r in listed["records"]] == [False, False, False, False, True]
        not_datasets = [tmp_path, ui_assets.detectors, "/", "../..", "", "x" * 5000, "/etc/passwd", "a\x00b"]
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "card.json").write_text("{}")
        (broken / "metadata.jsonl").write_text("not json\n")
        for directory in [*not_datasets, broken]:
            for path in ("/ui/api/outliers", "/ui/api/outliers/image"):
                response = client.get(path, params={"dir": str(directory), "id": "px-0004"})
                assert response.status_code == 404, (directory, response.text)
                assert "is not an outlier dataset" in response.json()["detail"]


def test_auth_applies_to_the_ui_data_as_to_the_api(secured, ui_assets):
    data_paths = [
        ("/ui/api/detectors/tiny", {}),
        ("/ui/api/datasets", {}),
        ("/ui/api/outliers", {"dir": str(ui_assets.outliers)}),
        ("/ui/api/outliers/image", {"dir": str(ui_assets.outliers), "id": "px-0000"}),
        ("/detectors", {}),
    ]
    with secured.client() as client:
        for page in ("/ui", "/ui/outliers", "/ui/static/detector.js"):  # no data in them, like /docs
            assert client.get(page).status_code == 200
        for path, params in data_paths:
            for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Basic {KEYS[0]}"}):
                response = client.get(path, params=params, headers=headers)
                assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer", path
            for key in KEYS:
                ok = client.get(path, params=params, headers={"Authorization": f"Bearer {key}"})
                assert ok.status_code == 200, (path, ok.text)
