"""One honest comparison of the OOD methods on mnist-open, and the OAL cause study -> BENCHMARKS.md.

Every run uses the same backbone (resnet-tiny), the same data split (data seed 0) and, for the methods
that use them, the same synth outliers and teacher (``runs/outliers``, ``runs/teacher``: run
``make demo`` first). The fine-tuning methods start from the CE run of the same seed. Three suites:

* ``methods`` — every method with the score it ships with (OAL: ``export.score: auto``, chosen per run on
  ID val vs held-out synthetic outliers) plus the common energy / KNN views;
* ``causes`` — the public OAL recipe (``configs/train/oal_paper.yaml``) with one change at a time, to find
  why it loses far OOD (each row: per-set FPR@95 and AUROC);
* ``sampler`` — OAL on a kNN pool sampled with ``sampler.mode: fixed`` vs ``public`` (the sd term off,
  since those two datasets are kNN-only); the two datasets are made here (seconds).

    .venv/bin/python bench/compare_methods.py                       # all suites, 3 seeds (~1 h on 2 cores)
    .venv/bin/python bench/compare_methods.py --suites methods --seeds 0 --only ce,oal   # a quick look

Finished runs are reused when their command is unchanged (``--fresh`` retrains). Also writes
``bench/oal_loss_terms.png``: every OAL loss term over the steps of seed 0 (and of the class-paired
CLUB variant).
"""

from __future__ import annotations

import argparse
import csv
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
SETS = ["digits-6-9", "faces", "textures", "photos", "noise"]
FAR = SETS[1:]
AUTO = "auto"
KNN_ONLY = {"fixed": OUT / "knn-fixed", "public": OUT / "knn-public"}


@dataclass(frozen=True)
class Entry:
    """One row group: a training config, its overrides and the scores it is judged by."""

    name: str
    config: str
    scores: tuple[str, ...]
    overrides: tuple[str, ...] = ()
    fine_tunes: bool = False  # starts from the CE run of the same seed


CE = Entry("ce", "ce.yaml", ("energy", "msp"))
SUITES: dict[str, list[Entry]] = {
    "methods": [
        CE,
        Entry("oe", "oe.yaml", ("msp",), fine_tunes=True),
        Entry("energy_margin", "energy_margin.yaml", ("energy",), fine_tunes=True),
        Entry("vos", "vos.yaml", ("energy",)),
        Entry("isomax_plus", "isomax_plus.yaml", ("max_logit",)),
        Entry("oal", "oal.yaml", (AUTO, "energy", "knn"), fine_tunes=True),
        Entry("oal_paper", "oal_paper.yaml", ("energy", "knn"), fine_tunes=True),
    ],
    "causes": [
        Entry("paper -feature_kd", "oal_paper.yaml", ("energy",), ("method_args.beta=0",), True),
        Entry("paper -logit_kd", "oal_paper.yaml", ("energy",), ("method_args.alpha=0",), True),
        Entry(
            "paper -both_kd",
            "oal_paper.yaml",
            ("energy",),
            ("method_args.alpha=0", "method_args.beta=0"),
            True,
        ),
        Entry(
            "paper -club", "oal_paper.yaml", ("energy",), ("method_args.gamma=0", "method_args.delta=0"), True
        ),
        Entry("paper lr 0.001", "oal_paper.yaml", ("energy",), ("optim.lr=0.001",), True),
        Entry("paper 3 epochs", "oal_paper.yaml", ("energy",), ("train.epochs=3",), True),
        Entry("paper +oe", "oal_paper.yaml", ("energy", "knn"), ("method_args.pixel_term=oe",), True),
        Entry(
            "paper +energy_head",
            "oal_paper.yaml",
            ("energy", "knn"),
            ("method_args.pixel_term=energy_head",),
            True,
        ),
        Entry(
            "paper +energy_margin",
            "oal_paper.yaml",
            ("energy", "knn"),
            ("method_args.pixel_term=energy_margin",),
            True,
        ),
        Entry(
            "paper club_q alternate",
            "oal_paper.yaml",
            ("energy",),
            ("method_args.club_q_training=alternate",),
            True,
        ),
        Entry(
            "paper club pairing class",
            "oal_paper.yaml",
            ("energy",),
            ("method_args.club_pairing=class",),
            True,
        ),
    ],
    "sampler": [
        Entry(
            f"paper knn-{mode} sampler",
            "oal_paper.yaml",
            ("energy", "knn"),
            (f"method_args.outliers={path}", "method_args.delta=0"),
            True,
        )
        for mode, path in KNN_ONLY.items()
    ],
}
SCORE_NAMES = {
    "msp": "MSP",
    "energy": "energy",
    "knn": "KNN",
    "max_logit": "max logit",
    "mahalanobis": "Mahalanobis",
}


