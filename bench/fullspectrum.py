"""Issue 23: which recipe gives a semantic detector, not a blur detector? One run, 3 seeds -> BENCHMARKS.md.

Every row trains on the same data split (data seed 0), backbone (resnet-tiny), teacher and outliers
(``runs/teacher``, ``runs/outliers`` with its generator reference: run ``make demo`` first, and
``python -m synth reference --config runs/configs/outliers.yaml --out runs/outliers`` if the outliers
predate the reference). The OAL rows start from the CE row of the same seed (``+cov`` rows from the CE
``+cov`` row). Every run exports ``export.score: auto`` (ID val ∪ csID-val vs the validation OOD sets,
``trainer.selection``) and is measured by its report (classic, FS-OOD, csID, extra sets, validation view)
and by ``python -m trainer.shortcut``.

The default recipe is the OAL row with the lowest validation objective (the selection criterion of its
chosen score, mean over seeds); test OOD figures are printed, never used to choose.

    .venv/bin/python bench/fullspectrum.py                 # every row, seeds 0 1 2 (~35 min on 2 cores)
    .venv/bin/python bench/fullspectrum.py --rows ce,paper+cov --seeds 0
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
from trainer.selection import pick  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = Path("runs/fullspectrum")
LAUNCH = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
CANDIDATES = "[energy, msp, max_logit, gen, knn, mahalanobis, rmds]"
COMMON = (
    "eval.plots=false",
    "export.score=auto",
    f"export.candidates={CANDIDATES}",
    f"eval.scores={CANDIDATES}",
)
COV = "train.covariate.p=0.5"
NO_COV = "train.covariate.p=0"
BAL = "train.id_reference=[generated, roundtrip]"
FAR = ["faces", "textures", "photos", "noise"]
EXTRA = ["uci-digits-6-9", "printed-text", "mpl-samples"]


@dataclass(frozen=True)
class Row:
    """One recipe: a config, its overrides, and the CE row it starts from (``None``: trains from scratch)."""

    name: str
    config: str
    overrides: tuple[str, ...] = ()
    init: str | None = None
    what: str = ""


ROWS = [
    Row("ce", "ce.yaml", (NO_COV,), what="CE baseline (no covariate augmentation)"),
    Row("ce+cov", "ce.yaml", (COV,), what="CE + covariate augmentation (b) = configs/train/ce.yaml"),
    Row(
        "oal",
        "oal_pixel.yaml",
        (),
        "ce",
        "the previous default: public recipe + energy margins on pixel outliers",
    ),
    Row(
        "oal+bal",
        "oal_pixel.yaml",
        (BAL,),
        "ce",
        "(a) artifact-balanced ID: generated + round-trip ID in the stream",
    ),
    Row("oal+cov", "oal_pixel.yaml", (COV,), "ce+cov", "(b) covariate augmentation in CE and OAL"),
    Row("oal+bal+cov", "oal_pixel.yaml", (BAL, COV), "ce+cov", "(a) + (b)"),
    Row("paper", "oal_paper.yaml", (), "ce", "(c) the latent-only public recipe"),
    Row("paper+cov", "oal_paper.yaml", (COV,), "ce+cov", "(c) + (b)"),
    Row("paper+bal+cov", "oal_paper.yaml", (BAL, COV), "ce+cov", "(c) + (a) + (b) = configs/train/oal.yaml"),
]


def run_dir(row: str, seed: int) -> Path:
    return OUT / f"{row}-s{seed}"


def train(row: Row, seed: int, fresh: bool) -> dict:
    """Train one (row, seed) unless a finished run of the same command exists; returns its report + shortcut."""
    out = run_dir(row.name, seed)
    items = [f"name={out.name}", f"output_dir={OUT}", f"seed={seed}", *COMMON, *row.overrides]
    if row.init:
        items.append(f"init_from={run_dir(row.init, seed)}/detector")
    command = [str(Path(sys.executable).with_name("accelerate")), "launch", *LAUNCH, "trainer/train.py",
               "--config", f"configs/train/{row.config}"]  # fmt: skip
    for item in items:
        command += ["--set", item]
    stamp = out / "bench_command.json"
    trained = (out / "report.json").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == command
    started = time.perf_counter()
    if fresh or not trained:
        shutil.rmtree(out, ignore_errors=True)
        _run(command, f"{out.name} train")
        stamp.write_text(json.dumps(command))
    print(f"  {out.name}: {time.perf_counter() - started:.0f} s", flush=True)
    return json.loads((out / "report.json").read_text())


def with_reference(row: Row, seed: int, report: dict) -> dict:
    """A run that trained without the generator reference (CE) re-evaluated with it, so its csID suite has
    the VAE round trip and the generated ID images too (its exported score stays the one it chose)."""
    if report.get("reference"):
        return report
    out = run_dir(row.name, seed)
    path = out / "fullspectrum.json"
    if not path.is_file():
        _run([sys.executable, "-m", "trainer.evaluate", "--detector", str(out / "detector"), "--reference",
              "runs/outliers", "--scores", ",".join(report["scores"]), "--out", str(path), "--device", "cpu"],
             f"{out.name} evaluate with the reference")  # fmt: skip
    full = json.loads(path.read_text())
    return {**full, "score": report["score"], "score_selection": report["score_selection"]}


def shortcut(row: Row, seed: int) -> dict:
    """``python -m trainer.shortcut`` of one run (cached in its directory)."""
    out = run_dir(row.name, seed)
    if not (out / "shortcut.json").is_file():
        _run([sys.executable, "-m", "trainer.shortcut", "--detector", str(out / "detector"), "--outliers",
              "runs/outliers", "--out", str(out / "shortcut.json")], f"{out.name} shortcut")  # fmt: skip
    return json.loads((out / "shortcut.json").read_text())


def _run(command: list[str], what: str) -> None:
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed:\n{proc.stderr[-3000:]}")


def ms(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    mean = scale * statistics.fmean(values)
    std = scale * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def choice(report: dict) -> str:
    """The score the validation rule picks from the run's selection table (the current rule, which a run
    trained before a rule change may not have applied at export time)."""
    return pick(report["score_selection"]["candidates"])


def chosen(report: dict) -> dict:
    return report["scores"][choice(report)]


def figures(reports: list[dict], ce: list[dict]) -> dict[str, str]:
    """The table cells of one row (``ce``: the CE row's reports of the same seeds, for the csID ratios)."""
    per = [chosen(r) for r in reports]
    ce_per = [chosen(r) for r in ce]
    shifts = [s for s in per[0]["csid"] if all(s in c["csid"] for c in ce_per)]
    ratio = [
        min(p["csid"][s]["accept"] / max(c["csid"][s]["accept"], 1e-9) for s in shifts)
        for p, c in zip(per, ce_per, strict=True)
    ]
    acc_gap = [
        min(p["csid"][s]["accuracy"] - c["csid"][s]["accuracy"] for s in shifts)
        for p, c in zip(per, ce_per, strict=True)
    ]
    sc = [r["shortcut"] for r in reports]
    return {
        "score": ", ".join(r["score_selection"]["chosen"] for r in reports),
        "val objective": ms(
            [r["score_selection"]["candidates"][r["score_selection"]["chosen"]]["fpr95"] for r in reports]
        ),
        "ID acc": ms([r["id_accuracy"] for r in reports]),
        "near FPR": ms([p["near"]["fpr95"] for p in per]),
        "near FS FPR": ms([p["fs"]["near"]["fpr95"] for p in per]),
        "far FPR / AUROC": " · ".join(
            f"{ms([p['ood'][s]['fpr95'] for p in per], digits=1)} / {ms([p['ood'][s]['auroc'] for p in per], digits=2)}"
            for s in FAR
        ),
        "far FS FPR / AUROC": f"{ms([p['fs']['far']['fpr95'] for p in per])} / {ms([p['fs']['far']['auroc'] for p in per])}",
        "extra AUROC": " · ".join(ms([p["extra"]["ood"][s]["auroc"] for p in per], digits=1) for s in EXTRA),
        "csID accept min / mean": f"{ms([min(p['csid'][s]['accept'] for s in shifts) for p in per])} / "
        f"{ms([statistics.fmean(p['csid'][s]['accept'] for s in shifts) for p in per])}",
        "csID accept ÷ CE (worst shift)": ms(ratio, scale=1.0),
        "csID label acc − CE (worst shift, points)": ms(acc_gap),
        "shortcut real / gen / roundtrip / outlier accept": " / ".join(
            ms([s[k] for s in sc])
            for k in (
                "real_id_accept",
                "generated_id_accept",
                "roundtrip_id_accept",
                "generated_outlier_accept",
            )
        ),
        "probe AUROC": ms([s["probe_auroc"] for s in sc]),
    }


def csid_rows(reports: dict[str, list[dict]]) -> list[str]:
    """Per csID shift: accept rate (mean over seeds) of each row's exported score, and label accuracy."""
    names = list(reports)
    shifts = list(chosen(reports[names[0]][0])["csid"])
    lines = ["| csID shift | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for s in shifts:
        cells = []
        for n in names:
            acc = statistics.fmean(chosen(r)["csid"][s]["accept"] for r in reports[n])
            lab = statistics.fmean(chosen(r)["csid"][s]["accuracy"] for r in reports[n])
            cells.append(f"{100 * acc:.1f} ({100 * lab:.1f})")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return lines


def best_posthoc(reports: list[dict]) -> str:
    """CE's best score on test near FPR@95 (picked on the test set: a reference figure, not a choice)."""
    names = list(reports[0]["scores"])
    means = {n: statistics.fmean(r["scores"][n]["near"]["fpr95"] for r in reports) for n in names}
    best = min(means, key=means.get)
    fs = statistics.fmean(r["scores"][best]["fs"]["near"]["fpr95"] for r in reports)
    return f"{best}: near FPR@95 {100 * means[best]:.2f}, FS near {100 * fs:.2f}"


def _near_val(candidate: dict, shifts: dict[str, str]) -> float:
    """Mean validation FPR@95 over the near validation OOD sets of one candidate's selection figures."""
    near = [m["fpr95"] for n, m in candidate["per_set"].items() if shifts.get(n) == "near"]
    return statistics.fmean(near) if near else float("nan")


def validation_vs_test(name: str, reports: list[dict]) -> list[str]:
    """Per candidate score of one row: what the validation rule saw and what the test sets say.

    The test columns are for the record: no choice reads them.
    """
    from oodforge.data.extra_sources import validation_sets

    shifts = {n: shift for n, (_, shift) in validation_sets(0, 32).items()}
    names = list(reports[0]["score_selection"]["candidates"])
    lines = [
        f"Row **{name}**, every candidate score, mean ± std over seeds (%): the validation objective and its near "
        "part (what the rule reads), then test figures (reference only):",
        "",
        "| score | chosen in | val objective | val near FPR | test near FPR | test FS near FPR | test far FPR | "
        "csID accept min |",
        "|---|---:|---|---|---|---|---|---|",
    ]
    for n in names:
        cands = [r["score_selection"]["candidates"][n] for r in reports]
        tests = [r["scores"][n] for r in reports]
        times = sum(choice(r) == n for r in reports)
        lines.append(
            f"| {n} | {times}/{len(reports)} | {ms([c['fpr95'] for c in cands])} | "
            f"{ms([_near_val(c, shifts) for c in cands])} | {ms([t['near']['fpr95'] for t in tests])} | "
            f"{ms([t['fs']['near']['fpr95'] for t in tests])} | {ms([t['far']['fpr95'] for t in tests])} | "
            f"{ms([min(v['accept'] for v in t['csid'].values()) for t in tests])} |"
        )
    return lines


DEFAULT_CE, DEFAULT_OAL = "ce+cov", "paper+bal+cov"
"""The rows ``configs/train/ce.yaml`` and ``configs/train/oal.yaml`` are today."""


def objective(reports: list[dict]) -> tuple[float, float]:
    """Mean and std over seeds of the validation objective of each run's chosen score."""
    values = [r["score_selection"]["candidates"][choice(r)]["fpr95"] for r in reports]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def rule(reports: dict[str, list[dict]]) -> tuple[str | None, str | None, str]:
    """The recipes the validation rule picks: ``(ce row, oal row, why)``.

    The pipeline trains one CE and fine-tunes OAL from it, so the CE row comes first (lowest validation
    objective among the CE rows) and the OAL row is chosen among the rows that start from it. A row
    replaces today's default only when its mean objective is lower by more than the larger of the two
    standard deviations over seeds; otherwise the two are tied on validation and the default stays.
    """
    def best(names: list[str], default: str) -> tuple[str | None, str]:
        if not names:
            return None, ""
        stats = {n: objective(reports[n]) for n in names}
        low = min(names, key=lambda n: stats[n][0])
        if default not in stats or low == default:
            return low, f"{low} {100 * stats[low][0]:.2f} ± {100 * stats[low][1]:.2f} (lowest)"
        gap = stats[default][0] - stats[low][0]
        margin = max(stats[default][1], stats[low][1])
        if gap > margin:
            return low, f"{low} {100 * stats[low][0]:.2f} beats {default} {100 * stats[default][0]:.2f} by more than the std"
        return default, (
            f"{default} {100 * stats[default][0]:.2f} ± {100 * stats[default][1]:.2f} and the lowest, {low} "
            f"{100 * stats[low][0]:.2f} ± {100 * stats[low][1]:.2f}, are within one std (gap {100 * gap:.2f} ≤ "
            f"{100 * margin:.2f}): tied, the default stays"
        )

    by_name = {r.name: r for r in ROWS}
    ce, why_ce = best([n for n in reports if by_name[n].init is None], DEFAULT_CE)
    oal, why_oal = best([n for n in reports if by_name[n].init == ce], DEFAULT_OAL)
    return ce, oal, f"CE: {why_ce}; OAL (rows starting from {ce}): {why_oal}"


def rule_lines(reports: dict[str, list[dict]]) -> list[str]:
    """The validation rule's verdict on the rows measured, and every OAL row's objective."""
    ce, oal, why = rule(reports)
    others = ", ".join(
        f"{n} {100 * objective(r)[0]:.2f} ± {100 * objective(r)[1]:.2f}" for n, r in reports.items()
    )
    return [
        f"Validation rule (`bench/fullspectrum.py: rule`): **{ce}** then **{oal}**. {why}.",
        f"Validation objective (mean ± std over seeds, %) of every row: {others}.",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(r.name for r in ROWS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument(
        "--train-only", action="store_true", help="train the runs, skip the shortcut pass and tables"
    )
    parser.add_argument("--no-write", action="store_true", help="print, do not write BENCHMARKS.md")
    args = parser.parse_args()
    wanted = args.rows.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = [r for r in ROWS if r.name in wanted]
    started = time.perf_counter()
    reports: dict[str, list[dict]] = {}
    for row in rows:
        print(f"{row.name}: {row.what}", flush=True)
        reports[row.name] = [train(row, s, args.fresh) for s in seeds]
    if args.train_only:
        return 0
    for row in rows:
        reports[row.name] = [with_reference(row, s, r) for s, r in zip(seeds, reports[row.name], strict=True)]
        for report, seed in zip(reports[row.name], seeds, strict=True):
            report["shortcut"] = shortcut(row, seed)
    minutes = (time.perf_counter() - started) / 60
    ce = reports.get("ce")
    table = {n: figures(r, ce or r) for n, r in reports.items()}
    keys = list(next(iter(table.values())))
    lines = [
        f"Measured {today()} on {machine()}: `.venv/bin/python bench/fullspectrum.py` (seeds {args.seeds}; "
        f"{minutes:.0f} min for the runs this call trained). Mean ± std over seeds, %, exported score = "
        "`export.score: auto` (validation rule). FS = ID test ∪ every csID set positive. csID ratios are against the "
        "CE row of the same seed. Shortcut: `python -m trainer.shortcut` (accept rates at the detector's threshold).",
        "",
        "| row | " + " | ".join(keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    lines += [f"| **{n}** | " + " | ".join(t[k] for k in keys) + " |" for n, t in table.items()]
    lines += ["", "Far sets in order: " + ", ".join(FAR) + "; extra sets: " + ", ".join(EXTRA) + ".", ""]
    lines += [
        "csID accept rate % (label accuracy %), mean over seeds, exported score:",
        "",
        *csid_rows(reports),
        "",
    ]
    for name in ("ce", "ce+cov"):
        if name in reports:
            lines.append(
                f"{name}: best post-hoc score on test near OOD (reference only, picked on test): {best_posthoc(reports[name])}."
            )
    for name in ("ce+cov", "paper+bal+cov"):
        if name in reports:
            lines += ["", *validation_vs_test(name, reports[name]), ""]
    teacher = Path("runs/teacher/detector")
    if teacher.is_dir():
        path = OUT / "teacher-shortcut.json"
        if not path.is_file():
            _run([sys.executable, "-m", "trainer.shortcut", "--detector", str(teacher), "--outliers", "runs/outliers",
                  "--out", str(path)], "teacher shortcut")  # fmt: skip
        t = json.loads(path.read_text())
        keys = ("real_id_accept", "generated_id_accept", "roundtrip_id_accept", "generated_outlier_accept")
        lines.append(
            "Teacher (`runs/teacher`) shortcut: real / gen / roundtrip / outlier accept "
            + " / ".join(f"{100 * t[k]:.2f}" for k in keys)
            + f", probe AUROC {100 * t['probe_auroc']:.2f}."
        )
    lines += rule_lines(reports)
    body = "\n".join(lines)
    print(body)
    (OUT / "summary.json").write_text(
        json.dumps({"table": table, "rows": [r.name for r in rows], "seeds": seeds}, indent=2)
    )
    if not args.no_write:
        write_section(
            "fullspectrum",
            "## Full-spectrum OOD: remedies for the blur detector (issue 23, 3 seeds)\n\n" + body,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
