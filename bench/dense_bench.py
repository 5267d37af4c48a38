"""Dense OOD on mnist-scenes: no negatives vs flow vs synth vs both, 3 seeds, one run -> BENCHMARKS.md.

Every variant trains the same segmenter (fcn-tiny) on the same scenes (data seed 0) with training seeds
0, 1, 2; only ``negatives.sources`` differs (``configs/train/dense*.yaml``). The no-negatives segmenter
is judged by its max-softmax and energy maps, the others by their JS map (and max-softmax, to separate
the effect of the training from the effect of the score). The table gives mean ± std over seeds of
pixel AP / FPR@95 / AUROC per anomaly set and the inlier mIoU; ``bench/dense_maps.png`` shows test
scenes, their ground-truth anomaly masks and the seed-0 maps of every variant side by side.

    .venv/bin/python bench/dense_bench.py            # ~40 min on 2 cores; finished runs are reused
    .venv/bin/python bench/dense_bench.py --fresh    # retrain everything
    .venv/bin/python bench/dense_bench.py --seeds 0 --only none,flow   # a quick partial look (no write)

The ``synth`` source reads ``runs/outliers`` (``make demo`` writes it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, today, write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = Path("runs/bench-dense")
FIGURE = Path("bench/dense_maps.png")
LAUNCH = "launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no"
ANOMALY_SETS = ("digits-6-9", "faces", "textures", "photos")
METRICS = ("ap", "fpr95", "auroc")


@dataclass(frozen=True)
class Variant:
    name: str
    config: str
    scores: tuple[str, ...]


VARIANTS = [
    Variant("none", "dense.yaml", ("msp", "energy")),
    Variant("flow", "dense_flow.yaml", ("js", "msp")),
    Variant("synth", "dense_synth.yaml", ("js", "msp")),
    Variant("both", "dense_both.yaml", ("js", "msp")),
]


def run_dir(variant: Variant, seed: int) -> Path:
    return OUT / f"{variant.name}-s{seed}"


def train(variant: Variant, seed: int, fresh: bool) -> dict:
    out = run_dir(variant, seed)
    report = out / "report.json"
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    if not report.is_file():
        cmd = (
            f"{Path(sys.executable).with_name('accelerate')} {LAUNCH} trainer/train_dense.py --config configs/train/{variant.config} "
            f"--set name={out.name} --set output_dir={OUT} --set seed={seed} --resume"
        )
        print(f"$ {cmd}", flush=True)
        started = time.perf_counter()
        # accelerate launch sets OMP_NUM_THREADS=1 unless it is set: give torch every core
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
        subprocess.run(cmd.split(), cwd=REPO, check=True, env=env)
        print(f"  {variant.name} seed {seed}: {time.perf_counter() - started:.0f} s wall", flush=True)
    return json.loads(report.read_text())


def mean_std(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    return f"{mean:.1f}" if len(values) < 2 else f"{mean:.1f}±{100 * statistics.stdev(values):.1f}"


def table(results: dict[str, list[dict]]) -> str:
    head = "| negatives | pixel score | " + " | ".join(f"{k} AP / FPR@95 / AUROC" for k in ANOMALY_SETS)
    head += " | all pixels AP / FPR@95 / AUROC | inlier mIoU |"
    lines = [head, "|" + "---|" * (len(ANOMALY_SETS) + 4)]
    for variant in VARIANTS:
        reports = results.get(variant.name)
        if not reports:
            continue
        for score in variant.scores:
            cells = []
            for anomaly_set in ANOMALY_SETS:
                per = [r["scores"][score]["pixel"]["sets"][anomaly_set] for r in reports]
                cells.append(" / ".join(mean_std([p[m] for p in per]) for m in METRICS))
            every = [r["scores"][score]["pixel"]["all"] for r in reports]
            cells.append(" / ".join(mean_std([p[m] for p in every]) for m in METRICS))
            cells.append(mean_std([r["miou"] for r in reports]))
            lines.append(f"| {variant.name} | {score} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(variants: list[Variant], seed: int) -> Path:
    """Scenes, ground truth and the seed-``seed`` map of every variant, for two scenes of each anomaly set."""
    import torch

    from oodforge.data.mnist_scenes import SceneConfig, load_scenes
    from oodforge.dense import PIXEL_SCORES
    from oodforge.detector import DenseDetector
    from trainer.dense_eval import example_rows, maps_figure, scene_pixels

    test = load_scenes(SceneConfig(seed=0)).test
    rows = example_rows(test)
    maps: dict[str, np.ndarray] = {}
    for variant in variants:
        detector = DenseDetector.load(run_dir(variant, seed) / "detector")
        with torch.no_grad():
            logits = detector.model(scene_pixels(test, detector.preprocess)[rows])
        full = np.zeros((len(test), *logits.shape[-2:]), dtype=np.float32)
        score = variant.scores[0]
        full[rows] = PIXEL_SCORES.get(score)(logits).numpy()
        maps[f"{variant.name} ({score})"] = full
    return maps_figure(test, rows, maps, FIGURE, title="mnist-scenes test: anomaly maps (bright = anomalous)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--only", default=None, help="comma-separated variants (none, flow, synth, both)")
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [v for v in VARIANTS if args.only is None or v.name in args.only.split(",")]
    started = time.perf_counter()
    results: dict[str, list[dict]] = {v.name: [] for v in variants}
    for seed in seeds:  # seed-major, so a partial look at all variants comes early
        for v in variants:
            results[v.name].append(train(v, seed, args.fresh))
    wall = time.perf_counter() - started
    body = table(results)
    print(body)
    if args.only is not None or len(seeds) < 3:
        print("(partial run: BENCHMARKS.md not written)")
        return 0
    fig = figure(variants, seeds[0])
    times = [r["train_seconds"] + r["eval_seconds"] for rs in results.values() for r in rs]
    per_variant = {
        v.name: statistics.fmean(r["train_seconds"] + r["eval_seconds"] for r in results[v.name])
        for v in variants
    }
    slowest = max(per_variant, key=per_variant.get)
    section = f"""## Dense OOD on mnist-scenes: which negatives? (issue 6)

`.venv/bin/python bench/dense_bench.py` — {machine()}, {today()}; {len(seeds)} training seeds per variant
(`seed` {args.seeds}), one run, same scenes (data seed 0: 2,000 train / 200 val / 4×100 test scenes, 64×64),
same segmenter (`fcn-tiny`, 12 epochs, batch 16, AdamW 2e-3 cosine), β = 0.03, patch side 12–28 px; the
configs are `configs/train/dense*.yaml`. Cells are mean±std over seeds, in %. Pixel metrics are over all
test pixels of the scenes of that anomaly set with void pixels ignored: AP with the anomaly as positive
class, FPR@95 = share of anomaly pixels accepted when 95% of inlier pixels are, AUROC. mIoU is over the
7 inlier classes on labelled test pixels. `js` = JS(U‖softmax) per pixel (the paper's anomaly score is
its negation), `msp` = max-softmax, `energy` = logsumexp of the logits.

{body}

Train + evaluation time per run (this machine, alone on it): mean {statistics.fmean(times) / 60:.1f} min,
slowest variant `{slowest}` {per_variant[slowest] / 60:.1f} min; whole benchmark {wall / 60:.0f} min of wall
time (finished runs are reused, so a rerun reports less).

![scenes, ground truth and maps]({fig.as_posix()})
"""
    write_section("dense-mnist-scenes", section)
    print(f"wrote BENCHMARKS.md section and {fig}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
