"""The generator path: a pipeline saved to a directory loads through the same `pretrained:` code a Hub id uses."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from oodforge.tokens import placeholder_token
from synth.embedded import TinySDConfig, bpe_vocab, build_components
from synth.generator import CARD_FILE, Generator, GeneratorConfig

CLASSES = ["0", "1", "2"]
TINY = TinySDConfig(vae_channels=[16, 16], unet_channels=[16, 32], unet_attention_head_dim=8, text_width=32)


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gen")
    torch.manual_seed(0)
    parts = build_components(TINY, CLASSES, root / "work")
    pipe = StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(root / "tiny")
    (root / "tiny" / CARD_FILE).write_text(json.dumps({"class_names": CLASSES}))
    return root / "tiny"


def test_bpe_vocab_keeps_words_whole() -> None:
    vocab, merges = bpe_vocab(["image", "of"])
    assert "image</w>" in vocab and "of</w>" in vocab and "i m" in merges


def test_local_directory_loads_through_pretrained(saved_pipeline: Path) -> None:
    gen = Generator.load(GeneratorConfig(pretrained=str(saved_pipeline), steps=2), CLASSES)
    tokens = gen.pipe.tokenizer.convert_ids_to_tokens(gen.token_ids)
    assert tokens == [placeholder_token(c) for c in CLASSES]
    assert gen.anchors().shape == (3, 32)
    assert (gen.height, gen.width) == (32, 32)  # unet sample size 16 x vae factor 2


def test_token_substitution_is_used_and_restored(saved_pipeline: Path) -> None:
    gen = Generator.load(GeneratorConfig(pretrained=str(saved_pipeline), steps=2), CLASSES)
    before = gen.pipe.text_encoder.get_input_embeddings().weight.clone()
    plain = gen.prompt_embeds([1])
    v = torch.randn(1, 32) * 5
    substituted = gen.prompt_embeds([1], v)
    assert not torch.allclose(plain, substituted)
    assert torch.equal(before, gen.pipe.text_encoder.get_input_embeddings().weight)  # restored
    # substituting the token's own row changes nothing
    torch.testing.assert_close(gen.prompt_embeds([1], gen.anchors()[1:2]), plain)


def test_sample_returns_latents_and_images(saved_pipeline: Path) -> None:
    gen = Generator.load(GeneratorConfig(pretrained=str(saved_pipeline), steps=2), CLASSES)
    latents, images = gen.sample([0, 2], seeds=[1, 2], vectors=gen.anchors()[[0, 2]])
    assert latents.shape == (2, 4, 16, 16) and len(images) == 2 and images[0].size == (32, 32)
    again, _ = gen.sample([0, 2], seeds=[1, 2], vectors=gen.anchors()[[0, 2]])
    torch.testing.assert_close(latents, again)  # seeded


def test_clear_errors(saved_pipeline: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="fit-generator"):  # a missing local path
        Generator.load(GeneratorConfig(pretrained=str(tmp_path / "nope")), CLASSES)
    with pytest.raises(ValueError, match="was fitted for classes"):
        Generator.load(GeneratorConfig(pretrained=str(saved_pipeline)), ["cat", "dog"])
