"""`python -m synth generate` end to end on mnist-open with a tiny untrained pipeline and teacher."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline

from oodforge.backbones import BackboneConfig, HeadConfig, build_classifier
from oodforge.data.transforms import Preprocess
from oodforge.detector import ClassifierDetector, Detector
from oodforge.outliers import OutlierDataset
from oodforge.scores import build_score
from synth.embedded import TinySDConfig, build_components
from synth.generate import SynthConfig, generate
from synth.generator import CARD_FILE, Generator, GeneratorConfig

REPO = Path(__file__).resolve().parents[1]
CLASSES = [str(d) for d in range(6)]
TINY_SD = TinySDConfig(
    vae_channels=[16, 16], unet_channels=[16, 32], unet_attention_head_dim=8, text_width=32
)
TINY_NET = {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]}
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A saved tiny SD pipeline for mnist-open's classes and an (untrained) cosine-head teacher."""
    root = tmp_path_factory.mktemp("synth")
    torch.manual_seed(0)
    parts = build_components(TINY_SD, CLASSES, root / "work")
    pipe = StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(root / "gen")
    (root / "gen" / CARD_FILE).write_text(json.dumps({"class_names": CLASSES}))
    anchors = Generator.load(GeneratorConfig(pretrained=str(root / "gen")), CLASSES).anchors()
    model = build_classifier(
        BackboneConfig(options=TINY_NET, head=HeadConfig(name="cosine")), 6, anchors=anchors
    )
    score = build_score("msp")
    ClassifierDetector.create(name="teacher", model=model.eval(), score=score, preprocess=Preprocess(),
                              class_names=CLASSES, val_scores=np.zeros(1)).save(root / "teacher")  # fmt: skip
    return {"gen": root / "gen", "teacher": root / "teacher"}


def config(assets: dict[str, Path], pixel: int, batch: int = 4) -> dict:
    return {
        "teacher": str(assets["teacher"]),
        "generator": {"pretrained": str(assets["gen"]), "steps": 2, "guidance_scale": 2.0},
        "sampler": {"k": 20, "select": 10, "n_candidates": 50},
        "filter": {"k": 10, "quantile": 0.5},
        "counts": {"knn_per_class": 8, "pixel": pixel, "batch_size": batch},
        "reference": {"generated_per_class": 5, "roundtrip": False, "batch_size": 16},
    }


def test_generate_writes_all_pools(assets: dict[str, Path], tmp_path: Path) -> None:
    card = generate(SynthConfig.model_validate(config(assets, pixel=10)), tmp_path / "out")
    ds = OutlierDataset.load(tmp_path / "out")
    assert len(ds.images()) == 10 and card["counts"]["pixel"]["kept"] == 10
    knn = ds.require("knn", width=32)
    assert 0 < len(knn) <= 6 * 8
    anchors = Generator.load(GeneratorConfig(pretrained=str(assets["gen"])), CLASSES).anchors()
    kept = [r for r in ds.records if r["pool"] == "knn" and r["kept"]]
    norms = anchors.norm(dim=1)[[r["source_class"] for r in kept]]
    torch.testing.assert_close(knn.norm(dim=1), norms, rtol=1e-4, atol=1e-4)  # rescaled to |T(y)|
    assert ds.require("sd").shape[1:] == (4, 16, 16)
    for r in ds.records:
        assert {"id", "pool", "kept", "reason", "source_class"} <= set(r)
    assert (tmp_path / "out" / "preview.png").is_file() and card["filter"]["threshold"] > 0


def run_cli(assets: dict[str, Path], tmp_path: Path, pixel: int, launcher: list[str]) -> subprocess.Popen:
    cfg = tmp_path / "synth.yaml"
    cfg.write_text(yaml.safe_dump(config(assets, pixel=pixel, batch=2)))
    cmd = [*launcher, "-m", "synth", "generate", "--config", str(cfg), "--out", str(tmp_path / "out")]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip


