"""Train an OOD detector with Accelerate, evaluate it and export the detector artifact.

    accelerate launch trainer/train_oal.py --config configs/train/ce.yaml [--set train.epochs=5] [--resume]

The method (``ce``, the text-aligned ``teacher``; OAL and the classic alternatives plug into
``trainer.methods``) is chosen by ``method:`` in the config; it also builds the model it trains. Runs
unchanged on CPU, one GPU or several (``accelerate launch --multi_gpu``). Everything lands in
``runs/<name>/``: ``checkpoints/`` (``accelerator.save_state``, every ``train.checkpoint_every_steps``
steps and at each epoch end), ``logs/metrics.csv``, ``report.json``, ``report.md``, ``plots/`` and
``detector/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    ProjectConfiguration,
    set_seed,
)
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from oodforge.backbones import Classifier
from oodforge.config import ConfigError, add_config_args, load_config
from oodforge.data import load_benchmark
from oodforge.data.transforms import TransformedSet
from oodforge.detector import Detector, ThresholdSpec, build_spec
from oodforge.metrics import threshold_at_tpr
from trainer.config import TrainConfig
from trainer.evaluate import collect_benchmark, evaluate_outputs, fit_scores
from trainer.methods import METHODS, Method, MethodContext
from trainer.outlier_stream import OutlierStream
from trainer.report import write_report
from trainer.tracking import CSVTracker

CHECKPOINT_PREFIX = "step_"


class Progress:
    """Where training stands; checkpointed with the model so ``--resume`` continues mid-epoch."""

    def __init__(self) -> None:
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.step_in_epoch, self.global_step = (
            state["epoch"],
            state["step_in_epoch"],
            state["global_step"],
        )


def list_checkpoints(run_dir: Path) -> list[Path]:
    ckpt_dir = run_dir / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def save_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, keep: int) -> None:
    """``save_state`` into a temp dir, then rename: a kill mid-save never leaves a half checkpoint."""
    final = run_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:07d}"
    if final.exists():
        return
    tmp = final.with_name(f".tmp_{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


class TrainStep(nn.Module):
    """The model and the method's own modules as one module whose forward is the method's loss.

    One module means one ``accelerator.prepare`` (one DDP wrapper whose gradient sync covers heads,
    projectors and CLUB networks too) and one checkpointed state.
    """

    def __init__(self, model: Classifier, method: Method) -> None:
        super().__init__()
        self.model = model
        self.method = method

    def forward(
        self, batch: tuple[torch.Tensor, torch.Tensor], outliers: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return self.method.loss(self.model, batch, outliers)


def build_optimizer(cfg: TrainConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(
            groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay
        )
    return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)


def load_initial_weights(model: Classifier, source: Path) -> None:
    """Start from the weights of a detector artifact (``init_from``); the architectures must match."""
    from oodforge.detector import ArtifactError

    try:
        state = Detector.load(source).model.state_dict()
    except ArtifactError as err:
        raise ConfigError(f"init_from: {err}") from None
    result = model.load_state_dict(state, strict=False)
    mismatched = [
        k for k, v in state.items() if k in model.state_dict() and model.state_dict()[k].shape != v.shape
    ]
    if result.missing_keys or result.unexpected_keys or mismatched:
        raise ConfigError(
            f"init_from: the weights in {source} do not fit this run's model (missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}); use a detector trained with the same model and head config"
        )


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Linear warm-up then cosine (or constant) decay, as a function of the step."""
    warm = cfg.optim.warmup_steps

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.optim.scheduler == "constant":
            return 1.0
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_trackers(cfg: TrainConfig, log_dir: Path) -> list[Any]:
    trackers: list[Any] = []
    for name in cfg.train.log_with:
        if name == "csv":
            trackers.append(CSVTracker(cfg.name, log_dir))
        else:
            from accelerate.utils import is_tensorboard_available

            if not is_tensorboard_available():
                raise ConfigError(
                    "train.log_with has 'tensorboard' but it is not installed: pip install tensorboard"
                )
            trackers.append(name)
    return trackers


