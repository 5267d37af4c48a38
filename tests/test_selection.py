"""Score selection and the threshold read only validation data (ID val, csID-val, validation OOD) and held-out synthetic outliers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import OODAssets
from PIL import Image

from oodforge.detector import Detector
from oodforge.outliers import OutlierDataset, is_holdout
from oodforge.scores import build_score
from trainer.classifier_eval import Outputs
from trainer.selection import select_score

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.options={embedding_size: 8, hidden_sizes: [8, 16], depths: [1, 1]}",
    "train.batch_size=64",
    "train.eval_batch_size=1024",
    "train.epochs=1",
    "eval.plots=false",
    "eval.scores=[energy, msp]",
    "export.score=auto",
    "export.candidates=[energy, msp, max_logit, knn]",
]


def train(tmp_path: Path, assets: OODAssets, name: str, *extra: str) -> Path:
    from trainer.train import main

    items = [
        f"output_dir={tmp_path}",
        f"name={name}",
        f"method_args.teacher={assets.teacher}",
        f"method_args.outliers={assets.outliers}",
        f"init_from={assets.ce}",
        *TINY,
        *extra,
    ]
    args = ["--config", str(REPO / "configs/train/oal.yaml")]
    for item in items:
        args += ["--set", item]
    assert main(args) == 0
    return tmp_path / name


def noise_folder(root: Path, n: int = 12) -> Path:
    rng = np.random.default_rng(7)
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


@pytest.mark.slow
def test_other_test_ood_sets_change_nothing_that_is_chosen(tmp_path: Path, ood_assets: OODAssets) -> None:
    """Same run twice, once with mnist-open's OOD sets and once with only a folder of other images."""
    first = train(tmp_path, ood_assets, "builtin")
    folder = noise_folder(tmp_path / "other-ood")
    second = train(
        tmp_path, ood_assets, "replaced", "data.builtin_ood=false", f"data.ood={{other: {{path: {folder}}}}}"
    )
    a, b = Detector.load(first / "detector"), Detector.load(second / "detector")
    assert a.spec.version == b.spec.version  # identical weights (and score statistics)
    assert a.spec.score == b.spec.score and a.threshold == b.threshold
    sel_a = a.spec.provenance.training["score_selection"]
    sel_b = b.spec.provenance.training["score_selection"]
    assert sel_a == sel_b and sel_a["chosen"] == a.spec.score.name and sel_a["id_split"] == "val"
    # mnist-open has validation OOD (sources distinct from every test set): selection contrasts ID val and
    # csID-val with them; no test set is among the sets it read
    assert sel_a["negatives"] == ["val-letters", "val-patterns", "val-pen-glyphs", "val-scenes"]
    read = {k.split("/", 1)[-1] for k in sel_a["positives"]} | set(sel_a["negatives"])
    assert not read & set(json.loads((first / "report.json").read_text())["scores"]["energy"]["ood"])
    reports = [json.loads((run / "report.json").read_text()) for run in (first, second)]
    assert set(reports[0]["scores"]["energy"]["ood"]) == {
        "digits-6-9",
        "faces",
        "textures",
        "photos",
        "noise",
    }
    assert set(reports[1]["scores"]["energy"]["ood"]) == {"other"}  # the test sets did differ


def test_the_selected_score_is_best_on_the_held_out_outliers() -> None:
    """Hand-made outputs: max_logit separates ID val from the outliers, msp does not."""
    val = Outputs(torch.tensor([[5.0, 0.0], [6.0, 1.0], [4.0, 0.0]]), torch.zeros(3, 2), torch.zeros(3))
    # outlier logits: same softmax as ID (msp ties ID) but lower overall level (max_logit is lower)
    out = Outputs(torch.tensor([[1.0, -4.0], [1.0, -4.0]]), torch.zeros(2, 2), torch.zeros(2))
    scores = {name: build_score(name) for name in ("msp", "max_logit")}
    name, table = select_score(scores, val, out)
    assert name == "max_logit" and table["max_logit"]["fpr95"] == 0.0 and table["max_logit"]["auroc"] == 1.0
    assert table["msp"]["fpr95"] == 1.0


def test_the_held_out_part_is_a_fixed_function_of_the_id(ood_assets: OODAssets) -> None:
    ds = OutlierDataset.load(ood_assets.outliers)
    held, trained = ds.images("holdout"), ds.images("train")
    assert len(held) + len(trained) == len(ds.images()) and 0 < len(held) < len(trained)
    assert not set(held.paths) & set(trained.paths)
    ids = [f"px-{i:07d}" for i in range(10_000)]
    share = np.mean([is_holdout(i) for i in ids])
    assert 0.18 < share < 0.22 and [is_holdout(i) for i in ids[:50]] == [is_holdout(i) for i in ids[:50]]