def run_name(entry: Entry, seed: int) -> str:
    return entry.name.replace(" -", "-no-").replace(" +", "-plus-").replace(" ", "-") + f"-s{seed}"


def run(command: list[str], what: str) -> None:
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed:\n{proc.stderr[-3000:]}")


def train(entry: Entry, seed: int, fresh: bool) -> dict:
    """Train one (entry, seed) run unless a finished report for the same command exists; return the report."""
    name = run_name(entry, seed)
    run_dir = OUT / name
    overrides = [f"name={name}", f"output_dir={OUT}", f"seed={seed}", "eval.plots=false", *entry.overrides]
    if entry.fine_tunes:
        overrides.append(f"init_from={OUT / run_name(CE, seed)}/detector")
    command = [*LAUNCH.split(), "trainer/train.py", "--config", f"configs/train/{entry.config}"]
    for item in overrides:
        command += ["--set", item]
    stamp = run_dir / "bench_command.json"
    if (
        not fresh
        and (run_dir / "report.json").is_file()
        and stamp.is_file()
        and json.loads(stamp.read_text()) == command
    ):
        return json.loads((run_dir / "report.json").read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.perf_counter()
    run([str(Path(sys.executable).with_name("accelerate")), *command[1:]], name)
    stamp.write_text(json.dumps(command))
    print(f"  {name}: {time.perf_counter() - started:.0f} s", flush=True)
    return json.loads((run_dir / "report.json").read_text())


def make_knn_only_datasets() -> None:
    """The two kNN-only outlier datasets of the sampler suite (no SD decoding: seconds)."""
    for mode, path in KNN_ONLY.items():
        if (path / "card.json").is_file():
            continue
        shutil.rmtree(path, ignore_errors=True)
        command = [sys.executable, "-m", "synth", "generate", "--out", str(path), "--set", "counts.pixel=0"]
        run([*command, "--set", f"sampler.mode={mode}"], f"kNN-only dataset ({mode})")


def shipped(report: dict, score: str) -> str:
    """The score a run ships with (``auto``: the one its selection chose)."""
    return report["score_selection"]["chosen"] if score == AUTO else score


def metric(report: dict, score: str, where: str, key: str) -> float:
    per = report["scores"][shipped(report, score)]
    return per[where][key] if where in ("near", "far") else per["ood"][where][key]


def mean_std(values: list[float], scale: float = 100.0) -> str:
    mean = scale * statistics.fmean(values)
    std = scale * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


def score_label(runs: list[dict], score: str) -> str:
    if score != AUTO:
        return SCORE_NAMES[score]
    chosen = [shipped(r, AUTO) for r in runs]
    return "auto: " + ", ".join(SCORE_NAMES.get(c, c) for c in chosen)


def summary_table(reports: dict[Entry, list[dict]], ce_ms: float) -> list[str]:
    lines = [
        "| method | score | ID acc | near AUROC ↑ | near FPR@95 ↓ | far AUROC ↑ | far FPR@95 ↓ | step time vs ce |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for entry, runs in reports.items():
        ratio = statistics.fmean(r["step_ms"] for r in runs) / ce_ms
        for score in entry.scores:
            cells = [mean_std([r["id_accuracy"] for r in runs])]
            cells += [
                mean_std([metric(r, score, g, k) for r in runs])
                for g in ("near", "far")
                for k in ("auroc", "fpr95")
            ]
            lines.append(
                f"| {entry.name} | {score_label(runs, score)} | " + " | ".join(cells) + f" | {ratio:.2f}× |"
            )
    return lines


def per_set_table(reports: dict[Entry, list[dict]]) -> list[str]:
    lines = [
        "| method | score | " + " | ".join(SETS) + " |",
        "|---|---|" + "---:|" * len(SETS),
    ]
    for entry, runs in reports.items():
        for score in entry.scores:
            cells = [
                f"{mean_std([metric(r, score, s, 'auroc') for r in runs])} / {mean_std([metric(r, score, s, 'fpr95') for r in runs])}"
                for s in SETS
            ]
            lines.append(f"| {entry.name} | {score_label(runs, score)} | " + " | ".join(cells) + " |")
    return lines


def teacher_rows() -> list[str]:
    """The teacher alone (one run, shared by every seed) on each OOD set."""
    report = json.loads((REPO / "runs/teacher/report.json").read_text())
    lines = []
    for score in ("energy", "knn"):
        if score not in report["scores"]:
            continue
        per = report["scores"][score]["ood"]
        cells = [f"{100 * per[s]['auroc']:.2f} / {100 * per[s]['fpr95']:.2f}" for s in SETS]
        lines.append(f"| teacher alone (1 run) | {SCORE_NAMES[score]} | " + " | ".join(cells) + " |")
    return lines


def goal_check(reports: dict[Entry, list[dict]]) -> list[str]:
    """Issue 14's goal for OAL's shipped score, per far set, against CE's energy."""
    oal = next(r for e, r in reports.items() if e.name == "oal")
    ce = next(r for e, r in reports.items() if e.name == "ce")
    lines = ["| check | OAL (shipped score) | CE (energy) | met |", "|---|---:|---:|:---:|"]
    for s in FAR:
        o = statistics.fmean(metric(r, AUTO, s, "fpr95") for r in oal)
        c = statistics.fmean(metric(r, "energy", s, "fpr95") for r in ce)
        lines.append(
            f"| {s} FPR@95 ≤ CE + 1 | {100 * o:.2f} | {100 * c:.2f} | {'yes' if o <= c + 0.01 else 'no'} |"
        )
        a = statistics.fmean(metric(r, AUTO, s, "auroc") for r in oal)
        lines.append(f"| {s} AUROC ≥ 99 | {100 * a:.2f} | | {'yes' if a >= 0.99 else 'no'} |")
    near = {
        f"{e.name} ({score_label(r, sc)})": statistics.fmean(metric(x, sc, "near", "fpr95") for x in r)
        for e, r in reports.items()
        for sc in e.scores[:1]
    }
    best = min(near, key=near.get)
    lines.append(
        f"| near FPR@95 lowest of all methods | {100 * near[next(k for k in near if k.startswith('oal ('))]:.2f} | lowest: {best} {100 * near[best]:.2f} | {'yes' if best.startswith('oal (') else 'no'} |"
    )
    acc_o = statistics.fmean(r["id_accuracy"] for r in oal)
    acc_c = statistics.fmean(r["id_accuracy"] for r in ce)
    lines.append(
        f"| ID accuracy ≥ CE − 0.5 | {100 * acc_o:.2f} | {100 * acc_c:.2f} | {'yes' if acc_o >= acc_c - 0.005 else 'no'} |"
    )
    return lines


def logged(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    with (run_dir / "logs" / "metrics.csv").open() as f:
        for row in csv.DictReader(f):
            if row["name"].startswith("train/") and row["name"] != "train/epoch_loss":
                series.setdefault(row["name"][6:], []).append((int(row["step"]), float(row["value"])))
    return series


def loss_figure(runs: dict[str, Path], out: Path) -> None:
    """One panel per run: every logged OAL loss term over the steps (unweighted values)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
    for ax, (title, run_dir) in zip(axes[0], runs.items(), strict=True):
        for name, points in logged(run_dir).items():
            if name in ("loss",) or name.endswith("class_match"):
                continue
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, label=name, lw=1)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_yscale("symlog", linthresh=0.01)
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("OAL loss terms (unweighted) over training, seed 0")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--suites", default="methods,causes,sampler")
    parser.add_argument("--only", default="", help="comma-separated entry names (no BENCHMARKS.md write)")
    parser.add_argument("--fresh", action="store_true", help="retrain runs that already finished")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    only = set(args.only.split(",")) - {""}
    suites = [s for s in args.suites.split(",") if s]
    for needed in ("runs/teacher/detector", "runs/outliers/card.json"):
        if not (REPO / needed).exists():
            raise SystemExit(
                f"{needed} is missing; run `make demo` first (it builds the teacher and outliers)"
            )
    if "sampler" in suites:
        make_knn_only_datasets()
    started = time.perf_counter()
    results: dict[str, dict[Entry, list[dict]]] = {}
    for suite in suites:
        entries = [e for e in SUITES[suite] if not only or e.name in only]
        results[suite] = {e: [] for e in entries}
        for seed in seeds:
            train(CE, seed, args.fresh)  # every fine-tuned run starts from it
            for entry in entries:
                results[suite][entry].append(train(entry, seed, args.fresh))
    wall = time.perf_counter() - started
    ce_runs = [json.loads((OUT / run_name(CE, s) / "report.json").read_text()) for s in seeds]
    ce_ms = statistics.fmean(r["step_ms"] for r in ce_runs)
    for suite, reports in results.items():
        print(f"\n## {suite}\n")
        print("\n".join(summary_table(reports, ce_ms)))
        print()
        print("\n".join(per_set_table(reports)))
    if only or len(seeds) < 3 or set(suites) != set(SUITES):
        return
    figure = REPO / "bench" / "oal_loss_terms.png"
    loss_figure(
        {
            "oal (oodforge recipe)": OUT / "oal-s0",
            "oal_paper": OUT / "oal_paper-s0",
            "oal_paper, CLUB pairing by class": OUT / "paper-club-pairing-class-s0",
        },
        figure,
    )
    card = json.loads((REPO / "runs/outliers/card.json").read_text())
    causes = {CE: ce_runs, **results["causes"]}
    methods = results["methods"]
    write_section(
        "compare-methods",
        f"""## OOD methods compared on `mnist-open` (3 seeds)

Measured {today()} on {machine()}; command `.venv/bin/python bench/compare_methods.py` ({wall / 60:.0f} min
of training in this invocation; finished runs are reused; runs in `{OUT}/`). Same backbone (`resnet-tiny`),
same data split (data seed 0), seeds {", ".join(map(str, seeds))}; ce, vos and isomax_plus train 15 epochs
from scratch; oe, energy_margin and oal fine-tune the CE run of the same seed for 10 epochs. Outliers:
`runs/outliers` (counts {card.get("counts")}), teacher `runs/teacher` (one set for all seeds). ID
accuracy on the 600 ID test images; near = digits 6-9, far = mean of faces, textures, photos, noise.
FPR@95 (ours): share of OOD images accepted at the threshold that accepts 95% of ID test images. Cells:
mean ± std over seeds, %. `auto`: the score `export.score: auto` chose in each run (seed 0, 1, 2) on ID
val vs the held-out synthetic outliers — never on a test set. Step time: mean wall time of one
optimisation step, as a ratio to ce's, in the same run (2 cores shared with other work: noisy).

{chr(10).join(summary_table(methods, ce_ms))}

Per OOD set (AUROC ↑ / FPR@95 ↓, %, mean ± std over seeds):

{chr(10).join(per_set_table(methods))}

Issue 14's goal, on the means above:

{chr(10).join(goal_check(methods))}
""",
    )
    write_section(
        "oal-causes",
        f"""## OAL: why it lost far OOD (cause study, 3 seeds)

Same run and settings as the methods table (measured {today()}, {machine()}). The base is the public
recipe `configs/train/oal_paper.yaml`; each row changes one thing. Per OOD set AUROC ↑ / FPR@95 ↓ (%,
mean ± std over seeds); the teacher row is the text-aligned teacher alone (one run).

{chr(10).join([*per_set_table(causes), *teacher_rows()])}

{chr(10).join(summary_table(causes, ce_ms))}

Sampler: OAL (sd term off) on a kNN pool drawn with the fixed sampler vs the public code's selection
(`sampler.mode: public`, random σ-perturbations of boundary points):

{chr(10).join(per_set_table(results["sampler"]))}

![OAL loss terms](bench/oal_loss_terms.png)
""",
    )
    print(f"wrote the compare-methods and oal-causes sections of {REPO / 'BENCHMARKS.md'} and {figure}")


if __name__ == "__main__":
    main()
