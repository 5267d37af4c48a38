"""``oal``: outlier-aware learning with knowledge distillation (Gao et al., arXiv 2406.16525), DESIGN.md §5.

The student starts from the CE checkpoint (``init_from``); a frozen text-aligned teacher (the ``teacher``
run's detector) supplies logits f_T and features h_T; the synth dataset supplies outlier vectors:

    L = CE(f_S, y) + α·KL(softmax f_T ‖ softmax f_S) + β·KL(softmax DT(h_T) ‖ softmax h_S)
      + γ·CLUB(v_knn, h_S) + δ·CLUB(pool(z_sd), h_S)  [+ λ·pixel term on the synth images]

α=4, β=8, γ=0.1, δ=0.2. ``DT`` projects teacher features to the student's width; ``pool(z_sd)`` averages
an SD latent over channels and rows. Every term is logged on its own, and a weight of 0 switches it off
(its data is then not needed: ``delta: 0`` runs without an ``sd`` pool).

CLUB's variational network q is trained ``joint``ly with the student by the same loss (as the public OAL
code does) or ``alternate``ly (as the CLUB paper: q maximises its log-likelihood on detached pairs while
the estimate, with q held fixed, trains the student) — both in one backward pass, since the two losses
reach disjoint parameters. DT learns at ``dt_lr`` (0.01) and the CLUB networks at ``club_lr`` (1e-4), as
the public code's optimiser groups; its kNN-pool CLUB is a 2-layer MLP, its SD-pool CLUB a deeper one.

    accelerate launch trainer/train_oal.py --config configs/train/oal.yaml
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn
from torch.utils.data import Dataset

from oodforge.backbones import Classifier
from oodforge.config import ConfigError
from oodforge.data import Benchmark
from oodforge.detector import ArtifactError, ClassifierDetector
from oodforge.outliers import OutlierDataset
from trainer.config import TrainConfig
from trainer.losses.club import CLUB, Q_NETWORKS, club_estimate
from trainer.losses.kd import DTProjector, feature_kd, logit_kd
from trainer.methods.base import METHODS, Method, Plan
from trainer.methods.pixel import (
    PixelTermArgs,
    build_term,
    check_term,
    joint_forward,
    load_outliers,
    pixel_set,
)

TRAIN_TEACHER = "accelerate launch trainer/train_oal.py --config configs/train/teacher.yaml"


class OALArgs(PixelTermArgs):
    """``method_args`` of ``oal``.

    Attributes:
        teacher: the teacher run's detector directory (the frozen text-aligned encoder).
        outliers: the synth dataset directory (``knn`` and ``sd`` pools; its images for ``pixel_term``).
        alpha: logit-KD weight.
        beta: feature-KD weight (through the DT projector).
        gamma: weight of CLUB between the kNN outlier embeddings and the student features.
        delta: weight of CLUB between the pooled SD latents and the student features.
        club_q_training: ``joint`` (q trained by the student loss, as the public code) or ``alternate``
            (q fitted by maximum likelihood, the estimate trains the student only).
        club_hidden: hidden width of the CLUB q networks (public code: 512 // 2 = 256).
        club_knn_network: q network of the kNN-pool CLUB (``trainer.losses.club.Q_NETWORKS``: ``mlp``).
        club_sd_network: q network of the SD-pool CLUB (public code: the deeper ``deep`` stack).
        club_pairing: which outlier row goes with which ID row in CLUB: ``random`` (as the public code,
            which draws outliers with ``randperm``) or ``class`` (an outlier synthesised for the ID row's
            class, drawn from a 4x larger random batch; falls back to a random row if none matches).
        dt_lr: learning rate of the DT projector (public code: 0.01).
        club_lr: learning rate of the CLUB q networks (public code: 1e-4).
        pixel_term: optional term on the synth images: ``oe``, ``energy_margin`` or ``energy_head``.
        pixel_weight: its weight (0.5 for oe, 0.1 for the others when unset).
    """

    teacher: Path = Path("runs/teacher/detector")
    outliers: Path = Path("runs/outliers")
    alpha: float = Field(4.0, ge=0)
    beta: float = Field(8.0, ge=0)
    gamma: float = Field(0.1, ge=0)
    delta: float = Field(0.2, ge=0)
    club_q_training: Literal["joint", "alternate"] = "joint"
    club_hidden: int = Field(256, ge=1)
    club_knn_network: str = "mlp"
    club_sd_network: str = "deep"
    club_pairing: Literal["random", "class"] = "random"
    dt_lr: float = Field(0.01, gt=0)
    club_lr: float = Field(1e-4, gt=0)
    pixel_term: str | None = None
    pixel_weight: float | None = Field(None, ge=0)

    @field_validator("pixel_term")
    @classmethod
    def _registered(cls, name: str | None) -> str | None:
        return check_term(name)

    @field_validator("club_knn_network", "club_sd_network")
    @classmethod
    def _q_network(cls, name: str) -> str:
        if name not in Q_NETWORKS:
            raise ValueError(f"unknown CLUB q network {name!r}; choose one of: {', '.join(Q_NETWORKS)}")
        return name


def pool_sd(latents: torch.Tensor) -> torch.Tensor:
    """``pool(z_sd)``: SD latents [M, C, h, w] averaged over channels and rows -> [M, w]."""
    if latents.ndim != 4:
        raise ValueError(f"sd latents must be [M, C, h, w], got shape {tuple(latents.shape)}")
    return latents.float().mean(dim=(1, 2))


def load_teacher(path: Path) -> ClassifierDetector:
    """The teacher detector, or a :class:`ConfigError` that says how to make it."""
    try:
        return ClassifierDetector.load(path)
    except ArtifactError as err:
        raise ConfigError(f"method_args.teacher: {err}. Train the teacher with `{TRAIN_TEACHER}`") from None


class LatentPool(Dataset):
    """Rows of one latent pool with the class each was synthesised for: ``{"x": row, "cls": class}``."""

    def __init__(self, rows: torch.Tensor, classes: torch.Tensor) -> None:
        """Pair ``rows`` [M, D] with their source classes [M]."""
        self.rows, self.classes = rows, classes

    def __len__(self) -> int:
        """Number of rows."""
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """Row ``i`` and its class."""
        return {"x": self.rows[i], "cls": self.classes[i]}


def source_classes(ds: OutlierDataset, pool: str) -> torch.Tensor:
    """The class each kept row of a latent pool was synthesised for (-1 where the record has none)."""
    return torch.tensor([int(r.get("source_class", -1)) for r in ds.kept(pool)], dtype=torch.long)


def pair_by_class(
    labels: torch.Tensor, rows: torch.Tensor, classes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each ID label, the first unused candidate row of the same class (else the next unused row).

    Args:
        labels: ``[N]`` ID labels of the batch.
        rows: ``[M, D]`` candidate outlier rows, ``M >= N`` (a random batch).
        classes: ``[M]`` their source classes.

    Returns:
        ``(rows [N, D], matched [N] bool)``: row i goes with ID row i; ``matched`` says whether it is of
        the same class.
    """
    if len(rows) < len(labels):
        raise ValueError(f"class pairing needs at least {len(labels)} candidate rows, got {len(rows)}")
    used = torch.zeros(len(rows), dtype=torch.bool, device=rows.device)
    pick = torch.empty(len(labels), dtype=torch.long, device=rows.device)
    matched = torch.zeros(len(labels), dtype=torch.bool, device=rows.device)
    for i, y in enumerate(labels.tolist()):
        same = torch.nonzero((classes == y) & ~used).flatten()
        j = int(same[0]) if len(same) else int(torch.nonzero(~used).flatten()[0])
        pick[i], matched[i], used[j] = j, bool(len(same)), True
    return rows[pick], matched


def _latent_sets(args: OALArgs, ds: OutlierDataset, teacher_dim: int) -> dict[str, torch.Tensor]:
    """The outlier vectors the CLUB terms need (only those with a non-zero weight), width-checked."""
    sets = {}
    try:
        if args.gamma:
            sets["knn"] = ds.require("knn", width=teacher_dim).float()
        if args.delta:
            sets["sd"] = pool_sd(ds.require("sd"))
    except ValueError as err:
        hint = (
            " (or set method_args.delta: 0 to train without the sd term)"
            if args.delta and "sd" not in sets
            else ""
        )
        raise ConfigError(f"method_args.outliers: {err}{hint}") from None
    return sets


@METHODS.register("oal")
class OutlierAwareLearning(Method):
    """CE + α·logit KD + β·feature KD + γ·CLUB(knn) + δ·CLUB(sd) [+ pixel term]."""

    Config = OALArgs

    def setup(self, config: TrainConfig, data: Benchmark) -> Plan:
        """Load the teacher and the synth dataset once; build the student, DT and the CLUB networks."""
        args: OALArgs = self.args
        if config.init_from is None:
            raise ConfigError("init_from: OAL fine-tunes the CE baseline; set init_from: runs/ce/detector")
        teacher = load_teacher(args.teacher)
        # the student's training tensors are the teacher's input: size and normalisation must agree (the raw
        # geometry only matters for inputs of the raw size, which training never feeds)
        if teacher.preprocess.model_dump(exclude={"raw"}) != config.preprocess.model_dump(exclude={"raw"}):
            raise ConfigError(
                f"method_args.teacher: the teacher was trained with preprocess {teacher.preprocess.model_dump()} "
                f"but this run uses {config.preprocess.model_dump()}; the student and teacher see the same "
                "tensors, so use the teacher's preprocess"
            )
        if teacher.class_names != data.class_names:
            raise ConfigError(
                f"method_args.teacher: the teacher's classes {teacher.class_names} are not this run's "
                f"{data.class_names}; train the teacher on the same benchmark"
            )
        needs_outliers = bool(args.gamma or args.delta or args.pixel_term)
        outliers = load_outliers(args.outliers) if needs_outliers else None
        latents = _latent_sets(args, outliers, teacher.model.feature_dim) if outliers else {}
        sets: dict[str, Dataset] = {
            name: LatentPool(t, source_classes(outliers, name)) for name, t in latents.items()
        }
        if args.pixel_term:
            self.pixel, self.pixel_weight = build_term(args.pixel_term, args, args.pixel_weight)
            sets["pixel"] = pixel_set(outliers, config)
        plan = super().setup(config, data)
        width = plan.model.feature_dim
        # held outside the module tree: not trained, not checkpointed, not wrapped by DDP
        object.__setattr__(self, "teacher", teacher.model.eval().requires_grad_(False))
        if args.beta:
            self.dt = DTProjector(teacher.model.feature_dim, width)
        networks = {"knn": args.club_knn_network, "sd": args.club_sd_network}
        self.clubs = nn.ModuleDict(
            {name: CLUB(t.shape[1], width, args.club_hidden, networks[name]) for name, t in latents.items()}
        )
        plan.param_groups = [
            g
            for g in (
                {"params": list(self.dt.parameters()) if args.beta else [], "lr": args.dt_lr},
                {"params": list(self.clubs.parameters()), "lr": args.club_lr},
            )
            if g["params"]
        ]
        plan.outliers = sets
        plan.head_sees_synth_images = bool(args.pixel_term)
        # CLUB pairs outlier row i with ID row i; class pairing picks from a 4x larger random batch
        plan.outlier_batch_size = config.train.batch_size * (4 if args.club_pairing == "class" else 1)
        if args.pixel_term and args.club_pairing == "class":
            raise ConfigError(
                "method_args.club_pairing=class draws 4x larger outlier batches, which the pixel term would "
                "also get; use club_pairing=random with pixel_term"
            )
        return plan

    def _club(self, name: str, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(estimate, loss to add)``: the loss is ``weight·estimate`` (+ q's own loss when alternating)."""
        club: CLUB = self.clubs[name]
        weight = self.args.gamma if name == "knn" else self.args.delta
        x = x.to(h.dtype)
        if self.args.club_q_training == "joint":
            estimate = club(x, h)
            return estimate, weight * estimate
        mu, logvar = club.mu_logvar(x)
        estimate = club_estimate(mu.detach(), logvar.detach(), h)
        return estimate, weight * estimate + club.learning_loss(x, h.detach())

    def loss(
        self,
        model: Classifier,
        batch: tuple[torch.Tensor, torch.Tensor],
        outliers: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The OAL student loss of one batch; every term is returned on its own for logging."""
        args: OALArgs = self.args
        images, labels = batch
        if args.pixel_term:
            logits, h_s, logits_out, _ = joint_forward(model, images, outliers["pixel"])
        else:
            logits, h_s = model(images)
        ce = F.cross_entropy(logits, labels)
        total, parts = ce, {"ce": ce.item()}
        if args.alpha or args.beta:
            t_logits, h_t = self._teach(images)
        if args.alpha:
            kd = logit_kd(logits, t_logits)
            total, parts["logit_kd"] = total + args.alpha * kd, kd.item()
        if args.beta:
            fkd = feature_kd(h_s, self.dt(h_t))
            total, parts["feature_kd"] = total + args.beta * fkd, fkd.item()
        for name in self.clubs:
            pool = outliers[name]
            x = pool["x"][: len(labels)]
            if args.club_pairing == "class":
                x, matched = pair_by_class(labels, pool["x"], pool["cls"])
                parts[f"club_{name}_class_match"] = matched.float().mean().item()
            estimate, term = self._club(name, x, h_s)
            total, parts[f"club_{name}"] = total + term, estimate.item()
        if args.pixel_term:
            pixel = self.pixel(logits, logits_out)
            total, parts[args.pixel_term] = total + self.pixel_weight * pixel, pixel.item()
        return total, parts

    @torch.no_grad()
    def _teach(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        teacher: Classifier = self.teacher  # type: ignore[assignment]
        if next(teacher.parameters()).device != images.device:
            teacher.to(images.device)
        logits, features = teacher(images)
        return logits.float(), features.float()
