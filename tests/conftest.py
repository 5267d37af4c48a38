"""Shared fixtures: tiny real artifacts that the OOD methods train from (no generator or teacher run needed)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oodforge.backbones import BackboneConfig, HeadConfig, build_classifier
from oodforge.data.transforms import Preprocess
from oodforge.detector import ClassifierDetector
from oodforge.outliers import OutlierWriter
from oodforge.scores import build_score

TINY_OPTIONS = {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]}
CLASSES = ["0", "1", "2", "3", "4", "5"]
TEACHER_WIDTH = 24  # the tiny teacher's embedding width D (the knn pool's width)
SD_SHAPE = (4, 8, 8)  # one SD latent [C, h, w]; pooled over channels and rows -> width 8
N_OUTLIERS = 96  # more than one batch of 64


@dataclass(frozen=True)
class OODAssets:
    ce: Path  # a detector with the tiny linear-head model (what init_from loads)
    teacher: Path  # a detector with a cosine head of width TEACHER_WIDTH
    outliers: Path  # pixel images + knn [N, TEACHER_WIDTH] + sd [N, 4, 8, 8]
    no_sd: Path  # pixel images + knn only
    wide_knn: Path  # knn of the wrong width (TEACHER_WIDTH + 8)


def save_detector(model: torch.nn.Module, path: Path, name: str) -> Path:
    detector = ClassifierDetector.create(
        name=name,
        model=model.eval(),
        score=build_score("energy"),
        preprocess=Preprocess(),
        class_names=CLASSES,
        val_scores=np.zeros(1),
    )
    return detector.save(path)


def write_outliers(root: Path, knn_width: int, sd: bool, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    writer = OutlierWriter(root)
    for i in range(N_OUTLIERS):
        record = {"id": f"px-{i:04d}", "kept": True, "source_class": i % 6, "seed": i, "reason": "kept"}
        image = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
        writer.add_image(record, image)
    pools = {"knn": torch.from_numpy(rng.normal(size=(N_OUTLIERS, knn_width))).float()}
    if sd:
        pools["sd"] = torch.from_numpy(rng.normal(size=(N_OUTLIERS, *SD_SHAPE))).float()
    for pool, rows in pools.items():
        records = [
            {"id": f"{pool}-{i:04d}", "kept": True, "source_class": i % 6, "seed": i, "reason": "kept"}
            for i in range(N_OUTLIERS)
        ]
        writer.add_latents(pool, [r["id"] for r in records], rows, records)
    writer.finalize({"generator": "test fixture"})
    write_reference(root, rng)
    return root


def write_reference(root: Path, rng: np.random.Generator) -> Path:
    """A tiny generator reference (oodforge.reference format) beside the outliers: labelled generated and
    round-trip images. The round trips are not aligned with mnist-open's splits (too few), so the csID suite
    leaves them out; ``train.id_reference`` reads their train part."""
    from safetensors.numpy import save_file

    ref = root / "reference"
    ref.mkdir()
    tensors = {}
    for kind in ("generated", "roundtrip"):
        for split, n in (("train", 12), ("val", 6), ("test", 6)):
            tensors[f"{kind}/{split}"] = rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
            tensors[f"{kind}/{split}/labels"] = np.arange(n, dtype=np.int64) % len(CLASSES)
    save_file(tensors, str(ref / "images.safetensors"))
    (ref / "card.json").write_text('{"settings": {"data": {"benchmark": "mnist-open"}}, "counts": {}}')
    return ref


@pytest.fixture(scope="session")
def ood_assets(tmp_path_factory: pytest.TempPathFactory) -> OODAssets:
    root = tmp_path_factory.mktemp("ood-assets")
    torch.manual_seed(0)
    ce = build_classifier(BackboneConfig(options=TINY_OPTIONS), len(CLASSES))
    anchors = torch.randn(len(CLASSES), TEACHER_WIDTH)
    teacher_cfg = BackboneConfig(options=TINY_OPTIONS, head=HeadConfig(name="cosine", tau=0.1))
    teacher = build_classifier(teacher_cfg, len(CLASSES), anchors=anchors)
    return OODAssets(
        ce=save_detector(ce, root / "ce", "ce"),
        teacher=save_detector(teacher, root / "teacher", "teacher"),
        outliers=write_outliers(root / "outliers", TEACHER_WIDTH, sd=True),
        no_sd=write_outliers(root / "no-sd", TEACHER_WIDTH, sd=False),
        wide_knn=write_outliers(root / "wide-knn", TEACHER_WIDTH + 8, sd=True),
    )


@pytest.fixture(scope="session")
def ui_assets(tmp_path_factory: pytest.TempPathFactory):
    from ui_assets import build_ui_assets

    return build_ui_assets(tmp_path_factory.mktemp("ui-assets"))
