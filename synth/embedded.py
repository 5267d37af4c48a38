"""The embedded generator: a small Stable Diffusion pipeline built from config (no download).

Every component is a stock diffusers / transformers class — ``AutoencoderKL``, ``UNet2DConditionModel``,
``CLIPTextModel``, ``CLIPTokenizer`` — only small. The tokenizer's vocabulary is built locally from
the prompt words and class names (whole-word BPE), and each class gets its placeholder token. The
result is saved with ``save_pretrained`` and loaded back with ``from_pretrained``, exactly like a Hub
checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from oodforge.config import StrictModel
from oodforge.tokens import add_placeholder_tokens

PROMPT_WORDS = ["a", "high", "quality", "image", "of", "the", "photo", "digit", "number"]


class TinySDConfig(StrictModel):
    """Sizes of the embedded pipeline's components (defaults: 32x32 images, 8x8x4 latents)."""

    image_size: int = 32
    latent_channels: int = 4
    vae_channels: list[int] = [16, 32, 32]
    unet_channels: list[int] = [32, 64]
    unet_layers_per_block: int = 1
    unet_attention_head_dim: int = 16
    unet_text_time_embedding: bool = True  # also add a pooled text embedding to the time embedding
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_prompt_tokens: int = 16
    train_timesteps: int = 1000
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"


def words_of(text: str) -> list[str]:
    """The pieces CLIP's tokenizer splits ``text`` into before BPE.

    Those are runs of letters, single digits and runs of other symbols (lower-cased; whitespace dropped).
    """
    return re.findall(r"[^\W\d_]+|\d|[^\w\s]+|_+", text.lower())


def bpe_vocab(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """A CLIP-style byte-level BPE vocabulary in which every word piece of ``words`` is one token.

    Texts are split like CLIP's tokenizer does (:func:`words_of`: ``"golden retriever"`` is two words,
    ``"class 12"`` is ``class``, ``1``, ``2``) and written in CLIP's byte alphabet (every UTF-8 byte is one
    symbol, so ``café`` and ``猫`` work). Each piece is merged left to right (``i m`` -> ``im``, ``im a`` ->
    ``ima`` …) so the tokenizer reproduces it whole; all 256 byte symbols stay in the vocabulary, so any
    other text still tokenizes.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = bytes_to_unicode()
    symbols_of = lambda piece: [alphabet[b] for b in piece.encode("utf-8")]  # noqa: E731
    chars = list(dict.fromkeys(alphabet.values()))
    vocab_list = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    pieces = dict.fromkeys(p for w in words for p in words_of(w))
    for piece in pieces:
        symbols = symbols_of(piece)
        symbols[-1] += "</w>"
        current = symbols[0]
        for sym in symbols[1:]:
            merges.append(f"{current} {sym}")
            current += sym
            vocab_list.append(current)
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    return vocab, list(dict.fromkeys(merges))


def build_tokenizer(words: list[str], directory: Path, max_length: int) -> CLIPTokenizer:
    """Write the vocabulary and merges for ``words`` to ``directory`` and load them as a CLIP tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = bpe_vocab(words)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(
        str(directory / "vocab.json"),
        str(directory / "merges.txt"),
        model_max_length=max_length,
        pad_token="<|endoftext|>",
    )


def build_components(cfg: TinySDConfig, class_names: list[str], work_dir: Path) -> dict[str, Any]:
    """Fresh (untrained) VAE, UNet, text encoder, tokenizer (with placeholder tokens) and scheduler."""
    tokenizer = build_tokenizer(PROMPT_WORDS + class_names, work_dir / "tokenizer-src", cfg.max_prompt_tokens)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.text_width,
            intermediate_size=cfg.text_width * 2,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            max_position_embeddings=cfg.max_prompt_tokens,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    add_placeholder_tokens(tokenizer, text_encoder, class_names)
    n = len(cfg.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.vae_channels),
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=16,
        sample_size=cfg.image_size,
    )
    m = len(cfg.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=cfg.image_size // 2 ** (n - 1),
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (m - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (m - 1) + ("UpBlock2D",),
        block_out_channels=tuple(cfg.unet_channels),
        layers_per_block=cfg.unet_layers_per_block,
        cross_attention_dim=cfg.text_width,
        attention_head_dim=cfg.unet_attention_head_dim,
        addition_embed_type="text" if cfg.unet_text_time_embedding else None,
        addition_embed_type_num_heads=cfg.text_heads,
        norm_num_groups=16,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=cfg.train_timesteps,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=cfg.prediction_type,
        clip_sample=False,
        steps_offset=1,
    )
    return {
        "vae": vae,
        "unet": unet,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }
