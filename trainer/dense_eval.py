"""Evaluation of dense (per-pixel) OOD detectors on a dense benchmark such as ``mnist-scenes``.

Pixel metrics are computed over all test pixels whose anomaly label is not void: pixel AP (anomaly =
positive class), FPR@95 (share of anomaly pixels accepted at the threshold that keeps 95% of inlier
pixels) and AUROC, per anomaly set (scenes of that set), over all test scenes, and as near/far means.
Inlier mIoU is over the 7 classes on test pixels with a class label. Image scores (pooled maps) of the
test scenes are compared with the ID-only val scenes.

    python -m trainer.evaluate --benchmark mnist-scenes --detector runs/dense_flow/detector
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oodforge.data.mnist_scenes import (
    DENSE_BENCHMARKS,
    VOID,
    DenseBenchmark,
    SceneConfig,
    SceneSet,
    load_scenes,
)
from oodforge.data.transforms import Preprocess
from oodforge.dense import PIXEL_SCORES, PoolingSpec, pool
from oodforge.detector import DenseDetector
from oodforge.metrics import FPR95_DEFINITION, SHIFTS, ood_metrics
from oodforge.progress import progress
from oodforge.segmenters import Segmenter
from trainer.report import detector_markdown

PIXEL_KEYS = ("ap", "fpr95", "auroc")


def scene_pixels(scenes: SceneSet, preprocess: Preprocess) -> torch.Tensor:
    """Pre-processed scenes ``[N, 3, S, S]`` (the same code path as serving)."""
    return preprocess.tensor(torch.from_numpy(np.array(scenes.images)).permute(0, 3, 1, 2))


@torch.no_grad()
def predict_logits(
    model: Segmenter, pixels: torch.Tensor, batch_size: int = 128, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Logits ``[N, K, S, S]`` of pre-processed pixels, batch by batch."""
    model.eval()
    parts = [
        model(pixels[i : i + batch_size].to(device)).float().cpu()
        for i in progress(range(0, len(pixels), batch_size), desc="segment", leave=False)
    ]
    return torch.cat(parts)


def pixel_metrics(maps: np.ndarray, anomaly: np.ndarray, tpr: float = 0.95) -> dict[str, float]:
    """``{ap, fpr95, auroc}`` of per-pixel ID scores ``maps`` against ``anomaly`` (1 = anomaly, void ignored)."""
    maps, anomaly = np.asarray(maps).reshape(-1), np.asarray(anomaly).reshape(-1)
    inlier, outlier = maps[anomaly == 0], maps[anomaly == 1]
    m = ood_metrics(inlier, outlier, tpr)
    return {"ap": m["aupr_out"], "fpr95": m["fpr95"], "auroc": m["auroc"]}


