"""Evaluation report: ``report.json``, markdown tables in both metric conventions and PNG plots.

Every table says its convention: **ours** (ID positive, step-wise AP) or **OpenOOD** (OOD positive,
trapezoid AUPR), both computed from the same score arrays (:mod:`oodforge.metrics`). Reports written
before the OpenOOD block existed show "–" in its cells.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from oodforge.metrics import OPENOOD, OPENOOD_LABEL, OURS_LABEL

METRICS = [("auroc", "AUROC ↑"), ("fpr95", "FPR@95 ↓"), ("aupr_in", "AUPR-in ↑"), ("aupr_out", "AUPR-out ↑")]
MISSING = "–"

Pick = Callable[[dict[str, Any]], dict[str, Any] | None]
CONVENTIONS: list[tuple[str, str, Pick]] = [
    ("ours", OURS_LABEL, lambda per: per),
    (OPENOOD, OPENOOD_LABEL, lambda per: per.get(OPENOOD)),
]
"""``(key, label, pick)``: ``pick(per_score)`` is the block of that convention (``ood``/``near``/``far``)."""


def percent(metrics: dict[str, Any] | None, key: str, bold: bool = False) -> str:
    """``metrics[key]`` in % with 2 decimals, or "–" when the block or the value is missing."""
    value = (metrics or {}).get(key)
    if value is None:
        return MISSING
    text = f"{100 * value:.2f}"
    return f"**{text}**" if bold else text


def markdown_tables(result: dict[str, Any]) -> str:
    """Per convention, one table per metric: rows = OOD sets (+ near/far means), columns = scores, in %."""
    per_score = result["scores"]
    names = list(per_score)
    first = per_score[names[0]]
    sets = list(first["ood"])
    lines = []
    for _, label, pick in CONVENTIONS:
        blocks = {n: pick(per_score[n]) or {} for n in names}
        lines += [f"### {label}", ""]
        for key, title in METRICS:
            lines += [f"**{title}** (%, {label})", "", "| OOD set | shift | " + " | ".join(names) + " |"]
            lines.append("|---|---|" + "---:|" * len(names))
            for s in sets:
                shift = first["ood"][s]["shift"]
                cells = [percent(blocks[n].get("ood", {}).get(s), key) for n in names]
                lines.append(f"| {s} | {shift} | " + " | ".join(cells) + " |")
            for group in ("near", "far"):
                if first.get(group):
                    cells = [percent(blocks[n].get(group), key, bold=True) for n in names]
                    lines.append(f"| **{group} mean** | | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def summary_markdown(result: dict[str, Any]) -> str:
    """Per convention, one table: a row per score, near/far means of the four metrics, in %.

    A score that ran in its own gradient pass (``result["gradient_pass"]``) is marked so.
    """
    per_score = result["scores"]
    gradient = set(result.get("gradient_pass", []))
    groups = [g for g in ("near", "far") if per_score[next(iter(per_score))].get(g)]
    head = " | ".join(f"{g} {title}" for g in groups for _, title in METRICS)
    lines = []
    for _, label, pick in CONVENTIONS:
        lines += [f"{label} (%, means over the {' and '.join(groups)} OOD sets)", ""]
        lines += [f"| score | pass | {head} |", "|---|---|" + "---:|" * (len(groups) * len(METRICS))]
        for name, per in per_score.items():
            block = pick(per) or {}
            cells = [percent(block.get(g), key) for g in groups for key, _ in METRICS]
            kind = "gradient" if name in gradient else "one pass"
            lines.append(f"| {name} | {kind} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def fullspectrum_markdown(result: dict[str, Any]) -> str:
    """The full-spectrum sections: csID accept rates and accuracy, FS-OOD means, extra sets, validation view."""
    per_score = {n: p for n, p in result["scores"].items() if p.get("csid")}
    if not per_score:
        return ""
    names = list(per_score)
    first = per_score[names[0]]
    lines = [
        "## Covariate-shifted ID (csID: ID, must be accepted)",
        "",
        "Share of each shifted copy of ID test accepted at the threshold each score calibrates on ID val "
        f"(the served rule, {100 * result.get('target_id_tpr', 0.95):.0f}% of ID val), and the label accuracy on it.",
        "",
        "| csID set | n | accuracy | " + " | ".join(f"{n} accept" for n in names) + " |",
        "|---|---:|---:|" + "---:|" * len(names),
    ]
    for shift, row in first["csid"].items():
        cells = [percent(per_score[n]["csid"].get(shift), "accept") for n in names]
        lines.append(f"| {shift} | {row['n']} | {percent(row, 'accuracy')} | " + " | ".join(cells) + " |")
    lines.append("")
    for key, what in (("fs", "FS-OOD: ID test ∪ every csID set positive"), ("extra", "extra test OOD families (reported only)"),
                      ("extra_fs", "extra families, FS-OOD"), ("val", "validation view: ID val ∪ csID-val vs validation OOD (what selection reads)")):  # fmt: skip
        if not first.get(key):
            continue
        sets = list(first[key]["ood"])
        lines += [
            f"### {what}",
            "",
            "| set | shift | " + " | ".join(f"{n} AUROC / FPR@95" for n in names) + " |",
        ]
        lines.append("|---|---|" + "---:|" * len(names))
        rows = [(s, first[key]["ood"][s]["shift"], lambda b, s=s: b["ood"].get(s)) for s in sets]
        rows += [(f"**{g} mean**", "", lambda b, g=g: b.get(g)) for g in ("near", "far") if first[key].get(g)]
        for label, shift, get in rows:
            cells = [
                f"{percent(get(per_score[n][key]), 'auroc')} / {percent(get(per_score[n][key]), 'fpr95')}"
                for n in names
            ]
            lines.append(f"| {label} | {shift} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def detector_markdown(about: dict[str, Any]) -> str:
    """The "Detector" section of a report from :meth:`Detector.describe` (the API's detector info too)."""
    t = about["threshold"]
    score = ", ".join(f"{k}={v}" for k, v in about["score"].items() if k != "name" and v not in ({}, None))
    return "\n".join(
        [
            "## Detector",
            "",
            f"- kind **{about['kind']}**, version `{about['version']}`, created {about['created']}, "
            f"input {'x'.join(map(str, about['input']['shape']))}",
            f"- score **{about['score']['name']}**" + (f" ({score})" if score else ""),
            f"- threshold **{t['value']:.6g}**: `is_ood = score < threshold`, calibrated on the ID "
            f"{t['split']} split ({t['n_samples']} images) to accept {100 * t['target_id_tpr']:.0f}% of them",
            "",
        ]
    )


def render_markdown(result: dict[str, Any], title: str) -> str:
    """The markdown report of an evaluation ``result``, headed by ``title``.

    It holds the ID accuracy, the detector (when ``result`` has ``detector_info``), a summary table per
    metric convention and, per convention, a table per metric.
    """
    about = result.get("detector_info")
    return "\n".join(
        [
            f"# {title}",
            "",
            *([detector_markdown(about)] if about else []),
            f"ID accuracy ({result.get('id_split', 'test')} split): **{100 * result['id_accuracy']:.2f}%** "
            f"on {result.get('n_id', '?')} images.",
            "",
            f"{result['fpr95_definition']} Scores: higher = more in-distribution.",
            "",
            *([result["openood_definition"], ""] if result.get("openood_definition") else []),
            "## Summary",
            "",
            summary_markdown(result),
            fullspectrum_markdown(result),
            "## Per OOD set",
            "",
            markdown_tables(result),
        ]
    )


def plot_scores(values: dict[str, dict[str, np.ndarray]], out_dir: Path) -> list[Path]:
    """Per score: histograms of ID vs each OOD set, and ROC curves (ID positive) of every OOD set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for score, vals in values.items():
        ood_sets = [k for k in vals if k != "id"]
        cols = min(3, len(ood_sets))
        rows = -(-len(ood_sets) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
        for ax, name in zip(axes.flat, ood_sets, strict=False):
            both = np.concatenate([vals["id"], vals[name]])
            bins = np.linspace(both.min(), both.max(), 40)
            ax.hist(vals["id"], bins=bins, alpha=0.6, density=True, label="ID test")
            ax.hist(vals[name], bins=bins, alpha=0.6, density=True, label=name)
            ax.set_title(name, fontsize=9)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(ood_sets) :]:
            ax.axis("off")
        fig.suptitle(f"{score}: score histograms (higher = more ID)")
        fig.tight_layout()
        paths.append(out_dir / f"hist_{score}.png")
        fig.savefig(paths[-1], dpi=80)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        for name in ood_sets:
            y = np.r_[np.ones(len(vals["id"])), np.zeros(len(vals[name]))]
            fpr, tpr, _ = roc_curve(y, np.r_[vals["id"], vals[name]])
            ax.plot(fpr, tpr, label=name)
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.axhline(0.95, color="grey", lw=0.6, ls="--")
        ax.set_xlabel("OOD accepted (FPR)")
        ax.set_ylabel("ID accepted (TPR)")
        ax.set_title(f"{score}: ROC (ID positive)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out_dir / f"roc_{score}.png")
        fig.savefig(paths[-1], dpi=80)
        plt.close(fig)
    return paths


def write_report(
    result: dict[str, Any],
    values: dict[str, dict[str, np.ndarray]],
    out_dir: Path,
    title: str,
    plots: bool = True,
) -> Path:
    """Write ``report.json``, ``report.md`` and ``plots/*.png`` into ``out_dir``; returns the markdown path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(result, indent=2))
    md = render_markdown(result, title)
    if plots:
        paths = plot_scores(values, out_dir / "plots")
        md += "\n## Plots\n\n" + "\n".join(f"![{p.stem}](plots/{p.name})" for p in paths) + "\n"
    (out_dir / "report.md").write_text(md)
    return out_dir / "report.md"
