"""What every training script shares: run directory, Accelerate setup, resume, the epoch loop's bookkeeping.

``trainer/train_oal.py`` (classifiers) and ``trainer/train_dense.py`` (segmenters) are separate readable
scripts; the parts that must behave the same in both live here: checkpoints (``accelerator.save_state``
into ``runs/<name>/checkpoints/step_*``, written atomically), ``--resume`` mid-epoch, the learning-rate
schedule, trackers, logging and checkpointing after each step, and the CLI.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from pydantic import BaseModel
from tqdm.auto import tqdm

from oodforge.config import ConfigError, add_config_args, load_config
from oodforge.progress import progress as progress_bar
from trainer.config import LoopConfig, OptimConfig
from trainer.tracking import CSVTracker


class RunConfig(Protocol):
    """What the shared helpers read from a training config (``TrainConfig``, ``DenseTrainConfig``)."""

    name: str
    seed: int
    optim: OptimConfig
    train: LoopConfig

    @property
    def run_dir(self) -> Path:
        """The run's directory (checkpoints, logs, report, detector)."""

    def model_dump(self, **kwargs: Any) -> dict[str, Any]:
        """The config as a dict (pydantic's ``model_dump``)."""

    def model_dump_json(self, **kwargs: Any) -> str:
        """The config as JSON (pydantic's ``model_dump_json``)."""


CHECKPOINT_PREFIX = "step_"


class Progress:
    """Where training stands; checkpointed with the model so ``--resume`` continues mid-epoch."""

    def __init__(self) -> None:
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0

    def state_dict(self) -> dict[str, int]:
        """The epoch, step within the epoch and global step, as saved in a checkpoint."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the counters from :meth:`state_dict` output."""
        self.epoch, self.step_in_epoch, self.global_step = (
            state["epoch"],
            state["step_in_epoch"],
            state["global_step"],
        )


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint directories, oldest (lowest step) first."""
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


def build_optimizer(cfg: RunConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """SGD (with momentum) or AdamW over the parameter ``groups``, as ``cfg.optim`` says."""
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(
            groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay
        )
    return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)


def lr_lambda(cfg: RunConfig, total_steps: int) -> Callable[[int], float]:
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


def make_trackers(cfg: RunConfig, log_dir: Path) -> list[Any]:
    """The Accelerate trackers for ``cfg.train.log_with`` (a ConfigError if TensorBoard is missing)."""
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


def prepare_run_dir(cfg: RunConfig, resume: bool, overwrite: bool) -> Path:
    """Create the run directory (emptied first with ``overwrite``); old checkpoints need ``resume``."""
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


def flat_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to dotted keys; values that are not scalars become JSON strings."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out


def start_run(cfg: RunConfig, run_dir: Path, kwargs_handlers: Iterable[Any] = ()) -> Accelerator:
    """The run's ``Accelerator`` (trackers, project dir, seedable sampler), seeded; writes ``config.json``."""
    # Without cpu=True, Accelerate on a host without CUDA ignores the launcher's process group and runs
    # every process of `accelerate launch --multi_gpu` / `--num_machines 2` as a world of its own. The
    # state is a singleton that CSVTracker's @on_main_process would create first (with cpu=False).
    cpu = not torch.cuda.is_available()
    PartialState(cpu=cpu)
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=cfg.train.mixed_precision,
        log_with=make_trackers(cfg, run_dir / "logs"),
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=list(kwargs_handlers),
    )
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    accelerator.init_trackers(cfg.name, config=flat_config(cfg.model_dump(mode="json")))
    return accelerator


def restore(accelerator: Accelerator, run_dir: Path, resume: bool, steps_per_epoch: int) -> Progress:
    """A :class:`Progress` registered for checkpointing, loaded with the last checkpoint when resuming."""
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    checkpoints = list_checkpoints(run_dir)
    if resume and checkpoints:
        accelerator.load_state(str(checkpoints[-1]))
        accelerator.print(
            f"resumed from {checkpoints[-1]} (epoch {progress.epoch + 1}, step {progress.step_in_epoch} "
            f"of {steps_per_epoch}, global step {progress.global_step})"
        )
    elif resume:
        accelerator.print(f"--resume: no checkpoint in {run_dir / 'checkpoints'}, starting from scratch")
    return progress


def epoch_batches(accelerator: Accelerator, loader: Any, progress: Progress, epochs: int) -> tqdm:
    """The current epoch's batches with a progress bar, skipping those a resumed run already trained on."""
    loader.set_epoch(progress.epoch)
    if hasattr(loader, "batches"):  # trainer.tensor_data.TensorBatches skips on its own
        batches = loader.batches(progress.step_in_epoch)
    elif progress.step_in_epoch:
        batches = accelerator.skip_first_batches(loader, progress.step_in_epoch)
    else:
        batches = loader
    return progress_bar(
        batches,
        total=len(loader),
        initial=progress.step_in_epoch,
        desc=f"epoch {progress.epoch + 1}/{epochs}",
        disable=not accelerator.is_local_main_process,
    )


def end_step(
    accelerator: Accelerator,
    cfg: RunConfig,
    progress: Progress,
    steps_per_epoch: int,
    logs: dict[str, float],
) -> None:
    """Count the step, log ``logs`` every ``log_every_steps`` and checkpoint every ``checkpoint_every_steps``.

    The end-of-epoch checkpoint is written by the caller, after its epoch-end work.
    """
    progress.global_step += 1
    progress.step_in_epoch += 1
    if progress.global_step % cfg.train.log_every_steps == 0:
        accelerator.log(logs, step=progress.global_step)
    if (
        progress.global_step % cfg.train.checkpoint_every_steps == 0
        and progress.step_in_epoch < steps_per_epoch
    ):
        save_checkpoint(accelerator, cfg.run_dir, progress.global_step, cfg.train.keep_checkpoints)


def run_cli(
    argv: list[str] | None,
    config_cls: type[BaseModel],
    train: Callable[..., Path],
    description: str,
    default_config: str,
) -> int:
    """``--config`` / ``--set`` / ``--resume`` / ``--overwrite``; a config error exits 2 with its message."""
    parser = argparse.ArgumentParser(description=description)
    add_config_args(parser, default=default_config)
    parser.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="delete runs/<name> first and start again")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, config_cls, args.overrides)
        train(cfg, resume=args.resume, overwrite=args.overwrite)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
