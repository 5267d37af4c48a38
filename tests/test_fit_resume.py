"""Resumable fits: a `fit-generator` killed mid-stage and re-run ends with the same weights as an uninterrupted one.

The fits run as real `python -m synth fit-generator` processes; the interrupted one gets SIGKILL as soon
as its first checkpoint of the stage under test is on disk. Data: a tiny CIFAR-10-format directory
(python pickles, 10 classes, 16x16 after resizing), so each fit takes seconds.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from torch import nn

from synth.checkpoint import GeneratorState, Stage
from synth.embedded import TinySDConfig, build_components

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TINY = [
    "model.image_size=16", "data.image_size=16", "model.vae_channels=[16,16]", "model.unet_channels=[16,32]",
    "model.unet_attention_head_dim=8", "model.text_width=32", "fit.batch_size=8", "fit.warmup_steps=2",
]  # fmt: skip
FIT = [*TINY, "fit.vae_steps=6", "fit.unet_steps=40", "fit.checkpoint_every_steps=5"]
INVERT = ["data.image_size=16", "invert.steps=30", "invert.batch_size=4", "invert.warmup_steps=2",
          "invert.checkpoint_every_steps=5", "invert.device=cpu"]  # fmt: skip
# one thread: the same arithmetic in every run, and far faster than two on a shared 2-core machine
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def write_cifar10(root: Path, per_batch: int = 20, seed: int = 0) -> Path:
    """A CIFAR-10 python-version directory of random 32x32 images (5 train batches, a test batch, meta)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8),
            b"labels": [i % 10 for i in range(per_batch)],
        }
        (root / name).write_bytes(pickle.dumps(batch))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [n.encode() for n in CIFAR_NAMES]}))
    return root


@pytest.fixture(scope="module")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cifar10(tmp_path_factory.mktemp("data") / "cifar-10-batches-py")


def command(out: Path, cifar: Path, extra: list[str]) -> list[str]:
    args = [sys.executable, "-m", "synth", "fit-generator", "--config", "configs/synth/tiny_mnist_open.yaml",
            "--out", str(out)]  # fmt: skip
    common = ["data.benchmark=cifar10", f"data.root={cifar}", "save_dtype=float32",
              f"fidelity.classifier={out.parent / 'no-classifier'}"]  # fmt: skip
    for item in [*common, *extra]:
        args += ["--set", item]
    return args


