"""Train a dense OOD detector (a segmenter that flags unknown objects per pixel) with Accelerate.

    accelerate launch trainer/train_dense.py --config configs/train/dense_flow.yaml [--set seed=1] [--resume]

NFlowJS recipe (Grcić, Bevandić & Šegvić): inlier scenes get one synthetic negative patch each (from the
sources in ``negatives.sources``: a jointly trained normalizing flow, synth pixel outliers, or both); the
segmenter minimises CE on inlier pixels + β·JS(U ‖ softmax) on the negative pixels. With no sources it is
a plain segmenter, scored by max-softmax or energy. Everything lands in ``runs/<name>/``:
``checkpoints/``, ``logs/metrics.csv``, ``report.json``, ``report.md``, ``plots/maps.png`` and
``detector/`` (a dense detector artifact served by the API with ``/score?maps=true``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from oodforge.config import StrictModel
from oodforge.data.mnist_scenes import DENSE_BENCHMARKS, SceneConfig, load_scenes
from oodforge.data.transforms import Preprocess
from oodforge.dense import PIXEL_SCORES, PoolingSpec, pool
from oodforge.dense_detector import DenseDetector, build_dense_spec
from oodforge.detector import ThresholdSpec
from oodforge.metrics import threshold_at_tpr
from oodforge.segmenters import Segmenter, SegmenterConfig, build_segmenter
from trainer.config import LoopConfig, OptimConfig
from trainer.dense_eval import dense_report, evaluate_dense, example_rows, maps_figure, scene_pixels
from trainer.loop import (
    build_optimizer,
    end_step,
    epoch_batches,
    lr_lambda,
    prepare_run_dir,
    restore,
    run_cli,
    save_checkpoint,
    start_run,
)
from trainer.losses.dense import dense_ood_loss
from trainer.negatives import NegativesConfig, build_sources, paste_negatives

MAP_QUANTILES = (0.001, 0.999)  # the PNG map's [lo, hi]: quantiles of the val pixels' scores


class DenseExportConfig(StrictModel):
    """What the exported detector scores with, and how its thresholds are calibrated (on val scenes)."""

    pixel_score: str = "js"
    pooling: PoolingSpec = PoolingSpec()
    target_id_tpr: float = Field(0.95, gt=0, lt=1)


class DenseEvalConfig(StrictModel):
    scores: list[str] = ["js", "msp", "energy"]
    plots: bool = True


class DenseOptimConfig(OptimConfig):
    """The optimiser, with the dense defaults (AdamW 2e-3, cosine) also under partial overrides."""

    name: Literal["sgd", "adamw"] = "adamw"
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = 1e-4


class DenseLoopConfig(LoopConfig):
    """The training loop, with the dense defaults (12 epochs of batch 16 on 2,000 scenes = 1,500 steps).

    Shorter schedules leave some seeds on the plateau where the segmenter separates digits from the
    background but not one digit from another (one of 3 seeds at 8 epochs of batch 32).
    """

    epochs: int = Field(12, ge=1)
    batch_size: int = Field(16, ge=1)
    eval_batch_size: int = Field(128, ge=1)
    checkpoint_every_steps: int = Field(250, ge=1, description="also saved at the end of every epoch")


class ScenePreprocess(Preprocess):
    """Pre-processing with the scenes' side (64) as default, also under partial overrides."""

    size: int = Field(64, ge=1)


class DenseTrainConfig(StrictModel):
    """One dense training run (``configs/train/dense*.yaml``)."""

    name: str = "dense"
    seed: int = 0
    output_dir: Path = Path("runs")
    data: SceneConfig = SceneConfig()
    model: SegmenterConfig = SegmenterConfig()
    preprocess: ScenePreprocess = ScenePreprocess()
    negatives: NegativesConfig = NegativesConfig()
    optim: DenseOptimConfig = DenseOptimConfig()
    train: DenseLoopConfig = DenseLoopConfig()
    eval: DenseEvalConfig = DenseEvalConfig()
    export: DenseExportConfig = DenseExportConfig()

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.name

    @model_validator(mode="after")
    def _check_names(self) -> DenseTrainConfig:
        if self.data.benchmark not in DENSE_BENCHMARKS:
            raise ValueError(
                f"data.benchmark: unknown dense benchmark {self.data.benchmark!r}; choose one of {DENSE_BENCHMARKS.names()}"
            )
        for name in [*self.eval.scores, self.export.pixel_score]:
            if name not in PIXEL_SCORES:
                raise ValueError(f"unknown pixel score {name!r}; choose from {PIXEL_SCORES.names()}")
        return self


