"""The OOD training methods (oe, energy_margin, vos, isomax_plus, oal) through the real training script."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from conftest import CLASSES, TEACHER_WIDTH, OODAssets
from torch.utils.data import TensorDataset

from oodforge.config import ConfigError, load_config
from oodforge.data import ArrayImageSet, Benchmark
from oodforge.detector import Detector
from trainer.config import TrainConfig
from trainer.losses.club import club_estimate
from trainer.methods import Method, Plan, build_method
from trainer.outlier_stream import OutlierStream

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.options={embedding_size: 8, hidden_sizes: [8, 16], depths: [1, 1]}",
    "train.batch_size=64",
    "train.eval_batch_size=1024",
    "train.epochs=1",
    "eval.plots=false",
    "eval.scores=[energy, msp, knn]",
]
pytestmark = pytest.mark.slow


def prepared(config: str, method: str, **args: object) -> tuple[Method, Plan]:
    """``method`` with ``args`` set up on a tiny model for the 6 classes (``configs/train/<config>``)."""
    cfg = load_config(
        REPO / "configs/train" / config, TrainConfig, [f"model.options={TINY[0].split('=', 1)[1]}"]
    )
    empty = ArrayImageSet("empty", np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0))
    bench = Benchmark("tiny", CLASSES, empty, empty, empty)
    built = build_method(method, args)
    return built, built.setup(cfg, bench)


def oal_args(assets: OODAssets, outliers: Path | None = None) -> list[str]:
    return [
        f"method_args.teacher={assets.teacher}",
        f"method_args.outliers={outliers or assets.outliers}",
        f"init_from={assets.ce}",
    ]


def run(tmp_path: Path, config: str, *extra: str) -> int:
    from trainer.train_oal import main

    args = ["--config", str(REPO / "configs/train" / config)]
    for item in [f"output_dir={tmp_path / 'runs'}", *TINY, *extra]:
        args += ["--set", item]
    return main(args)


def logged(run_dir: Path, column: str) -> list[float]:
    """The values of one logged metric, in step order (metrics.csv is long: step, name, value)."""
    with (run_dir / "logs" / "metrics.csv").open() as f:
        return [float(row["value"]) for row in csv.DictReader(f) if row["name"] == column]


def test_oal_one_epoch_run_logs_every_term_and_exports(tmp_path: Path, ood_assets: OODAssets) -> None:
    assert run(tmp_path, "oal.yaml", *oal_args(ood_assets), "train.log_every_steps=1") == 0
    run_dir = tmp_path / "runs" / "oal"
    for term in ("ce", "logit_kd", "feature_kd", "club_knn", "club_sd"):
        values = logged(run_dir, f"train/{term}")
        # 2100 ID train images + the fixture reference's 24 labelled train images (train.id_reference) at batch 64
        assert len(values) == (2100 + 24) // 64 and all(math.isfinite(v) for v in values), term
    total = logged(run_dir, "train/loss")
    assert sum(total[-5:]) < sum(total[:5])  # the student learns: distillation from the teacher dominates
    detector = Detector.load(run_dir / "detector")
    report = json.loads((run_dir / "report.json").read_text())
    chosen = report["score_selection"]["chosen"]
    assert detector.spec.score.name == chosen and detector.spec.provenance.training["method"] == "oal"
    # oal.yaml has no pixel term (the head never saw the synth images) and mnist-open has validation OOD:
    # every candidate competes on ID val + csID-val vs the validation OOD sets
    assert report["score_selection"]["negatives"] == ["val-letters", "val-patterns", "val-pen-glyphs", "val-scenes"]
    assert chosen in report["score_selection"]["candidates"]
    assert {"energy", "msp", "knn"} <= set(report["scores"])


@pytest.mark.parametrize("mode", ["joint", "alternate"])
def test_oal_training_lowers_the_club_term(ood_assets: OODAssets, mode: str) -> None:
    """With outliers that carry information about the features, OAL's CLUB term is driven down.

    (In the training loop the outlier rows are paired with the ID rows at random, as in the public
    code, so there the estimate is zero in expectation and only fluctuates; here the pairing is fixed
    and the student features depend on x, so there is mutual information to remove.)
    """
    torch.manual_seed(0)
    method, plan = prepared(
        "oal.yaml",
        "oal",
        teacher=ood_assets.teacher,
        outliers=ood_assets.outliers,
        club_q_training=mode,
        delta=0,
    )
    x = torch.randn(256, TEACHER_WIDTH)
    assert len(plan.param_groups) == 2  # DT, CLUB
    student = torch.nn.Linear(TEACHER_WIDTH, 16)  # features h = W x + noise: they depend on the outliers
    noise = 0.1 * torch.randn(256, 16)
    aux = [{**g, "lr": 0.05} for g in plan.param_groups]
    groups = [{"params": list(student.parameters()), "lr": 0.05}, *aux]
    optimizer = torch.optim.SGD([g for g in groups if g["params"]], lr=0.05)

    def estimate() -> float:
        return method._club("knn", x, student(x) + noise)[0].item()

    if mode == "alternate":  # fit q first, as the CLUB paper does before minimising the bound
        q_opt = torch.optim.Adam(method.clubs["knn"].parameters(), lr=1e-2)
        for _ in range(300):
            q_opt.zero_grad()
            method.clubs["knn"].learning_loss(x, (student(x) + noise).detach()).backward()
            q_opt.step()
    before = estimate()
    for _ in range(200 if mode == "alternate" else 40):
        optimizer.zero_grad()
        _, term = method._club("knn", x, student(x) + noise)
        term.backward()
        optimizer.step()
    after = estimate()
    assert math.isfinite(after)
    if mode == "alternate":  # a fitted q reveals the dependence; minimising the bound removes most of it
        assert before > 0.5 and after < 0.5 * before, (before, after)
    else:  # q and student minimise together: the estimate falls (and is not a bound any more)
        assert after < before - 0.5, (before, after)


def test_oal_without_sd_pool_fails_before_training(
    tmp_path: Path, ood_assets: OODAssets, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(tmp_path, "oal.yaml", *oal_args(ood_assets, ood_assets.no_sd)) == 2
    err = capsys.readouterr().err
    assert "no kept 'sd' outliers" in err and "delta: 0" in err
    assert not (tmp_path / "runs").exists()


def test_oal_with_delta_zero_needs_no_sd_pool(tmp_path: Path, ood_assets: OODAssets) -> None:
    assert run(tmp_path, "oal.yaml", *oal_args(ood_assets, ood_assets.no_sd), "method_args.delta=0") == 0
    run_dir = tmp_path / "runs" / "oal"
    assert logged(run_dir, "train/club_knn") and not logged(run_dir, "train/club_sd")


def test_oal_outliers_of_the_wrong_width_fail_before_training(
    tmp_path: Path, ood_assets: OODAssets, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(tmp_path, "oal.yaml", *oal_args(ood_assets, ood_assets.wide_knn)) == 2
    err = capsys.readouterr().err
    assert f"width {TEACHER_WIDTH + 8}" in err and f"but {TEACHER_WIDTH} is expected" in err
    assert not (tmp_path / "runs").exists()


def test_oal_missing_inputs_say_what_to_run(
    tmp_path: Path, ood_assets: OODAssets, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere"
    assert run(tmp_path, "oal.yaml", *oal_args(ood_assets), f"method_args.teacher={missing}") == 2
    assert "configs/train/teacher.yaml" in capsys.readouterr().err
    assert run(tmp_path, "oal.yaml", *oal_args(ood_assets, missing)) == 2
    assert "synth generate" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("config", "extra", "term", "score"),
    [
        ("oe.yaml", [], "oe", "msp"),
        ("energy_margin.yaml", [], "energy_margin", "energy"),
        (
            "vos.yaml",
            ["method_args.capacity=20", "method_args.n_samples=500", "method_args.start_epoch=0"],
            "vos",
            "energy",
        ),
        ("isomax_plus.yaml", [], "isomax", "max_logit"),
        (
            "oal.yaml",
            [
                "method_args.pixel_term=energy_head",
                "method_args.club_q_training=alternate",
                "export.score=energy",
                "train.id_reference=[]",
            ],
            "energy_head",
            "energy",
        ),
    ],  # fmt: skip
)
def test_method_trains_logs_its_term_and_exports(
    tmp_path: Path, ood_assets: OODAssets, config: str, extra: list[str], term: str, score: str
) -> None:
    sources = [f"method_args.outliers={ood_assets.outliers}", f"init_from={ood_assets.ce}"]
    if config == "oal.yaml":
        sources = oal_args(ood_assets)
    elif config in ("vos.yaml", "isomax_plus.yaml"):
        sources = []  # trained from scratch on ID only
    assert run(tmp_path, config, *sources, *extra, "train.log_every_steps=1") == 0
    name = config.removesuffix(".yaml")
    values = logged(tmp_path / "runs" / name, f"train/{term}")
    assert len(values) == 32 and all(v == v for v in values)  # logged every step, never NaN
    if term == "vos":  # 20 per class fill after a few steps; from then on the uncertainty loss is on
        assert values[0] == 0.0 and values[-1] > 0.0
    detector = Detector.load(tmp_path / "runs" / name / "detector")
    assert detector.spec.score.name == score
    if term == "isomax":
        assert detector.head.head.name == "isomax_plus"


def test_pixel_methods_use_one_forward_pass(ood_assets: OODAssets) -> None:
    """ID and outlier rows go through the model together, so BatchNorm sees one batch per step."""
    method, plan = prepared("oe.yaml", "oe", outliers=ood_assets.outliers)
    model = plan.model
    assert set(plan.outliers) == {"pixel"}
    calls: list[int] = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    images, outliers = torch.randn(5, 3, 32, 32), torch.randn(7, 3, 32, 32)
    loss, parts = method.loss(model, (images, torch.arange(5) % 6), {"pixel": outliers})
    assert calls == [12] and set(parts) == {"ce", "oe"}
    assert loss.item() == pytest.approx(parts["ce"] + 0.5 * parts["oe"], rel=1e-5)


def test_oal_modules_and_learning_rates(ood_assets: OODAssets) -> None:
    method, plan = prepared(
        "oal.yaml", "oal", teacher=ood_assets.teacher, outliers=ood_assets.outliers, dt_lr=0.3
    )
    model = plan.model
    assert method.dt.teacher_dim == TEACHER_WIDTH and method.dt.student_dim == model.feature_dim
    assert method.clubs["knn"].x_dim == TEACHER_WIDTH and method.clubs["sd"].x_dim == 8  # pooled w
    assert not any("teacher" in name for name in method.state_dict())  # frozen, not checkpointed
    dt, clubs = plan.param_groups
    assert dt["lr"] == 0.3 and len(dt["params"]) == len(list(method.dt.parameters()))
    assert clubs["lr"] == 1e-4 and len(clubs["params"]) == len(list(method.clubs.parameters()))
    assert method.clubs["knn"].network == "mlp" and method.clubs["sd"].network == "deep"
    assert set(plan.outliers) == {"knn", "sd"} and plan.outlier_batch_size == 128

    bare, bare_plan = prepared(
        "oal.yaml", "oal", teacher=ood_assets.teacher, outliers=ood_assets.outliers, beta=0, gamma=0, delta=0
    )
    assert not hasattr(bare, "dt") and len(bare.clubs) == 0 and bare_plan.outliers == {}


def test_alternate_club_keeps_q_out_of_the_estimate(ood_assets: OODAssets) -> None:
    """``alternate``: q gets only its likelihood gradient; the student gets only the estimate's."""
    method, _ = prepared(
        "oal.yaml",
        "oal",
        teacher=ood_assets.teacher,
        outliers=ood_assets.outliers,
        club_q_training="alternate",
    )
    club = method.clubs["knn"]
    x, h = torch.randn(10, TEACHER_WIDTH), torch.randn(10, 16, requires_grad=True)
    estimate, term = method._club("knn", x, h)
    term.backward()
    q_grads = [p.grad.clone() for p in club.parameters()]
    h_grad = h.grad.clone()

    club.zero_grad()
    h2 = h.detach().clone().requires_grad_(True)
    club.learning_loss(x, h2.detach()).backward()
    for got, want in zip(q_grads, [p.grad for p in club.parameters()], strict=True):
        torch.testing.assert_close(got, want)
    with torch.no_grad():
        mu, logvar = club.mu_logvar(x)
    (method.args.gamma * club_estimate(mu, logvar, h2)).backward()
    torch.testing.assert_close(h_grad, h2.grad)
    assert estimate.item() == pytest.approx(club(x, h).item())


