"""The training entry point end to end on the embedded benchmark with a tiny backbone."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from oodforge.detector import Detector

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "trainer" / "train_oal.py"
ACCELERATE = Path(sys.executable).with_name("accelerate")
TINY = [
    "model.options={embedding_size: 8, hidden_sizes: [8, 16], depths: [1, 1]}",
    "train.batch_size=64",
    "train.eval_batch_size=1024",
]
pytestmark = pytest.mark.slow


def overrides(tmp_path: Path, *extra: str) -> list[str]:
    out = []
    for item in [f"output_dir={tmp_path / 'runs'}", *TINY, *extra]:
        out += ["--set", item]
    return out


def run_main(tmp_path: Path, *extra: str, resume: bool = False) -> int:
    from trainer.train_oal import main

    args = ["--config", str(REPO / "configs/train/ce.yaml"), *overrides(tmp_path, *extra)]
    return main(args + (["--resume"] if resume else []))


def test_ce_run_writes_report_and_detector(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(tmp_path, "name=ce", "train.epochs=1", "eval.plots=true") == 0
    run = tmp_path / "runs" / "ce"
    report = json.loads((run / "report.json").read_text())
    sets = {"digits-6-9", "faces", "textures", "photos", "noise"}
    assert set(report["ood"]) == sets and report["score"] == "msp"
    assert set(report["scores"]) == {"msp", "max_logit", "energy", "entropy", "knn", "mahalanobis"}
    assert report["ood"]["digits-6-9"]["kind"] == "near" and report["far"] and report["near"]
    assert 0.5 < report["id_accuracy"] <= 1.0  # one epoch of a tiny net already learns digits
    md = (run / "report.md").read_text()
    for name in [*sets, "mahalanobis", "knn", "FPR@95"]:
        assert name in md
    assert (run / "plots" / "roc_energy.png").stat().st_size > 1000
    assert "val/accuracy" in (run / "logs" / "metrics.csv").read_text()
    detector = Detector.load(run / "detector")
    assert detector.spec.score.name == "energy" and detector.spec.threshold.split == "val"
    assert "report:" in capsys.readouterr().out


def test_existing_run_needs_resume_or_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(tmp_path, "name=again", "train.epochs=1", "eval.plots=false") == 0
    assert run_main(tmp_path, "name=again", "train.epochs=1") == 2
    assert "--resume" in capsys.readouterr().err


def test_misspelled_key_fails_before_any_work(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--config",
            str(REPO / "configs/train/ce.yaml"),
            *overrides(tmp_path, "name=typo", "train.epochz=1"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "train.epochz" in proc.stderr
    assert not (tmp_path / "runs").exists()


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return {
        k: v for k, v in load_file(run / "detector" / "model.safetensors").items() if k.startswith("model.")
    }


def test_killed_run_resumes_from_last_checkpoint(tmp_path: Path) -> None:
    extra = ("name=killed", "train.epochs=2", "train.checkpoint_every_steps=5", "eval.plots=false")
    cmd = [
        str(ACCELERATE),
        "launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(SCRIPT),
        "--config",
        str(REPO / "configs/train/ce.yaml"),
        *overrides(tmp_path, *extra),
    ]
    ckpts = tmp_path / "runs" / "killed" / "checkpoints"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and not (ckpts / "step_0000010").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-epoch: an epoch of 2100 images at batch 64 has 32 steps
    proc.wait()
    assert not (tmp_path / "runs" / "killed" / "detector").exists()
    saved = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_"))
    assert saved and int(saved[-1][5:]) < 32

    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {ckpts / saved[-1]}" in resumed.stdout + resumed.stderr
    assert sorted(p.name for p in ckpts.iterdir())[-1] == "step_0000064"  # 2 epochs x 32 steps, none repeated

    # the resumed run ends with exactly the weights of an uninterrupted run with the same seed
    assert run_main(tmp_path, "name=straight", *extra[1:]) == 0
    killed, straight = (
        final_weights(tmp_path / "runs" / "killed"),
        final_weights(tmp_path / "runs" / "straight"),
    )
    assert killed.keys() == straight.keys()
    for key in killed:
        torch.testing.assert_close(killed[key], straight[key], rtol=0, atol=1e-6, msg=key)
