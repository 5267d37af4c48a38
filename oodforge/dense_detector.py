"""The dense detector artifact: a segmenter + a per-pixel score + image pooling + calibrated thresholds.

Same directory convention as the classifier :class:`~oodforge.detector.Detector` (DESIGN.md §4)::

    detector/
      model.safetensors   segmenter weights ("model.*")
      detector.json       kind "dense", segmenter architecture (rebuilt with no download), preprocessing,
                          class names (background first), pixel score, pooling, image threshold, pixel
                          threshold, the map's display range, metrics, training, versions, checksum

``predict`` gives, per image, an image score (the pooled map; higher = more in-distribution), the
verdict ``is_ood = score < threshold`` and the per-pixel score map. :func:`anomaly_png` turns a map into
an 8-bit PNG (255 = most anomalous) of any requested size.

Example:
    >>> detector = DenseDetector.load("runs/dense_flow/detector")
    >>> out = detector.predict([PIL.Image.open("scene.png")])
    >>> out.is_ood[0], out.maps[0].shape          # (True, (64, 64))
    >>> png = anomaly_png(out.maps[0], detector.spec.map_range, size=(480, 640))
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import model_validator

from oodforge.artifacts import (
    ARTIFACT_KINDS,
    FORMAT_VERSION,
    ArtifactDetector,
    ArtifactError,
    library_versions,
    prefixed,
    read_spec,
    read_weights,
)
from oodforge.config import StrictModel
from oodforge.data.transforms import Preprocess
from oodforge.dense import PIXEL_SCORES, PoolingSpec, pool
from oodforge.detector import ThresholdSpec
from oodforge.segmenters import Segmenter, segmenter_from_architecture

MAP_ENCODING = (
    "8-bit grey PNG, 255 = most anomalous: value = round(255 * clip((hi - score) / (hi - lo), 0, 1)) with "
    "[lo, hi] = map_range, resized bilinearly to the input image's size"
)


class DenseDetectorSpec(StrictModel):
    """The content of a dense detector's ``detector.json``.

    Attributes:
        pixel_score: ``PIXEL_SCORES`` name of the per-pixel score (``js``, ``msp``, ``energy``).
        pooling: How the map becomes the image score.
        threshold: Image-level threshold (``is_ood = image score < value``), calibrated on ID scenes.
        pixel_threshold: Pixels scoring below it are anomalous at ``threshold.target_id_tpr`` of the ID
            pixels of the calibration split.
        map_range: ``[lo, hi]`` of the PNG encoding (the 0.1% and 99.9% quantiles of calibration pixels).
    """

    format_version: int = FORMAT_VERSION
    kind: Literal["dense"] = "dense"
    name: str
    segmenter: dict[str, Any]
    preprocess: Preprocess
    class_names: list[str]
    pixel_score: str
    pooling: PoolingSpec = PoolingSpec()
    threshold: ThresholdSpec
    pixel_threshold: float
    map_range: tuple[float, float]
    metrics: dict[str, Any] = {}
    training: dict[str, Any] = {}
    versions: dict[str, str] = {}
    weights_sha256: str
    created: str

    @model_validator(mode="after")
    def _range(self) -> DenseDetectorSpec:
        if not self.map_range[0] < self.map_range[1]:
            raise ValueError(f"map_range must be [lo, hi] with lo < hi, got {list(self.map_range)}")
        return self


@dataclass
class DensePrediction:
    """Per-image outputs of :meth:`DenseDetector.predict`; ``maps`` are at the model's input resolution."""

    scores: np.ndarray  # [N] image scores, higher = more ID
    is_ood: np.ndarray  # [N] bool
    maps: np.ndarray  # [N, S, S] float32 per-pixel scores, higher = more ID


def anomaly_png(score_map: np.ndarray, map_range: tuple[float, float], size: tuple[int, int]) -> bytes:
    """Encode one score map as an 8-bit grey PNG of ``size`` = (height, width); see ``MAP_ENCODING``."""
    lo, hi = map_range
    x = torch.as_tensor(np.asarray(score_map, dtype=np.float32))[None, None]
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    anomaly = ((hi - x[0, 0]) / (hi - lo)).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(anomaly, mode="L").save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


class DenseDetector(ArtifactDetector):
    """A segmenter with a per-pixel OOD score, image pooling and calibrated thresholds."""

    def __init__(self, model: Segmenter, spec: DenseDetectorSpec, device: str | torch.device = "cpu"):
        super().__init__(model, spec, device)
        self._pixel_score = PIXEL_SCORES.get(spec.pixel_score)

    @torch.no_grad()
    def score_maps(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Per-pixel scores ``[N, S, S]`` (higher = more ID) of already pre-processed pixels."""
        return self._pixel_score(self.model(pixel_values.to(self.device)).float()).cpu()

    def predict_pixels(self, pixel_values: torch.Tensor) -> DensePrediction:
        """Image scores, verdicts and maps of pre-processed pixels ``[N, 3, S, S]`` (one forward pass)."""
        maps = self.score_maps(pixel_values)
        scores = pool(maps, self.spec.pooling).numpy().astype(np.float64)
        return DensePrediction(scores=scores, is_ood=scores < self.threshold, maps=maps.numpy())

    def predict(self, images: list[Image.Image] | Image.Image, batch_size: int = 64) -> DensePrediction:
        """Score PIL images (any size or mode; converted to RGB and resized to the model's input)."""
        if isinstance(images, Image.Image):
            images = [images]
        if len(images) == 0:
            raise ValueError("predict() got no images")
        pixels = torch.stack([self.preprocess(im) for im in images])
        parts = [self.predict_pixels(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)]
        return DensePrediction(
            scores=np.concatenate([p.scores for p in parts]),
            is_ood=np.concatenate([p.is_ood for p in parts]),
            maps=np.concatenate([p.maps for p in parts]),
        )

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> DenseDetector:
        """Load a dense artifact; :class:`ArtifactError` says what is wrong and what to do."""
        path = Path(path)
        spec = read_spec(path, DenseDetectorSpec)
        tensors = read_weights(path, spec.weights_sha256, verify)
        try:
            PIXEL_SCORES.get(spec.pixel_score)
            model = segmenter_from_architecture(spec.segmenter)
            model.load_state_dict(prefixed(tensors, "model"), strict=True)
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            raise ArtifactError(f"the segmenter in {path} cannot be rebuilt: {err}") from None
        return cls(model, spec, device=device)


ARTIFACT_KINDS.register("dense")(DenseDetector)


def build_dense_spec(
    *,
    name: str,
    model: Segmenter,
    preprocess: Preprocess,
    class_names: list[str],
    pixel_score: str,
    pooling: PoolingSpec,
    threshold: ThresholdSpec,
    pixel_threshold: float,
    map_range: tuple[float, float],
    metrics: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
) -> DenseDetectorSpec:
    """Assemble a dense ``detector.json``; the checksum is filled in by :meth:`DenseDetector.save`."""
    return DenseDetectorSpec(
        name=name,
        segmenter=model.architecture(),
        preprocess=preprocess,
        class_names=class_names,
        pixel_score=pixel_score,
        pooling=pooling,
        threshold=threshold,
        pixel_threshold=pixel_threshold,
        map_range=map_range,
        metrics=metrics or {},
        training=training or {},
        versions=library_versions(),
        weights_sha256="",
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
