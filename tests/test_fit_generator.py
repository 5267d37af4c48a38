"""`python -m synth fit-generator` on a short budget: trains, saves with save_pretrained, reloads, reports."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from oodforge.backbones import BackboneConfig, build_classifier
from oodforge.data.transforms import Preprocess
from oodforge.detector import ClassifierDetector
from oodforge.scores import build_score
from synth.generator import CARD_FILE, Generator, GeneratorConfig

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
SHORT = [
    "fit.vae_steps=3", "fit.unet_steps=3", "fit.batch_size=8", "fit.warmup_steps=1",
    "model.vae_channels=[16,16]", "model.unet_channels=[16,32]", "model.unet_attention_head_dim=8",
    "model.text_width=32", "fidelity.per_class=2", "fidelity.steps=2",
]  # fmt: skip


def run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "synth", "fit-generator", "--config", "configs/synth/tiny_mnist_open.yaml",
            "--out", str(tmp_path / "gen")]  # fmt: skip
    for item in [*SHORT, *extra]:
        args += ["--set", item]
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_short_fit_saves_a_loadable_pipeline(tmp_path: Path) -> None:
    proc = run(tmp_path, f"fidelity.classifier={tmp_path / 'no-classifier'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fidelity not measured" in proc.stdout
    card = json.loads((tmp_path / "gen" / CARD_FILE).read_text())
    assert card["class_names"] == [str(d) for d in range(6)] and card["fidelity"]["fidelity"] is None
    gen = Generator.load(GeneratorConfig(pretrained=str(tmp_path / "gen"), steps=2), card["class_names"])
    assert gen.anchors().shape == (6, 32)
    _, images = gen.sample([0, 5], seeds=[0, 1])
    assert images[0].size == (32, 32)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind


def test_fidelity_is_measured_with_a_classifier(tmp_path: Path) -> None:
    """An (untrained) classifier artifact is enough to exercise the fidelity measurement end to end."""
    model = build_classifier(
        BackboneConfig(options={"embedding_size": 8, "hidden_sizes": [8], "depths": [1]}), 6
    )
    ClassifierDetector.create(name="judge", model=model, score=build_score("msp"), preprocess=Preprocess(),
                              class_names=[str(d) for d in range(6)], val_scores=np.zeros(1)).save(tmp_path / "judge")  # fmt: skip
    proc = run(tmp_path, f"fidelity.classifier={tmp_path / 'judge'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    fid = json.loads((tmp_path / "gen" / CARD_FILE).read_text())["fidelity"]
    assert 0.0 <= fid["fidelity"] <= 1.0 and fid["n_samples"] == 12 and len(fid["per_class"]) == 6
    assert f"fidelity {100 * fid['fidelity']:.1f}%" in proc.stdout


def test_misspelled_key_fails_before_work(tmp_path: Path) -> None:
    proc = run(tmp_path, "fit.unet_stepz=3")
    assert proc.returncode == 2 and "fit.unet_stepz" in proc.stderr
    assert not (tmp_path / "gen").exists()


def test_failed_fit_resumes_from_its_finished_stages(tmp_path: Path) -> None:
    """A fit that fails after training (here: a fidelity judge for other classes) keeps both stages'
    final checkpoints; the re-run restores them instead of training again."""
    model = build_classifier(
        BackboneConfig(options={"embedding_size": 8, "hidden_sizes": [8], "depths": [1]}), 3
    )
    ClassifierDetector.create(name="wrong", model=model, score=build_score("msp"), preprocess=Preprocess(),
                              class_names=["a", "b", "c"], val_scores=np.zeros(1)).save(tmp_path / "wrong")  # fmt: skip
    first = run(tmp_path, f"fidelity.classifier={tmp_path / 'wrong'}")
    assert first.returncode == 2 and "has classes" in first.stderr
    assert "its checkpoints are kept in" in first.stdout and not (tmp_path / "gen").exists()
    for stage in ("vae", "unet"):
        (final,) = (tmp_path / ".gen.work" / "checkpoints" / stage).glob("step_*")
        assert json.loads((final / "stage.json").read_text())["finished"] is True
    second = run(tmp_path, f"fidelity.classifier={tmp_path / 'none'}")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "vae: finished earlier" in second.stdout and "unet: finished earlier" in second.stdout
    assert (tmp_path / "gen" / CARD_FILE).is_file()
    assert not (tmp_path / ".gen.work").exists()


def test_changed_config_starts_the_stage_again(tmp_path: Path) -> None:
    """Checkpoints of a run with another UNet learning rate are discarded (the VAE stage is kept)."""
    model = build_classifier(
        BackboneConfig(options={"embedding_size": 8, "hidden_sizes": [8], "depths": [1]}), 3
    )
    ClassifierDetector.create(name="wrong", model=model, score=build_score("msp"), preprocess=Preprocess(),
                              class_names=["a", "b", "c"], val_scores=np.zeros(1)).save(tmp_path / "wrong")  # fmt: skip
    assert run(tmp_path, f"fidelity.classifier={tmp_path / 'wrong'}").returncode == 2
    second = run(tmp_path, "fit.unet_lr=0.002", f"fidelity.classifier={tmp_path / 'none'}")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "vae: finished earlier" in second.stdout
    assert "unet: the checkpoints in" in second.stdout and "changed: fit.unet_lr" in second.stdout
