"""Resumable fit stages: ``accelerate`` checkpoints of a training loop, written atomically, resumed by config.

``fit-generator`` trains in stages (the embedded generator's VAE and UNet stages, or textual inversion).
Each stage writes ``Accelerator.save_state`` checkpoints to ``<work>/checkpoints/<stage>/step_NNNNNNN/``
every ``checkpoint_every_steps`` steps and once more at its end. A checkpoint holds what the loop's next
step depends on: the prepared model(s), optimizer and learning-rate scheduler, and the objects registered
with ``register_for_checkpointing`` — the stage's step counter (:class:`StageProgress`), the
``torch.Generator`` that draws its batches, noise and timesteps (:class:`GeneratorState`) and, where there
is one, the EMA model. Nothing in the loops draws from the global RNG, so a stage resumed from step N
continues exactly as an uninterrupted run would and ends with the same weights.

A checkpoint is written to a temp dir and renamed (a kill mid-save leaves the previous one intact); the
last ``keep`` are kept. Each records the stage's config fingerprint in ``stage.json``: a re-run with the
same config resumes from the newest checkpoint, a re-run with another config starts the stage again and
names the keys that changed.

Example:
    >>> stage = Stage(work_dir, "vae", fingerprint={"steps": 600}, every=200)
    >>> accelerator = Accelerator(device_placement=False)
    >>> model, opt, sched = accelerator.prepare(model, opt, sched)
    >>> done = stage.begin(accelerator, GeneratorState(gen))   # loads the newest checkpoint, if any
    >>> for step in stage.steps(done, total=600, desc="fit VAE"):
    ...     ...  # one optimiser step
    ...     stage.step_done(accelerator, done)
    >>> stage.finish(accelerator, done)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from oodforge.progress import progress

CHECKPOINT_PREFIX = "step_"
META_FILE = "stage.json"
_ACCELERATE_LOGGERS = ("accelerate.accelerator", "accelerate.checkpointing")


class StageProgress:
    """Where a stage stands: optimiser steps done, and whether the stage has ended (checkpointed)."""

    def __init__(self) -> None:
        self.step = 0
        self.finished = False

    def state_dict(self) -> dict[str, Any]:
        """The step and the finished flag, as saved in a checkpoint."""
        return {"step": self.step, "finished": self.finished}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step and the finished flag from :meth:`state_dict` output."""
        self.step, self.finished = int(state["step"]), bool(state["finished"])


