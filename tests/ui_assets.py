"""What the /ui tests serve: a tiny detector with a calibration histogram, an old one without, an outlier set."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image
from serving import free_port

from oodforge.backbones import BackboneConfig, build_classifier
from oodforge.data.transforms import Preprocess
from oodforge.detector import ClassifierDetector
from oodforge.outliers import OutlierWriter
from oodforge.scores import build_score

TINY_OPTIONS = {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]}
CLASSES = ["0", "1", "2"]
N_KEPT, N_REJECTED, N_KNN = 30, 10, 5
REJECT_REASON = "near_id: knn distance 0.1000 < threshold 0.3000"


@dataclass(frozen=True)
class UIAssets:
    detectors: Path  # NAME/detector/ for "tiny" (with a histogram) and "old" (without one)
    outliers: Path  # 30 kept + 10 rejected pixel records, 5 knn records; source classes 0..2
    val_scores: np.ndarray  # the scores "tiny" was calibrated on


def random_images(n: int, seed: int, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def write_gallery_outliers(root: Path) -> Path:
    rng = np.random.default_rng(1)
    writer = OutlierWriter(root)
    for i in range(N_KEPT + N_REJECTED):
        kept = i < N_KEPT
        record = {
            "id": f"px-{i:04d}",
            "kept": kept,
            "reason": "kept" if kept else REJECT_REASON,
            "source_class": i % 3,
            "seed": i,
            "knn_distance": float(0.3 + rng.random()) if kept else 0.1,
        }
        colour = rng.integers(0, 255, 3, dtype=np.uint8)
        image = Image.fromarray(np.broadcast_to(colour, (16, 16, 3)).copy()) if kept else None
        writer.add_image(record, image)
    rows = torch.from_numpy(rng.normal(size=(N_KNN, 4))).float()
    records = [{"id": f"knn-{i:04d}", "kept": True, "source_class": i % 3} for i in range(N_KNN)]
    writer.add_latents("knn", [r["id"] for r in records], rows, records)
    writer.finalize(
        {"generator": {"pretrained": "test fixture"}, "filter": {"k": 5, "quantile": 0.95, "threshold": 0.3}}
    )
    return root


def build_ui_assets(root: Path) -> UIAssets:
    outliers = write_gallery_outliers(root / "outliers")
    torch.manual_seed(0)
    model = build_classifier(BackboneConfig(options=TINY_OPTIONS), len(CLASSES)).eval()

    def create(val_scores: np.ndarray) -> ClassifierDetector:
        return ClassifierDetector.create(
            name="tiny",
            model=model,
            score=build_score("energy"),
            preprocess=Preprocess(),
            class_names=CLASSES,
            val_scores=val_scores,
            metrics={"id_accuracy": 0.5, "ood": {"noise": {"auroc": 0.75, "fpr95": 0.5, "shift": "far"}}},
            training={"method": "oal", "epochs": 1, "method_args": {"outliers": str(outliers)}},
        )

    val_scores = create(np.zeros(1)).predict(random_images(60, seed=2)).scores
    detectors = root / "detectors"
    tiny = create(val_scores).save(detectors / "tiny" / "detector")
    old = detectors / "old" / "detector"
    shutil.copytree(tiny, old)
    spec = json.loads((old / "detector.json").read_text())
    del spec["calibration"]["histogram"]  # as exported before the histogram was stored
    spec["provenance"]["training"] = {"method": "ce"}
    (old / "detector.json").write_text(json.dumps(spec))
    return UIAssets(detectors=detectors, outliers=outliers, val_scores=val_scores)


@dataclass
class InProcessServer:
    url: str

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)


@contextmanager
def serving_in_thread(env: dict[str, str], timeout: float = 60) -> Iterator[InProcessServer]:
    """A real uvicorn on 127.0.0.1 serving ``api.app.create_app`` in a thread of this process.

    Faster to start than a uvicorn subprocess (torch is already imported); the settings come from
    ``env`` (OODFORGE_* names) exactly as the server reads them.
    """
    import uvicorn

    from api.app import create_app
    from api.settings import load_settings

    threads = torch.get_num_threads()
    port = free_port()
    config = uvicorn.Config(
        create_app(load_settings(environ=env)), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the in-process server did not start in {timeout} s")
            time.sleep(0.05)
        ready = httpx.get(f"{url}/readyz", timeout=10)  # the lifespan has loaded the detectors by now
        if ready.status_code != 200:
            raise RuntimeError(f"the in-process server is not ready: {ready.text}")
        yield InProcessServer(url)
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        torch.set_num_threads(threads)  # the app's lifespan sets the server's torch threads
