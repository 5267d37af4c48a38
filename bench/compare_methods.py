"""One honest comparison of the OOD methods on mnist-open -> BENCHMARKS.md.

Every method is trained with 3 seeds on the same backbone (resnet-tiny), the same data split (data seed
0) and, for the methods that use them, the same synth outliers and teacher (``outliers/mnist-open``,
``runs/teacher``: run ``make demo`` first). The fine-tuning methods (oe, energy_margin, oal and its
ablations) start from the CE run of the same seed. Each method is evaluated with its natural score
(OAL also with MSP and KNN); the table gives mean ± std over seeds, and the training step time of each
method as a ratio to ``ce`` measured in this same run.

    .venv/bin/python bench/compare_methods.py              # ~30 min on 2 cores; finished runs are reused
    .venv/bin/python bench/compare_methods.py --fresh      # retrain everything
    .venv/bin/python bench/compare_methods.py --seeds 0 --only ce,oal   # a quick partial look (no write)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, today, write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = Path("runs/compare")
LAUNCH = "accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no"


@dataclass(frozen=True)
class Entry:
    """One row group of the table: a training config, its overrides and the scores it is judged by."""

    name: str
    config: str
    scores: tuple[str, ...]
    overrides: tuple[str, ...] = ()
    fine_tunes: bool = False  # starts from the CE run of the same seed


ENTRIES = [
    Entry("ce", "ce.yaml", ("msp", "energy")),
    Entry("oe", "oe.yaml", ("msp",), fine_tunes=True),
    Entry("energy_margin", "energy_margin.yaml", ("energy",), fine_tunes=True),
    Entry("vos", "vos.yaml", ("energy",)),
    Entry("isomax_plus", "isomax_plus.yaml", ("max_logit",)),
    Entry("oal", "oal.yaml", ("energy", "msp", "knn"), fine_tunes=True),
    Entry("oal club_q alternate", "oal.yaml", ("energy",), ("method_args.club_q_training=alternate",), True),
    Entry("oal -logit_kd", "oal.yaml", ("energy",), ("method_args.alpha=0",), True),
    Entry("oal -feature_kd", "oal.yaml", ("energy",), ("method_args.beta=0",), True),
    Entry("oal -club_knn", "oal.yaml", ("energy",), ("method_args.gamma=0",), True),
    Entry("oal -club_sd", "oal.yaml", ("energy",), ("method_args.delta=0",), True),
]
SCORE_NAMES = {"msp": "MSP", "energy": "energy", "knn": "KNN", "max_logit": "min-distance (max z)"}


def run_name(entry: Entry, seed: int) -> str:
    return entry.name.replace(" -", "-no-").replace(" ", "-") + f"-s{seed}"


def train(entry: Entry, seed: int, fresh: bool) -> dict:
    """Train one (method, seed) run unless a finished report for the same command exists; return the report."""
    name = run_name(entry, seed)
    run_dir = OUT / name
    overrides = [f"name={name}", f"output_dir={OUT}", f"seed={seed}", "eval.plots=false", *entry.overrides]
    if entry.fine_tunes:
        overrides.append(f"init_from={OUT / run_name(ENTRIES[0], seed)}/detector")
    command = [*LAUNCH.split(), "trainer/train_oal.py", "--config", f"configs/train/{entry.config}"]
    for item in overrides:
        command += ["--set", item]
    stamp = run_dir / "bench_command.json"
    finished = (run_dir / "report.json").is_file() and stamp.is_file()
    if not fresh and finished and json.loads(stamp.read_text()) == command:
        return json.loads((run_dir / "report.json").read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.perf_counter()
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    proc = subprocess.run([accelerate, *command[1:]], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    stamp.write_text(json.dumps(command))
    print(f"  {name}: {time.perf_counter() - started:.0f} s", flush=True)
    return json.loads((run_dir / "report.json").read_text())


def mean_std(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


def tables(reports: dict[Entry, list[dict]], seeds: list[int]) -> str:
    ce_ms = statistics.fmean(r["step_ms"] for r in reports[ENTRIES[0]])
    head = ("| method | score | ID acc | near AUROC ↑ | near FPR@95 ↓ | far AUROC ↑ | far FPR@95 ↓ "
            "| step time vs ce |")  # fmt: skip
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|"]
    for entry, runs in reports.items():
        ratio = statistics.fmean(r["step_ms"] for r in runs) / ce_ms
        for score in entry.scores:
            cells = [mean_std([r["id_accuracy"] for r in runs])]
            for group in ("near", "far"):
                for key in ("auroc", "fpr95"):
                    cells.append(mean_std([r["scores"][score][group][key] for r in runs]))
            lines.append(
                f"| {entry.name} | {SCORE_NAMES[score]} | " + " | ".join(cells) + f" | {ratio:.2f}× |"
            )
    sets = list(reports[ENTRIES[0]][0]["scores"]["msp"]["ood"])
    per_set = ["", "Per OOD set (AUROC ↑ / FPR@95 ↓, %, mean over seeds; first score of each method):", "",
               "| method | " + " | ".join(sets) + " |", "|---|" + "---:|" * len(sets)]  # fmt: skip
    for entry, runs in reports.items():
        score = entry.scores[0]
        cells = []
        for s in sets:
            auroc = 100 * statistics.fmean(r["scores"][score]["ood"][s]["auroc"] for r in runs)
            fpr = 100 * statistics.fmean(r["scores"][score]["ood"][s]["fpr95"] for r in runs)
            cells.append(f"{auroc:.2f} / {fpr:.2f}")
        per_set.append(f"| {entry.name} ({SCORE_NAMES[score]}) | " + " | ".join(cells) + " |")
    return "\n".join(lines + per_set)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--only", default="", help="comma-separated method names (no BENCHMARKS.md write)")
    parser.add_argument("--fresh", action="store_true", help="retrain runs that already finished")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    only = set(args.only.split(",")) - {""}
    entries = [e for e in ENTRIES if not only or e.name in only or e is ENTRIES[0]]
    for needed in ("runs/teacher/detector", "outliers/mnist-open/card.json"):
        if not (REPO / needed).exists():
            raise SystemExit(
                f"{needed} is missing; run `make demo` first (it builds the teacher and outliers)"
            )
    started = time.perf_counter()
    reports: dict[Entry, list[dict]] = {e: [] for e in entries}
    for seed in seeds:
        for entry in entries:
            reports[entry].append(train(entry, seed, args.fresh))
    wall = time.perf_counter() - started
    body = tables(reports, seeds)
    print(body)
    if only or len(seeds) < 3:
        return
    card = json.loads((REPO / "outliers/mnist-open/card.json").read_text())
    write_section(
        "compare-methods",
        f"""## OOD methods compared on `mnist-open` (3 seeds)

Measured {today()} on {machine()}; command `.venv/bin/python bench/compare_methods.py` ({wall / 60:.0f} min
for {len(entries) * len(seeds)} runs, runs in `{OUT}/`). Same backbone (`resnet-tiny`), same data split
(data seed 0), seeds {", ".join(map(str, seeds))}; ce, vos and isomax_plus train 15 epochs from scratch; oe,
energy_margin and oal fine-tune the CE run of the same seed for 10 epochs at lr 0.005. Outliers:
`outliers/mnist-open` ({card.get("counts")}), teacher `runs/teacher` (the `make demo` artifacts, one set
for all seeds). ID accuracy on the 600 ID test images; near = digits 6-9, far = mean of faces, textures,
photos, noise. FPR@95: share of OOD images accepted at the threshold that accepts 95% of ID test images.
Step time: mean wall time of one optimisation step (forward, backward, update, outlier batches) over the
run, as a ratio to ce's, all measured in this run.

{body}
""",
    )
    print(f"wrote the compare-methods section of {REPO / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