class GeneratorState:
    """A ``torch.Generator`` as a checkpointable object (``state_dict`` = its RNG state)."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The generator's RNG state, as saved in a checkpoint."""
        return {"rng_state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the generator's RNG state from :meth:`state_dict` output."""
        self.generator.set_state(state["rng_state"])


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two (nested) dicts."""
    a, b = _flat(old), _flat(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>"))


def trim_log(path: Path, prefix: str, step: int) -> None:
    """Drop the JSON-lines entries of one stage (keys starting with ``prefix``) at or after ``step``.

    A resumed stage logs those steps again; without this the log would hold them twice. Lines cut short
    by a kill are dropped too.
    """
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        ours = any(k.startswith(prefix) for k in entry if k != "step")
        if not (ours and entry.get("step", -1) >= step):
            kept.append(line)
    tmp = path.with_name(f".tmp_{path.name}")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)


@contextmanager
def _quiet_accelerate() -> Iterator[None]:
    """While inside, keep accelerate's per-file INFO log of every save/load out of the fit's output."""
    loggers = [logging.getLogger(name) for name in _ACCELERATE_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class Stage:
    """The checkpoints of one resumable training loop.

    Args:
        work_dir: The fit's work directory; checkpoints go to ``work_dir/checkpoints/<name>/``.
        name: Stage name (``vae``, ``unet``, ``invert``); also the prefix of its log keys (``vae/l1``).
        fingerprint: JSON-able description of everything the stage's result depends on (config, seed,
            data, the stages before it). Checkpoints with another fingerprint are discarded.
        every: Checkpoint every this many steps (and always at the stage's end).
        keep: How many checkpoints to keep (the newest).
        log: The fit's JSON-lines log; a resumed stage's entries from the resume step on are dropped.
    """

    def __init__(
        self,
        work_dir: Path,
        name: str,
        fingerprint: dict[str, Any],
        every: int,
        keep: int = 2,
        log: Path | None = None,
    ) -> None:
        self.directory = Path(work_dir) / "checkpoints" / name
        self.name = name
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        self.every = every
        self.keep = keep
        self.log = log
        self.resumed_from: Path | None = None

    def checkpoints(self) -> list[Path]:
        """This stage's checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
        return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))

    def begin(self, accelerator: Accelerator, *objects: Any) -> StageProgress:
        """Register the stage's progress and ``objects`` for checkpointing; load the newest checkpoint.

        Call after ``accelerator.prepare(...)`` of the model(s), optimizer and scheduler. Returns the
        stage's :class:`StageProgress` (step 0 when there is nothing to resume). The stage's log entries
        from that step on (written by a run that was killed) are dropped: the loop writes them again.
        """
        done = StageProgress()
        accelerator.register_for_checkpointing(done, *objects)
        self._load_newest(accelerator, done)
        if self.log is not None:
            trim_log(self.log, f"{self.name}/", done.step)
        return done

    def _load_newest(self, accelerator: Accelerator, done: StageProgress) -> None:
        if self.directory.is_dir():
            for leftover in self.directory.glob(".tmp_*"):  # a save that a kill interrupted
                shutil.rmtree(leftover, ignore_errors=True)
        found = self.checkpoints()
        if not found:
            return
        newest = found[-1]
        meta = json.loads((newest / META_FILE).read_text()) if (newest / META_FILE).is_file() else {}
        if meta.get("fingerprint") != self.fingerprint:
            keys = changed_keys(meta.get("fingerprint", {}), self.fingerprint)
            print(
                f"{self.name}: the checkpoints in {self.directory} were written with a different config "
                f"(changed: {', '.join(keys[:8]) or 'unknown'}); starting the {self.name} stage again"
            )
            shutil.rmtree(self.directory)
            return
        with _quiet_accelerate():
            accelerator.load_state(str(newest))
        self.resumed_from = newest
        what = "finished earlier" if done.finished else f"resumed at step {done.step}"
        print(f"{self.name}: {what}, restored from {newest}")

    def steps(self, done: StageProgress, total: int, desc: str) -> Any:
        """The remaining step indices ``done.step .. total-1`` as a progress bar (none once finished)."""
        start = total if done.finished else min(done.step, total)
        if start and not done.finished:
            desc = f"{desc} (resumed at step {start})"
        return progress(range(start, total), total=total, initial=start, desc=desc)

    def step_done(self, accelerator: Accelerator, done: StageProgress) -> None:
        """Count one optimiser step; checkpoint when the step count is a multiple of ``every``."""
        done.step += 1
        if done.step % self.every == 0:
            self.save(accelerator, done)

    def finish(self, accelerator: Accelerator, done: StageProgress) -> None:
        """Mark the stage ended and checkpoint it (a re-run restores this state and skips the loop)."""
        if done.finished:
            return
        done.finished = True
        self.save(accelerator, done)

    def save(self, accelerator: Accelerator, done: StageProgress) -> Path:
        """``save_state`` into a temp dir, then rename; keeps the newest ``keep`` checkpoints."""
        final = self.directory / f"{CHECKPOINT_PREFIX}{done.step:07d}"
        tmp = final.with_name(f".tmp_{final.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        with _quiet_accelerate():
            accelerator.save_state(str(tmp))
        meta = {
            "stage": self.name,
            "step": done.step,
            "finished": done.finished,
            "fingerprint": self.fingerprint,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        if final.exists():  # the stage ended on a checkpoint step: the end state replaces it
            old = final.with_name(f".tmp_old_{final.name}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        for stale in self.checkpoints()[: -self.keep]:
            shutil.rmtree(stale, ignore_errors=True)
        return final
