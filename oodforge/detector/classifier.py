"""The ``classifier`` kind: a `transformers` image classifier + a post-hoc OOD score + a threshold.

Artifact (DESIGN.md §4): ``model.safetensors`` holds the classifier's weights (``model.*``) and the
score's fitted statistics (``score.*``); ``detector.json``'s ``head`` section holds the backbone's
`transformers` config and the head config, so the model is rebuilt with no download.

Example:
    >>> detector = ClassifierDetector.create(name="ce", model=model, score=score, preprocess=pre,
    ...                                      class_names=names, val_scores=score(val_logits, val_feats))
    >>> detector.save("runs/ce/detector")
    >>> out = Detector.load("runs/ce/detector").predict([image])
    >>> out.is_ood, out.scores, out.label_names()
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from oodforge.artifacts import prefixed
from oodforge.backbones import ANCHORS_KEY, Classifier, HeadConfig, classifier_from_config, config_to_dict
from oodforge.config import StrictModel
from oodforge.data.transforms import Preprocess
from oodforge.detector.base import Detector, make_spec, register_kind
from oodforge.detector.calibration import calibrate
from oodforge.detector.prediction import Prediction
from oodforge.detector.spec import DetectorSpec, ScoreSpec
from oodforge.scores import Score, build_score


class ClassifierHead(StrictModel):
    """The ``head`` section of a classifier: the backbone's `transformers` config and its head."""

    backbone: dict[str, Any]
    head: HeadConfig = HeadConfig()


@register_kind("classifier")
class ClassifierDetector(Detector):
    """A classifier, an OOD score and a threshold that travel together (pre-processing included)."""

    Head = ClassifierHead
    has_labels = True
    model: Classifier

    def __init__(
        self, model: Classifier, score: Score, spec: DetectorSpec, device: str | torch.device = "cpu"
    ) -> None:
        """Wrap a classifier and its fitted score."""
        super().__init__(model, spec, device)
        self.score = score

    @classmethod
    def create(
        cls,
        *,
        name: str,
        model: Classifier,
        score: Score,
        preprocess: Preprocess,
        class_names: list[str],
        val_scores: np.ndarray,
        target_id_tpr: float = 0.95,
        metrics: dict[str, Any] | None = None,
        training: dict[str, Any] | None = None,
    ) -> ClassifierDetector:
        """A detector whose threshold accepts ``target_id_tpr`` of ``val_scores`` (held-out ID data)."""
        threshold, calibration = calibrate(val_scores, target_id_tpr, split="val")
        spec = make_spec(
            kind=cls.kind,
            name=name,
            preprocess=preprocess,
            class_names=class_names,
            score=ScoreSpec(name=score.name, params=score.params()),
            threshold=threshold,
            calibration=calibration,
            head=ClassifierHead(backbone=config_to_dict(model.hf_config), head=model.head_config),
            metrics=metrics,
            training=training,
        )
        return cls(model, score, spec)

    @torch.no_grad()
    def forward_batch(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and features of already pre-processed pixels (float32, on the CPU)."""
        logits, features = self.model(pixel_values.to(self.device))
        return logits.float().cpu(), features.float().cpu()

    def predict_pixels(self, pixel_values: torch.Tensor) -> Prediction:
        """:class:`Prediction` with labels and confidences of pre-processed pixels.

        One forward pass; a score that needs input gradients (``score.needs_grad``, e.g. ODIN) is
        computed by its own :meth:`~oodforge.scores.Score.score_pixels` with gradients enabled locally
        (labels and confidences still come from the unperturbed forward pass).
        """
        logits, features = self.forward_batch(pixel_values)
        if not self.score.needs_grad:
            return self.predict_from_outputs(logits, features)
        scores = self.score.score_pixels(
            self.model, pixel_values.to(self.device), input_std=self.preprocess.std
        )
        return self._prediction(scores.detach().cpu().numpy().astype(np.float64), logits)

    def predict_from_outputs(self, logits: torch.Tensor, features: torch.Tensor) -> Prediction:
        """:class:`Prediction` of a batch's logits and features (scores without ``needs_grad``)."""
        return self._prediction(self.score(logits, features).numpy().astype(np.float64), logits)

    def _prediction(self, scores: np.ndarray, logits: torch.Tensor) -> Prediction:
        conf, labels = logits.softmax(dim=1).max(dim=1)
        return Prediction(
            scores=scores,
            is_ood=scores < self.threshold,
            labels=labels.numpy(),
            confidences=conf.numpy().astype(np.float64),
            class_names=self.class_names,
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The classifier's weights under ``model.`` and the score's fitted statistics under ``score.``."""
        return {**super().tensors(), **{f"score.{k}": v for k, v in self.score.state_dict().items()}}

    @classmethod
    def from_parts(
        cls, spec: DetectorSpec, tensors: dict[str, torch.Tensor], device: str | torch.device
    ) -> ClassifierDetector:
        """Rebuild the backbone from its stored config, load its weights and restore the score."""
        head = ClassifierHead.model_validate(spec.head)
        model_state = prefixed(tensors, "model")
        # a cosine head's class anchors are part of its weights
        model = classifier_from_config(head.backbone, head.head, anchors=model_state.get(ANCHORS_KEY))
        model.load_state_dict(model_state, strict=True)
        score = build_score(spec.score.name, **spec.score.params)
        score.load_state_dict(prefixed(tensors, "score"))
        return cls(model, score, spec, device=device)
