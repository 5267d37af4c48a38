"""Every post-hoc score on the detectors of several runs (e.g. seeds), in both metric conventions.

For each run directory (with ``detector/``) it runs ``python -m trainer.evaluate --scores all`` (the
detector's own score keeps its stored statistics; the others are fitted on the benchmark's ID train
split, odin runs in its own gradient pass) and writes one markdown table: a row per score, near and far
FPR@95 and AUROC in our convention (ID positive, step-wise AP) and in OpenOOD's (OOD positive,
trapezoid AUPR), as mean ± std over the runs (sample std; ± 0.00 for one run).

    .venv/bin/python bench/posthoc_scores.py runs/ce-s0 runs/ce-s1 runs/ce-s2 --out bench/posthoc_scores.md
    .venv/bin/python bench/posthoc_scores.py runs/ce --score-params vim.dim=64    # one run, a quick look

Each run's evaluation is written to ``<run>/posthoc_eval.json`` and reused when it is newer than the
detector and was made with the same arguments (``--fresh`` re-evaluates).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, today  # noqa: E402
from oodforge.metrics import OPENOOD, OPENOOD_FPR95_DEFINITION, OPENOOD_LABEL, OURS_LABEL  # noqa: E402
from trainer.evaluate import main as evaluate  # noqa: E402

EVAL_FILE = "posthoc_eval.json"
COLUMNS = [("near", "fpr95", "FPR@95 ↓"), ("near", "auroc", "AUROC ↑"), ("far", "fpr95", "FPR@95 ↓")]
COLUMNS += [("far", "auroc", "AUROC ↑")]


def mean_std(values: list[float], scale: float = 100.0) -> str:
    """``mean ± std`` in % (sample std over the runs; 0 for a single run)."""
    mean = scale * statistics.fmean(values)
    std = scale * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


def evaluate_run(run: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The ``--scores all`` evaluation of ``run/detector`` (cached in ``run/posthoc_eval.json``)."""
    detector, out = run / "detector", run / EVAL_FILE
    if not (detector / "detector.json").is_file():
        raise SystemExit(f"{detector} is not a detector artifact; train the run first (trainer/train.py)")
    command = [
        "--detector",
        str(detector),
        "--benchmark",
        args.benchmark,
        "--scores",
        "all",
        "--out",
        str(out),
    ]
    if args.score_params:
        command += ["--score-params", args.score_params]
    if args.selection_outliers:
        command += ["--selection-outliers", str(args.selection_outliers)]
    stamp = run / (EVAL_FILE + ".args")
    fresh_enough = out.is_file() and out.stat().st_mtime > (detector / "model.safetensors").stat().st_mtime
    if not args.fresh and fresh_enough and stamp.is_file() and json.loads(stamp.read_text()) == command:
        return json.loads(out.read_text())
    if evaluate(command) != 0:
        raise SystemExit(f"evaluating {detector} failed (see above)")
    stamp.write_text(json.dumps(command))
    return json.loads(out.read_text())


def table(results: dict[str, dict[str, Any]]) -> list[str]:
    """One markdown table: a row per score evaluated in every run, both conventions' near/far columns."""
    runs = list(results.values())
    names = [n for n in runs[0]["scores"] if all(n in r["scores"] for r in runs)]
    conventions = [("ours", lambda per: per), ("OpenOOD", lambda per: per.get(OPENOOD) or {})]
    head = [f"{label} {group} {title}" for label, _ in conventions for group, _, title in COLUMNS]
    selecting = all("selection" in r for r in runs)
    if selecting:
        head.append("selection: val vs held-out synth FPR@95 ↓ (runs choosing it)")
    lines = ["| score | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for name in names:
        cells = []
        if selecting:
            per = [r["selection"]["candidates"].get(name) for r in runs]
            chosen = sum(r["selection"]["chosen"] == name for r in runs)
            mark = f" ({chosen}/{len(runs)})" if chosen else ""
            selection_cell = "–" if None in per else mean_std([c["fpr95"] for c in per]) + mark
        for _, pick in conventions:
            for group, key, _ in COLUMNS:
                values = [pick(r["scores"][name]).get(group, {}).get(key) for r in runs]
                cells.append("–" if None in values else mean_std(values))
        if selecting:
            cells.append(selection_cell)
        kind = " (gradient pass)" if any(name in r.get("gradient_pass", []) for r in runs) else ""
        lines.append(f"| {name}{kind} | " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict[str, dict[str, Any]], benchmark: str) -> str:
    runs = list(results.values())
    first = runs[0]
    skipped = sorted({n for r in runs for n in r.get("skipped", {})})
    accuracy = mean_std([r["id_accuracy"] for r in runs])
    lines = [
        f"## Post-hoc scores on `{benchmark}`, {len(runs)} run(s)",
        "",
        f"Measured {today()} on {machine()}.",
        f"Runs: {', '.join(f'`{r}`' for r in results)}; ID test accuracy {accuracy}%.",
        "Command per run: `python -m trainer.evaluate --detector RUN/detector --scores all`; values in %, "
        "mean ± std over the runs; near / far = the means over the benchmark's near / far OOD sets.",
        "",
        f"- **ours** ({OURS_LABEL}): {first['fpr95_definition']}",
        f"- **OpenOOD** ({OPENOOD_LABEL}): {OPENOOD_FPR95_DEFINITION}",
        *([f"- skipped (the head cannot serve them): {', '.join(skipped)}"] if skipped else []),
        "",
        *table(results),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories, each with detector/")
    parser.add_argument("--benchmark", default="mnist-open")
    parser.add_argument("--score-params", default=None, help="e.g. react.percentile=90,vim.dim=64")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown here (printed either way)")
    parser.add_argument("--fresh", action="store_true", help="re-evaluate even when a cached result exists")
    parser.add_argument(
        "--selection-outliers",
        type=Path,
        default=None,
        help="synth dataset: add the selection column (ID val vs its held-out outliers) and name the winner",
    )
    args = parser.parse_args(argv)
    results = {str(run): evaluate_run(run, args) for run in args.runs}
    text = markdown(results, args.benchmark)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
