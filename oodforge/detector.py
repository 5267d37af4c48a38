"""The detector artifact: a trained classifier + an OOD score + a calibrated threshold, on disk.

Directory format (DESIGN.md §4)::

    detector/
      model.safetensors   classifier weights ("model.*") and the score's fitted statistics ("score.*")
      detector.json       backbone config, head config, preprocessing, class names, score name + params,
                          threshold and how it was calibrated, metrics at export, library versions,
                          weights checksum

Loading never unpickles anything: weights come from safetensors, the rest from JSON.

Example:
    >>> detector = Detector.load("runs/ce/detector")
    >>> out = detector.predict([PIL.Image.open("digit.png")])
    >>> out.is_ood, out.scores, out.labels
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from oodforge.artifacts import (
    ARTIFACT_KINDS,
    FORMAT_VERSION,
    SPEC_FILE,
    WEIGHTS_FILE,
    ArtifactDetector,
    ArtifactError,
    library_versions,
    prefixed,
    read_spec,
    read_weights,
)
from oodforge.backbones import ANCHORS_KEY, Classifier, HeadConfig, classifier_from_config, config_to_dict
from oodforge.config import StrictModel
from oodforge.data.transforms import Preprocess
from oodforge.scores import Score, build_score

__all__ = [
    "SPEC_FILE",
    "WEIGHTS_FILE",
    "ArtifactError",
    "Detector",
    "DetectorSpec",
    "Prediction",
    "build_spec",
]


class ScoreSpec(StrictModel):
    name: str
    params: dict[str, Any] = {}


class ThresholdSpec(StrictModel):
    """``is_ood = score < value``; ``value`` accepts ``target_id_tpr`` of the ``split`` ID images."""

    value: float
    split: str = "val"
    target_id_tpr: float = 0.95
    n_samples: int
    rule: str = (
        "is_ood = score < threshold; threshold = the largest t with fraction(id_scores >= t) >= target_id_tpr"
    )


class DetectorSpec(StrictModel):
    """The content of ``detector.json``."""

    format_version: int = FORMAT_VERSION
    kind: Literal["classifier"] = "classifier"
    name: str
    backbone: dict[str, Any]
    head: HeadConfig = HeadConfig()  # artifacts written before heads were configurable are linear
    preprocess: Preprocess
    class_names: list[str]
    score: ScoreSpec
    threshold: ThresholdSpec
    metrics: dict[str, Any] = {}
    training: dict[str, Any] = {}
    versions: dict[str, str] = {}
    weights_sha256: str
    created: str


@dataclass
class Prediction:
    """Per-image outputs of :meth:`Detector.predict` (numpy arrays of length N)."""

    scores: np.ndarray
    is_ood: np.ndarray
    labels: np.ndarray
    confidences: np.ndarray
    class_names: list[str]

    def label_names(self) -> list[str]:
        return [self.class_names[i] for i in self.labels]


class Detector(ArtifactDetector):
    """A classifier, an OOD score and a threshold that travel together (pre-processing included)."""

    def __init__(
        self, model: Classifier, score: Score, spec: DetectorSpec, device: str | torch.device = "cpu"
    ):
        super().__init__(model, spec, device)
        self.score = score

    # ---------------------------------------------------------------- inference
    def _to_batch(self, images: list[Image.Image] | torch.Tensor) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            if images.ndim == 3:
                images = images.unsqueeze(0)
            if images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"expected images as a [N, 3, H, W] tensor, got shape {tuple(images.shape)}")
            return self.preprocess.tensor(images)
        if isinstance(images, Image.Image):
            images = [images]
        if len(images) == 0:
            raise ValueError("predict() got no images")
        return torch.stack([self.preprocess(im) for im in images])

    @torch.no_grad()
    def forward_batch(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and features of already pre-processed pixels."""
        logits, features = self.model(pixel_values.to(self.device))
        return logits.float().cpu(), features.float().cpu()

    @torch.no_grad()
    def predict(self, images: list[Image.Image] | torch.Tensor, batch_size: int = 256) -> Prediction:
        """Score images: PIL images (any size/mode; converted to RGB) or a uint8 / [0, 1] float tensor.

        Returns:
            :class:`Prediction` with ``scores`` (higher = more in-distribution), ``is_ood``
            (``score < threshold``), predicted ``labels`` and their softmax ``confidences``.
        """
        pixels = self._to_batch(images)
        logits, features = [], []
        for start in range(0, len(pixels), batch_size):
            lo, fe = self.forward_batch(pixels[start : start + batch_size])
            logits.append(lo)
            features.append(fe)
        return self.predict_from_outputs(torch.cat(logits), torch.cat(features))

    def predict_pixels(self, pixel_values: torch.Tensor) -> Prediction:
        """:class:`Prediction` of already pre-processed pixels ``[N, 3, S, S]`` (one forward pass)."""
        return self.predict_from_outputs(*self.forward_batch(pixel_values))

    def predict_from_outputs(self, logits: torch.Tensor, features: torch.Tensor) -> Prediction:
        scores = self.score(logits, features).numpy().astype(np.float64)
        probs = logits.softmax(dim=1)
        conf, labels = probs.max(dim=1)
        return Prediction(
            scores=scores,
            is_ood=scores < self.threshold,
            labels=labels.numpy(),
            confidences=conf.numpy().astype(np.float64),
            class_names=self.class_names,
        )

    # ---------------------------------------------------------------- persistence
    def tensors(self) -> dict[str, torch.Tensor]:
        """The classifier's weights under ``model.`` and the score's fitted statistics under ``score.``."""
        return {**super().tensors(), **{f"score.{k}": v for k, v in self.score.state_dict().items()}}

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> Detector:
        """Load an artifact directory; raises :class:`ArtifactError` saying what is wrong and what to do."""
        path = Path(path)
        spec = read_spec(path, DetectorSpec)
        tensors = read_weights(path, spec.weights_sha256, verify)
        model_state = prefixed(tensors, "model")
        try:
            # a cosine head's class anchors are part of its weights
            model = classifier_from_config(spec.backbone, spec.head, anchors=model_state.get(ANCHORS_KEY))
        except ValueError as err:
            raise ArtifactError(f"the model in {path} cannot be rebuilt: {err}") from None
        try:
            model.load_state_dict(model_state, strict=True)
        except RuntimeError as err:
            raise ArtifactError(
                f"{path / WEIGHTS_FILE} does not fit the backbone in {SPEC_FILE}: {err}"
            ) from None
        try:
            score = build_score(spec.score.name, **spec.score.params)
            score.load_state_dict(prefixed(tensors, "score"))
        except (KeyError, TypeError, ValueError) as err:
            raise ArtifactError(f"score {spec.score.name!r} in {path} cannot be restored: {err}") from None
        return cls(model, score, spec, device=device)


def build_spec(
    *,
    name: str,
    model: Classifier,
    preprocess: Preprocess,
    class_names: list[str],
    score: Score,
    threshold: ThresholdSpec,
    metrics: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
) -> DetectorSpec:
    """Assemble ``detector.json`` content; the checksum is filled in by :meth:`Detector.save`."""
    return DetectorSpec(
        name=name,
        backbone=config_to_dict(model.hf_config),
        head=model.head_config,
        preprocess=preprocess,
        class_names=class_names,
        score=ScoreSpec(name=score.name, params=score.params()),
        threshold=threshold,
        metrics=metrics or {},
        training=training or {},
        versions=library_versions(),
        weights_sha256="",
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


ARTIFACT_KINDS.register("classifier")(Detector)
