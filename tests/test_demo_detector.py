"""The demo's OAL detector, served, flags pure noise and natural photos as OOD (and accepts ID digits).

It is `make demo`'s own detector when one was trained here (``runs/oal/detector``), else the
reference detector the project publishes (``make publish`` -> ``oodforge/assets/detectors/mnist-open``).
The images are made here, not taken from the benchmark's test OOD sets.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serving import png_bytes, running_server
from skimage import data as skdata

from oodforge.data import DataConfig, load_benchmark
from oodforge.detector import Detector

REPO = Path(__file__).resolve().parents[1]
CANDIDATES = [REPO / "runs/oal/detector", REPO / "oodforge/assets/detectors/mnist-open/oal"]


def demo_detector() -> Path:
    for path in CANDIDATES:
        if (path / "detector.json").is_file():
            return path
    raise AssertionError(
        f"no demo OAL detector in {[str(p) for p in CANDIDATES]}: run `make demo` or `make publish`"
    )


def probes() -> dict[str, Image.Image]:
    rng = np.random.default_rng(2026)
    gauss = np.clip(rng.normal(128, 60, (48, 48, 3)), 0, 255).astype(np.uint8)
    uniform = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    coffee = Image.fromarray(skdata.coffee()).resize((96, 64))  # a whole photo, not a benchmark crop
    chelsea = Image.fromarray(skdata.chelsea()).resize((80, 60))
    return {
        "gaussian": Image.fromarray(gauss),
        "uniform": Image.fromarray(uniform),
        "coffee": coffee,
        "chelsea": chelsea,
    }


def test_the_served_demo_detector_rejects_noise_and_photos(tmp_path: Path) -> None:
    root = tmp_path / "served"
    shutil.copytree(demo_detector(), root / "oal" / "detector")
    digits = load_benchmark(DataConfig()).test  # ID test digits: most must be accepted
    id_images = [digits[i][0] for i in range(0, 60, 3)]
    server_env = {"OODFORGE_DETECTORS_DIR": str(root)}
    with running_server(server_env, tmp_path / "server.log") as server, server.client() as client:
        files = [("files", (f"{k}.png", png_bytes(im), "image/png")) for k, im in probes().items()]
        ood = client.post("/score", files=files).json()["results"]
        files = [("files", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(id_images)]
        idr = client.post("/score", files=files).json()["results"]
    verdicts = {r["filename"]: r["is_ood"] for r in ood}
    assert verdicts == {f"{k}.png": True for k in probes()}, ood
    accepted = np.mean([not r["is_ood"] for r in idr])
    assert accepted >= 0.8, idr  # the threshold accepts 95% of ID val digits


@pytest.mark.parametrize("name", ["gaussian", "uniform", "coffee", "chelsea"])
def test_the_library_agrees_with_the_server(name: str) -> None:
    detector = Detector.load(demo_detector())
    assert bool(detector.predict([png_bytes(probes()[name])]).is_ood[0])