class DenseStep(nn.Module):
    """Segmenter + negative sources as one module whose forward is the training loss."""

    def __init__(self, segmenter: Segmenter, sources: nn.ModuleDict, cfg: NegativesConfig) -> None:
        super().__init__()
        self.segmenter = segmenter
        self.sources = sources
        self.cfg = cfg

    def forward(
        self, pixels: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        negative = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
        clean = pixels
        if len(self.sources):
            pixels, labels, negative, _ = paste_negatives(
                pixels, labels, self.sources, self.cfg.side, generator
            )
        loss = dense_ood_loss(self.segmenter(pixels), labels, negative, self.cfg.beta)
        total = loss.total
        parts = {"ce": loss.ce.item(), "js": loss.js.item(), "negative_px": negative.float().mean().item()}
        for name, source in self.sources.items():
            aux = source.aux_loss(clean, generator)
            if aux is not None:
                total = total + aux
                parts[f"{name}_loss"] = aux.item()
        return total, parts


def scene_tensors(cfg: DenseTrainConfig, scenes) -> TensorDataset:
    return TensorDataset(
        scene_pixels(scenes, cfg.preprocess), torch.from_numpy(scenes.labels.astype(np.int64))
    )


def train(cfg: DenseTrainConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Train, evaluate and export a dense detector; returns the run directory."""
    bench = load_scenes(cfg.data)
    sources = build_sources(cfg.negatives, cfg.preprocess)  # a missing synth dataset fails here, early
    run_dir = prepare_run_dir(cfg, resume, overwrite)
    accelerator = start_run(cfg, run_dir)

    train_set = scene_tensors(cfg, bench.train)
    segmenter = build_segmenter(cfg.model, len(bench.class_names))
    for source in sources.values():
        source.prepare(train_set.tensors[0], run_dir)
    loader = DataLoader(train_set, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True)
    groups = [{"params": list(segmenter.parameters())}]
    if "flow" in sources:
        groups.append({"params": list(sources["flow"].parameters()), "lr": cfg.negatives.flow.lr})
    optimizer = build_optimizer(cfg, groups)
    step_module, optimizer, loader = accelerator.prepare(
        DenseStep(segmenter, sources, cfg.negatives), optimizer, loader
    )
    total_steps = cfg.train.epochs * len(loader)
    scheduler = accelerator.prepare(torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps)))
    progress = restore(accelerator, run_dir, resume, len(loader))

    started = time.perf_counter()
    while progress.epoch < cfg.train.epochs:
        step_module.train()
        bar = epoch_batches(accelerator, loader, progress, cfg.train.epochs)
        for pixels, labels in bar:
            # pasting randomness is a function of (seed, step, process): a resumed run pastes the same
            generator = torch.Generator().manual_seed(
                cfg.seed * 1_000_003 + progress.global_step * 97 + accelerator.process_index
            )
            loss, parts = step_module(pixels, labels, generator)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss.item():.4f}", js=f"{parts['js']:.3f}")
            logs = {"train/loss": loss.item(), **{f"train/{k}": v for k, v in parts.items()}}
            end_step(accelerator, cfg, progress, len(loader), logs)
        progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0
        save_checkpoint(accelerator, run_dir, progress.global_step, cfg.train.keep_checkpoints)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(step_module).segmenter
        finish(cfg, model, bench, run_dir, str(accelerator.device), time.perf_counter() - started)
    accelerator.end_training()
    return run_dir


def calibrate(
    val_maps: np.ndarray, pooling: PoolingSpec, tpr: float
) -> tuple[ThresholdSpec, float, tuple[float, float]]:
    """Image threshold, pixel threshold and PNG range from the ID-only val scenes' score maps."""
    image_scores = pool(torch.from_numpy(val_maps), pooling).numpy()
    threshold = ThresholdSpec(
        value=float(threshold_at_tpr(image_scores, tpr)),
        split="val",
        target_id_tpr=tpr,
        n_samples=len(image_scores),
    )
    pixels = val_maps.reshape(-1).astype(np.float64)
    lo, hi = (float(v) for v in np.quantile(pixels, MAP_QUANTILES))
    if not lo < hi:
        lo, hi = lo - 1e-6, hi + 1e-6
    return threshold, float(threshold_at_tpr(pixels, tpr)), (lo, hi)


def finish(
    cfg: DenseTrainConfig, model: Segmenter, bench, run_dir: Path, device: str, train_seconds: float
) -> Path:
    """Evaluate every pixel score, write report + figure, calibrate and export the dense detector."""
    eval_started = time.perf_counter()
    names = list(dict.fromkeys([cfg.export.pixel_score, *cfg.eval.scores]))
    result, maps = evaluate_dense(
        model,
        bench,
        cfg.preprocess,
        names,
        cfg.export.pooling,
        cfg.train.eval_batch_size,
        device,
        cfg.export.target_id_tpr,
    )
    result.update(
        {
            "run": cfg.name,
            "negatives": cfg.negatives.sources,
            "seed": cfg.seed,
            "train_seconds": round(train_seconds, 1),
            "eval_seconds": round(time.perf_counter() - eval_started, 1),
        }
    )
    (run_dir / "report.json").write_text(json.dumps(result, indent=2))
    title = f"{cfg.name} (negatives: {', '.join(cfg.negatives.sources) or 'none'}) on {bench.name}"
    (run_dir / "report.md").write_text(dense_report(result, title) + "\n![maps](plots/maps.png)\n")
    if cfg.eval.plots:
        rows = example_rows(bench.test)
        maps_figure(
            bench.test, rows, {n: m["test"] for n, m in maps.items()}, run_dir / "plots" / "maps.png", title
        )

    export = maps[cfg.export.pixel_score]["val"]
    threshold, pixel_threshold, map_range = calibrate(export, cfg.export.pooling, cfg.export.target_id_tpr)
    own = result["scores"][cfg.export.pixel_score]
    spec = build_dense_spec(
        name=cfg.name,
        model=model,
        preprocess=cfg.preprocess,
        class_names=bench.class_names,
        pixel_score=cfg.export.pixel_score,
        pooling=cfg.export.pooling,
        threshold=threshold,
        pixel_threshold=pixel_threshold,
        map_range=map_range,
        metrics={"benchmark": bench.name, "miou": result["miou"], **own},
        training={
            "negatives": cfg.negatives.model_dump(mode="json"),
            "seed": cfg.seed,
            "data_seed": cfg.data.seed,
            "epochs": cfg.train.epochs,
        },
    )
    detector_dir = DenseDetector(model.cpu(), spec).save(run_dir / "detector")
    px = own["pixel"]["all"]
    print(
        f"\ninlier mIoU {100 * result['miou']:.2f}% | {cfg.export.pixel_score}: pixel AP {100 * px['ap']:.2f}%, "
        f"FPR@95 {100 * px['fpr95']:.2f}%, AUROC {100 * px['auroc']:.2f}% (all test pixels)\n"
        f"report:   {run_dir / 'report.md'}\n"
        f"detector: {detector_dir}  (image threshold {threshold.value:.4f} at "
        f"{100 * threshold.target_id_tpr:.0f}% ID TPR on val scenes)"
    )
    return detector_dir


def main(argv: list[str] | None = None) -> int:
    return run_cli(
        argv,
        DenseTrainConfig,
        train,
        "Train, evaluate and export a dense OOD detector.",
        "configs/train/dense_flow.yaml",
    )


if __name__ == "__main__":
    raise SystemExit(main())
