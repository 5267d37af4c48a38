"""`fit-generator` with `pretrained` set: textual inversion learns the placeholder rows and nothing else."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

from oodforge.config import load_config
from oodforge.tokens import add_placeholder_tokens, placeholder_token
from synth.embedded import TinySDConfig, build_components
from synth.fit_generator import FitGeneratorConfig
from synth.generator import CARD_FILE, Generator, GeneratorConfig

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
CLASSES = [str(d) for d in range(6)]
# image_size 16: the pipeline's resolution is below mnist-open's 32x32, so the resize path runs too
TINY = TinySDConfig(
    image_size=16, vae_channels=[16, 16], unet_channels=[16, 32], unet_attention_head_dim=8, text_width=32
)
TOKEN_ROWS = "embeddings.token_embedding.weight"  # key suffix (transformers versions differ in prefix)
WEIGHTS = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
}


def run(tmp_path: Path, pretrained: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "synth", "fit-generator", "--config", "configs/synth/tiny_mnist_open.yaml",
            "--out", str(tmp_path / "gen"), "--set", f"pretrained={pretrained}"]  # fmt: skip
    # batch 16 x 3 steps: every class is in some batch, so every placeholder row gets a gradient
    short = ["invert.steps=3", "invert.batch_size=16", "invert.warmup_steps=0", "fidelity.per_class=1",
             "fidelity.steps=2", f"fidelity.classifier={tmp_path / 'no-classifier'}"]  # fmt: skip
    for item in [*short, *extra]:
        args += ["--set", item]
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float16 "pre-trained" pipeline whose tokenizer has no placeholder tokens, like a Hub checkpoint."""
    root = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    parts = build_components(TINY, [], root / "work")
    pipe = StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.to(torch.float16).save_pretrained(root / "sd")
    return root / "sd"


@pytest.fixture(scope="module")
def inverted(
    pretrained: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, subprocess.CompletedProcess]:
    tmp_path = tmp_path_factory.mktemp("inverted")
    return tmp_path, run(tmp_path, pretrained)


def initial_rows(pretrained: Path) -> torch.Tensor:
    """The placeholder rows as the loader initialises them (class-name embeddings), in float16."""
    tokenizer = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", dtype=torch.float32)
    ids = add_placeholder_tokens(tokenizer, text_encoder, CLASSES)
    return text_encoder.get_input_embeddings().weight[ids].detach().half()


def test_inversion_succeeds_and_reloads(inverted: tuple[Path, subprocess.CompletedProcess]) -> None:
    tmp_path, proc = inverted
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fidelity not measured" in proc.stdout
    gen = Generator.load(GeneratorConfig(pretrained=str(tmp_path / "gen"), steps=2), CLASSES)
    assert gen.pipe.tokenizer.convert_ids_to_tokens(gen.token_ids) == [placeholder_token(c) for c in CLASSES]
    assert (gen.height, gen.width) == (16, 16)
    _, images = gen.sample([0, 5], seeds=[0, 1])
    assert images[0].size == (16, 16)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no work dir left behind


def test_only_the_placeholder_rows_change(
    pretrained: Path, inverted: tuple[Path, subprocess.CompletedProcess]
) -> None:
    tmp_path, proc = inverted
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = {name: load_file(pretrained / path) for name, path in WEIGHTS.items()}
    after = {name: load_file(tmp_path / "gen" / path) for name, path in WEIGHTS.items()}
    for name in WEIGHTS:
        assert before[name].keys() == after[name].keys(), name
        for key, value in before[name].items():
            if not key.endswith(TOKEN_ROWS):
                assert after[name][key].dtype == value.dtype and torch.equal(after[name][key], value), key
    (rows,) = [key for key in before["text_encoder"] if key.endswith(TOKEN_ROWS)]
    old, new = before["text_encoder"][rows], after["text_encoder"][rows]
    assert new.shape == (len(old) + len(CLASSES), old.shape[1])
    assert torch.equal(new[: len(old)], old)  # the checkpoint's own vocabulary is untouched
    learned, init = new[len(old) :], initial_rows(pretrained)
    assert all(not torch.equal(learned[c], init[c]) for c in range(len(CLASSES)))
    scheduler = "scheduler/scheduler_config.json"
    assert json.loads((pretrained / scheduler).read_text()) == json.loads(
        (tmp_path / "gen" / scheduler).read_text()
    )


def test_card_records_the_inversion(
    pretrained: Path, inverted: tuple[Path, subprocess.CompletedProcess]
) -> None:
    tmp_path, proc = inverted
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = json.loads((tmp_path / "gen" / CARD_FILE).read_text())
    assert card["recipe"] == f"textual inversion of {pretrained}" and card["pretrained"] == str(pretrained)
    assert card["class_names"] == CLASSES and card["placeholder_tokens"] == [
        placeholder_token(c) for c in CLASSES
    ]
    assert card["resolution"] == 16 and card["config"]["invert"]["steps"] == 3
    assert card["fidelity"]["fidelity"] is None and card["fit_seconds"] >= 0
    logged = [json.loads(line) for line in (tmp_path / "gen" / "fit_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == [0, 2] and all("invert/loss" in entry for entry in logged)


def test_missing_pretrained_fails_before_work(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    proc = run(tmp_path, missing)
    assert proc.returncode == 2 and str(missing) in proc.stderr
    assert not (tmp_path / "gen").exists() and not (tmp_path / ".gen.work").exists()


def test_real_scale_config_validates() -> None:
    cfg = load_config(REPO / "configs/synth/sd15_invert_cifar10.yaml", FitGeneratorConfig)
    assert cfg.pretrained and cfg.invert.dtype == "float16" and cfg.data.benchmark == "cifar10"
