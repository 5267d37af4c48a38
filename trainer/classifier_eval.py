"""Evaluation of classifier detectors: network outputs collected once, every score computed from them.

Each split is run through the network once; every score is computed from the cached logits and
features. Scores that need fitting (knn, mahalanobis, vim, ...) are fitted on the benchmark's ID train
split — those that need the final linear layer get ``final_layer(model)`` — except the detector's own
score, which keeps the statistics stored in the artifact. Scores that need input gradients (odin) run
in a separate pass over the same images. ``all`` stands for every registered score the model can
serve. Used by the training script (the report at the end of a run) and by ``python -m trainer.evaluate``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader

from oodforge.backbones import Classifier, final_layer
from oodforge.data import BENCHMARKS, Benchmark, DataConfig, ImageSet, load_benchmark
from oodforge.data.transforms import Preprocess, TransformedSet
from oodforge.detector import ClassifierDetector
from oodforge.metrics import FPR95_DEFINITION, OPENOOD_FPR95_DEFINITION, accuracy, summarize
from oodforge.progress import progress
from oodforge.reference import Reference, find_reference
from oodforge.scores import ALL, SCORES, Score, build_score, check_score_params
from trainer.fullspectrum import fullspectrum_metrics, suite_sets
from trainer.report import summary_markdown, write_report
from trainer.selection import fair_candidates, load_holdout, select_score


@dataclass
class Source:
    """How a set of outputs was made, so that a gradient score can run the same images again."""

    model: Classifier
    images: ImageSet
    preprocess: Preprocess
    batch_size: int = 512
    device: str | torch.device = "cpu"

    def batches(self, desc: str) -> Any:
        """The source's pre-processed images in batches, behind a progress bar labelled ``desc``."""
        loader = DataLoader(TransformedSet(self.images, self.preprocess), batch_size=self.batch_size)
        return progress(loader, desc=desc, leave=False)


@dataclass
class Outputs:
    """Network outputs on one image set (and, when collected here, where they came from)."""

    logits: torch.Tensor
    features: torch.Tensor
    labels: torch.Tensor
    source: Source | None = field(default=None, repr=False)


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
    source = Source(model, images, preprocess, batch_size, device)
    logits, features, labels = [], [], []
    for x, y in source.batches(desc or images.name):
        lo, fe = model(x.to(device))
        logits.append(lo.float().cpu())
        features.append(fe.float().cpu())
        labels.append(torch.as_tensor(y))
    return Outputs(torch.cat(logits), torch.cat(features), torch.cat(labels), source)


def collect_benchmark(
    model: Classifier,
    bench: Benchmark,
    preprocess: Preprocess,
    batch_size: int = 512,
    device: str = "cpu",
    reference: Reference | None = None,
) -> dict[str, Outputs]:
    """Outputs for ``train``, ``val``, ``test``, every OOD set (keyed by its name) and the full-spectrum sets.

    The full-spectrum sets (:func:`trainer.fullspectrum.suite_sets`: csID of test and val, extra test OOD,
    validation OOD) are keyed ``csid/<shift>``, ``csid-val/<shift>``, ``extra/<set>``, ``valood/<set>``;
    ``reference`` adds the generator's VAE round trips and generated ID images to the csID sets.
    """
    sets: dict[str, ImageSet] = {"train": bench.train, "val": bench.val, "test": bench.test}
    sets.update({name: ood.images for name, ood in bench.ood.items()})
    sets.update(suite_sets(bench, reference))
    return {
        key: collect(model, images, preprocess, batch_size, device, desc=f"embed {key}")
        for key, images in progress(sets.items(), desc="evaluate")
    }


# --------------------------------------------------------------------------- which scores


def unmet_need(name: str, model: Classifier | None) -> str | None:
    """Why ``model`` cannot serve score ``name`` (``None`` when it can)."""
    if not SCORES.get(name).needs_layer:
        return None
    if model is None:
        return f"score {name!r} needs the model's final linear layer, and no model was given"
    try:
        final_layer(model, needed_by=name)
    except ValueError as err:
        return str(err)
    return None


