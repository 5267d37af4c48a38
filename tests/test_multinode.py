"""Two machines on one host (``accelerate launch --num_machines 2``, gloo): generation and training.

Each "machine" is its own launcher, as on two hosts; the launch helpers are ``bench.multinode``'s
(whose full run, with kills and resumes and the 1-vs-2-rank times, is in BENCHMARKS.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.multinode import launcher, same_dataset, start, start_machines, synth_config, tiny_assets, wait_all

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_assets(tmp_path_factory.mktemp("multinode"))


def test_two_machines_generate_what_one_machine_with_two_processes_generates(assets, tmp_path):
    cfg = synth_config(assets, pixel=6, path=tmp_path / "synth.yaml", steps=2)
    tail = ["-m", "synth", "generate", "--config", str(cfg), "--out"]
    machines = start_machines([*tail, str(tmp_path / "machines")], 2, tmp_path / "machines.log")
    wait_all(machines, "two machines", timeout=400)
    wait_all(
        [start([*launcher(1, 2), *tail, str(tmp_path / "one")], tmp_path / "one.log")], "one", timeout=400
    )
    card = json.loads((tmp_path / "machines" / "card.json").read_text())
    assert card["processes"] == 2 and card["counts"]["pixel"]["kept"] == 6
    shards = {r["id"]: r for r in map(json.loads, (tmp_path / "machines/parts/metadata-1.jsonl").open())}
    assert any(r["pool"] == "pixel" for r in shards.values())  # the second machine decoded its share
    assert same_dataset(tmp_path / "machines", tmp_path / "one")  # records, latents and PNG bytes


def test_two_machines_train_one_model_on_halves_of_the_data(assets, tmp_path):
    """2100 ID train images at batch 64 are 32 steps on one process and 16 per rank on two ranks."""
    items = [f"output_dir={tmp_path}", "name=ce", "model.options={embedding_size: 8, hidden_sizes: [8, 16], "
             "depths: [1, 1]}", "train.batch_size=64", "train.eval_batch_size=1024", "train.epochs=1",
             "eval.plots=false", "eval.scores=[energy]", "export.score=energy"]  # fmt: skip
    args = ["trainer/train_oal.py", "--config", "configs/train/ce.yaml"]
    for item in items:
        args += ["--set", item]
    wait_all(start_machines(args, 2, tmp_path / "train.log"), "training", timeout=400)
    assert [p.name for p in sorted((tmp_path / "ce" / "checkpoints").iterdir())] == ["step_0000016"]
    report = json.loads((tmp_path / "ce" / "report.json").read_text())
    assert report["method"] == "ce" and 0 < report["id_accuracy"] <= 1
