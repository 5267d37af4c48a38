"""Train a classifier OOD detector with any method, evaluate it and export the detector artifact.

    accelerate launch trainer/train.py --config configs/train/ce.yaml [--set train.epochs=5] [--resume]
    accelerate launch trainer/train_oal.py --config configs/train/oal.yaml    # the same script

The method (``ce``, ``teacher``, ``oal``, ``oe``, ``energy_margin``, ``vos``, ``isomax_plus``: the
``trainer.methods`` registry) is chosen by ``method:`` in the config; its ``setup`` builds the model it
trains and loads what it needs, before the run directory is touched. Runs
unchanged on CPU, one GPU or several (``accelerate launch --multi_gpu``). Everything lands in
``runs/<name>/``: ``checkpoints/`` (``accelerator.save_state``, every ``train.checkpoint_every_steps``
steps and at each epoch end), ``logs/metrics.csv``, ``report.json``, ``report.md``, ``plots/`` and
``detector/``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch import nn

from oodforge.backbones import Classifier
from oodforge.config import ConfigError
from oodforge.data import Benchmark, ImageSet, load_benchmark
from oodforge.detector import ArtifactError, ClassifierDetector
from oodforge.reference import Reference, find_reference
from trainer.classifier_eval import collect, collect_benchmark, evaluate_outputs, fit_scores
from trainer.config import AUTO_SCORE, TrainConfig
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
from trainer.methods import Method, Plan, build_method
from trainer.outlier_stream import OutlierStream
from trainer.report import write_report
from trainer.selection import holdout_images_dir, load_holdout, select_on_validation
from trainer.tensor_data import TensorBatches


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
        """The method's loss on an ID batch and the outlier batches, and its parts for logging."""
        return self.method.loss(self.model, batch, outliers)


