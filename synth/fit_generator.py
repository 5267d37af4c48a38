"""``python -m synth fit-generator``: build and train the embedded Stable Diffusion pipeline, save it
with ``save_pretrained`` and report its fidelity (share of class-prompted samples that the CE baseline
classifies as the prompted class)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from pydantic import Field

from oodforge.config import StrictModel
from oodforge.data import DataConfig, load_benchmark
from oodforge.detector import library_versions
from oodforge.tokens import placeholder_token
from synth.embedded import TinySDConfig, build_components
from synth.fit import FitConfig, encode_latents, fit_unet, fit_vae, images_to_tensor
from synth.generator import CARD_FILE, Generator, GeneratorConfig


class FidelityConfig(StrictModel):
    classifier: Path = Path("runs/ce/detector")
    per_class: int = Field(50, ge=1)
    steps: int = 25
    guidance_scale: float = 3.0


class FitGeneratorConfig(StrictModel):
    """``configs/synth/tiny_mnist_open.yaml``."""

    seed: int = 0
    data: DataConfig = DataConfig()
    model: TinySDConfig = TinySDConfig()
    fit: FitConfig = FitConfig()
    fidelity: FidelityConfig = FidelityConfig()
    save_dtype: str = Field("float16", pattern="^(float16|float32)$")


def measure_fidelity(generator: Generator, cfg: FidelityConfig, seed: int = 0) -> dict:
    """Share of class-prompted samples that the classifier assigns to the prompted class."""
    from oodforge.detector import Detector

    if not (cfg.classifier / "detector.json").is_file():
        return {
            "fidelity": None,
            "note": f"not measured: no classifier at {cfg.classifier} (run `make demo` first)",
        }
    classifier = Detector.load(cfg.classifier)
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
    """Train the embedded pipeline on ID train, save it to ``out`` atomically, return its card."""
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    bench = load_benchmark(cfg.data)
    images = images_to_tensor(np.stack([np.asarray(bench.train[i][0]) for i in range(len(bench.train))]))
    labels = torch.from_numpy(bench.train.labels)
    out.parent.mkdir(parents=True, exist_ok=True)
    # a stable work dir: a killed fit keeps its finished VAE stage and the re-run skips it
    tmp = out.parent / f".{out.name}.work"
    tmp.mkdir(exist_ok=True)
    log_path = tmp / "fit_log.jsonl"

    def log(values: dict, step: int) -> None:
        with log_path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")

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
            "kind": "oodforge embedded generator",
            "class_names": bench.class_names,
            "placeholder_tokens": [placeholder_token(c) for c in bench.class_names],
            "benchmark": cfg.data.benchmark,
            "train_images": len(images),
            "fit_seconds": round(wall, 1),
            "command": command,
            "config": cfg.model_dump(mode="json"),
            "versions": library_versions(),
        }
        (final / CARD_FILE).write_text(json.dumps(card, indent=2))
        generator = Generator.load(
            GeneratorConfig(
                pretrained=str(final), steps=cfg.fidelity.steps, guidance_scale=cfg.fidelity.guidance_scale
            ),
            bench.class_names,
        )
        card["fidelity"] = measure_fidelity(generator, cfg.fidelity, cfg.seed)
        (final / CARD_FILE).write_text(json.dumps(card, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(final, out)
    except BaseException:
        print(f"fit-generator stopped; finished stages are kept in {tmp} and a re-run resumes from them")
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return card


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