def test_killed_generation_resumes_to_exact_count(assets: dict[str, Path], tmp_path: Path) -> None:
    proc = run_cli(assets, tmp_path, pixel=30, launcher=[sys.executable])
    images = tmp_path / "out" / "images"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(images.glob("*.png"))) < 6:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out" / "card.json").exists()
    proc = run_cli(assets, tmp_path, pixel=30, launcher=[sys.executable])
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    ds = OutlierDataset.load(tmp_path / "out")
    ids = [r["id"] for r in ds.records]
    assert len(ids) == len(set(ids))
    assert len(ds.images()) == 30 == len(list(images.glob("*.png")))
    generate(SynthConfig.model_validate(config(assets, pixel=30, batch=2)), tmp_path / "whole")
    same_dataset(tmp_path / "whole", tmp_path / "out")  # same ids, records, latents and images


def same_dataset(a: Path, b: Path) -> None:
    """Two outlier directories hold the same records, the same sd latents and byte-identical PNGs."""
    da, db = OutlierDataset.load(a), OutlierDataset.load(b)
    assert da.records == db.records
    assert torch.equal(da.require("sd"), db.require("sd")) and torch.equal(
        da.require("knn"), db.require("knn")
    )
    pngs = sorted(p.name for p in (a / "images").glob("*.png"))
    assert pngs == sorted(p.name for p in (b / "images").glob("*.png")) and pngs
    assert all((a / "images" / n).read_bytes() == (b / "images" / n).read_bytes() for n in pngs)


