"""`python -m trainer.pipeline` on an image folder it has never seen: clear data errors, every stage, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from trainer.pipeline import main

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = "model.options={embedding_size: 8, hidden_sizes: [8, 16], depths: [1, 1]}"
TINY = [
    f"ce.{TINY_MODEL}",
    "ce.train.epochs=3",
    f"teacher.{TINY_MODEL}",
    "teacher.train.epochs=3",
    f"oal.{TINY_MODEL}",
    "oal.train.epochs=1",
    "generator.fit.vae_steps=6",
    "generator.fit.unet_steps=6",
    "generator.fit.batch_size=16",
    "generator.fidelity.per_class=1",
    "generator.fidelity.steps=1",
    "outliers.counts.knn_per_class=10",
    "outliers.counts.pixel=10",
    "outliers.counts.batch_size=16",
    "outliers.generator.steps=1",
    "outliers.sampler.n_candidates=20",
    "outliers.filter.quantile=0.3",
]


def image_folder(root: Path, classes: dict[str, int], size: int = 20, seed: int = 0) -> Path:
    """``root/<class>/*.png``: each class a colour plus noise, so the classes are learnable."""
    rng = np.random.default_rng(seed)
    for c, (name, n) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        colour = np.array([(c * 97) % 256, (c * 53 + 80) % 256, (c * 31 + 160) % 256])
        for i in range(n):
            pixels = np.clip(rng.normal(0, 25, (size, size, 3)) + colour, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def args(data: Path, out: Path, *extra: str) -> list[str]:
    items = ["--data", str(data), "--out", str(out), *extra]
    for item in TINY:
        items += ["--set", item]
    return items


def test_data_problems_are_named_before_any_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one = image_folder(tmp_path / "one", {"only": 30})
    assert main(["--data", str(one), "--out", str(tmp_path / "o1")]) == 2
    assert "at least 2 ID classes" in capsys.readouterr().err
    few = image_folder(tmp_path / "few", {"plenty": 40, "rare class": 8})
    assert main(["--data", str(few), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "'rare class'" in err and "at least 10" in err
    ok = image_folder(tmp_path / "ok", {"a": 30, "b": 30})
    (tmp_path / "empty").mkdir()
    assert main(["--data", str(ok), "--ood", f"x={tmp_path / 'empty'}", "--out", str(tmp_path / "o3")]) == 2
    err = capsys.readouterr().err
    assert "--ood x" in err and "no readable image" in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


@pytest.mark.slow
def test_a_killed_pipeline_resumes_and_ends_with_a_served_detector(tmp_path: Path) -> None:
    names = {"cat": 36, "golden retriever": 36, "café": 36}  # spaces and non-ASCII in class names
    data = image_folder(tmp_path / "data", names)
    (data / "cat" / "broken.png").write_bytes(b"not an image")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(data / "cat" / "other-size.png")
    ood = image_folder(tmp_path / "ood", {"noise": 15}, seed=1)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "trainer.pipeline", *args(data, out, "--ood", f"noise={ood / 'noise'}:far")]
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    while not (out / ".generator.work").exists():  # CE done, the generator fit under way: kill it there
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "ce" / "detector" / "detector.json").is_file() and not (out / "oal").exists()
    ce_written = (out / "ce" / "detector" / "detector.json").stat().st_mtime
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "ce is done" in second.stdout  # skipped, not retrained
    assert (out / "ce" / "detector" / "detector.json").stat().st_mtime == ce_written
    for stage in ("ce", "teacher", "oal"):
        assert (out / stage / "detector" / "detector.json").is_file(), stage
    assert (out / "generator" / "model_index.json").is_file() and (out / "outliers" / "card.json").is_file()
    for stage in ("ce", "generator", "teacher", "outliers", "oal"):
        assert (out / "configs" / f"{stage}.yaml").is_file(), stage
    report = (out / "report.md").read_text()
    assert "noise" in report and "Unreadable files skipped: 1" in report and "café" in report
    assert "curl -F files=@" in second.stdout and "uvicorn api.app:app" in second.stdout
    from oodforge.detector import Detector

    detector = Detector.load(out / "oal" / "detector")
    assert detector.class_names == sorted(names) and detector.predict(
        [data / "café" / "0.png"]
    ).scores.shape == (1,)
    third = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and third.stdout.count("is done") == 6  # everything skipped


def test_a_rerun_applies_its_set_items_to_the_kept_configs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The user's edit of OUT/configs/ce.yaml survives; a re-run's --set lands on top of it."""
    from trainer.pipeline import write_configs

    configs = {"ce": {"train": {"epochs": 15, "batch_size": 64}}, "oal": {"train": {"epochs": 10}}}
    paths = write_configs(configs, tmp_path, rederive=False)
    edited = paths["ce"].read_text().replace("batch_size: 64", "batch_size: 32")  # the user's edit
    paths["ce"].write_text(edited)
    write_configs(configs, tmp_path, rederive=False, overrides=["ce.train.epochs=5"])
    ce = yaml.safe_load(paths["ce"].read_text())
    assert ce["train"] == {"epochs": 5, "batch_size": 32}
    assert "applied --set train.epochs=5" in capsys.readouterr().out
    assert yaml.safe_load(paths["oal"].read_text()) == configs["oal"]
    write_configs(configs, tmp_path, rederive=True)
    assert yaml.safe_load(paths["ce"].read_text()) == configs["ce"]
