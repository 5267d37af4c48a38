"""``python -m synth fit-generator``: fit the class-conditioned Stable Diffusion generator on ID train.

Two recipes, chosen by ``pretrained``:

* unset (the default): build the embedded pipeline from ``model``, train its VAE, then its UNet and
  text encoder (``synth.fit``);
* a Hub id or local diffusers directory: load that pipeline with the generator's own loading code and
  learn only the class placeholder tokens (textual inversion, ``synth.invert``).

Either way the result is saved with ``save_pretrained`` (atomically: a work dir, then a rename), with a
card, and its fidelity is reported (share of class-prompted samples that the CE baseline classifies as
the prompted class).
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
from diffusers import AutoencoderKL
from pydantic import Field

from oodforge.artifacts import library_versions
from oodforge.config import StrictModel
from oodforge.data import Benchmark, DataConfig, load_benchmark
from oodforge.tokens import placeholder_token
from synth.embedded import TinySDConfig, build_components
from synth.fit import FitConfig, encode_latents, fit_unet, fit_vae, images_to_tensor
from synth.generator import CARD_FILE, Generator, GeneratorConfig
from synth.invert import InvertConfig, fit_tokens, pipeline_resolution


class FidelityConfig(StrictModel):
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
    """The benchmark, its ID train images ``[N, 3, H, W]`` in [-1, 1] and their labels."""
    bench = load_benchmark(data)
    images = images_to_tensor(np.stack([np.asarray(bench.train[i][0]) for i in range(len(bench.train))]))
    return bench, images, torch.from_numpy(bench.train.labels)


def _jsonl_logger(path: Path) -> Callable[[dict, int], None]:
    def log(values: dict, step: int) -> None:
        with path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")

    return log


def _publish(
    final: Path, card: dict, out: Path, generator_cfg: GeneratorConfig, cfg: FitGeneratorConfig
) -> dict:
    """Write the card into the saved pipeline ``final``, reload it as a generator, add its fidelity to
    the card, then move ``final`` to ``out`` (replacing what was there)."""
    (final / CARD_FILE).write_text(json.dumps(card, indent=2))
    generator = Generator.load(generator_cfg, card["class_names"])
    card["fidelity"] = measure_fidelity(generator, cfg.fidelity, cfg.seed)
    (final / CARD_FILE).write_text(json.dumps(card, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(final, out)
    return card


def fit_embedded(cfg: FitGeneratorConfig, out: Path, command: str = "") -> dict:
    """Train the embedded pipeline on ID train, save it to ``out`` atomically, return its card."""
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    bench, images, labels = _id_train(cfg.data)
    out.parent.mkdir(parents=True, exist_ok=True)
    # a stable work dir: a killed fit keeps its finished VAE stage and the re-run skips it
    tmp = out.parent / f".{out.name}.work"
    tmp.mkdir(exist_ok=True)
    log_path = tmp / "fit_log.jsonl"
    log = _jsonl_logger(log_path)
    try:
        started = time.perf_counter()
        parts = build_components(cfg.model, bench.class_names, tmp)
        vae_dir = tmp / "vae-stage"
        stage = {"config": cfg.model.model_dump(), "steps": cfg.fit.vae_steps, "seed": cfg.seed}
        if (vae_dir / "stage.json").is_file() and json.loads((vae_dir / "stage.json").read_text()) == stage:
            parts["vae"] = AutoencoderKL.from_pretrained(vae_dir)
            print(f"reusing the fitted VAE in {vae_dir}")
        else:
            scaling = fit_vae(parts["vae"], images, cfg.fit, gen, log)
            parts["vae"].register_to_config(scaling_factor=scaling)
            parts["vae"].save_pretrained(vae_dir)
            (vae_dir / "stage.json").write_text(json.dumps(stage))
        scaling = parts["vae"].config.scaling_factor
        latents = encode_latents(parts["vae"], images)
        unet = fit_unet(
            parts["unet"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"],
            latents, labels, bench.class_names, scaling, cfg.fit, gen, log,
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
            "command": command,
            "config": cfg.model_dump(mode="json"),
            "versions": library_versions(),
        }
        loader = GeneratorConfig(
            pretrained=str(final), steps=cfg.fidelity.steps, guidance_scale=cfg.fidelity.guidance_scale
        )
        card = _publish(final, card, out, loader, cfg)
    except BaseException:
        print(f"fit-generator stopped; finished stages are kept in {tmp} and a re-run resumes from them")
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return card


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
    """Textual inversion of ``cfg.pretrained`` on ID train: learn only the placeholder tokens, save the
    whole pipeline to ``out`` atomically, return its card."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    bench, images, labels = _id_train(cfg.data)
    pipe = _load_pretrained(cfg, bench.class_names).pipe
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.work"
    shutil.rmtree(tmp, ignore_errors=True)  # nothing to resume: a stale work dir is discarded
    tmp.mkdir()
    log_path = tmp / "fit_log.jsonl"
    try:
        started = time.perf_counter()
        fit_tokens(pipe, images, labels, bench.class_names, cfg.invert, gen, _jsonl_logger(log_path))
        wall = time.perf_counter() - started
        final = tmp / "pipeline"
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
            "resolution": pipeline_resolution(pipe),
            "fit_seconds": round(wall, 1),
            "command": command,
            "config": cfg.model_dump(mode="json"),
            "versions": library_versions(),
        }
        del pipe  # free the accelerator before the saved pipeline is loaded back
        loader = GeneratorConfig(
            pretrained=str(final), dtype=cfg.invert.dtype, device=cfg.invert.device,
            steps=cfg.fidelity.steps, guidance_scale=cfg.fidelity.guidance_scale,
        )  # fmt: skip
        return _publish(final, card, out, loader, cfg)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main_fit(cfg: FitGeneratorConfig, out: Path) -> int:
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
