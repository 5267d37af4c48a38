"""``python -m synth reference``: ID images carrying the generator's artifacts (:mod:`oodforge.reference`).

Writes ``<out>/reference/``: ``generated`` ID-class images (each class's own placeholder token, no
substitution) and VAE ``roundtrip`` copies of every ID train / val / test image. ``synth generate`` writes
it after the outliers; this command (re)writes it alone for an existing outlier dataset. It is skipped when
a complete reference made with the same settings is there already.

    python -m synth reference --config configs/synth/mnist_open.yaml --out runs/outliers
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from PIL import Image
from pydantic import Field
from safetensors.numpy import save_file

from oodforge.config import StrictModel
from oodforge.data import DataConfig, ImageSet, load_benchmark
from oodforge.progress import progress
from oodforge.reference import CARD_FILE, IMAGES_FILE, SPLITS, as_uint8, reference_dir, split_of

if TYPE_CHECKING:
    from synth.generator import Generator, GeneratorConfig

log = logging.getLogger("synth.reference")
SEED_OFFSET = 500_000_000  # generated-ID seeds never meet the outlier candidates' seeds


class ReferenceConfig(StrictModel):
    """``reference:`` of a synth config.

    Attributes:
        generated_per_class: ID-class images generated per class (split 3:1:1 into train/val/test); 0: none.
        roundtrip: Also write VAE round trips of every ID train, val and test image.
        batch_size: Images per generator call.
    """

    generated_per_class: int = Field(150, ge=0)
    roundtrip: bool = True
    batch_size: int = Field(64, ge=1)


class SynthLike(Protocol):
    """What :func:`make_reference` reads of a synth config (``synth.generate.SynthConfig``)."""

    seed: int
    data: DataConfig
    generator: GeneratorConfig
    reference: ReferenceConfig


def _to_side(images: list[Image.Image], side: int) -> np.ndarray:
    return as_uint8(
        np.stack(
            [
                np.asarray(
                    im.convert("RGB").resize((side, side), Image.BILINEAR)
                    if im.size != (side, side)
                    else im.convert("RGB")
                )
                for im in images
            ]
        )
    )


@torch.no_grad()
def roundtrip(generator: Generator, images: list[Image.Image]) -> list[Image.Image]:
    """Encode each image with the generator's VAE (the posterior mean) and decode it, at the generator's size."""
    vae = generator.pipe.vae
    size = (generator.width, generator.height)
    arr = np.stack(
        [
            np.asarray(
                im.convert("RGB").resize(size, Image.BICUBIC) if im.size != size else im.convert("RGB")
            )
            for im in images
        ]
    )
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    latents = vae.encode(x.to(generator.device, vae.dtype)).latent_dist.mode() * vae.config.scaling_factor
    return generator.decode(latents)


def _roundtrip_set(
    generator: Generator, images: ImageSet, side: int, batch_size: int, desc: str
) -> np.ndarray:
    out = []
    for start in progress(range(0, len(images), batch_size), desc=desc):
        batch = [images[i][0] for i in range(start, min(start + batch_size, len(images)))]
        out.append(_to_side(roundtrip(generator, batch), side))
    return np.concatenate(out)


def _generated(
    cfg: SynthLike, generator: Generator, n_classes: int, side: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    per = cfg.reference.generated_per_class
    jobs = [
        (c, i) for i in range(per) for c in range(n_classes)
    ]  # classes interleaved: every batch mixes them
    images: list[np.ndarray] = []
    step = cfg.reference.batch_size
    for start in progress(range(0, len(jobs), step), desc="generated ID images"):
        batch = jobs[start : start + step]
        seeds = [cfg.seed * 1_000_003 + SEED_OFFSET + c * per + i for c, i in batch]
        _, decoded = generator.sample([c for c, _ in batch], seeds, None)
        images.append(_to_side(decoded, side))
    stacked = np.concatenate(images) if images else np.zeros((0, side, side, 3), np.uint8)
    out = {}
    for split in SPLITS:
        pick = [k for k, (_, i) in enumerate(jobs) if split_of(i) == split]
        out[split] = (stacked[pick], np.asarray([jobs[k][0] for k in pick], dtype=np.int64))
    return out


def make_reference(cfg: SynthLike, out: Path, generator: Generator | None = None) -> dict:
    """Write ``out/reference`` for ``cfg`` (skipped when an identical one exists); returns its card."""
    from synth.generator import Generator

    root = reference_dir(out)
    settings = {"reference": cfg.reference.model_dump(), "data": cfg.data.model_dump(mode="json"),
                "generator": cfg.generator.model_dump(mode="json"), "seed": cfg.seed}  # fmt: skip
    card_path = root / CARD_FILE
    if card_path.is_file() and (root / IMAGES_FILE).is_file():
        card = json.loads(card_path.read_text())
        if card.get("settings") == settings:
            log.info("reference in %s is complete; skipped", root)
            return card
    started = time.perf_counter()
    bench = load_benchmark(cfg.data)
    generator = generator or Generator.load(cfg.generator, bench.class_names)
    side = cfg.data.image_size
    tensors: dict[str, np.ndarray] = {}
    if cfg.reference.generated_per_class:
        for split, (images, labels) in _generated(cfg, generator, len(bench.class_names), side).items():
            tensors[f"generated/{split}"], tensors[f"generated/{split}/labels"] = images, labels
    if cfg.reference.roundtrip:
        for split in SPLITS:
            images = getattr(bench, split)
            tensors[f"roundtrip/{split}"] = _roundtrip_set(
                generator, images, side, cfg.reference.batch_size, f"VAE round trip {split}"
            )
            tensors[f"roundtrip/{split}/labels"] = np.asarray(images.labels, dtype=np.int64)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{IMAGES_FILE}.tmp"
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
    tmp.replace(root / IMAGES_FILE)
    card = {
        "settings": settings,
        "class_names": bench.class_names,
        "counts": {k: int(len(v)) for k, v in tensors.items() if not k.endswith("/labels")},
        "image_size": side,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    tmp = root / f".{CARD_FILE}.tmp"
    tmp.write_text(json.dumps(card, indent=2))
    tmp.replace(card_path)  # the card last: a reference with a card is complete
    return card


def main_reference(cfg: SynthLike, out: Path) -> int:
    """Run ``synth reference``: write the generator reference of the outlier dataset ``out``; returns 0."""
    card = make_reference(cfg, out)
    print(f"reference: {reference_dir(out)}  counts: {card['counts']}  ({card['wall_seconds']:.0f} s)")
    return 0
