"""``python -m synth fit-generator``: fit the class-conditioned Stable Diffusion generator on ID train.

Two recipes, chosen by ``pretrained``:

* unset (the default): build the embedded pipeline from ``model``, train its VAE, then its UNet and
  text encoder (``synth.fit``);
* a Hub id or local diffusers directory: load that pipeline with the generator's own loading code and
  learn only the class placeholder tokens (textual inversion, ``synth.invert``).

Either way the result is saved with ``save_pretrained`` (atomically: a work dir, then a rename), with a
card, and its fidelity is reported (share of class-prompted samples that the CE baseline classifies as
the prompted class).

Resumable: the work dir ``<out>/../.<name>.work/`` keeps each stage's accelerate checkpoints
(``checkpoints/{vae,unet,invert}/step_*``, ``synth.checkpoint``) until the generator is published; the
same command re-run after a kill continues from the newest checkpoint (a finished stage is restored, not
re-trained) and ends with the same weights as an uninterrupted run. A re-run with a different config
starts the affected stages again and says so.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from oodforge.artifacts import library_versions
from oodforge.config import StrictModel
from oodforge.data import Benchmark, DataConfig, load_benchmark
from oodforge.tokens import placeholder_token
from synth.checkpoint import Stage
from synth.embedded import TinySDConfig, build_components
from synth.fit import (
    BOOKKEEPING_KEYS,
    VAE_KEYS,
    FitConfig,
    encode_latents,
    fit_unet,
    fit_vae,
    images_to_tensor,
    latent_scaling,
)
from synth.generator import CARD_FILE, Generator, GeneratorConfig
from synth.invert import InvertConfig, fit_tokens, training_resolution


class FidelityConfig(StrictModel):
    """How fidelity is measured: ``per_class`` class-prompted samples, judged by the ``classifier``."""

    classifier: Path = Path("runs/ce/detector")
    per_class: int = Field(50, ge=1)
    steps: int = 25
    guidance_scale: float = 3.0


class FitGeneratorConfig(StrictModel):
    """``configs/synth/tiny_mnist_open.yaml`` (embedded) or ``configs/synth/sd15_invert_cifar10.yaml``.

    ``pretrained`` switches from training the embedded pipeline (``model``, ``fit``, ``save_dtype``) to
    textual inversion of that checkpoint (``invert``, ``save_dtype``).
    """

    seed: int = 0
    data: DataConfig = DataConfig()
    pretrained: str | None = None
    revision: str | None = None
    model: TinySDConfig = TinySDConfig()
    fit: FitConfig = FitConfig()
    invert: InvertConfig = InvertConfig()
    fidelity: FidelityConfig = FidelityConfig()
    save_dtype: str = Field("float16", pattern="^(float16|float32)$")


def measure_fidelity(generator: Generator, cfg: FidelityConfig, seed: int = 0) -> dict:
    """Share of class-prompted samples that the classifier assigns to the prompted class."""
    from oodforge.detector import ClassifierDetector

    if not (cfg.classifier / "detector.json").is_file():
        return {
            "fidelity": None,
            "note": f"not measured: no classifier at {cfg.classifier} (run `make demo` first)",
        }
    classifier = ClassifierDetector.load(cfg.classifier)
    if classifier.class_names != generator.class_names:
        raise ValueError(
            f"classifier {cfg.classifier} has classes {classifier.class_names}, not {generator.class_names}"
        )
    per_class, started = {}, time.perf_counter()
    for c, name in enumerate(generator.class_names):
        seeds = [seed * 100_000 + c * 1000 + i for i in range(cfg.per_class)]
        _, images = generator.sample([c] * cfg.per_class, seeds)
        per_class[name] = float(np.mean(classifier.predict(images).labels == c))
    n = cfg.per_class * len(generator.class_names)
    return {
        "fidelity": float(np.mean(list(per_class.values()))),
        "per_class": per_class,
        "n_samples": n,
        "classifier": str(cfg.classifier),
        "steps": generator.cfg.steps,
        "guidance_scale": generator.cfg.guidance_scale,
        "images_per_second": n / (time.perf_counter() - started),
    }


def fit_generator(cfg: FitGeneratorConfig, out: Path, command: str = "") -> dict:
    """Fit the generator (embedded, or textual inversion of ``cfg.pretrained``), save it to ``out``, return its card."""
    fit = invert_pretrained if cfg.pretrained else fit_embedded
    return fit(cfg, out, command)


def _id_train(data: DataConfig) -> tuple[Benchmark, torch.Tensor, torch.Tensor]:
    """The benchmark, its ID train images ``[N, 3, S, S]`` in [-1, 1] and their labels.

    Every image is brought to ``data.image_size`` (``S``): folder images come in any size and the
    in-memory benchmarks already have it, so for them this is a no-op.
    """
    bench = load_benchmark(data)
    side = data.image_size

    def square(i: int) -> np.ndarray:
        image = bench.train[i][0].convert("RGB")
        if image.size != (side, side):
            image = image.resize((side, side), Image.Resampling.BICUBIC)
        return np.asarray(image)

    images = images_to_tensor(np.stack([square(i) for i in range(len(bench.train))]))
    return bench, images, torch.from_numpy(bench.train.labels)


def _jsonl_logger(path: Path) -> Callable[[dict, int], None]:
    def log(values: dict, step: int) -> None:
        with path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")

    return log


def _publish(
    final: Path, card: dict, out: Path, generator_cfg: GeneratorConfig, cfg: FitGeneratorConfig
) -> dict:
    """Save the card into the pipeline ``final``, add its measured fidelity, and move it to ``out``.

    The saved pipeline is reloaded as a generator to measure the fidelity; ``out`` is replaced.
    """
    (final / CARD_FILE).write_text(json.dumps(card, indent=2))
    generator = Generator.load(generator_cfg, card["class_names"])
    card["fidelity"] = measure_fidelity(generator, cfg.fidelity, cfg.seed)
    (final / CARD_FILE).write_text(json.dumps(card, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(final, out)
    return card


def _work_dir(out: Path) -> Path:
    """The stable work dir of a fit to ``out``: its checkpoints survive a kill, a re-run resumes from them."""
    return out.parent / f".{out.name}.work"


def _stage_fingerprints(cfg: FitGeneratorConfig) -> dict[str, dict]:
    """What each stage's result depends on; checkpoints written under another fingerprint are discarded."""
    common = {"seed": cfg.seed, "data": cfg.data.model_dump(mode="json")}
    if cfg.pretrained:
        invert = cfg.invert.model_dump(mode="json", exclude=BOOKKEEPING_KEYS)
        return {
            "invert": {**common, "pretrained": cfg.pretrained, "revision": cfg.revision, "invert": invert}
        }
    model = cfg.model.model_dump(mode="json")
    return {
        "vae": {**common, "model": model, "fit": cfg.fit.model_dump(mode="json", include=VAE_KEYS)},
        "unet": {**common, "model": model, "fit": cfg.fit.model_dump(mode="json", exclude=BOOKKEEPING_KEYS)},
    }


