"""Typed configuration of training runs: ``TrainConfig`` (classifiers) and ``DenseTrainConfig`` (segmenters).

``TrainConfig`` reads ``configs/train/*.yaml``; ``DenseTrainConfig`` reads ``configs/train/dense*.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from oodforge.backbones import BackboneConfig
from oodforge.config import StrictModel
from oodforge.data import DataConfig
from oodforge.data.augment import CovariateAugment
from oodforge.data.mnist_scenes import DENSE_BENCHMARKS, SceneConfig
from oodforge.data.transforms import Preprocess
from oodforge.dense import PIXEL_SCORES, PoolingSpec
from oodforge.scores import ALL, SCORES, check_score_params, default_scores
from oodforge.segmenters import SegmenterConfig
from trainer.negatives import NegativesConfig


class OptimConfig(StrictModel):
    """The optimiser (SGD or AdamW) and its learning-rate schedule (warm-up, then cosine or constant)."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    scheduler: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0


class LoopConfig(StrictModel):
    """The training loop: epochs, batch sizes, precision, checkpointing, augmentation and logging."""

    epochs: int = Field(15, ge=1)
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(512, ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    checkpoint_every_steps: int = Field(50, ge=1, description="also saved at the end of every epoch")
    keep_checkpoints: int = Field(2, ge=1)
    augment: bool = True
    hflip: bool = False
    covariate: CovariateAugment = Field(
        default_factory=CovariateAugment,
        description="class-preserving covariate shifts (affine, blur, resampling) with probability p; p 0 is off",
    )
    id_reference: list[Literal["generated", "roundtrip"]] = Field(
        [],
        description="add the generator reference's labelled train images (generated ID-class images, VAE round "
        "trips of ID train) to the ID stream: decoded images on both sides of the boundary",
    )
    reference: Path | None = Field(
        None,
        description="the outlier dataset (or its reference/ dir) for id_reference and the csID suite; "
        "default: method_args.outliers",
    )
    num_workers: int = 0
    log_with: list[Literal["csv", "tensorboard"]] = ["csv"]
    log_every_steps: int = 10


class EvalConfig(StrictModel):
    """Which scores the end-of-run evaluation computes, with what hyper-parameters.

    Attributes:
        scores: Registered score names, or ``all`` (every score the model can serve: those needing a
            linear final layer are skipped for cosine / IsoMax+ heads, odin runs in its own gradient
            pass). Default: the curated list of :func:`oodforge.scores.default_scores`.
        score_params: ``{score: {param: value}}``, e.g. ``{react: {percentile: 90}, vim: {dim: 64}}``.
        plots: Write histogram and ROC plots.
    """

    scores: list[str] = Field(default_factory=default_scores)
    score_params: dict[str, dict[str, Any]] = {"knn": {"k": 50}}
    plots: bool = True

    @field_validator("scores")
    @classmethod
    def _registered(cls, scores: list[str]) -> list[str]:
        for name in scores:
            if name != ALL and name not in SCORES:
                raise ValueError(f"unknown score {name!r}; choose 'all' or from {SCORES.names()}")
        return scores

    @field_validator("score_params")
    @classmethod
    def _known_params(cls, score_params: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, params in score_params.items():
            if name not in SCORES:
                raise ValueError(f"score_params: unknown score {name!r}; choose from {SCORES.names()}")
            try:
                check_score_params(name, params)
            except TypeError as err:
                raise ValueError(f"score_params: {err}") from None
        return score_params


AUTO_SCORE = "auto"


class ExportConfig(StrictModel):
    """What the exported detector scores with and how its threshold is calibrated.

    Attributes:
        score: A registered score, or ``auto``: the one of ``candidates`` with the lowest FPR@95 (ties:
            the higher AUROC) on the held-out synthetic outliers against the ID validation split — no test
            OOD set is read (``trainer.selection``).
        candidates: The scores ``auto`` chooses from.
        selection_outliers: The synth dataset whose held-out pixel outliers ``auto`` uses (default: the
            method's ``method_args.outliers``).
        target_id_tpr: Share of ID validation images the threshold accepts.
    """

    score: str = "energy"
    candidates: list[str] = ["energy", "msp", "max_logit", "knn", "mahalanobis"]
    selection_outliers: Path | None = None
    target_id_tpr: float = Field(0.95, gt=0, lt=1)


class TrainConfig(StrictModel):
    """One training run: ``runs/<name>/`` holds its checkpoints, report and exported detector."""

    name: str = "ce"
    method: str = "ce"
    method_args: dict[str, Any] = {}
    seed: int = 0
    output_dir: Path = Path("runs")
    data: DataConfig = DataConfig()
    model: BackboneConfig = BackboneConfig()
    init_from: Path | None = Field(
        None,
        description="a detector directory whose weights start the model (fine-tuning), e.g. runs/ce/detector",
    )
    preprocess: Preprocess = Preprocess()
    optim: OptimConfig = OptimConfig()
    train: LoopConfig = LoopConfig()
    eval: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()

    @property
    def run_dir(self) -> Path:
        """The run's directory, ``output_dir / name``."""
        return self.output_dir / self.name

    @model_validator(mode="after")
    def _check_scores(self) -> TrainConfig:
        exported = [] if self.export.score == AUTO_SCORE else [self.export.score]
        for name in [*exported, *self.export.candidates]:  # eval.scores: EvalConfig checks them
            if name not in SCORES:
                raise ValueError(f"unknown score {name!r}; choose from {SCORES.names()}")
        return self


class DenseExportConfig(StrictModel):
    """What the exported detector scores with, and how its thresholds are calibrated (on val scenes)."""

    pixel_score: str = "js"
    pooling: PoolingSpec = PoolingSpec()
    target_id_tpr: float = Field(0.95, gt=0, lt=1)


class DenseEvalConfig(StrictModel):
    """Which pixel scores the dense evaluation reports, and whether it draws map figures."""

    scores: list[str] = ["js", "msp", "energy"]
    plots: bool = True


class DenseOptimConfig(OptimConfig):
    """The optimiser, with the dense defaults (AdamW 2e-3, cosine) also under partial overrides."""

    name: Literal["sgd", "adamw"] = "adamw"
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = 1e-4


class DenseLoopConfig(LoopConfig):
    """The training loop, with the dense defaults (12 epochs of batch 16 on 2,000 scenes = 1,500 steps).

    Shorter schedules leave some seeds on the plateau where the segmenter separates digits from the
    background but not one digit from another (one of 3 seeds at 8 epochs of batch 32).
    """

    epochs: int = Field(12, ge=1)
    batch_size: int = Field(16, ge=1)
    eval_batch_size: int = Field(128, ge=1)
    checkpoint_every_steps: int = Field(250, ge=1, description="also saved at the end of every epoch")


class ScenePreprocess(Preprocess):
    """Pre-processing with the scenes' side (64) as default, also under partial overrides."""

    size: int = Field(64, ge=1)


class DenseTrainConfig(StrictModel):
    """One dense training run (``configs/train/dense*.yaml``)."""

    name: str = "dense"
    seed: int = 0
    output_dir: Path = Path("runs")
    data: SceneConfig = SceneConfig()
    model: SegmenterConfig = SegmenterConfig()
    preprocess: ScenePreprocess = ScenePreprocess()
    negatives: NegativesConfig = NegativesConfig()
    optim: DenseOptimConfig = DenseOptimConfig()
    train: DenseLoopConfig = DenseLoopConfig()
    eval: DenseEvalConfig = DenseEvalConfig()
    export: DenseExportConfig = DenseExportConfig()

    @property
    def run_dir(self) -> Path:
        """The run's directory, ``output_dir / name``."""
        return self.output_dir / self.name

    @model_validator(mode="after")
    def _check_names(self) -> DenseTrainConfig:
        if self.data.benchmark not in DENSE_BENCHMARKS:
            raise ValueError(
                f"data.benchmark: unknown dense benchmark {self.data.benchmark!r}; choose one of {DENSE_BENCHMARKS.names()}"
            )
        for name in [*self.eval.scores, self.export.pixel_score]:
            if name not in PIXEL_SCORES:
                raise ValueError(f"unknown pixel score {name!r}; choose from {PIXEL_SCORES.names()}")
        return self
