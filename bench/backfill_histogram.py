"""Add ``calibration.histogram`` to detector artifacts exported before it existed (the published ones).

    .venv/bin/python -m bench.backfill_histogram oodforge/assets/detectors/mnist-open/ce \
        oodforge/assets/detectors/mnist-open/oal

For each artifact: reload its benchmark's ID validation split (``metrics.benchmark``, split seed
``provenance.training.data_seed``), score it with the detector, re-run the calibration and check that it
gives back the stored threshold and sample count (so these are the scores the threshold was chosen on);
only then write the histogram into ``detector.json``. The weights and their checksum are untouched.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from oodforge.artifacts import SPEC_FILE
from oodforge.data.base import DataConfig
from oodforge.data.benchmarks import load_benchmark
from oodforge.detector import Detector, calibrate


def backfill(path: Path) -> str:
    detector = Detector.load(path)
    spec = detector.spec
    if spec.calibration.histogram is not None:
        return f"{path}: already has a histogram"
    benchmark = spec.metrics.get("benchmark")
    if not benchmark or spec.calibration.split != "val":
        return f"{path}: skipped (no benchmark recorded or not calibrated on val)"
    seed = int(spec.provenance.training.get("data_seed", 0))
    bench = load_benchmark(DataConfig(benchmark=benchmark, seed=seed, image_size=spec.preprocess.size))
    scores = detector.predict([bench.val[i][0] for i in range(len(bench.val))]).scores
    threshold, calibration = calibrate(scores, spec.calibration.target_id_tpr)
    if calibration.n_samples != spec.calibration.n_samples or not math.isclose(
        threshold, spec.threshold, rel_tol=1e-5, abs_tol=1e-6
    ):
        return (
            f"{path}: NOT written: re-calibration gives {threshold} on {calibration.n_samples} images, the "
            f"artifact says {spec.threshold} on {spec.calibration.n_samples}"
        )
    data = json.loads((path / SPEC_FILE).read_text())
    data["calibration"]["histogram"] = calibration.histogram.model_dump()
    (path / SPEC_FILE).write_text(json.dumps(data, indent=2))  # as Detector.save writes it
    Detector.load(path)  # still loads, checksum included
    return f"{path}: histogram of {calibration.n_samples} {benchmark} val scores written (threshold {threshold:.6g} reproduced)"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("artifacts", nargs="+", type=Path)
    for path in parser.parse_args().artifacts:
        print(backfill(path))


if __name__ == "__main__":
    main()
