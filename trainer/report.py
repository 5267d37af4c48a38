"""Evaluation report: ``report.json``, a markdown table per metric and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

METRICS = [("auroc", "AUROC ↑"), ("fpr95", "FPR@95 ↓"), ("aupr_in", "AUPR-in ↑"), ("aupr_out", "AUPR-out ↑")]


def markdown_tables(result: dict[str, Any]) -> str:
    """One table per metric: rows = OOD sets (+ near/far means), columns = scores, values in %."""
    per_score = result["scores"]
    names = list(per_score)
    sets = list(per_score[names[0]]["ood"])
    lines = []
    for key, title in METRICS:
        lines += [f"**{title}** (%)", "", "| OOD set | shift | " + " | ".join(names) + " |"]
        lines.append("|---|---|" + "---:|" * len(names))
        for s in sets:
            shift = per_score[names[0]]["ood"][s]["shift"]
            cells = [f"{100 * per_score[n]['ood'][s][key]:.2f}" for n in names]
            lines.append(f"| {s} | {shift} | " + " | ".join(cells) + " |")
        for group in ("near", "far"):
            if per_score[names[0]].get(group):
                cells = [f"**{100 * per_score[n][group][key]:.2f}**" for n in names]
                lines.append(f"| **{group} mean** | | " + " | ".join(cells) + " |")
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
    """The report: ID accuracy, the detector (when ``result`` has ``detector_info``), a table per metric."""
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