def fit_embedded(cfg: FitGeneratorConfig, out: Path, command: str = "") -> dict:
    """Train the embedded pipeline on ID train, save it to ``out`` atomically, return its card."""
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(cfg.seed)  # the components' initial weights
    gen = torch.Generator().manual_seed(cfg.seed)  # every draw of both loops (checkpointed with them)
    bench, images, labels = _id_train(cfg.data)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _work_dir(out)
    tmp.mkdir(exist_ok=True)
    log_path = tmp / "fit_log.jsonl"
    log = _jsonl_logger(log_path)
    fingerprints = _stage_fingerprints(cfg)
    stages = {
        name: Stage(tmp, name, fingerprints[name], cfg.fit.checkpoint_every_steps, cfg.fit.keep_checkpoints, log_path)
        for name in ("vae", "unet")
    }  # fmt: skip
    try:
        started = time.perf_counter()
        parts = build_components(cfg.model, bench.class_names, tmp)
        fit_vae(parts["vae"], images, cfg.fit, gen, log, stages["vae"])
        latents = encode_latents(parts["vae"], images)
        scaling = latent_scaling(latents[0])
        parts["vae"].register_to_config(scaling_factor=scaling)
        unet = fit_unet(
            parts["unet"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"],
            latents, labels, bench.class_names, scaling, cfg.fit, gen, log, stages["unet"],
        )  # fmt: skip
        wall = time.perf_counter() - started
        pipe = StableDiffusionPipeline(
            vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=unet,
            scheduler=parts["scheduler"], safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
        final = tmp / "pipeline"
        shutil.rmtree(final, ignore_errors=True)
        pipe.to(torch.float16 if cfg.save_dtype == "float16" else torch.float32).save_pretrained(final)
        shutil.copy(log_path, final / "fit_log.jsonl")
        card = {
            "recipe": "oodforge embedded generator",
            "class_names": bench.class_names,
            "placeholder_tokens": [placeholder_token(c) for c in bench.class_names],
            "benchmark": cfg.data.benchmark,
            "train_images": len(images),
            "fit_seconds": round(wall, 1),
            "resumed": _resumed(stages),
            "command": command,
            "config": cfg.model_dump(mode="json"),
            "versions": library_versions(),
        }
        loader = GeneratorConfig(
            pretrained=str(final), steps=cfg.fidelity.steps, guidance_scale=cfg.fidelity.guidance_scale
        )
        card = _publish(final, card, out, loader, cfg)
    except BaseException:
        print(f"fit-generator stopped; its checkpoints are kept in {tmp} and a re-run resumes from them")
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return card


def _resumed(stages: dict[str, Stage]) -> dict[str, str] | None:
    """Which stages this run restored from a checkpoint (for the card); None for a run from scratch."""
    found = {name: str(s.resumed_from.name) for name, s in stages.items() if s.resumed_from is not None}
    return found or None


def _load_pretrained(cfg: FitGeneratorConfig, class_names: list[str]) -> Generator:
    """``cfg.pretrained`` through the generator's loading code (placeholder tokens added, scheduler kept)."""
    loader = GeneratorConfig(
        pretrained=cfg.pretrained, revision=cfg.revision, dtype=cfg.invert.dtype,
        device=cfg.invert.device, scheduler="pipeline",
    )  # fmt: skip
    try:
        return Generator.load(loader, class_names)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"pretrained={cfg.pretrained!r} is neither a local diffusers Stable Diffusion directory nor a "
            "reachable Hub model; point `pretrained` to one (a directory with model_index.json, or owner/name), "
            "or unset it to fit the embedded generator"
        ) from err


def invert_pretrained(cfg: FitGeneratorConfig, out: Path, command: str = "") -> dict:
    """Textual inversion of ``cfg.pretrained`` on ID train; return the card of the saved pipeline.

    Only the placeholder tokens are learned; the whole pipeline is saved to ``out`` atomically.
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)  # batches, timesteps, noise (checkpointed with the loop)
    bench, images, labels = _id_train(cfg.data)
    pipe = _load_pretrained(cfg, bench.class_names).pipe
    size = training_resolution(pipe, cfg.invert)  # a bad invert.resolution fails before any work
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _work_dir(out)
    tmp.mkdir(exist_ok=True)
    log_path = tmp / "fit_log.jsonl"
    stage = Stage(
        tmp, "invert", _stage_fingerprints(cfg)["invert"], cfg.invert.checkpoint_every_steps,
        cfg.invert.keep_checkpoints, log_path,
    )  # fmt: skip
    try:
        started = time.perf_counter()
        fit_tokens(pipe, images, labels, bench.class_names, cfg.invert, gen, _jsonl_logger(log_path), stage)
        wall = time.perf_counter() - started
        final = tmp / "pipeline"
        shutil.rmtree(final, ignore_errors=True)
        pipe.to(torch.float16 if cfg.save_dtype == "float16" else torch.float32).save_pretrained(final)
        shutil.copy(log_path, final / "fit_log.jsonl")
        card = {
            "recipe": f"textual inversion of {cfg.pretrained}",
            "pretrained": cfg.pretrained,
            "revision": cfg.revision,
            "class_names": bench.class_names,
            "placeholder_tokens": [placeholder_token(c) for c in bench.class_names],
            "benchmark": cfg.data.benchmark,
            "train_images": len(images),
            "resolution": size,
            "fit_seconds": round(wall, 1),
            "resumed": _resumed({"invert": stage}),
            "command": command,
            "config": cfg.model_dump(mode="json"),
            "versions": library_versions(),
        }
        del pipe  # free the accelerator before the saved pipeline is loaded back
        loader = GeneratorConfig(
            pretrained=str(final), dtype=cfg.invert.dtype, device=cfg.invert.device,
            steps=cfg.fidelity.steps, guidance_scale=cfg.fidelity.guidance_scale,
            height=cfg.invert.resolution, width=cfg.invert.resolution,
        )  # fmt: skip
        card = _publish(final, card, out, loader, cfg)
    except BaseException:
        print(f"fit-generator stopped; its checkpoints are kept in {tmp} and a re-run resumes from them")
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return card


def main_fit(cfg: FitGeneratorConfig, out: Path) -> int:
    """Run ``fit-generator``: fit the generator, save it to ``out`` and print its fidelity; returns 0."""
    card = fit_generator(cfg, out, command=" ".join(["python -m synth", *sys.argv[1:]]))
    fid = card["fidelity"]
    print(f"saved generator to {out} (fit {card['fit_seconds']:.0f} s)")
    if fid["fidelity"] is None:
        print(f"fidelity {fid['note']}")
    else:
        print(
            f"fidelity {100 * fid['fidelity']:.1f}% of {fid['n_samples']} class-prompted samples classified as "
            f"their class by {fid['classifier']} (per class: "
            + ", ".join(f"{k} {100 * v:.0f}%" for k, v in fid["per_class"].items())
            + ")"
        )
    return 0