def expand_scores(names: list[str], model: Classifier | None) -> tuple[list[str], dict[str, str]]:
    """``names`` with ``all`` replaced by every registered score ``model`` can serve, without repeats.

    Returns:
        ``(names, skipped)``: ``skipped`` maps each score ``all`` left out to the reason. A score named
        explicitly is kept even when the model cannot serve it (fitting it gives the error).
    """
    out: list[str] = []
    skipped: dict[str, str] = {}
    for name in names:
        if name != ALL:
            SCORES.get(name)  # KeyError listing the registered scores
            out.append(name)
            continue
        for candidate in SCORES:
            reason = unmet_need(candidate, model)
            if reason is None:
                out.append(candidate)
            else:
                skipped[candidate] = reason
    kept = list(dict.fromkeys(out))
    return kept, {n: r for n, r in skipped.items() if n not in kept}


def fit_scores(
    names: list[str],
    params: dict[str, dict[str, Any]],
    train: Outputs,
    fitted: dict[str, Score] | None = None,
) -> dict[str, Score]:
    """Build each named score (``all`` expanded) and fit those that need ID train statistics.

    Scores that need statistics or the final layer are fitted unless already ``fitted``; the layer comes
    from the model that produced ``train``.
    """
    model = train.source.model if train.source else None
    names, skipped = expand_scores(names, model)
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}", file=sys.stderr)
    out: dict[str, Score] = {}
    for name in names:
        if fitted and name in fitted:
            out[name] = fitted[name]
            continue
        score = build_score(name, **params.get(name, {}))
        if score.needs_fit or score.needs_layer:
            layer = None
            if score.needs_layer:
                reason = unmet_need(name, model)
                if reason:
                    raise ValueError(reason)
                layer = final_layer(model, needed_by=name)
            score.fit(train.features, train.labels, logits=train.logits, layer=layer)
        out[name] = score
    return out


# --------------------------------------------------------------------------- scoring and metrics


def gradient_pass(score: Score, outputs: Outputs, desc: str) -> np.ndarray:
    """Scores of a ``needs_grad`` score, from a new pass over the images that made ``outputs``."""
    source = outputs.source
    if source is None:
        raise ValueError(
            f"score {score.name!r} needs input gradients, so it needs the images, not cached outputs; "
            "collect the outputs with trainer.classifier_eval.collect"
        )
    source.model.eval()
    parts = [
        score.score_pixels(source.model, x.to(source.device), input_std=source.preprocess.std)
        for x, _ in source.batches(desc)
    ]
    return torch.cat(parts).detach().cpu().numpy().astype(np.float64)


def score_values(name: str, score: Score, outputs: Outputs) -> np.ndarray:
    """``[N]`` float64 values of ``score`` on one set (a gradient pass for ``needs_grad`` scores)."""
    if score.needs_grad:
        return gradient_pass(score, outputs, desc=f"{name} (gradient pass)")
    return score(outputs.logits, outputs.features).numpy().astype(np.float64)


