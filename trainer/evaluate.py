"""Evaluate an exported detector of any kind on a benchmark (several scores in one pass).

CLI::

    python -m trainer.evaluate --detector runs/ce/detector --benchmark mnist-open --out eval.json \
        --scores msp,energy,knn
    python -m trainer.evaluate --detector runs/ce/detector --scores all --score-params react.percentile=90,vim.dim=64
    python -m trainer.evaluate --detector runs/dense_flow/detector --benchmark mnist-scenes \
        --scores js,msp,energy --report eval_dense/      # dense detectors: pixel AP, FPR@95, AUROC, mIoU

The detector's kind picks its evaluator from :data:`EVALUATORS` (classifiers: image-level AUROC,
FPR@95, AUPR per OOD set; dense: pixel metrics per anomaly set and mIoU).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from oodforge.detector import ArtifactError, Detector
from trainer.classifier_eval import main_classifier
from trainer.dense_eval import main_dense

EVALUATORS: dict[str, Callable[[Any, argparse.Namespace], int]] = {
    "classifier": main_classifier,
    "dense": main_dense,
}
"""Detector kind -> ``evaluate(detector, args) -> exit code``; a new kind adds its own entry."""


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m trainer.evaluate``."""
    p = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--detector", required=True, type=Path, help="detector artifact directory")
    p.add_argument(
        "--benchmark",
        default=None,
        help="benchmark name (default: mnist-open for a classifier, mnist-scenes for a dense detector)",
    )
    p.add_argument("--root", type=Path, default=None, help="data root for imagefolder/cifar benchmarks")
    p.add_argument("--seed", type=int, default=None, help="benchmark split seed (default: the detector's)")
    p.add_argument(
        "--scores",
        default=None,
        help="comma-separated scores, or 'all' (every score the classifier can serve; odin in its own "
        "gradient pass); default: the detector's own; per-pixel js,msp,energy for dense detectors",
    )
    p.add_argument(
        "--score-params",
        default=None,
        help="score hyper-parameters as score.param=value items (YAML values), e.g. "
        "react.percentile=90,vim.dim=64",
    )
    p.add_argument("--out", type=Path, default=Path("eval.json"), help="where to write the JSON result")
    p.add_argument("--report", type=Path, default=None, help="also write report.md + plots into this dir")
    p.add_argument(
        "--save-scores",
        type=Path,
        default=None,
        help="also write every score's per-image values to this .npz (keys 'score/set', ID test = 'score/id'; "
        "classifier detectors)",
    )
    p.add_argument(
        "--selection-outliers",
        type=Path,
        default=None,
        help="a synth outlier dataset: also rank every (one-pass) score by FPR@95 of ID val vs its held-out "
        "outliers, as export.score auto does (never test OOD); the result's 'selection' names the winner",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="a run's config.json (its 'data' section: benchmark, root, OOD folders, seed, image size) to evaluate "
        "on exactly the training run's data; overrides --benchmark/--root/--seed",
    )
    p.add_argument(
        "--reference",
        type=Path,
        default=None,
        help="an outlier dataset (or its reference/ dir) whose generator reference adds the VAE round trip and "
        "generated ID images to the csID suite (default: the one the detector's provenance names, if any)",
    )
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    """Load the detector, pick its kind's evaluator and run it; bad input exits 2 with a message."""
    args = parser().parse_args(argv)
    try:
        detector = Detector.load(args.detector, device=args.device)
        evaluate = EVALUATORS.get(detector.kind)
        if evaluate is None:
            raise ValueError(
                f"no evaluator for {detector.kind} detectors; add one to trainer.evaluate.EVALUATORS"
            )
        return evaluate(detector, args)
    except (ArtifactError, KeyError, ValueError) as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
