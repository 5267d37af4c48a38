"""``python -m trainer.shortcut``: does a detector detect the decoder instead of the novelty?

Synthetic outliers are decoder outputs. A detector that learned "decoded = outlier" accepts real ID
images but rejects ID images that went through the same generator. From the generator reference of the
outlier dataset in the detector's provenance (``method_args.outliers``, or ``--outliers``), at the
detector's own threshold and score:

* ``real_id_accept`` — share of the real ID test images accepted;
* ``generated_id_accept`` — share of the generated ID-class test images accepted (they are ID);
* ``roundtrip_id_accept`` — share of the VAE round trips of ID test accepted (they are ID);
* ``generated_outlier_accept`` — share of the held-out synthetic outliers accepted (lower is better);
* ``probe_auroc`` — a logistic-regression probe on the frozen penultimate features, trained to tell real
  ID train images from generated + round-trip ID train images, scored on the test splits (0.5: the
  features cannot tell decoded from real; 1.0: they separate them perfectly, a shortcut is available).

A healthy detector has ``generated_id_accept`` and ``roundtrip_id_accept`` close to ``real_id_accept``.

    python -m trainer.shortcut --detector runs/oal/detector [--out shortcut.json]
    python -m trainer.shortcut --detector runs/ce/detector --outliers runs/outliers
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oodforge.data import DataConfig, load_benchmark
from oodforge.detector import ClassifierDetector
from oodforge.metrics import auroc
from oodforge.outliers import OutlierDataset
from oodforge.reference import Reference
from trainer.classifier_eval import Outputs, collect

KEYS = (
    "real_id_accept",
    "generated_id_accept",
    "roundtrip_id_accept",
    "generated_outlier_accept",
    "probe_auroc",
)


def probe_auroc(
    real_train: torch.Tensor, gen_train: torch.Tensor, real_test: torch.Tensor, gen_test: torch.Tensor
) -> float:
    """AUROC on the test features of a linear probe (standardised, L2-regularised logistic regression)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = torch.cat([real_train, gen_train]).numpy()
    y = np.r_[np.zeros(len(real_train)), np.ones(len(gen_train))]
    scaler = StandardScaler().fit(x)
    probe = LogisticRegression(max_iter=2000, class_weight="balanced").fit(scaler.transform(x), y)
    p_real = probe.decision_function(scaler.transform(real_test.numpy()))
    p_gen = probe.decision_function(scaler.transform(gen_test.numpy()))
    return auroc(p_gen, p_real)  # "generated" is the positive side of the probe


def accept(detector: ClassifierDetector, out: Outputs) -> float:
    """Share of ``out`` the detector accepts (its score at or above its threshold)."""
    scores = detector.score(out.logits, out.features).numpy()
    return float(np.mean(scores >= detector.threshold))


def diagnose(
    detector: ClassifierDetector, outliers: Path, batch_size: int = 512, device: str = "cpu"
) -> dict[str, Any]:
    """The five shortcut figures of ``detector`` against the reference of the outlier dataset ``outliers``."""
    reference = Reference.load(outliers)
    data = DataConfig(**reference.card["settings"]["data"])
    bench = load_benchmark(data)
    model, pre = detector.model, detector.preprocess

    def run(images: Any, what: str) -> Outputs:
        return collect(model, images, pre, batch_size, device, desc=f"shortcut: {what}")

    parts = {}
    for kind in ("generated", "roundtrip"):
        for split in ("train", "test"):
            images = reference.get(kind, split)
            if images is None or len(images) == 0:
                raise FileNotFoundError(
                    f"{reference.root} has no {kind}/{split} images; re-run `python -m synth reference`"
                )
            parts[(kind, split)] = run(images, f"{kind} {split}")
    real_test, real_train = run(bench.test, "real ID test"), run(bench.train, "real ID train")
    try:
        holdout = OutlierDataset.load(Path(outliers)).images("holdout")
    except ValueError:  # no kept pixel outliers in the held-out part: nothing to measure there
        holdout = []
    result = {
        "real_id_accept": accept(detector, real_test),
        "generated_id_accept": accept(detector, parts[("generated", "test")]),
        "roundtrip_id_accept": accept(detector, parts[("roundtrip", "test")]),
        "generated_outlier_accept": accept(detector, run(holdout, "held-out outliers"))
        if len(holdout)
        else None,
        "probe_auroc": probe_auroc(
            real_train.features,
            torch.cat([parts[("generated", "train")].features, parts[("roundtrip", "train")].features]),
            real_test.features,
            torch.cat([parts[("generated", "test")].features, parts[("roundtrip", "test")].features]),
        ),
    }
    result.update(
        {
            "detector": detector.name,
            "score": detector.spec.score.name,
            "threshold": detector.threshold,
            "outliers": str(outliers),
            "n": {
                "real_id": len(real_test.labels),
                "generated_id": len(parts[("generated", "test")].labels),
                "roundtrip_id": len(parts[("roundtrip", "test")].labels),
                "generated_outliers": len(holdout),
            },  # fmt: skip
            "generated_id_label_accuracy": float(
                (parts[("generated", "test")].logits.argmax(1) == parts[("generated", "test")].labels)
                .float()
                .mean()
            ),
        }
    )
    return result


def outliers_of(detector: ClassifierDetector, given: Path | None) -> Path:
    """``--outliers``, or the outlier dataset named in the detector's provenance."""
    if given is not None:
        return given
    named = (detector.spec.provenance.training.get("method_args") or {}).get("outliers")
    if not named:
        raise ValueError(
            f"{detector.name}: its provenance names no outlier dataset (it trained without one); pass the outlier "
            "dataset whose generator reference to use with --outliers DIR (e.g. runs/outliers)"
        )
    return Path(named)


def main(argv: list[str] | None = None) -> int:
    """Print (and with ``--out`` write) the shortcut figures of one detector; exit 2 on bad input."""
    parser = argparse.ArgumentParser(prog="python -m trainer.shortcut", description=__doc__.split("\n\n")[0])
    parser.add_argument("--detector", type=Path, required=True, help="a classifier detector directory")
    parser.add_argument(
        "--outliers", type=Path, help="outlier dataset with a reference/ (default: the provenance's)"
    )
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        detector = ClassifierDetector.load(args.detector, device=args.device)
        result = diagnose(detector, outliers_of(detector, args.outliers), args.batch_size, args.device)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