def test_energy_margins_must_be_ordered(tmp_path: Path, ood_assets: OODAssets, capsys) -> None:
    extra = [f"method_args.outliers={ood_assets.outliers}", f"init_from={ood_assets.ce}"]
    assert run(tmp_path, "energy_margin.yaml", *extra, "method_args.m_in=-3", "method_args.m_out=-5") == 2
    assert "m_in < m_out" in capsys.readouterr().err


def test_outlier_stream_cycles_and_resumes_at_a_step() -> None:
    # the training script's accelerator: seedable samplers, so batch s is a function of (seed, s)
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    data = TensorDataset(torch.arange(10).float())

    def draws(stream: OutlierStream, n: int) -> list[list[float]]:
        return [stream.next().tolist() for _ in range(n)]

    set_seed(0)
    first = draws(OutlierStream(accelerator, data, 4, "x"), 7)  # 2 batches per epoch: 3.5 epochs
    assert all(len(b) == 4 for b in first)
    for epoch in range(3):
        rows = first[2 * epoch] + first[2 * epoch + 1]
        assert len(set(rows)) == 8  # no repeats within an epoch
    assert first[0] != first[2]  # each epoch is reshuffled
    set_seed(0)  # a resumed process: same run seed, stream positioned at global step 3
    resumed = OutlierStream(accelerator, data, 4, "x")
    resumed.start(3)
    assert draws(resumed, 4) == first[3:]
    small = OutlierStream(accelerator, data, 25, "tiny")  # 10 rows, batch 25: the set is repeated
    batch = small.next()
    assert len(batch) == 25 and set(batch.tolist()) == set(range(10))
    with pytest.raises(ValueError, match="is empty"):
        OutlierStream(accelerator, TensorDataset(torch.zeros(0)), 4, "none")


def test_unknown_method_args_are_named() -> None:
    cfg = load_config(REPO / "configs/train/oal.yaml", TrainConfig, ["method_args.gama=0.1"])
    with pytest.raises(ConfigError, match="method_args.gama"):
        build_method(cfg.method, cfg.method_args)
    with pytest.raises(ConfigError, match="unknown method 'oall'"):
        build_method("oall", {})
