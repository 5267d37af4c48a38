"""Where the outlier stage's time goes: the pixel loop of ``python -m synth generate``, timed by component.

    PYTHONPATH=$PWD .venv/bin/python bench/profile_outliers.py --teacher runs/teacher/detector \\
        [--generator oodforge/assets/generators/tiny-mnist-open] [--pixel 60] [--json out.json] [--write]

It runs :func:`synth.generate.generate` with the demo's ``configs/synth/mnist_open.yaml`` (only the teacher,
generator, ``counts.pixel`` and the output directory changed) and wraps, at class level, the functions the
pixel loop calls. Each wrapper records *exclusive* time (its own time minus that of wrapped calls inside
it) for the thread it runs in, only while ``pixel_pools`` runs, so the rows of the main thread add up to the
loop's wall time (``other``: the loop's own Python, tensor copies, ``torch.stack``...). Writer-thread rows
(if the code writes from a thread) overlap the main thread and are listed separately.

Candidates/s = pixel records written / ``pixel_pools`` wall time. The script only uses names that exist
before and after issue 26, so the same file profiles an older checkout (``PYTHONPATH=<old checkout>``).
``--write`` puts the table in the ``profile-outliers`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]

_state = threading.local()
_active = threading.Event()
_totals: dict[tuple[str, str], float] = defaultdict(float)
_calls: dict[tuple[str, str], int] = defaultdict(int)


def _thread() -> str:
    return "main" if threading.current_thread() is threading.main_thread() else "writer thread"


def _wrap(owner: Any, name: str, label: str) -> None:
    """Replace ``owner.name`` by a wrapper that adds its exclusive time to ``label``."""
    inner: Callable = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        if not _active.is_set():
            return inner(*args, **kwargs)
        stack = getattr(_state, "stack", None)
        if stack is None:
            stack = _state.stack = []
        stack.append(0.0)  # time spent in wrapped callees
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            elapsed = time.perf_counter() - start
            child = stack.pop()
            key = (_thread(), label)
            _totals[key] += elapsed - child
            _calls[key] += 1
            if stack:
                stack[-1] += elapsed

    setattr(owner, name, timed)


def install() -> None:
    """Wrap the components of the pixel loop (class-level, so every instance is timed)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextModel

    import synth.generate as gen_mod
    from oodforge.backbones import Classifier
    from oodforge.data.transforms import Preprocess
    from oodforge.outliers import OutlierWriter

    _wrap(UNet2DConditionModel, "forward", "UNet")
    _wrap(AutoencoderKL, "decode", "VAE decode")
    _wrap(CLIPTextModel, "forward", "text encoder")
    _wrap(StableDiffusionPipeline, "__call__", "diffusers pipeline (scheduler, CFG, latents)")
    _wrap(Classifier, "forward", "teacher forward")
    _wrap(Preprocess, "__call__", "teacher pre-processing")
    _wrap(Preprocess, "tensor", "teacher pre-processing")
    _wrap(Image, "fromarray", "PIL conversion")
    _wrap(gen_mod, "filter_near", "FAISS ID-near filter")
    for name in ("add_image", "add_images", "add_latents"):
        if hasattr(OutlierWriter, name):
            _wrap(OutlierWriter, name, "writing (PNG, part files, journal)")
    loop = gen_mod.pixel_pools

    def timed_loop(*args: Any, **kwargs: Any) -> Any:
        _active.set()
        start, cpu = time.perf_counter(), time.process_time()
        try:
            return loop(*args, **kwargs)
        finally:
            _totals[("main", "__loop__")] = time.perf_counter() - start
            _totals[("main", "__cpu__")] = time.process_time() - cpu
            _active.clear()

    gen_mod.pixel_pools = timed_loop