def prepare_run_dir(cfg: TrainConfig, resume: bool, overwrite: bool) -> Path:
    run_dir = cfg.run_dir
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    if list_checkpoints(run_dir) and not resume:
        raise ConfigError(
            f"{run_dir} already holds checkpoints of an earlier run; pass --resume to continue it, "
            f"--overwrite to start again, or --set name=<new name>"
        )
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    return run_dir


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Train, evaluate and export; returns the run directory."""
    method_cls = METHODS.get(cfg.method)
    method_args = method_cls.Config(**cfg.method_args)
    method_cls.check(method_args, cfg)  # missing inputs fail here, before the run directory is touched
    if cfg.init_from is not None and not (cfg.init_from / "detector.json").is_file():
        raise ConfigError(
            f"init_from: {cfg.init_from} is not a detector directory (no detector.json); train that run first"
        )
    bench = load_benchmark(cfg.data)
    outlier_sets = method_cls.outlier_sets(method_args, cfg, bench.class_names)
    run_dir = prepare_run_dir(cfg, resume, overwrite)
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        log_with=make_trackers(cfg, run_dir / "logs"),
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=method_cls.find_unused_parameters)
        ],
    )
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    accelerator.init_trackers(cfg.name, config=_flat(cfg.model_dump(mode="json")))

    num_classes = len(bench.class_names)
    model = method_cls.build_model(method_args, cfg, bench.class_names)
    if cfg.init_from is not None:
        load_initial_weights(model, cfg.init_from)
    method: Method = method_cls(MethodContext(method_args, num_classes, cfg, model.feature_dim))

    train_set = TransformedSet(
        bench.train, cfg.preprocess, augment=cfg.train.augment, seed=cfg.seed, hflip=cfg.train.hflip
    )
    loader = DataLoader(
        train_set,
        batch_size=cfg.train.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=cfg.train.num_workers,
    )
    groups = [{"params": list(model.parameters())}, *method.param_groups(cfg.optim.lr)]
    optimizer = build_optimizer(cfg, [g for g in groups if g["params"]])
    step_module, optimizer, loader = accelerator.prepare(TrainStep(model, method), optimizer, loader)
    batch_size = method_cls.outlier_batch_size(method_args, cfg)
    streams = {name: OutlierStream(accelerator, ds, batch_size, name) for name, ds in outlier_sets.items()}
    total_steps = cfg.train.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    scheduler = accelerator.prepare(scheduler)
    progress = Progress()
    accelerator.register_for_checkpointing(progress)

    checkpoints = list_checkpoints(run_dir)
    if resume and checkpoints:
        accelerator.load_state(str(checkpoints[-1]))
        accelerator.print(
            f"resumed from {checkpoints[-1]} (epoch {progress.epoch + 1}, step {progress.step_in_epoch} "
            f"of {len(loader)}, global step {progress.global_step})"
        )
    elif resume:
        accelerator.print(f"--resume: no checkpoint in {run_dir / 'checkpoints'}, starting from scratch")
    for stream in streams.values():
        stream.start(progress.global_step)

    started = time.perf_counter()
    step_seconds, timed_steps = 0.0, 0  # optimisation steps only (no validation, no checkpointing)
    while progress.epoch < cfg.train.epochs:
        epoch = progress.epoch
        train_set.set_epoch(epoch)
        loader.set_epoch(epoch)
        batches = (
            accelerator.skip_first_batches(loader, progress.step_in_epoch)
            if progress.step_in_epoch
            else loader
        )
        step_module.train()
        bar = tqdm(
            batches,
            total=len(loader),
            initial=progress.step_in_epoch,
            desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
            disable=not accelerator.is_local_main_process or None,
        )
        running, seen = 0.0, 0
        for batch in bar:
            step_started = time.perf_counter()
            loss, parts = step_module(batch, {name: s.next() for name, s in streams.items()})
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step_seconds, timed_steps = step_seconds + time.perf_counter() - step_started, timed_steps + 1
            progress.global_step += 1
            progress.step_in_epoch += 1
            running, seen = running + loss.item(), seen + 1
            bar.set_postfix(loss=f"{running / seen:.4f}")
            if progress.global_step % cfg.train.log_every_steps == 0:
                accelerator.log(
                    {
                        "train/loss": loss.item(),
                        "lr": scheduler.get_last_lr()[0],
                        **{f"train/{k}": v for k, v in parts.items()},
                    },
                    step=progress.global_step,
                )
            if progress.global_step % cfg.train.checkpoint_every_steps == 0 and progress.step_in_epoch < len(
                loader
            ):
                save_checkpoint(accelerator, run_dir, progress.global_step, cfg.train.keep_checkpoints)
        val_acc = _accuracy(accelerator, _unwrap(accelerator, step_module), bench.val, cfg)
        accelerator.log(
            {"epoch": epoch + 1, "val/accuracy": val_acc, "train/epoch_loss": running / max(1, seen)},
            step=progress.global_step,
        )
        accelerator.print(
            f"epoch {epoch + 1}: train loss {running / max(1, seen):.4f}, val accuracy {100 * val_acc:.2f}%"
        )
        progress.epoch, progress.step_in_epoch = epoch + 1, 0
        save_checkpoint(accelerator, run_dir, progress.global_step, cfg.train.keep_checkpoints)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        finish(
            cfg,
            _unwrap(accelerator, step_module),
            bench,
            run_dir,
            str(accelerator.device),
            time.perf_counter() - started,
            1000 * step_seconds / timed_steps if timed_steps else None,
        )
    accelerator.end_training()
    return run_dir


def _unwrap(accelerator: Accelerator, step_module: nn.Module) -> Classifier:
    return accelerator.unwrap_model(step_module).model


@torch.no_grad()
def _accuracy(accelerator: Accelerator, model: Classifier, images, cfg: TrainConfig) -> float:
    from trainer.evaluate import collect

    out = collect(model, images, cfg.preprocess, cfg.train.eval_batch_size, accelerator.device)
    return (out.logits.argmax(1) == out.labels).float().mean().item()


def finish(
    cfg: TrainConfig,
    model: Classifier,
    bench,
    run_dir: Path,
    device: str,
    train_seconds: float,
    step_ms: float | None = None,
) -> None:
    """Evaluate every configured score, write the report and export the detector."""
    model.eval()
    outputs = collect_benchmark(model, bench, cfg.preprocess, cfg.train.eval_batch_size, device)
    names = list(dict.fromkeys([*cfg.eval.scores, cfg.export.score]))
    scores = fit_scores(names, cfg.eval.score_params, outputs["train"])
    result, values = evaluate_outputs(outputs, bench, scores, tpr=cfg.export.target_id_tpr)
    result.update(
        {
            "run": cfg.name,
            "method": cfg.method,
            "benchmark": cfg.data.benchmark,
            "train_seconds": round(train_seconds, 1),
            # mean wall time of one optimisation step of this process (None when resumed at the end)
            "step_ms": None if step_ms is None else round(step_ms, 2),
        }
    )
    report = write_report(
        result,
        values,
        run_dir,
        title=f"{cfg.name} ({cfg.method}) on {cfg.data.benchmark}",
        plots=cfg.eval.plots,
    )

    score = scores[cfg.export.score]
    val = outputs["val"]
    val_scores = score(val.logits, val.features).numpy()
    threshold = ThresholdSpec(
        value=float(threshold_at_tpr(val_scores, cfg.export.target_id_tpr)),
        split="val",
        target_id_tpr=cfg.export.target_id_tpr,
        n_samples=len(val_scores),
    )
    per = result["scores"][cfg.export.score]
    spec = build_spec(
        name=cfg.name,
        model=model,
        preprocess=cfg.preprocess,
        class_names=bench.class_names,
        score=score,
        threshold=threshold,
        metrics={
            "benchmark": cfg.data.benchmark,
            "id_accuracy": result["id_accuracy"],
            "near": per["near"],
            "far": per["far"],
            "ood": per["ood"],
        },
        training={
            "method": cfg.method,
            "method_args": cfg.model_dump(mode="json")["method_args"],
            "data_seed": cfg.data.seed,
            "seed": cfg.seed,
            "epochs": cfg.train.epochs,
        },
    )
    detector_dir = Detector(model.cpu(), score, spec).save(run_dir / "detector")
    print(
        f"\nID test accuracy {100 * result['id_accuracy']:.2f}% | {cfg.export.score}: "
        f"near AUROC {100 * per['near']['auroc']:.2f}%, far AUROC {100 * per['far']['auroc']:.2f}%\n"
        f"report:   {report}\n"
        f"detector: {detector_dir}  (score {cfg.export.score}, threshold {threshold.value:.4f} at "
        f"{100 * threshold.target_id_tpr:.0f}% ID TPR on val)"
    )


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train, evaluate and export an OOD detector.")
    add_config_args(parser, default="configs/train/ce.yaml")
    parser.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="delete runs/<name> first and start again")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, TrainConfig, args.overrides)
        train(cfg, resume=args.resume, overwrite=args.overwrite)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
