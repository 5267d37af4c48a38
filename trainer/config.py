"""Typed configuration of a training run (``configs/train/*.yaml``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from oodforge.backbones import BackboneConfig
from oodforge.config import StrictModel
from oodforge.data import DataConfig
from oodforge.data.transforms import Preprocess

ALL_SCORES = ["msp", "max_logit", "energy", "entropy", "knn", "mahalanobis"]


class OptimConfig(StrictModel):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    scheduler: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0


class LoopConfig(StrictModel):
    epochs: int = Field(15, ge=1)
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(512, ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    checkpoint_every_steps: int = Field(50, ge=1, description="also saved at the end of every epoch")
    keep_checkpoints: int = Field(2, ge=1)
    augment: bool = True
    hflip: bool = False
    num_workers: int = 0
    log_with: list[Literal["csv", "tensorboard"]] = ["csv"]
    log_every_steps: int = 10


class EvalConfig(StrictModel):
    scores: list[str] = ALL_SCORES
    score_params: dict[str, dict[str, Any]] = {"knn": {"k": 50}}
    plots: bool = True


class ExportConfig(StrictModel):
    score: str = "energy"
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
        return self.output_dir / self.name

    @model_validator(mode="after")
    def _check_names(self) -> TrainConfig:
        from oodforge.scores import SCORES
        from trainer.methods import METHODS

        if self.method not in METHODS:
            raise ValueError(f"method: unknown method {self.method!r}; choose one of {METHODS.names()}")
        # method_args are validated by the method's own config class, so a typo there is caught too
        _validate_method_args(METHODS.get(self.method).Config, self.method_args)
        for name in [*self.eval.scores, self.export.score]:
            if name not in SCORES:
                raise ValueError(f"unknown score {name!r}; choose from {SCORES.names()}")
        return self


def _validate_method_args(cls: type[StrictModel], args: dict[str, Any]) -> None:
    from pydantic import ValidationError

    try:
        cls.model_validate(args)
    except ValidationError as err:
        parts = []
        for e in err.errors():
            where = "method_args." + ".".join(str(p) for p in e["loc"])
            parts.append(
                f"unknown key '{where}'" if e["type"] == "extra_forbidden" else f"{where}: {e['msg']}"
            )
        raise ValueError("; ".join(parts)) from None