def mean_iou(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[float, list[float]]:
    """Mean IoU over classes of ``pred`` vs ``labels`` on pixels whose label is not void.

    ``IoU_c = |pred = c ∧ label = c| / |pred = c ∨ label = c|`` over labelled pixels; a class absent from
    both is left out of the mean.
    """
    valid = labels != VOID
    p, y = pred[valid].astype(np.int64), labels[valid].astype(np.int64)
    confusion = np.bincount(y * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    return float(np.nanmean(iou)), [float(v) for v in iou]


def summarize_dense(
    maps: np.ndarray, test: SceneSet, shifts: dict[str, str], tpr: float = 0.95
) -> dict[str, Any]:
    """Pixel metrics per anomaly set, over all scenes (``all``) and as ``near``/``far`` means."""
    out: dict[str, Any] = {"sets": {}}
    names = np.asarray(test.anomalies)
    for anomaly_set in shifts:
        rows = names == anomaly_set
        if rows.any():
            out["sets"][anomaly_set] = {
                **pixel_metrics(maps[rows], test.anomaly[rows], tpr),
                "shift": shifts[anomaly_set],
            }
    out["all"] = pixel_metrics(maps, test.anomaly, tpr)
    for group in SHIFTS:
        members = [m for m in out["sets"].values() if m["shift"] == group]
        out[group] = {k: float(np.mean([m[k] for m in members])) for k in PIXEL_KEYS} if members else {}
    return out


def evaluate_dense(
    model: Segmenter,
    bench: DenseBenchmark,
    preprocess: Preprocess,
    scores: list[str],
    pooling: PoolingSpec,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    tpr: float = 0.95,
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Metrics of every pixel score on ``bench.test`` and the maps (for figures and calibration).

    Returns:
        ``(result, maps)``: ``result`` has ``miou``, ``iou_per_class`` and per score ``pixel`` metrics
        (see :func:`summarize_dense`) and ``image`` AUROC/FPR@95 of test vs val scenes; ``maps[score]``
        has ``"test"`` and ``"val"`` arrays ``[N, S, S]`` (higher = more ID).
    """
    logits = {
        split: predict_logits(model, scene_pixels(getattr(bench, split), preprocess), batch_size, device)
        for split in ("val", "test")
    }
    miou, per_class = mean_iou(logits["test"].argmax(1).numpy(), bench.test.labels, len(bench.class_names))
    result: dict[str, Any] = {
        "benchmark": bench.name,
        "miou": miou,
        "iou_per_class": dict(zip(bench.class_names, per_class, strict=True)),
        "n_test_scenes": len(bench.test),
        "n_val_scenes": len(bench.val),
        "fpr95_definition": FPR95_DEFINITION.replace("samples", "pixels (images for image-level)"),
        "pooling": pooling.model_dump(),
        "scores": {},
    }
    maps: dict[str, dict[str, np.ndarray]] = {}
    names = np.asarray(bench.test.anomalies)
    for name in scores:
        fn = PIXEL_SCORES.get(name)
        maps[name] = {split: fn(lo).numpy() for split, lo in logits.items()}
        image = {split: pool(torch.from_numpy(m), pooling).numpy() for split, m in maps[name].items()}
        image_metrics = {
            anomaly_set: ood_metrics(image["val"], image["test"][names == anomaly_set], tpr)
            for anomaly_set in bench.shifts
            if (names == anomaly_set).any()
        }
        result["scores"][name] = {
            "pixel": summarize_dense(maps[name]["test"], bench.test, bench.shifts, tpr),
            "image": {k: {"auroc": v["auroc"], "fpr95": v["fpr95"]} for k, v in image_metrics.items()},
        }
    return result, maps


def maps_figure(
    scenes: SceneSet, rows: list[int], maps: dict[str, np.ndarray], path: Path, title: str | None = None
) -> Path:
    """A PNG grid: per row a scene, its ground-truth anomaly mask and each named anomaly map.

    Maps are ID scores (higher = more ID); they are drawn as anomaly (bright = anomalous), each column
    scaled to its own 1st-99th percentile range over the shown rows.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 2 + len(maps)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.6 * cols, 1.6 * len(rows)), squeeze=False)
    gt = np.where(scenes.anomaly == VOID, 0.5, scenes.anomaly.astype(np.float32))
    for c, name in enumerate(["scene", "ground truth", *maps]):
        axes[0, c].set_title(name, fontsize=8)
    for c, m in enumerate(maps.values()):
        lo, hi = np.percentile(m[rows], [1, 99])
        for r, i in enumerate(rows):
            axes[r, 2 + c].imshow(-m[i], cmap="magma", vmin=-hi, vmax=-lo)
    for r, i in enumerate(rows):
        axes[r, 0].imshow(scenes.images[i])
        axes[r, 0].set_ylabel(scenes.anomalies[i] or "ID", fontsize=7)
        axes[r, 1].imshow(gt[i], cmap="gray", vmin=0, vmax=1)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def example_rows(scenes: SceneSet, per_set: int = 2) -> list[int]:
    """The first ``per_set`` scenes of each anomaly set (in set order)."""
    rows: list[int] = []
    for anomaly_set in dict.fromkeys(scenes.anomalies):
        rows += [i for i, k in enumerate(scenes.anomalies) if k == anomaly_set][:per_set]
    return rows


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def dense_report(result: dict[str, Any], title: str) -> str:
    """The dense report: mIoU, the detector (``detector_info``), pixel metrics per anomaly set and score."""
    lines = [
        f"# {title}",
        "",
        f"Inlier mIoU: **{_pct(result['miou'])}%** (test scenes, 7 classes, void ignored)",
        "",
    ]
    if result.get("detector_info"):
        lines.append(detector_markdown(result["detector_info"]))
    lines += [
        "Pixel metrics over test pixels (void ignored; anomaly = positive for AP; "
        "FPR@95 = share of anomaly pixels accepted when 95% of inlier pixels are).",
        "",
    ]
    for name, per in result["scores"].items():
        px = per["pixel"]
        lines += [
            f"## score `{name}`",
            "",
            "| anomaly set | pixel AP | FPR@95 | AUROC | image AUROC |",
            "|---|---|---|---|---|",
        ]
        for anomaly_set, m in px["sets"].items():
            img = per["image"].get(anomaly_set, {}).get("auroc")
            lines.append(
                f"| {anomaly_set} ({m['shift']}) | {_pct(m['ap'])} | {_pct(m['fpr95'])} | {_pct(m['auroc'])} | "
                f"{'' if img is None else _pct(img)} |"
            )
        for group in ("near", "far"):
            if px[group]:
                m = px[group]
                lines.append(
                    f"| mean {group} | {_pct(m['ap'])} | {_pct(m['fpr95'])} | {_pct(m['auroc'])} | |"
                )
        m = px["all"]
        lines += [f"| all test pixels | {_pct(m['ap'])} | {_pct(m['fpr95'])} | {_pct(m['auroc'])} | |", ""]
    return "\n".join(lines)


def main_dense(detector: DenseDetector, args: argparse.Namespace) -> int:
    """``python -m trainer.evaluate`` for a dense detector (see :mod:`trainer.evaluate` for the flags)."""
    if args.benchmark and args.benchmark not in DENSE_BENCHMARKS:
        raise ValueError(
            f"{args.detector} is a dense detector; {args.benchmark!r} is not a dense benchmark "
            f"(dense benchmarks: {', '.join(DENSE_BENCHMARKS.names())})"
        )
    names = [s.strip() for s in (args.scores or detector.spec.score.name).split(",") if s.strip()]
    for name in names:
        PIXEL_SCORES.get(name)  # a KeyError that lists the valid names
    seed = args.seed if args.seed is not None else detector.spec.provenance.training.get("data_seed", 0)
    bench = load_scenes(SceneConfig(benchmark=args.benchmark or "mnist-scenes", seed=seed))
    if bench.class_names != detector.class_names:
        print(
            f"warning: benchmark classes {bench.class_names} differ from the detector's {detector.class_names}",
            file=sys.stderr,
        )
    result, maps = evaluate_dense(
        detector.model, bench, detector.preprocess, names, detector.head.pooling, args.batch_size, args.device
    )
    result.update(
        {
            "detector": str(args.detector),
            "pixel_score": detector.spec.score.name,
            "detector_info": detector.describe(),
        }
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    if args.report:
        title = f"{detector.name} on {bench.name}"
        args.report.mkdir(parents=True, exist_ok=True)
        (args.report / "report.md").write_text(dense_report(result, title) + "\n![maps](plots/maps.png)\n")
        maps_figure(
            bench.test,
            example_rows(bench.test),
            {n: m["test"] for n, m in maps.items()},
            args.report / "plots" / "maps.png",
            title,
        )
    first = result["scores"][names[0]]["pixel"]["all"]
    print(
        f"{detector.name} on {bench.name}: mIoU {100 * result['miou']:.2f}% | {names[0]}: pixel AP "
        f"{100 * first['ap']:.2f}%, FPR@95 {100 * first['fpr95']:.2f}%, AUROC {100 * first['auroc']:.2f}%"
    )
    print(f"wrote {args.out}")
    return 0