def test_interrupted_generation_resumes_to_the_same_dataset(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run stopped in the middle of writing a block, then resumed, equals an uninterrupted run."""
    from oodforge.outliers import OutlierWriter

    cfg = SynthConfig.model_validate(config(assets, pixel=12, batch=4))
    generate(cfg, tmp_path / "whole")
    original, calls = OutlierWriter.add_images, []

    def stop_half_way(self: OutlierWriter, records: list[dict], images: list) -> int:
        calls.append(len(records))
        if len(calls) == 3:  # the third block: write its first half, then the process "dies"
            original(self, records[:2], images[:2])
            raise KeyboardInterrupt
        return original(self, records, images)

    monkeypatch.setattr(OutlierWriter, "add_images", stop_half_way)
    with pytest.raises(KeyboardInterrupt):
        generate(cfg, tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "card.json").exists() and len(calls) == 3
    monkeypatch.setattr(OutlierWriter, "add_images", original)
    generate(cfg, tmp_path / "resumed")
    same_dataset(tmp_path / "whole", tmp_path / "resumed")
    pixel = [r for r in OutlierDataset.load(tmp_path / "whole").records if r["pool"] == "pixel"]
    assert sum(r["kept"] for r in pixel) == 12 and pixel[-1]["kept"]  # recorded up to the 12th kept one


def test_two_processes_make_one_dataset(assets: dict[str, Path], tmp_path: Path) -> None:
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    launcher = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    proc = run_cli(assets, tmp_path, pixel=8, launcher=launcher)
    out = proc.communicate(timeout=400)[0]
    assert proc.returncode == 0, out[-3000:]
    ds = OutlierDataset.load(tmp_path / "out")
    assert ds.card["processes"] == 2 and len(ds.images()) == 8
    seeds = [r["seed"] for r in ds.records if r["pool"] == "pixel"]
    assert len(seeds) == len(set(seeds))  # the two shards decoded different candidates
    assert len(ds.require("knn")) == len({r["id"] for r in ds.records if r["pool"] == "knn" and r["kept"]})


def test_missing_teacher_is_a_clear_error(assets: dict[str, Path], tmp_path: Path) -> None:
    cfg = SynthConfig.model_validate({**config(assets, pixel=2), "teacher": str(tmp_path / "nope")})
    with pytest.raises(FileNotFoundError, match="teacher.yaml"):
        generate(cfg, tmp_path / "out")


def test_corrupt_id_image_is_skipped_counted_and_named(
    assets: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An ID image that passes the folder scan but cannot be decoded is skipped, and the log names it."""
    from oodforge.data import DataConfig, load_benchmark

    train = load_benchmark(DataConfig()).train
    root = tmp_path / "id"
    for c in CLASSES:
        (root / c).mkdir(parents=True)
    per_class = dict.fromkeys(range(6), 0)
    for i in range(len(train)):
        image, label = train[i]
        if per_class[label] < 8:
            image.save(root / str(label) / f"{i}.jpg")
            per_class[label] += 1
    good = (root / "3" / f"{next(i for i in range(len(train)) if train[i][1] == 3)}.jpg").read_bytes()
    (root / "3" / "broken.jpg").write_bytes(good[: len(good) // 2])  # truncated
    cfg = SynthConfig.model_validate(
        {**config(assets, pixel=2), "data": {"benchmark": "imagefolder", "root": str(root)}}
    )
    with caplog.at_level("WARNING"):
        card = generate(cfg, tmp_path / "out")
    assert card["id_reference"]["n"] == len(load_benchmark(cfg.data).train)  # every readable train image
    warning = next(r.getMessage() for r in caplog.records if "broken.jpg" in r.getMessage())
    assert "skipped 1 unreadable" in warning
    assert len(OutlierDataset.load(tmp_path / "out").images()) == 2


def test_embedding_skips_an_image_that_fails_to_decode(
    assets: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A file that fails only at decode time (after any scan) is skipped and named, the rest embedded."""
    from PIL import Image

    from oodforge.data.base import FileImageSet
    from synth.generate import embed_images

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (32, 32), (i * 80, 0, 0)).save(paths[-1])
    paths.insert(1, tmp_path / "zero-bytes.png")
    paths[1].write_bytes(b"")
    teacher = Detector.load(assets["teacher"])
    with caplog.at_level("WARNING"):
        z, y = embed_images(teacher, FileImageSet("id", paths, np.array([0, 1, 2, 3])))
    assert z.shape == (3, 32) and y.tolist() == [0, 2, 3]
    assert "skipped 1 unreadable ID image" in caplog.text and "zero-bytes.png" in caplog.text


def test_reference_holds_labelled_generated_images_and_aligned_round_trips(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    """synth reference: generated ID-class images split 3:1:1, VAE round trips aligned with the ID splits."""
    from oodforge.data import DataConfig, load_benchmark
    from oodforge.reference import Reference
    from synth.reference import make_reference

    cfg = SynthConfig.model_validate({**config(assets, pixel=0), "reference": {"generated_per_class": 5}})
    card = make_reference(cfg, tmp_path / "out")
    (tmp_path / "out" / "card.json").write_text("{}")  # an outlier dataset's own card beside reference/
    ref = Reference.load(tmp_path / "out")
    bench = load_benchmark(DataConfig())
    gen = {split: ref.get("generated", split) for split in ("train", "val", "test")}
    assert [len(gen[s]) for s in ("train", "val", "test")] == [18, 6, 6]
    assert sorted(set(gen["train"].labels.tolist())) == list(range(6))
    for split in ("train", "val", "test"):
        rt = ref.get("roundtrip", split)
        assert len(rt) == len(getattr(bench, split)) and np.array_equal(
            rt.labels, getattr(bench, split).labels
        )
        assert rt.images.shape[1:] == (32, 32, 3)
    assert card["counts"]["roundtrip/train"] == len(bench.train)
    # a second call with the same settings is skipped (the card is unchanged), other settings rewrite it
    assert make_reference(cfg, tmp_path / "out") == card
    other = SynthConfig.model_validate(
        {**config(assets, pixel=0), "reference": {"generated_per_class": 0, "roundtrip": False}}
    )
    assert make_reference(other, tmp_path / "out")["counts"] == {}


def test_shards_fall_back_to_cpu_without_a_gpu_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes on a one-GPU host (or `accelerate launch --cpu`) shard on the CPU instead of cuda:1."""
    from synth.generate import _shard_on_cpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert not _shard_on_cpu()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert _shard_on_cpu()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    assert _shard_on_cpu()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    assert _shard_on_cpu()