def run(out: Path, cifar: Path, extra: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        command(out, cifar, extra), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def run_killed(out: Path, cifar: Path, extra: list[str], stage: str) -> int:
    """Start the fit, SIGKILL it once ``stage`` has its first checkpoint; returns that checkpoint's step."""
    ckpts = out.parent / f".{out.name}.work" / "checkpoints" / stage
    log = (out.parent / f"{out.name}.killed.log").open("w")
    proc = subprocess.Popen(
        command(out, cifar, extra), cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 600
    try:
        while not list(ckpts.glob("step_*")):
            assert proc.poll() is None, f"the fit ended before its {stage} stage checkpointed: {log.name}"
            assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    steps = sorted(json.loads((p / "stage.json").read_text()) for p in ckpts.glob("step_*"))
    assert steps and not any(s["finished"] for s in steps), "killed after the stage had ended"
    assert not out.exists()
    return max(s["step"] for s in steps)


def assert_same_pipeline(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert len(files) >= 3 and files == sorted(p.relative_to(b) for p in b.rglob("*.safetensors"))
    for rel in files:
        left, right = load_file(a / rel), load_file(b / rel)
        assert left.keys() == right.keys(), rel
        for key in left:
            assert torch.equal(left[key], right[key]), f"{rel}: {key} differs"
    assert (a / "fit_log.jsonl").read_text() == (b / "fit_log.jsonl").read_text()


def test_killed_embedded_fit_resumes_to_the_same_weights(tmp_path: Path, cifar: Path) -> None:
    whole = run(tmp_path / "whole", cifar, FIT)
    assert "resumed" not in whole.stdout
    killed_at = run_killed(tmp_path / "gen", cifar, FIT, "unet")
    assert 0 < killed_at < 40
    resumed = run(tmp_path / "gen", cifar, FIT)
    assert "vae: finished earlier" in resumed.stdout
    (line,) = [x for x in resumed.stdout.splitlines() if x.startswith("unet: resumed at step")]
    step = int(line.split()[4].rstrip(","))
    assert step >= killed_at and step % 5 == 0 and step < 40
    assert f"fit UNet (resumed at step {step})" in resumed.stderr  # the oodforge.progress bar
    assert_same_pipeline(tmp_path / "whole", tmp_path / "gen")
    card = json.loads((tmp_path / "gen" / "oodforge_generator.json").read_text())
    assert card["resumed"] == {"vae": "step_0000006", "unet": f"step_{step:07d}"}
    assert not (tmp_path / ".gen.work").exists()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny saved SD pipeline whose tokenizer has no placeholder tokens (like a Hub checkpoint)."""
    root = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    cfg = TinySDConfig(image_size=16, vae_channels=[16, 16], unet_channels=[16, 32], unet_attention_head_dim=8,
                       text_width=32)  # fmt: skip
    parts = build_components(cfg, [], root / "work")
    pipe = StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(root / "sd")
    return root / "sd"


def test_killed_inversion_resumes_to_the_same_weights(tmp_path: Path, cifar: Path, pretrained: Path) -> None:
    extra = [f"pretrained={pretrained}", *INVERT]
    run(tmp_path / "whole", cifar, extra)
    killed_at = run_killed(tmp_path / "gen", cifar, extra, "invert")
    assert 0 < killed_at < 30
    resumed = run(tmp_path / "gen", cifar, extra)
    assert "invert: resumed at step" in resumed.stdout
    assert "textual inversion (resumed at step" in resumed.stderr
    assert_same_pipeline(tmp_path / "whole", tmp_path / "gen")
    rows = "text_encoder/model.safetensors"
    before, after = load_file(pretrained / rows), load_file(tmp_path / "gen" / rows)
    (key,) = [k for k in before if k.endswith("token_embedding.weight")]
    assert after[key].shape[0] == before[key].shape[0] + 10  # the ten placeholder rows
    assert torch.equal(after[key][:-10], before[key])  # the checkpoint's own vocabulary is untouched


def test_inversion_with_another_config_starts_again(tmp_path: Path, cifar: Path, pretrained: Path) -> None:
    extra = [f"pretrained={pretrained}", *INVERT]
    run_killed(tmp_path / "gen", cifar, extra, "invert")
    again = run(tmp_path / "gen", cifar, [*extra, "invert.lr=0.001"])
    assert "invert: the checkpoints in" in again.stdout and "changed: invert.lr" in again.stdout
    assert "resumed" not in again.stdout


# ---------------------------------------------------------------- the Stage helper itself, in-process
def _train(work: Path, stop_at: int | None, fingerprint: dict, total: int = 12) -> tuple[nn.Module, Stage]:
    """A small SGD loop over random batches from a checkpointed generator; optionally stops ("dies") early."""
    from accelerate import Accelerator

    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    gen = torch.Generator().manual_seed(1)
    accelerator = Accelerator(cpu=True, device_placement=False)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    model, opt, sched = accelerator.prepare(model, opt, sched)
    log = work / "log.jsonl"
    stage = Stage(work, "toy", fingerprint, every=3, keep=2, log=log)
    done = stage.begin(accelerator, GeneratorState(gen))
    for step in stage.steps(done, total, desc="toy"):
        if step == stop_at:
            return model, stage
        loss = model(torch.randn(8, 4, generator=gen)).pow(2).mean()
        accelerator.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()
        with log.open("a") as f:
            f.write(json.dumps({"step": step, "toy/loss": loss.item()}) + "\n")
        stage.step_done(accelerator, done)
    stage.finish(accelerator, done)
    return model, stage


def test_stage_resume_keep_and_fingerprint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    whole, _ = _train(tmp_path / "a", None, {"lr": 0.1})
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "log.jsonl").write_text('{"step": 0, "toy/loss": 1.0}\n{"step": 1, "toy/lo')  # killed
    _train(tmp_path / "c", None, {"lr": 0.1})  # no checkpoint yet: starts at 0, its stale log lines go
    assert (tmp_path / "c" / "log.jsonl").read_text() == (tmp_path / "a" / "log.jsonl").read_text()
    _, stage = _train(tmp_path / "b", 8, {"lr": 0.1})  # dies at step 8: checkpoints at 3 and 6
    assert [p.name for p in stage.checkpoints()] == ["step_0000003", "step_0000006"]
    (stage.directory / ".tmp_step_0000009").mkdir()  # a save cut short by the kill
    resumed, stage = _train(tmp_path / "b", None, {"lr": 0.1})
    assert "toy: resumed at step 6" in capsys.readouterr().out
    assert all(torch.equal(p, q) for p, q in zip(whole.parameters(), resumed.parameters(), strict=True))
    # kept: the last two; 12 is both an interval step and the end, the end state replaced it
    assert [p.name for p in stage.checkpoints()] == ["step_0000009", "step_0000012"]
    assert json.loads((stage.checkpoints()[-1] / "stage.json").read_text())["finished"] is True
    assert not list(stage.directory.glob(".tmp_*"))
    assert (tmp_path / "b" / "log.jsonl").read_text() == (tmp_path / "a" / "log.jsonl").read_text()
    _train(tmp_path / "b", None, {"lr": 0.2})
    assert "changed: lr" in capsys.readouterr().out
