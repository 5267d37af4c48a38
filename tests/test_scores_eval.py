"""``--scores all`` and ``--score-params`` through ``python -m trainer.evaluate``, both metric conventions in
the output, the compare table on old reports, and a ViM detector serving over /score what evaluation computed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import OODAssets
from pydantic import ValidationError
from serving import detectors_dir, png_bytes, running_server

from oodforge.data import DataConfig, load_benchmark
from oodforge.detector import ClassifierDetector, Detector
from oodforge.metrics import OPENOOD_LABEL, OURS_LABEL, auroc
from oodforge.scores import SCORES, default_scores
from trainer.classifier_eval import collect, fit_scores
from trainer.compare import comparison_markdown
from trainer.config import EvalConfig, TrainConfig
from trainer.evaluate import main

LAYER_SCORES = {n for n in SCORES if SCORES.get(n).needs_layer}
METRICS = {"auroc", "fpr95", "aupr_in", "aupr_out"}
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:she. no correctly classified")]


@pytest.fixture(scope="module")
def all_scores(ood_assets: OODAssets, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """``--scores all`` with parameters on the tiny linear-head detector: (result JSON, stdout)."""
    out = tmp_path_factory.mktemp("eval-all") / "eval.json"
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["--detector", str(ood_assets.ce), "--out", str(out), "--scores", "all",
                     "--score-params", "react.percentile=80,vim.dim=4,knn.k=7,gen.gamma=0.5"])  # fmt: skip
    assert code == 0
    return json.loads(out.read_text()), buffer.getvalue()


def test_all_scores_in_one_pass_plus_odin(all_scores: tuple[dict, str]) -> None:
    result, stdout = all_scores
    assert set(result["scores"]) == set(SCORES) and result["skipped"] == {}
    assert result["score"] == "energy" and result["gradient_pass"] == ["odin"]
    assert "odin ran in its own gradient pass" in stdout
    assert result["score_params"]["react"] == {"percentile": 80.0}
    assert result["score_params"]["vim"] == {"dim": 4, "alpha": None}
    assert result["score_params"]["knn"] == {"k": 7} and result["score_params"]["gen"]["gamma"] == 0.5
    for name, per in result["scores"].items():
        for block in (per, per["openood"]):
            assert set(block["near"]) == METRICS and set(block["far"]) == METRICS, name
            assert set(block["ood"]) == set(result["n_ood"]), name
        for ood, metrics in per["ood"].items():
            assert metrics["auroc"] == pytest.approx(per["openood"]["ood"][ood]["auroc"], abs=1e-12)


def test_the_printed_table_shows_both_conventions(all_scores: tuple[dict, str]) -> None:
    _, stdout = all_scores
    assert OURS_LABEL in stdout and OPENOOD_LABEL in stdout
    rows = [line for line in stdout.splitlines() if line.startswith("| odin |")]
    assert len(rows) == 2 and all("| gradient |" in row for row in rows)
    for name in SCORES:
        assert sum(line.startswith(f"| {name} |") for line in stdout.splitlines()) == 2, name


def test_all_skips_what_a_cosine_head_cannot_serve(ood_assets: OODAssets, tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval.json"
    assert main(["--detector", str(ood_assets.teacher), "--out", str(out), "--scores", "all"]) == 0
    result = json.loads(out.read_text())
    assert set(result["skipped"]) == LAYER_SCORES
    assert set(result["scores"]) == set(SCORES) - LAYER_SCORES
    printed = capsys.readouterr().out
    assert (
        "skipped vim: score 'vim' needs a linear final layer (W h + b), but this classifier has a cosine"
        in printed
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--scores", "all", "--score-params", "vim.dimm=3"],
            "no parameter(s) 'dimm'; its parameters are: dim, alpha",
        ),
        (["--scores", "all", "--score-params", "nope.k=3"], "unknown score 'nope'; choose one of: ash_b"),
        (["--scores", "energy", "--score-params", "vim.dim=4"], "sets 'vim', which is not evaluated"),
        (["--scores", "all", "--score-params", "vim"], "must look like score.param=value"),
        (["--scores", "energy,nope"], "unknown score 'nope'"),
    ],
)
def test_bad_scores_and_params_exit_2_with_the_valid_ones(
    args: list[str], message: str, ood_assets: OODAssets, tmp_path: Path, capsys
) -> None:
    assert main(["--detector", str(ood_assets.ce), "--out", str(tmp_path / "x.json"), *args]) == 2
    assert message in capsys.readouterr().err


def test_a_cosine_head_named_explicitly_gets_the_error(ood_assets: OODAssets, tmp_path: Path, capsys) -> None:
    assert (
        main(["--detector", str(ood_assets.teacher), "--out", str(tmp_path / "x.json"), "--scores", "react"])
        == 2
    )
    assert "has a cosine head (model.head.name=cosine)" in capsys.readouterr().err


def test_compare_shows_both_conventions_and_dashes_for_old_reports(all_scores: tuple[dict, str]) -> None:
    new, _ = all_scores
    old = json.loads(json.dumps(new))
    old.pop("openood_definition")
    for per in old["scores"].values():
        per.pop("openood")
    text = comparison_markdown({"new": new, "old": old}, ["energy", "vim"])
    ours, openood = text.split(f"## {OPENOOD_LABEL}")
    assert f"## {OURS_LABEL}" in ours and "–" not in ours
    near = [line for line in openood.splitlines() if line.startswith("| **near mean**")][0]
    cells = [c.strip() for c in near.split("|")[3:-1]]
    assert cells[4:] == ["–"] * 4 and all(c != "–" for c in cells[:4])  # new: numbers, old: dashes
    assert f"{100 * new['scores']['vim']['openood']['near']['fpr95']:.2f}" in near


def test_eval_config_accepts_all_and_checks_params() -> None:
    assert EvalConfig().scores == default_scores()
    assert EvalConfig(scores=["all"]).scores == ["all"]
    assert TrainConfig.model_validate({"eval": {"scores": ["all", "vim"]}}).eval.scores == ["all", "vim"]
    with pytest.raises(ValidationError, match="unknown score 'nope'; choose 'all' or from"):
        EvalConfig(scores=["nope"])
    with pytest.raises(ValidationError, match="no parameter.*'dimm'; its parameters are: dim, alpha"):
        EvalConfig(score_params={"vim": {"dimm": 3}})
    with pytest.raises(ValidationError, match="unknown score 'nope'"):
        EvalConfig(score_params={"nope": {}})


# --------------------------------------------------------------------------- served = evaluated


def test_a_vim_detector_serves_what_evaluate_computes(ood_assets: OODAssets, tmp_path: Path) -> None:
    base = Detector.load(ood_assets.ce)
    bench = load_benchmark(DataConfig())
    train = collect(base.model, bench.train, base.preprocess)
    (vim,) = fit_scores(["vim"], {"vim": {"dim": 8}}, train).values()
    val = collect(base.model, bench.val, base.preprocess)
    detector = ClassifierDetector.create(
        name="vim", model=base.model, score=vim, preprocess=base.preprocess, class_names=base.class_names,
        val_scores=vim(val.logits, val.features).numpy(), training=base.spec.provenance.training,
    )  # fmt: skip
    path = detector.save(tmp_path / "vim")

    out, saved = tmp_path / "eval.json", tmp_path / "scores.npz"
    assert (
        main(["--detector", str(path), "--out", str(out), "--scores", "vim", "--save-scores", str(saved)])
        == 0
    )
    result, values = json.loads(out.read_text()), np.load(saved)
    assert result["score_params"]["vim"] == {"dim": 8, "alpha": None}  # the stored score, not a refit

    n = 32
    sets = {"id": bench.test, "faces": bench.ood["faces"].images}
    root = detectors_dir(tmp_path / "served", {"vim": path})
    env = {"OODFORGE_DETECTORS_DIR": str(root), "OODFORGE_DEFAULT_DETECTOR": "vim"}
    with running_server(env, tmp_path / "server.log") as server, server.client() as client:
        for key, images in sets.items():
            files = [("files", (f"{i}.png", png_bytes(images[i][0]), "image/png")) for i in range(n)]
            body = client.post("/score", files=files).json()
            served = np.array([r["score"] for r in body["results"]])
            np.testing.assert_allclose(served, values[f"vim/{key}"][:n], rtol=1e-5, atol=1e-6)
            assert body["detector"]["name"] == "vim" and body["threshold"]["value"] == detector.threshold
    # the metrics evaluate reports are the ones of those arrays
    expected = auroc(values["vim/id"], values["vim/faces"])
    assert result["scores"]["vim"]["ood"]["faces"]["auroc"] == pytest.approx(expected, abs=1e-12)


def _selection_run(detector: Path, outliers: Path, out: Path) -> dict:
    args = ["--detector", str(detector), "--out", str(out), "--scores", "energy,msp,max_logit,knn,odin",
            "--selection-outliers", str(outliers)]  # fmt: skip
    assert main(args) == 0
    return json.loads(out.read_text())["selection"]


def test_selection_ranks_every_one_pass_score_on_val_vs_held_out_synth(
    ood_assets: OODAssets, tmp_path: Path
) -> None:
    """``--selection-outliers``: the scores ranked as export.score auto ranks them, recomputed here by hand."""
    from oodforge.outliers import OutlierDataset

    sel = _selection_run(ood_assets.ce, ood_assets.outliers, tmp_path / "a.json")
    assert set(sel["candidates"]) == {"energy", "msp", "max_logit", "knn"}  # odin needs a gradient pass
    best = min(sel["candidates"], key=lambda n: (sel["candidates"][n]["fpr95"], -sel["candidates"][n]["auroc"]))
    assert sel["chosen"] == best and not sel["head_sees_synth_images"]
    held = OutlierDataset.load(ood_assets.outliers).images("holdout")
    assert sel["n_outliers"] == len(held)
    detector = Detector.load(ood_assets.ce)
    bench = load_benchmark(DataConfig())
    val = collect(detector.model, bench.val, detector.preprocess)
    out = collect(detector.model, held, detector.preprocess)
    energy = detector.score  # the asset's own score, no statistics
    id_s, ood_s = energy(val.logits, val.features).numpy(), energy(out.logits, out.features).numpy()
    expected = float(np.mean(ood_s >= np.quantile(id_s, 0.05, method="lower")))
    assert sel["candidates"]["energy"]["fpr95"] == pytest.approx(expected, abs=1.5 / len(ood_s))
    assert sel["candidates"]["energy"]["auroc"] == pytest.approx(auroc(id_s, ood_s))


def test_selection_leaves_out_head_scores_when_the_head_saw_the_outliers(
    ood_assets: OODAssets, tmp_path: Path
) -> None:
    import shutil

    copy = tmp_path / "det"
    shutil.copytree(ood_assets.ce, copy)
    spec = json.loads((copy / "detector.json").read_text())
    spec["provenance"]["training"]["head_sees_synth_images"] = True
    (copy / "detector.json").write_text(json.dumps(spec))
    sel = _selection_run(copy, ood_assets.outliers, tmp_path / "b.json")
    assert sel["chosen"] == "knn" and set(sel["candidates"]) == {"knn"}
    assert set(sel["dropped"]) == {"energy", "msp", "max_logit"}