def evaluate_outputs(
    outputs: dict[str, Outputs], bench: Benchmark, scores: dict[str, Score], tpr: float = 0.95
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Metrics for every score and OOD set (both conventions), plus the raw score values (for plots).

    Scores with ``needs_grad`` run in their own gradient pass over the images (a line says so).

    Returns:
        ``(result, values)``: ``result`` has the first score's metrics at the top level
        (``id_accuracy``, ``score``, ``ood``, ``near``, ``far``, ``openood``) and every score under
        ``scores``; ``gradient_pass`` lists the scores that needed one; ``values[score][set]`` are the
        score arrays, with ID test under the key ``"id"``.
    """
    test = outputs["test"]
    result: dict[str, Any] = {
        "id_accuracy": accuracy(test.logits.numpy(), test.labels.numpy()),
        "id_split": "test",
        "fpr95_definition": FPR95_DEFINITION,
        "openood_definition": OPENOOD_FPR95_DEFINITION,
        "n_id": len(test.labels),
        "n_ood": {name: len(outputs[name].labels) for name in bench.ood},
    }
    per_score: dict[str, Any] = {}
    values: dict[str, dict[str, np.ndarray]] = {}
    for name, score in scores.items():
        vals = {"id": score_values(name, score, test)}
        vals.update({ood_name: score_values(name, score, outputs[ood_name]) for ood_name in bench.ood})
        ood = {n: (vals[n], bench.ood[n].shift) for n in bench.ood}
        per_score[name] = summarize(vals["id"], ood, tpr=tpr)
        values[name] = vals
        if not score.needs_grad:  # a gradient pass over every csID set would cost more than the rest
            extra = {k: score_values(name, score, o) for k, o in outputs.items() if k == "val" or "/" in k}
            per_score[name].update(fullspectrum_metrics({**vals, **extra}, outputs, bench, tpr))
    gradient = [name for name, score in scores.items() if score.needs_grad]
    for name in gradient:
        print(f"{name} ran in its own gradient pass (input perturbation needs a backward pass per batch)")
    first = next(iter(scores))
    result.update({"score": first, **per_score[first], "scores": per_score, "gradient_pass": gradient})
    return result, values


# --------------------------------------------------------------------------- the command line


def parse_scores(text: str | None) -> list[str] | None:
    """Comma-separated score names or ``all``, each checked (``KeyError`` lists the valid ones)."""
    if not text:
        return None
    names = [s.strip() for s in text.split(",") if s.strip()]
    for n in names:
        if n != ALL:
            SCORES.get(n)
    return names


def parse_score_params(text: str | None) -> dict[str, dict[str, Any]]:
    """``react.percentile=90,vim.dim=64`` -> ``{"react": {"percentile": 90}, "vim": {"dim": 64}}``.

    Values are YAML scalars (``90`` int, ``0.5`` float, ``null`` None, ``true`` bool).

    Raises:
        KeyError: an unknown score (the message lists the registered ones).
        ValueError: a malformed item, or a parameter the score does not take (listing the ones it does).
    """
    out: dict[str, dict[str, Any]] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, eq, raw = item.partition("=")
        name, dot, param = key.strip().partition(".")
        if not (eq and dot and name and param):
            raise ValueError(
                f"--score-params item {item!r} must look like score.param=value (e.g. vim.dim=64)"
            )
        SCORES.get(name)
        value = yaml.safe_load(raw) if raw.strip() else None
        out.setdefault(name, {})[param.strip()] = value
    for name, params in out.items():
        try:
            check_score_params(name, params)
        except TypeError as err:
            raise ValueError(str(err)) from None
    return out


def rank_on_holdout(
    model: Classifier,
    preprocess: Preprocess,
    scores: dict[str, Score],
    val: Outputs,
    outliers: Path,
    *,
    head_sees_synth_images: bool,
    tpr: float = 0.95,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """The ``export.score: auto`` rule: rank fitted ``scores`` on ID val vs the held-out synth outliers.

    Lowest FPR@95, then highest AUROC (:func:`trainer.selection.select_score`). Scores that need a gradient
    pass are left out, and so are scores through the head when the head trained on the other part of
    those outliers (:func:`trainer.selection.fair_candidates`). Only ``val`` and the held-out part of
    ``outliers`` are read: never a test set. Returns the selection record (``chosen``, every candidate's
    figures, what was dropped and why), as stored in reports and artifacts.
    """
    images = load_holdout(outliers).images("holdout")
    holdout = collect(model, images, preprocess, batch_size, device, desc="embed held-out")
    one_pass = [n for n, s in scores.items() if not s.needs_grad]
    names, dropped = fair_candidates(one_pass, head_sees_synth_images)
    chosen, table = select_score({n: scores[n] for n in names}, val, holdout, tpr)
    return {
        "chosen": chosen,
        "criterion": "lowest FPR@95 (then highest AUROC): ID val vs held-out synthetic outliers",
        "id_split": "val",
        "outliers": str(outliers),
        "n_outliers": len(images),
        "head_sees_synth_images": head_sees_synth_images,
        "candidates": table,
        "dropped": {
            n: "computed through the head, which was trained on the other part of these outliers"
            for n in dropped
        },
    }


def run_data_config(path: Path) -> DataConfig:
    """The ``data`` section of a training run's ``config.json`` (``--data``), or a ValueError saying what to pass."""
    try:
        data = json.loads(path.read_text())["data"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(
            f"--data {path}: not a training run's config.json with a 'data' section ({type(err).__name__}: {err}); "
            "pass runs/<name>/config.json, which trainer/train.py writes"
        ) from None
    return DataConfig.model_validate(data)


def main_classifier(detector: ClassifierDetector, args: argparse.Namespace) -> int:
    """``python -m trainer.evaluate`` for a classifier detector (see :mod:`trainer.evaluate` for the flags)."""
    own_name, own = detector.spec.score.name, detector.score
    requested = parse_scores(args.scores) or [own_name]
    params = parse_score_params(getattr(args, "score_params", None))
    # with "all", the detector's own score comes first (the result's top-level metrics are the first's)
    names, skipped = expand_scores([own_name, *requested] if ALL in requested else requested, detector.model)
    for name in names:
        reason = unmet_need(name, detector.model)
        if reason:
            raise ValueError(reason)
    for name in params:
        if name not in names and name not in skipped:
            raise ValueError(
                f"--score-params sets {name!r}, which is not evaluated (--scores {','.join(requested)})"
            )
    run_data = getattr(args, "data", None)
    data = run_data_config(Path(run_data)) if run_data else None
    benchmark = data.benchmark if data else (args.benchmark or "mnist-open")
    if benchmark not in BENCHMARKS:
        raise ValueError(
            f"{args.detector} is a classifier detector; {benchmark!r} is not a classifier benchmark "
            f"(classifier benchmarks: {', '.join(BENCHMARKS.names())})"
        )
    training = detector.spec.provenance.training
    seed = args.seed if args.seed is not None else training.get("data_seed", 0)
    bench = load_benchmark(data or DataConfig(benchmark=benchmark, root=args.root, seed=seed))
    if bench.class_names != detector.class_names:
        print(
            f"warning: benchmark classes {bench.class_names} differ from the detector's {detector.class_names}",
            file=sys.stderr,
        )
    if own_name in params and {**own.params(), **params[own_name]} != own.params():
        print(f"{own_name}: --score-params differ from the detector's stored score; refitted on ID train")
        fitted = {}
    else:
        fitted = {own_name: own}
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    reference = find_reference(
        getattr(args, "reference", None), (training.get("method_args") or {}).get("outliers")
    )
    outputs = collect_benchmark(
        detector.model, bench, detector.preprocess, args.batch_size, args.device, reference
    )
    scores = fit_scores(names, params, outputs["train"], fitted=fitted)
    result, values = evaluate_outputs(outputs, bench, scores, tpr=detector.spec.calibration.target_id_tpr)
    result["target_id_tpr"] = detector.spec.calibration.target_id_tpr
    result["reference"] = str(reference.root) if reference else None
    selection_dir = getattr(args, "selection_outliers", None)
    if selection_dir is not None:
        result["selection"] = rank_on_holdout(
            detector.model, detector.preprocess, scores, outputs["val"], selection_dir,
            head_sees_synth_images=bool(detector.spec.provenance.training.get("head_sees_synth_images")),
            tpr=detector.spec.calibration.target_id_tpr, batch_size=args.batch_size, device=args.device,
        )  # fmt: skip
    result.update(
        {
            "detector": str(args.detector),
            "benchmark": benchmark,
            "detector_info": detector.describe(),
            "score_params": {name: score.params() for name, score in scores.items()},
            "skipped": skipped,
        }
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    if args.report:
        write_report(result, values, args.report, title=f"{detector.name} on {benchmark}")
    save_scores = getattr(args, "save_scores", None)
    if save_scores:
        save_scores.parent.mkdir(parents=True, exist_ok=True)
        np.savez(save_scores, **{f"{n}/{s}": v for n, per in values.items() for s, v in per.items()})
        print(f"wrote {save_scores}")
    print(summary_markdown(result))
    print(f"wrote {args.out}")
    return 0
