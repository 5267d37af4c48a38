"""``Prediction``: what every detector kind returns per image (score, verdict, optional label and map)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

_ROWS = ("scores", "is_ood", "labels", "confidences", "maps")  # per-image fields (None or [N, ...])


@dataclass
class Prediction:
    """Per-image outputs of :meth:`Detector.predict` (numpy arrays of length N).

    Attributes:
        scores: ``[N]`` float64, higher = more in-distribution.
        is_ood: ``[N]`` bool, ``score < threshold``.
        labels: ``[N]`` predicted class index, for kinds that label images (else ``None``).
        confidences: ``[N]`` softmax probability of that class (else ``None``).
        maps: ``[N, H, W]`` float32 per-pixel scores at the model's input size, for kinds with maps.
        class_names: Names of the class indices in ``labels``.

    Example:
        >>> out = detector.predict(images)
        >>> out.is_ood, out.label_names(), out.rows(0, 1)
    """

    scores: np.ndarray
    is_ood: np.ndarray
    labels: np.ndarray | None = None
    confidences: np.ndarray | None = None
    maps: np.ndarray | None = None
    class_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        """Number of images."""
        return len(self.scores)

    def label_names(self) -> list[str | None]:
        """The predicted class name of each image (``None`` for every image of a kind without labels)."""
        if self.labels is None:
            return [None] * len(self)
        return [self.class_names[i] for i in self.labels]

    def confidence_values(self) -> list[float | None]:
        """Each image's confidence as a float (``None`` for a kind without labels)."""
        if self.confidences is None:
            return [None] * len(self)
        return [float(c) for c in self.confidences]

    def rows(self, start: int, stop: int) -> Prediction:
        """Images ``start:stop`` (every per-image field sliced, ``class_names`` kept)."""
        return dataclasses.replace(
            self,
            **{k: getattr(self, k)[start:stop] for k in _ROWS if getattr(self, k) is not None},
        )

    @classmethod
    def concat(cls, parts: list[Prediction]) -> Prediction:
        """The predictions of ``parts`` one after the other."""
        if not parts:
            raise ValueError("Prediction.concat needs at least one prediction")
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        joined = {
            k: np.concatenate([getattr(p, k) for p in parts]) for k in _ROWS if getattr(first, k) is not None
        }
        return dataclasses.replace(first, **joined)
