"""The dense training entry point end to end (a short smoke run) and the dense evaluation CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from oodforge.data.mnist_scenes import SceneConfig, load_scenes
from oodforge.detector import DenseDetector, Detector

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

SMALL_DATA = ["data.n_train=48", "data.n_val=16", "data.n_test_per_set=4"]
TINY = [
    "model.options={widths: [4, 8, 8], dilations: [1, 2]}",
    "train.batch_size=16",
    "train.epochs=1",
    "train.log_every_steps=1",
    "negatives.flow={crop: 4, transforms: 2, hidden: [32], pretrain_steps: 5, batch_size: 16}",
    "eval.plots=true",
]


def run_main(tmp_path: Path, config: str, *extra: str, resume: bool = False) -> int:
    from trainer.train_dense import main

    args = ["--config", str(REPO / "configs/train" / config)]
    for item in [f"output_dir={tmp_path / 'runs'}", *SMALL_DATA, *TINY, *extra]:
        args += ["--set", item]
    return main(args + (["--resume"] if resume else []))


@pytest.fixture(scope="module")
def both_run(tmp_path_factory: pytest.TempPathFactory, ood_assets) -> Path:
    """One smoke run with flow and synth negatives, shared by the tests that read its outputs."""
    tmp = tmp_path_factory.mktemp("dense")
    assert run_main(tmp, "dense_both.yaml", "name=both", f"negatives.synth_dir={ood_assets.outliers}") == 0
    return tmp / "runs" / "both"


def test_smoke_run_writes_report_figure_and_dense_detector(both_run: Path) -> None:
    report = json.loads((both_run / "report.json").read_text())
    assert report["negatives"] == ["flow", "synth"]
    assert set(report["scores"]) == {"js", "msp", "energy"}
    pixel = report["scores"]["js"]["pixel"]
    assert set(pixel["sets"]) == {"digits-6-9", "faces", "textures", "photos"}
    for metrics in [*pixel["sets"].values(), pixel["all"], pixel["near"], pixel["far"]]:
        assert {"ap", "fpr95", "auroc"} <= set(metrics) and 0 <= metrics["auroc"] <= 1
    assert 0 <= report["miou"] <= 1 and len(report["iou_per_class"]) == 7
    assert "digits-6-9 (near)" in (both_run / "report.md").read_text()
    assert (both_run / "plots" / "maps.png").stat().st_size > 5000
    assert (both_run / "flow_pretrained.pt").is_file()
    assert "train/flow_loss" in (both_run / "logs" / "metrics.csv").read_text()

    detector = Detector.load(both_run / "detector")
    assert isinstance(detector, DenseDetector)
    assert detector.spec.score.name == "js" and detector.spec.calibration.split == "val"
    scenes = load_scenes(SceneConfig(n_train=48, n_val=16, n_test_per_set=4))
    from PIL import Image

    out = detector.predict([Image.fromarray(scenes.val.images[i]) for i in range(len(scenes.val))])
    assert out.maps.shape == (16, 64, 64)
    assert (~out.is_ood).mean() >= 0.9  # calibrated to accept 95% of these val scenes
    assert np.all(out.maps >= 0) and np.all(out.maps <= np.log(2))


def test_evaluate_cli_reports_dense_metrics(both_run: Path, tmp_path: Path) -> None:
    from trainer.evaluate import main

    out = tmp_path / "eval.json"
    code = main(
        ["--detector", str(both_run / "detector"), "--scores", "js,energy"]  # benchmark: mnist-scenes by kind
        + ["--out", str(out), "--report", str(tmp_path / "report")]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert set(result["scores"]) == {"js", "energy"} and result["n_test_scenes"] == 400
    assert {"ap", "fpr95", "auroc"} == set(result["scores"]["js"]["pixel"]["all"])
    assert (tmp_path / "report" / "plots" / "maps.png").is_file()


def test_evaluate_cli_rejects_a_classifier_on_a_dense_benchmark(ood_assets, tmp_path: Path, capsys) -> None:
    from trainer.evaluate import main

    code = main(
        ["--detector", str(ood_assets.ce), "--benchmark", "mnist-scenes", "--out", str(tmp_path / "e.json")]
    )
    assert code == 2 and "is not a classifier benchmark" in capsys.readouterr().err


def test_resume_continues_from_the_last_checkpoint(tmp_path: Path) -> None:
    assert run_main(tmp_path, "dense.yaml", "name=r") == 0
    first = sorted((tmp_path / "runs" / "r" / "checkpoints").iterdir())[-1].name
    assert first == "step_0000003"  # 48 scenes / batch 16
    assert run_main(tmp_path, "dense.yaml", "name=r", "train.epochs=2", resume=True) == 0
    last = sorted((tmp_path / "runs" / "r" / "checkpoints").iterdir())[-1].name
    assert last == "step_0000006"
    assert run_main(tmp_path, "dense.yaml", "name=r") == 2  # an existing run needs --resume or --overwrite


def test_config_errors_are_clear(tmp_path: Path, capsys) -> None:
    assert run_main(tmp_path, "dense.yaml", "name=x", "negatives.sorces=[flow]") == 2
    assert "negatives.sorces" in capsys.readouterr().err
    assert run_main(tmp_path, "dense.yaml", "name=x", "export.pixel_score=entropy") == 2
    assert "unknown pixel score 'entropy'" in capsys.readouterr().err
    missing = tmp_path / "nothing"
    assert run_main(tmp_path, "dense_synth.yaml", "name=x", f"negatives.synth_dir={missing}") == 2
    err = capsys.readouterr().err
    assert "negatives.synth_dir" in err and "make demo" in err
    assert not (tmp_path / "runs" / "x").exists()  # nothing written before the error


def test_flow_source_sample_is_differentiable_in_training_step(tmp_path: Path) -> None:
    """One real training step: the segmenter's loss moves the flow's parameters (joint training)."""
    from oodforge.data.transforms import Preprocess
    from oodforge.segmenters import SegmenterConfig, build_segmenter
    from trainer.negatives import FlowConfig, NegativesConfig, build_sources
    from trainer.train_dense import DenseStep

    torch.manual_seed(0)
    cfg = NegativesConfig(
        sources=["flow"], beta=1.0, flow=FlowConfig(crop=4, transforms=1, hidden=[8], nll_weight=0)
    )
    sources = build_sources(cfg, Preprocess(size=32))
    step = DenseStep(build_segmenter(SegmenterConfig(options={"widths": [4, 4, 4]}), 7), sources, cfg)
    loss, parts = step(torch.randn(4, 3, 32, 32), torch.zeros(4, 32, 32, dtype=torch.long), torch.Generator())
    loss.backward()
    assert parts["negative_px"] > 0 and "flow_loss" in parts and parts["flow_loss"] == 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in sources["flow"].parameters())


def test_partial_overrides_keep_the_dense_defaults() -> None:
    """Overriding one key of a section must not reset its other keys to another class's defaults."""
    from oodforge.config import load_config
    from trainer.train_dense import DenseTrainConfig

    overrides = ["train.epochs=3", "optim.lr=0.01", "preprocess.mean=[0.4, 0.4, 0.4]"]
    cfg = load_config(REPO / "configs/train/dense.yaml", DenseTrainConfig, overrides)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.eval_batch_size) == (3, 16, 128)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("adamw", 0.01, 1e-4)
    assert cfg.preprocess.size == 64 and cfg.preprocess.mean == (0.4, 0.4, 0.4)
    bare = DenseTrainConfig.model_validate({"train": {"epochs": 2}, "optim": {"lr": 0.1}})
    assert bare.train.batch_size == 16 and bare.optim.name == "adamw"
