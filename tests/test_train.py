"""The training entry point end to end on the embedded benchmark with a tiny backbone."""

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


@pytest.fixture(scope="module")
def ce_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real (1-epoch, tiny) CE run shared by the tests that only read its outputs."""
    tmp = tmp_path_factory.mktemp("ce")
    assert run_main(tmp, "name=ce", "train.epochs=1", "eval.plots=true") == 0
    return tmp / "runs" / "ce"


def test_ce_run_writes_report_and_detector(ce_run: Path) -> None:
    report = json.loads((ce_run / "report.json").read_text())
    sets = {"digits-6-9", "faces", "textures", "photos", "noise"}
    # the exported score heads the report: ce.yaml's export.score auto, chosen on validation data only
    assert set(report["ood"]) == sets and report["score"] == report["score_selection"]["chosen"]
    assert report["score_selection"]["negatives"] == ["val-letters", "val-patterns", "val-pen-glyphs", "val-scenes"]
    assert set(report["scores"]) == {"msp", "max_logit", "energy", "entropy", "gen", "knn", "mahalanobis", "rmds"}
    exported = report["scores"][report["score"]]
    assert {"raw-source", "blur-0.7", "rotate-10", "upscale-4x"} <= set(exported["csid"])  # the csID suite
    assert exported["fs"]["near"] and set(exported["extra"]["ood"]) == {"uci-digits-6-9", "printed-text", "mpl-samples"}
    assert report["ood"]["digits-6-9"]["shift"] == "near" and report["far"] and report["near"]
    assert 0.5 < report["id_accuracy"] <= 1.0  # one epoch of a tiny net already learns digits
    md = (ce_run / "report.md").read_text()
    for name in [*sets, "mahalanobis", "knn", "FPR@95"]:
        assert name in md
    assert (ce_run / "plots" / "roc_energy.png").stat().st_size > 1000
    assert (ce_run / "plots" / "hist_knn.png").stat().st_size > 1000
    assert "val/accuracy" in (ce_run / "logs" / "metrics.csv").read_text()
    detector = Detector.load(ce_run / "detector")
    assert detector.spec.score.name == report["score"] and detector.spec.calibration.split == "val"


def test_exported_detector_scores_like_training(ce_run: Path) -> None:
    """The artifact reproduces the training-time evaluation and its threshold accepts 95% of ID val."""
    from oodforge.data import DataConfig, load_benchmark
    from oodforge.metrics import auroc

    detector = Detector.load(ce_run / "detector")
    bench = load_benchmark(DataConfig())
    val = detector.predict([bench.val[i][0] for i in range(len(bench.val))])
    assert (~val.is_ood).mean() >= 0.95 and (~val.is_ood).mean() < 0.96
    histogram = detector.spec.calibration.histogram  # of the val scores the threshold was chosen on
    counts, edges = np.histogram(val.scores, bins=len(histogram.counts))
    assert sum(histogram.counts) == len(bench.val) == detector.spec.calibration.n_samples
    np.testing.assert_allclose(histogram.edges, edges, rtol=1e-5, atol=1e-6)
    # float noise may move a score across an edge
    assert np.abs(np.array(histogram.counts) - counts).sum() <= 2
    test = detector.predict([bench.test[i][0] for i in range(len(bench.test))])
    near = bench.ood["digits-6-9"].images
    ood = detector.predict([near[i][0] for i in range(len(near))])
    report = json.loads((ce_run / "report.json").read_text())
    expected = report["scores"][report["score"]]["ood"]["digits-6-9"]["auroc"]
    assert auroc(test.scores, ood.scores) == pytest.approx(expected, abs=1e-9)
    assert (test.labels == bench.test.labels).mean() == pytest.approx(report["id_accuracy"], abs=1e-9)


def test_evaluate_cli_writes_documented_json(ce_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "trainer.evaluate", "--detector", str(ce_run / "detector"),
           "--benchmark", "mnist-open", "--out", str(out), "--scores", "energy,msp,knn"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["score"] == "energy" and set(result["scores"]) == {"energy", "msp", "knn"}
    assert set(result) >= {"id_accuracy", "score", "ood", "near", "far"}
    for metrics in result["ood"].values():
        assert set(metrics) == {"auroc", "fpr95", "aupr_in", "aupr_out", "shift"}
    report = json.loads((ce_run / "report.json").read_text())
    assert result["id_accuracy"] == pytest.approx(report["id_accuracy"])
    for score in ("energy", "msp", "knn"):  # same data, same model, same fitted statistics
        for name, metrics in result["scores"][score]["ood"].items():
            for key in ("auroc", "fpr95"):
                assert metrics[key] == pytest.approx(report["scores"][score]["ood"][name][key], abs=1e-9)


def test_evaluate_cli_reports_bad_input(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "trainer.evaluate", "--detector", str(tmp_path / "missing")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


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


def oal_sources(assets) -> tuple[str, ...]:
    """OAL with every outlier stream (knn, sd and, through the oe term, pixel images)."""
    return (f"method_args.teacher={assets.teacher}", f"method_args.outliers={assets.outliers}",
            f"init_from={assets.ce}", "method_args.pixel_term=oe")  # fmt: skip


@pytest.mark.parametrize("config", ["ce.yaml", "oal.yaml"])
def test_killed_run_resumes_from_last_checkpoint(tmp_path: Path, config: str, ood_assets) -> None:
    extra = ("name=killed", "train.epochs=2", "train.checkpoint_every_steps=5", "eval.plots=false")
    if config == "oal.yaml":
        extra += oal_sources(ood_assets)
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
        str(REPO / "configs/train" / config),
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
    # 2 epochs, none repeated: 2100 images at batch 64 (oal.yaml adds the fixture reference's 24 train images)
    per_epoch = (2100 + (24 if config == "oal.yaml" else 0)) // 64
    assert sorted(p.name for p in ckpts.iterdir())[-1] == f"step_{2 * per_epoch:07d}"

    # the resumed run ends with exactly the weights of an uninterrupted run launched the same way
    straight_cmd = [c.replace("name=killed", "name=straight") for c in cmd]
    assert subprocess.run(straight_cmd, capture_output=True, timeout=300).returncode == 0
    killed = final_weights(tmp_path / "runs" / "killed")
    straight = final_weights(tmp_path / "runs" / "straight")
    assert killed.keys() == straight.keys()
    for key in killed:
        torch.testing.assert_close(killed[key], straight[key], rtol=0, atol=1e-6, msg=key)
