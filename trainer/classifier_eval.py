"""Evaluation of classifier detectors: network outputs collected once, every score computed from them.

Each split is run through the network once; every score is computed from the cached logits and
features. Scores that need fitting (knn, mahalanobis, ...) are fitted on the benchmark's ID train
split, except the detector's own score, which keeps the statistics stored in the artifact. Used by
the training script (the report at the end of a run) and by ``python -m trainer.evaluate``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from oodforge.backbones import Classifier
from oodforge.data import BENCHMARKS, Benchmark, DataConfig, ImageSet, load_benchmark
from oodforge.data.transforms import Preprocess, TransformedSet
from oodforge.detector import ClassifierDetector
from oodforge.metrics import FPR95_DEFINITION, accuracy, summarize
from oodforge.progress import progress
from oodforge.scores import SCORES, Score, build_score
from trainer.report import write_report


@dataclass
class Outputs:
    """Network outputs on one image set."""

    logits: torch.Tensor
    features: torch.Tensor
    labels: torch.Tensor


@torch.no_grad()
def collect(
    model: Classifier,
    images: ImageSet,
    preprocess: Preprocess,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    desc: str | None = None,
) -> Outputs:
    """Run ``model`` over ``images`` (no augmentation) and keep logits, features and labels."""
    model.eval()
    loader = DataLoader(TransformedSet(images, preprocess), batch_size=batch_size, shuffle=False)
    logits, features, labels = [], [], []
    for x, y in progress(loader, desc=desc or images.name, leave=False):
        lo, fe = model(x.to(device))
        logits.append(lo.float().cpu())
        features.append(fe.float().cpu())
        labels.append(torch.as_tensor(y))
    return Outputs(torch.cat(logits), torch.cat(features), torch.cat(labels))


def collect_benchmark(
    model: Classifier, bench: Benchmark, preprocess: Preprocess, batch_size: int = 512, device: str = "cpu"
) -> dict[str, Outputs]:
    """Outputs for ``train``, ``val``, ``test`` and every OOD set (keyed by its name)."""
    sets: dict[str, ImageSet] = {"train": bench.train, "val": bench.val, "test": bench.test}
    sets.update({name: ood.images for name, ood in bench.ood.items()})
    return {
        key: collect(model, images, preprocess, batch_size, device, desc=f"embed {key}")
        for key, images in progress(sets.items(), desc="evaluate")
    }


def fit_scores(
    names: list[str],
    params: dict[str, dict[str, Any]],
    train: Outputs,
    fitted: dict[str, Score] | None = None,
) -> dict[str, Score]:
    """Build each named score; fit those that need ID train statistics (unless already ``fitted``)."""
    out: dict[str, Score] = {}
    for name in names:
        if fitted and name in fitted:
            out[name] = fitted[name]
            continue
        score = build_score(name, **params.get(name, {}))
        out[name] = score.fit(train.features, train.labels) if score.needs_fit else score
    return out


def evaluate_outputs(
    outputs: dict[str, Outputs], bench: Benchmark, scores: dict[str, Score], tpr: float = 0.95
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Metrics for every score and OOD set, plus the raw score values (for plots).

    Returns:
        ``(result, values)``: ``result`` has the first score's metrics at the top level
        (``id_accuracy``, ``score``, ``ood``, ``near``, ``far``) and every score under ``scores``;
        ``values[score][set]`` are the score arrays, with ID test under the key ``"id"``.
    """
    test = outputs["test"]
    result: dict[str, Any] = {
        "id_accuracy": accuracy(test.logits.numpy(), test.labels.numpy()),
        "id_split": "test",
        "fpr95_definition": FPR95_DEFINITION,
        "n_id": len(test.labels),
        "n_ood": {name: len(outputs[name].labels) for name in bench.ood},
    }
    per_score: dict[str, Any] = {}
    values: dict[str, dict[str, np.ndarray]] = {}
    for name, score in scores.items():
        vals = {"id": score(test.logits, test.features).numpy().astype(np.float64)}
        for ood_name in bench.ood:
            out = outputs[ood_name]
            vals[ood_name] = score(out.logits, out.features).numpy().astype(np.float64)
        ood = {n: (vals[n], bench.ood[n].shift) for n in bench.ood}
        per_score[name] = summarize(vals["id"], ood, tpr=tpr)
        values[name] = vals
    first = next(iter(scores))
    result.update({"score": first, **per_score[first], "scores": per_score})
    return result, values


def parse_scores(text: str | None) -> list[str] | None:
    """Comma-separated score names, each checked against the registry (``KeyError`` lists the valid ones)."""
    if not text:
        return None
    names = [s.strip() for s in text.split(",") if s.strip()]
    for n in names:
        SCORES.get(n)
    return names


def main_classifier(detector: ClassifierDetector, args: argparse.Namespace) -> int:
    """``python -m trainer.evaluate`` for a classifier detector (see :mod:`trainer.evaluate` for the flags)."""
    names = parse_scores(args.scores) or [detector.spec.score.name]
    benchmark = args.benchmark or "mnist-open"
    if benchmark not in BENCHMARKS:
        raise ValueError(
            f"{args.detector} is a classifier detector; {benchmark!r} is not a classifier benchmark "
            f"(classifier benchmarks: {', '.join(BENCHMARKS.names())})"
        )
    training = detector.spec.provenance.training
    seed = args.seed if args.seed is not None else training.get("data_seed", 0)
    bench = load_benchmark(DataConfig(benchmark=benchmark, root=args.root, seed=seed))
    if bench.class_names != detector.class_names:
        print(
            f"warning: benchmark classes {bench.class_names} differ from the detector's {detector.class_names}",
            file=sys.stderr,
        )
    outputs = collect_benchmark(detector.model, bench, detector.preprocess, args.batch_size, args.device)
    own = {detector.spec.score.name: detector.score}
    scores = fit_scores(names, {}, outputs["train"], fitted=own)
    result, values = evaluate_outputs(outputs, bench, scores)
    result["detector"] = str(args.detector)
    result["benchmark"] = benchmark
    result["detector_info"] = detector.describe()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    if args.report:
        write_report(result, values, args.report, title=f"{detector.name} on {benchmark}")
    print(f"wrote {args.out}")
    return 0