def table(result: dict) -> str:
    """A markdown table of the main thread's rows (share of the loop) and the writer thread's."""
    loop = result["loop_seconds"]
    rows = ["| component | thread | seconds | share of the loop | calls |", "|---|---|---:|---:|---:|"]
    for r in result["rows"]:
        share = f"{100 * r['seconds'] / loop:.1f}%" if r["thread"] == "main" else "(overlapped)"
        rows.append(f"| {r['component']} | {r['thread']} | {r['seconds']:.2f} | {share} | {r['calls']} |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", type=Path, default=REPO / "runs/teacher/detector")
    p.add_argument("--generator", default=str(REPO / "oodforge/assets/generators/tiny-mnist-open"))
    p.add_argument("--config", type=Path, default=REPO / "configs/synth/mnist_open.yaml")
    p.add_argument("--pixel", type=int, default=60, help="kept pixel outliers to make (counts.pixel)")
    p.add_argument(
        "--factor",
        type=float,
        default=None,
        help="counts.max_candidates_factor: stop after pixel x factor candidates",
    )
    p.add_argument("--batch-size", type=int, default=None, help="counts.batch_size (default: the config's)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--dtype", default=None, help="generator.dtype (default: the config's, float32)")
    p.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    p.add_argument("--label", default="", help="a name for this run in the output (e.g. 'before')")
    p.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    install()
    from synth.generate import SynthConfig, generate

    raw = yaml.safe_load(args.config.read_text())
    raw["teacher"] = str(args.teacher)
    raw["generator"] = {**raw["generator"], "pretrained": args.generator}
    raw["counts"] = {**raw["counts"], "pixel": args.pixel}
    if args.batch_size:
        raw["counts"]["batch_size"] = args.batch_size
    if args.dtype:
        raw["generator"]["dtype"] = args.dtype
    if args.factor:
        raw["counts"]["max_candidates_factor"] = args.factor
    cfg = SynthConfig.model_validate(raw)
    out = Path(tempfile.mkdtemp(prefix="profile-outliers-"))
    try:
        started = time.perf_counter()
        card = generate(cfg, out / "outliers")
        stage = time.perf_counter() - started
    finally:
        shutil.rmtree(out, ignore_errors=True)
    loop = _totals.pop(("main", "__loop__"))
    cpu = _totals.pop(("main", "__cpu__"))
    named = sum(s for (t, _), s in _totals.items() if t == "main")
    rows = [
        {"component": c, "thread": t, "seconds": s, "calls": _calls[(t, c)]}
        for (t, c), s in sorted(_totals.items(), key=lambda kv: (kv[0][0] != "main", -kv[1]))
    ]
    rows.append({"component": "other (loop Python, copies, stacking)", "thread": "main",
                 "seconds": loop - named, "calls": 0})  # fmt: skip
    candidates = card["counts"]["pixel"]["generated"]
    unet_vae = sum(
        r["seconds"] for r in rows if r["thread"] == "main" and r["component"] in ("UNet", "VAE decode")
    )
    result = {
        "label": args.label,
        "code": str(Path(sys.modules["synth.generate"].__file__).resolve().parents[1]),
        "threads": torch.get_num_threads(),
        "batch_size": cfg.counts.batch_size,
        "dtype": cfg.generator.dtype,
        "pixel_kept": card["counts"]["pixel"]["kept"],
        "candidates": candidates,
        "loop_seconds": loop,
        "stage_seconds": stage,
        "candidates_per_s": candidates / loop,
        "loop_cpu_seconds": cpu,
        "candidates_per_cpu_s": candidates / cpu,
        "unet_vae_share": unet_vae / loop,
        "rows": rows,
    }
    text = (
        f"{args.label or 'run'}: {candidates} candidates, {result['pixel_kept']} kept, pixel loop {loop:.1f} s "
        f"(stage {stage:.1f} s): **{result['candidates_per_s']:.1f} candidates/s** "
        f"({result['candidates_per_cpu_s']:.1f} per CPU-second of the process), UNet + VAE "
        f"{100 * result['unet_vae_share']:.0f}% of the loop ({result['threads']} torch threads, batch "
        f"{result['batch_size']}, code {result['code']})\n\n{table(result)}"
    )
    print(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.write:
        from bench.common import machine, today, write_section

        write_section(
            "profile-outliers", f"## Outlier loop profile\n\nMeasured {today()} on {machine()}.\n\n{text}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
