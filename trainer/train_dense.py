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

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from oodforge.data.mnist_scenes import DenseBenchmark, SceneSet, load_scenes
from oodforge.detector import DenseDetector
from oodforge.segmenters import Segmenter, build_segmenter
from trainer.config import DenseTrainConfig
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
        """The loss on scenes with negatives pasted in (plus the sources' own losses) and its parts."""
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


def scene_tensors(cfg: DenseTrainConfig, scenes: SceneSet) -> TensorDataset:
    """The scenes' pre-processed pixels and labels as a dataset."""
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


def finish(
    cfg: DenseTrainConfig,
    model: Segmenter,
    bench: DenseBenchmark,
    run_dir: Path,
    device: str,
    train_seconds: float,
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
    own = result["scores"][cfg.export.pixel_score]
    detector = DenseDetector.create(
        name=cfg.name,
        model=model.cpu(),
        preprocess=cfg.preprocess,
        class_names=bench.class_names,
        pixel_score=cfg.export.pixel_score,
        pooling=cfg.export.pooling,
        val_maps=maps[cfg.export.pixel_score]["val"],
        target_id_tpr=cfg.export.target_id_tpr,
        metrics={"benchmark": bench.name, "miou": result["miou"], **own},
        training={
            "negatives": cfg.negatives.model_dump(mode="json"),
            "seed": cfg.seed,
            "data_seed": cfg.data.seed,
            "epochs": cfg.train.epochs,
        },
    )
    detector_dir = detector.save(run_dir / "detector")
    result["detector_info"] = detector.describe()
    (run_dir / "report.json").write_text(json.dumps(result, indent=2))
    title = f"{cfg.name} (negatives: {', '.join(cfg.negatives.sources) or 'none'}) on {bench.name}"
    (run_dir / "report.md").write_text(dense_report(result, title) + "\n![maps](plots/maps.png)\n")
    if cfg.eval.plots:
        rows = example_rows(bench.test)
        maps_figure(
            bench.test, rows, {n: m["test"] for n, m in maps.items()}, run_dir / "plots" / "maps.png", title
        )
    px = own["pixel"]["all"]
    print(
        f"\ninlier mIoU {100 * result['miou']:.2f}% | {cfg.export.pixel_score}: pixel AP {100 * px['ap']:.2f}%, "
        f"FPR@95 {100 * px['fpr95']:.2f}%, AUROC {100 * px['auroc']:.2f}% (all test pixels)\n"
        f"report:   {run_dir / 'report.md'}\n"
        f"detector: {detector_dir}  (image threshold {detector.threshold:.4f} at "
        f"{100 * cfg.export.target_id_tpr:.0f}% ID TPR on val scenes)"
    )
    return detector_dir


def main(argv: list[str] | None = None) -> int:
    """Train a dense detector from the command line (``--config``, ``--set``, ``--resume``...)."""
    return run_cli(
        argv,
        DenseTrainConfig,
        train,
        "Train, evaluate and export a dense OOD detector.",
        "configs/train/dense_flow.yaml",
    )


if __name__ == "__main__":
    raise SystemExit(main())
