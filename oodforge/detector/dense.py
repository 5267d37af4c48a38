"""The ``dense`` kind: a segmenter + a per-pixel score + image pooling + calibrated thresholds.

``predict`` gives, per image, an image score (the pooled map; higher = more in-distribution), the
verdict ``is_ood = score < threshold`` and the per-pixel score map; :meth:`DenseDetector.render_map`
turns a map into an 8-bit PNG (255 = most anomalous) of the input image's size. The ``head`` section
holds the segmenter architecture (rebuilt with no download), the pooling, the pixel threshold and the
PNG's range.

Example:
    >>> detector = Detector.load("runs/dense_flow/detector")
    >>> out = detector.predict([PIL.Image.open("scene.png")])
    >>> out.is_ood[0], out.maps[0].shape          # (True, (64, 64))
    >>> detector.render_map(out.maps[0], (480, 640))["png"]
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import model_validator

from oodforge.artifacts import prefixed
from oodforge.config import StrictModel
from oodforge.data.transforms import Preprocess
from oodforge.dense import PIXEL_SCORES, PoolingSpec, pool
from oodforge.detector.base import Detector, make_spec, register_kind
from oodforge.detector.calibration import calibrate
from oodforge.detector.prediction import Prediction
from oodforge.detector.spec import DetectorSpec, ScoreSpec
from oodforge.segmenters import Segmenter, segmenter_from_architecture

MAP_ENCODING = (
    "8-bit grey PNG, 255 = most anomalous: value = round(255 * clip((hi - score) / (hi - lo), 0, 1)) with "
    "[lo, hi] = map_range, resized bilinearly to the input image's size"
)
MAP_QUANTILES = (0.001, 0.999)  # the PNG map's [lo, hi]: quantiles of the calibration pixels' scores


class DenseHead(StrictModel):
    """The ``head`` section of a dense detector.

    Attributes:
        segmenter: The architecture JSON of :meth:`Segmenter.architecture`.
        pooling: How the map becomes the image score.
        pixel_threshold: Pixels scoring below it are anomalous at the calibration's target TPR of the ID
            pixels of the calibration split.
        map_range: ``[lo, hi]`` of the PNG encoding (the 0.1% and 99.9% quantiles of calibration pixels).
    """

    segmenter: dict[str, Any]
    pooling: PoolingSpec = PoolingSpec()
    pixel_threshold: float
    map_range: tuple[float, float]

    @model_validator(mode="after")
    def _range(self) -> DenseHead:
        if not self.map_range[0] < self.map_range[1]:
            raise ValueError(f"map_range must be [lo, hi] with lo < hi, got {list(self.map_range)}")
        return self


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


@register_kind("dense")
class DenseDetector(Detector):
    """A segmenter with a per-pixel OOD score, image pooling and calibrated thresholds."""

    Head = DenseHead
    has_maps = True
    head: DenseHead

    def __init__(self, model: Segmenter, spec: DetectorSpec, device: str | torch.device = "cpu") -> None:
        """Wrap a segmenter; the pixel score is looked up in ``PIXEL_SCORES``."""
        super().__init__(model, spec, device)
        self._pixel_score = PIXEL_SCORES.get(spec.score.name)

    @classmethod
    def create(
        cls,
        *,
        name: str,
        model: Segmenter,
        preprocess: Preprocess,
        class_names: list[str],
        pixel_score: str,
        pooling: PoolingSpec,
        val_maps: np.ndarray,
        target_id_tpr: float = 0.95,
        metrics: dict[str, Any] | None = None,
        training: dict[str, Any] | None = None,
    ) -> DenseDetector:
        """A detector calibrated on the score maps ``[N, H, W]`` of ID-only validation scenes.

        The image threshold accepts ``target_id_tpr`` of the pooled val scores; the pixel threshold
        accepts that share of the val pixels; the PNG range is the 0.1–99.9% quantiles of the pixels.
        """
        image_scores = pool(torch.from_numpy(val_maps), pooling).numpy()
        threshold, calibration = calibrate(image_scores, target_id_tpr, split="val")
        pixels = val_maps.reshape(-1).astype(np.float64)
        pixel_threshold, _ = calibrate(pixels, target_id_tpr, split="val")
        lo, hi = (float(v) for v in np.quantile(pixels, MAP_QUANTILES))
        if not lo < hi:
            lo, hi = lo - 1e-6, hi + 1e-6
        head = DenseHead(
            segmenter=model.architecture(),
            pooling=pooling,
            pixel_threshold=pixel_threshold,
            map_range=(lo, hi),
        )
        spec = make_spec(
            kind=cls.kind,
            name=name,
            preprocess=preprocess,
            class_names=class_names,
            score=ScoreSpec(name=pixel_score),
            threshold=threshold,
            calibration=calibration,
            head=head,
            metrics=metrics,
            training=training,
        )
        return cls(model, spec)

    @torch.no_grad()
    def score_maps(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Per-pixel scores ``[N, S, S]`` (higher = more ID) of already pre-processed pixels."""
        return self._pixel_score(self.model(pixel_values.to(self.device)).float()).cpu()

    def predict_pixels(self, pixel_values: torch.Tensor) -> Prediction:
        """Image scores, verdicts and maps of pre-processed pixels ``[N, 3, S, S]`` (one forward pass)."""
        maps = self.score_maps(pixel_values)
        scores = pool(maps, self.head.pooling).numpy().astype(np.float64)
        return Prediction(
            scores=scores, is_ood=scores < self.threshold, maps=maps.numpy(), class_names=self.class_names
        )

    def render_map(self, score_map: np.ndarray, size: tuple[int, int]) -> dict[str, Any]:
        """One map as a grey PNG of ``size`` = (height, width), encoded as ``MAP_ENCODING`` says."""
        return {
            "png": anomaly_png(score_map, self.head.map_range, size=size),
            "encoding": MAP_ENCODING,
            "range": self.head.map_range,
            "pixel_threshold": self.head.pixel_threshold,
            "pixel_score": self.spec.score.name,
        }

    def describe_score(self) -> dict[str, Any]:
        """The pixel score, its pooling into the image score, the pixel threshold and the map's range."""
        return {
            "name": self.spec.score.name,
            "pooling": self.head.pooling.model_dump(),
            "pixel_threshold": self.head.pixel_threshold,
            "map_range": list(self.head.map_range),
        }

    @classmethod
    def from_parts(
        cls, spec: DetectorSpec, tensors: dict[str, torch.Tensor], device: str | torch.device
    ) -> DenseDetector:
        """Rebuild the segmenter from its architecture JSON and load its weights."""
        PIXEL_SCORES.get(spec.score.name)
        model = segmenter_from_architecture(DenseHead.model_validate(spec.head).segmenter)
        model.load_state_dict(prefixed(tensors, "model"), strict=True)
        return cls(model, spec, device=device)
