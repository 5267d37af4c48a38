"""Side-by-side report of several finished runs on the same benchmark (what ``make demo`` prints for CE vs OAL).

    python -m trainer.compare runs/ce runs/oal --out runs/ce_vs_oal.md [--scores energy,msp]

Each run's ``report.json`` is read (nothing is re-evaluated); per metric convention (ours: ID positive,
step-wise AP; OpenOOD: OOD positive, trapezoid AUPR) a table with a row per OOD set plus the near/far
means and a column pair (AUROC, FPR@95) per run and score. By default each run is shown with the score
its detector exports. Reports written before the OpenOOD block existed show "–" in its table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from trainer.report import CONVENTIONS, Pick, percent


def load_report(run_dir: Path) -> dict[str, Any]:
    """Read ``report.json`` of a finished run; FileNotFoundError when the run has none."""
    path = Path(run_dir) / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; train and evaluate that run first")
    return json.loads(path.read_text())


def comparison_markdown(reports: dict[str, dict[str, Any]], scores: list[str] | None = None) -> str:
    """The comparison as markdown; ``scores`` (default: each run's exported score) must exist in every report."""
    columns = []
    for name, report in reports.items():
        for score in scores or [report["score"]]:
            if score not in report["scores"]:
                raise ValueError(
                    f"run {name} was not evaluated with score {score!r} (has {list(report['scores'])})"
                )
            columns.append((name, score))
    benchmarks = {r.get("benchmark") for r in reports.values()}
    if len(benchmarks) > 1:
        raise ValueError(f"the runs were evaluated on different benchmarks: {sorted(map(str, benchmarks))}")
    first = next(iter(reports.values()))
    sets = list(first["scores"][first["score"]]["ood"])
    head = " | ".join(f"{n} {s} AUROC ↑ | {n} {s} FPR@95 ↓" for n, s in columns)
    lines = [
        f"# {' vs '.join(reports)} on {benchmarks.pop()}",
        "",
        "ID test accuracy: "
        + ", ".join(f"{n} **{100 * r['id_accuracy']:.2f}%**" for n, r in reports.items()),
        "",
        f"{first['fpr95_definition']} Values in %.",
        "",
    ]
    if first.get("openood_definition"):
        lines += [first["openood_definition"], ""]
    for _, label, pick in CONVENTIONS:

        def cells(group: str, ood: str | None = None, pick: Pick = pick) -> str:
            out = []
            for n, s in columns:
                block = pick(reports[n]["scores"][s]) or {}
                metrics = block.get("ood", {}).get(ood) if ood else block.get(group)
                out += [percent(metrics, "auroc"), percent(metrics, "fpr95")]
            return " | ".join(out)

        missing = [n for n, s in columns if pick(reports[n]["scores"][s]) is None]
        note = (
            [f"(– : {', '.join(dict.fromkeys(missing))} predate this block; re-evaluate them with "
             "`python -m trainer.evaluate --detector RUN/detector --report RUN` to fill it)", ""]
            if missing
            else []
        )  # fmt: skip
        lines += [
            f"## {label}",
            "",
            *note,
            f"| OOD set | shift | {head} |",
            "|---|---|" + "---:|" * (2 * len(columns)),
        ]
        for ood in sets:
            per_set = first["scores"][first["score"]]["ood"][ood]
            shift = per_set.get("shift", per_set.get("kind"))  # "kind": reports written before 0.2
            lines.append(f"| {ood} | {shift} | " + cells("ood", ood) + " |")
        for group in ("near", "far"):  # a group without OOD sets (no near folder, say) has no row
            if any((pick(reports[n]["scores"][s]) or {}).get(group) for n, s in columns):
                lines.append(f"| **{group} mean** | | " + cells(group) + " |")
        lines.append("")
    return "\n".join(lines)


def fullspectrum_comparison_markdown(
    reports: dict[str, dict[str, Any]], shortcuts: dict[str, dict[str, Any]] | None = None
) -> str:
    """Per run: csID accept rates and label accuracy, FS-OOD, extra-set and shortcut figures.

    Each run is shown with its exported score (``report["score"]``); runs evaluated without the
    full-spectrum suite are left out.
    """
    runs = {n: r["scores"][r["score"]] for n, r in reports.items() if r["scores"][r["score"]].get("csid")}
    if not runs:
        return ""
    names = list(runs)
    label = {n: f"{n} ({reports[n]['score']})" for n in names}
    lines = [
        "## Full spectrum: covariate-shifted ID is ID",
        "",
        "Accepted share at the served threshold (label accuracy), %, per csID copy of ID test:",
        "",
        "| csID set | " + " | ".join(label[n] for n in names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for shift in runs[names[0]]["csid"]:
        cells = []
        for n in names:
            row = runs[n]["csid"].get(shift)
            cells.append(f"{100 * row['accept']:.1f} ({100 * row['accuracy']:.1f})" if row else "–")
        lines.append(f"| {shift} | " + " | ".join(cells) + " |")
    lines += ["", "| figure | " + " | ".join(label[n] for n in names) + " |", "|---|" + "---:|" * len(names)]

    def row(title: str, get: Any) -> None:
        values = []
        for n in names:
            try:
                values.append(get(runs[n]))
            except (KeyError, TypeError):
                values.append("–")
        lines.append(f"| {title} | " + " | ".join(values) + " |")

    for group in ("near", "far"):
        row(
            f"classic {group} AUROC / FPR@95",
            lambda p, g=group: f"{100 * p[g]['auroc']:.2f} / {100 * p[g]['fpr95']:.2f}",
        )
        row(
            f"FS-OOD {group} AUROC / FPR@95",
            lambda p, g=group: f"{100 * p['fs'][g]['auroc']:.2f} / {100 * p['fs'][g]['fpr95']:.2f}",
        )
    for name in runs[names[0]].get("extra", {}).get("ood", {}):
        row(
            f"extra: {name} AUROC / FPR@95",
            lambda p, s=name: (
                f"{100 * p['extra']['ood'][s]['auroc']:.2f} / {100 * p['extra']['ood'][s]['fpr95']:.2f}"
            ),
        )
    for key in (
        "real_id_accept",
        "generated_id_accept",
        "roundtrip_id_accept",
        "generated_outlier_accept",
        "probe_auroc",
    ):
        if shortcuts and all(n in shortcuts for n in names):
            values = [shortcuts[n].get(key) for n in names]
            lines.append(
                f"| shortcut: {key} | "
                + " | ".join("–" if v is None else f"{100 * v:.1f}" for v in values)
                + " |"
            )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m trainer.compare``: print (with ``--out``, also write) the comparison; return 0 or 2."""
    parser = argparse.ArgumentParser(description="Compare finished runs side by side.")
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (each with report.json)")
    parser.add_argument("--out", type=Path, help="write the markdown here (printed either way)")
    parser.add_argument(
        "--scores", default="", help="comma-separated scores (default: each run's exported one)"
    )
    args = parser.parse_args(argv)
    try:
        reports = {run.name: load_report(run) for run in args.runs}
        text = comparison_markdown(reports, [s for s in args.scores.split(",") if s] or None)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
