"""Train the CE baseline on mnist-open exactly as `make demo` does and record its table in BENCHMARKS.md.

.venv/bin/python bench/ce_baseline.py            # trains into runs/bench-ce (about a minute on 2 cores)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, today, write_section  # noqa: E402
from trainer.report import markdown_tables  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COMMAND = (
    "accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no "
    "trainer/train_oal.py --config configs/train/ce.yaml --set name=bench-ce --overwrite"
)


def main() -> None:
    accelerate = Path(sys.executable).with_name("accelerate")
    started = time.perf_counter()
    subprocess.run([str(accelerate), *COMMAND.split()[1:]], cwd=REPO, check=True)
    wall = time.perf_counter() - started
    report = json.loads((REPO / "runs/bench-ce/report.json").read_text())
    body = f"""## CE baseline on `mnist-open` (all scores)

Measured {today()} on {machine()}.
Command: `{COMMAND}` (the `make demo` run; wall time {wall:.0f} s including evaluation, of which
training {report["train_seconds"]:.0f} s).
Backbone `resnet-tiny` (transformers ResNet, 0.70 M parameters), 15 epochs, data seed 0, seed 0.
ID test accuracy (digits 0-5, {report["n_id"]} images): **{100 * report["id_accuracy"]:.2f}%**.
{report["fpr95_definition"]}

{markdown_tables(report)}"""
    write_section("ce-baseline", body)
    print(f"wrote the ce-baseline section of {REPO / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