def load_initial_weights(model: Classifier, source: Path) -> None:
    """Start from the weights of a detector artifact (``init_from``); the architectures must match."""
    try:
        state = ClassifierDetector.load(source).model.state_dict()
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


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Train, evaluate and export; returns the run directory."""
    method = build_method(cfg.method, cfg.method_args)
    if cfg.init_from is not None and not (cfg.init_from / "detector.json").is_file():
        raise ConfigError(
            f"init_from: {cfg.init_from} is not a detector directory (no detector.json); train that run first"
        )
    bench = load_benchmark(cfg.data)
    if cfg.preprocess.raw is None and bench.raw is not None:  # train/serve parity: the artifact records it
        cfg.preprocess = cfg.preprocess.model_copy(update={"raw": bench.raw})
    set_seed(cfg.seed)  # the model's initial weights are a function of the seed
    plan = method.setup(cfg, bench)  # missing inputs fail here, before the run directory is touched
    if cfg.export.score == AUTO_SCORE and not bench.val_ood:  # so does a missing held-out set for selection
        try:
            load_holdout(holdout_images_dir(cfg.export.selection_outliers, cfg.method_args)).images("holdout")
        except ValueError as err:
            raise ConfigError(f"export.score: auto: {err}") from None
    model = plan.model
    if cfg.init_from is not None:
        load_initial_weights(model, cfg.init_from)
    run_dir = prepare_run_dir(cfg, resume, overwrite)
    accelerator = start_run(
        cfg, run_dir, [DistributedDataParallelKwargs(find_unused_parameters=plan.find_unused_parameters)]
    )

    loader = TensorBatches(
        [bench.train, *reference_train_sets(cfg)],
        cfg.preprocess,
        cfg.train.batch_size,
        cfg.seed,
        shift=2 if cfg.train.augment else 0,
        hflip=cfg.train.hflip,
        covariate=cfg.train.covariate,
        device=accelerator.device,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
    )
    optimizer = build_optimizer(cfg, param_groups(model, method, plan))
    step_module, optimizer = accelerator.prepare(TrainStep(model, method), optimizer)
    batch_size = plan.outlier_batch_size or cfg.train.batch_size
    streams = {name: OutlierStream(accelerator, ds, batch_size, name) for name, ds in plan.outliers.items()}
    total_steps = cfg.train.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    scheduler = accelerator.prepare(scheduler)
    progress = restore(accelerator, run_dir, resume, len(loader))
    for stream in streams.values():
        stream.start(progress.global_step)

    started = time.perf_counter()
    step_seconds, timed_steps = 0.0, 0  # optimisation steps only (no validation, no checkpointing)
    while progress.epoch < cfg.train.epochs:
        epoch = progress.epoch
        method.set_epoch(epoch)
        step_module.train()
        bar = epoch_batches(accelerator, loader, progress, cfg.train.epochs)
        running, seen = 0.0, 0
        for batch in bar:
            step_started = time.perf_counter()
            loss, parts = step_module(batch, {name: s.next() for name, s in streams.items()})
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step_seconds, timed_steps = step_seconds + time.perf_counter() - step_started, timed_steps + 1
            running, seen = running + loss.item(), seen + 1
            bar.set_postfix(loss=f"{running / seen:.4f}")
            end_step(
                accelerator,
                cfg,
                progress,
                len(loader),
                {
                    "train/loss": loss.item(),
                    "lr": scheduler.get_last_lr()[0],
                    **{f"train/{k}": v for k, v in parts.items()},
                },
            )
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
            plan.head_sees_synth_images,
        )
    accelerator.end_training()
    return run_dir


def reference_dir_of(cfg: TrainConfig) -> Path | None:
    """The outlier dataset whose generator reference this run reads (``train.reference`` or the method's)."""
    path = cfg.train.reference or cfg.method_args.get("outliers")
    return Path(path) if path else None


def reference_train_sets(cfg: TrainConfig) -> list[ImageSet]:
    """The labelled reference images ``train.id_reference`` adds to the ID stream (train split only)."""
    if not cfg.train.id_reference:
        return []
    root = reference_dir_of(cfg)
    try:
        reference = Reference.load(root) if root else None
    except FileNotFoundError as err:
        raise ConfigError(f"train.id_reference: {err}") from None
    if reference is None:
        raise ConfigError("train.id_reference needs train.reference (an outlier dataset with a reference/)")
    sets = [reference.get(kind, "train") for kind in cfg.train.id_reference]
    missing = [k for k, s in zip(cfg.train.id_reference, sets, strict=True) if s is None]
    if missing:
        raise ConfigError(
            f"train.id_reference: {reference.root} has no {missing} images; re-run synth reference"
        )
    return sets


def param_groups(model: Classifier, method: Method, plan: Plan) -> list[dict[str, Any]]:
    """The model at the run's learning rate, the method's groups, and its other parameters at the run's rate."""
    grouped = {id(p) for g in plan.param_groups for p in g["params"]}
    rest = [p for p in method.parameters() if p.requires_grad and id(p) not in grouped]
    groups = [{"params": list(model.parameters())}, *plan.param_groups, {"params": rest}]
    return [g for g in groups if g["params"]]


def _unwrap(accelerator: Accelerator, step_module: nn.Module) -> Classifier:
    return accelerator.unwrap_model(step_module).model


@torch.no_grad()
def _accuracy(accelerator: Accelerator, model: Classifier, images: ImageSet, cfg: TrainConfig) -> float:
    out = collect(model, images, cfg.preprocess, cfg.train.eval_batch_size, accelerator.device)
    return (out.logits.argmax(1) == out.labels).float().mean().item()


def choose_export_score(
    cfg: TrainConfig,
    model: Classifier,
    bench: Benchmark,
    outputs: dict[str, Any],
    device: str,
    head_sees_synth_images: bool,
) -> tuple[str, dict[str, Any] | None]:
    """``export.score``, or for ``auto`` the candidate :func:`trainer.selection.select_on_validation` picks.

    Only ID val, csID-val, the validation OOD sets and (without those) the held-out synthetic outliers are read.
    """
    if cfg.export.score != AUTO_SCORE:
        return cfg.export.score, None
    candidates = fit_scores(cfg.export.candidates, cfg.eval.score_params, outputs["train"])
    candidates = {n: s for n, s in candidates.items() if not s.needs_grad}
    holdout = None
    if not any(k.startswith("valood/") for k in outputs):
        path = holdout_images_dir(cfg.export.selection_outliers, cfg.method_args)
        images = load_holdout(path).images("holdout")
        holdout = collect(
            model, images, cfg.preprocess, cfg.train.eval_batch_size, device, desc="embed held-out"
        )
    selection = select_on_validation(
        candidates,
        outputs,
        cfg.export.target_id_tpr,
        holdout=holdout,
        head_sees_synth_images=head_sees_synth_images,
        val_ood_shifts={n: o.shift for n, o in bench.val_ood.items()},
    )
    selection["head_sees_synth_images"] = head_sees_synth_images
    return selection["chosen"], selection


def finish(
    cfg: TrainConfig,
    model: Classifier,
    bench: Benchmark,
    run_dir: Path,
    device: str,
    train_seconds: float,
    step_ms: float | None = None,
    head_sees_synth_images: bool = False,
) -> None:
    """Evaluate every configured score, write the report and export the detector."""
    model.eval()
    reference = find_reference(reference_dir_of(cfg))
    outputs = collect_benchmark(model, bench, cfg.preprocess, cfg.train.eval_batch_size, device, reference)
    export_score, selection = choose_export_score(cfg, model, bench, outputs, device, head_sees_synth_images)
    names = list(dict.fromkeys([export_score, *cfg.eval.scores]))  # the report's headline: the exported score
    scores = fit_scores(names, cfg.eval.score_params, outputs["train"])
    result, values = evaluate_outputs(outputs, bench, scores, tpr=cfg.export.target_id_tpr)
    result.update(
        {
            "run": cfg.name,
            "method": cfg.method,
            "target_id_tpr": cfg.export.target_id_tpr,
            "reference": str(reference.root) if reference else None,
            "benchmark": cfg.data.benchmark,
            "train_seconds": round(train_seconds, 1),
            # mean wall time of one optimisation step of this process (None when resumed at the end)
            "step_ms": None if step_ms is None else round(step_ms, 2),
        }
    )
    score = scores[export_score]
    val = outputs["val"]
    per = result["scores"][export_score]
    if selection:
        result["score_selection"] = selection
    detector = ClassifierDetector.create(
        name=cfg.name,
        model=model.cpu(),
        score=score,
        preprocess=cfg.preprocess,
        class_names=bench.class_names,
        val_scores=score(val.logits, val.features).numpy(),
        target_id_tpr=cfg.export.target_id_tpr,
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
            "score_selection": selection,
            "head_sees_synth_images": head_sees_synth_images,
        },
    )
    detector_dir = detector.save(run_dir / "detector")
    result["detector_info"] = detector.describe()
    report = write_report(
        result,
        values,
        run_dir,
        title=f"{cfg.name} ({cfg.method}) on {cfg.data.benchmark}",
        plots=cfg.eval.plots,
    )
    print(
        f"\nID test accuracy {100 * result['id_accuracy']:.2f}% | {export_score}: "
        + ", ".join(f"{g} AUROC {100 * per[g]['auroc']:.2f}%" for g in ("near", "far") if per[g])
        + "\n"
        f"report:   {report}\n"
        f"detector: {detector_dir}  (score {export_score}, threshold {detector.threshold:.4f} at "
        f"{100 * cfg.export.target_id_tpr:.0f}% ID TPR on val)"
    )


def main(argv: list[str] | None = None) -> int:
    """Train a classifier detector from the command line (``--config``, ``--set``, ``--resume``...)."""
    return run_cli(
        argv, TrainConfig, train, "Train, evaluate and export an OOD detector.", "configs/train/ce.yaml"
    )


if __name__ == "__main__":
    raise SystemExit(main())
