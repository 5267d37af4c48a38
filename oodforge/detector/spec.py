"""``detector.json``: the one spec every detector kind writes, and the upgrade of format-1 files.

Common fields say what any client needs to use a detector (input, pre-processing, score, threshold and
how it was calibrated, provenance, checksums); the ``head`` section is the kind's own and is validated
by the kind's ``Head`` model (:mod:`oodforge.detector.base`).

Example:
    >>> spec = DetectorSpec.model_validate_json(Path("runs/ce/detector/detector.json").read_text())
    >>> spec.kind, spec.threshold, spec.calibration.target_id_tpr
    ('classifier', 7.31, 0.95)
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from oodforge.artifacts import WEIGHTS_FILE
from oodforge.config import StrictModel
from oodforge.data.transforms import Preprocess

FORMAT_VERSION = 2
CALIBRATION_RULE = (
    "is_ood = score < threshold; threshold = the largest t with fraction(id_scores >= t) >= target_id_tpr"
)


class InputSpec(StrictModel):
    """What the model takes: RGB images, channels first, at the pre-processing's side.

    Attributes:
        mode: Colour mode every image is converted to before pre-processing.
        background: RGB colour that transparent pixels (RGBA, LA, PA) are composited on.
        layout: Tensor layout of the model input.
    """

    mode: Literal["RGB"] = "RGB"
    background: tuple[int, int, int] = Field((0, 0, 0), description="matches training images (black)")
    layout: Literal["NCHW"] = "NCHW"


class ScoreSpec(StrictModel):
    """The OOD score (higher = more in-distribution): a registry name and its hyper-parameters."""

    name: str
    params: dict[str, Any] = {}


class ScoreHistogram(StrictModel):
    """A compact histogram of the ID scores a threshold was calibrated on (for plots, e.g. ``/ui``).

    Attributes:
        edges: ``len(counts) + 1`` increasing bin edges; the last bin includes its right edge.
        counts: Number of scores in each bin.
    """

    edges: list[float] = Field(..., min_length=2)
    counts: list[int]

    @model_validator(mode="after")
    def _one_count_per_bin(self) -> ScoreHistogram:
        if len(self.counts) != len(self.edges) - 1:
            raise ValueError(
                f"{len(self.edges)} edges need {len(self.edges) - 1} counts, got {len(self.counts)}"
            )
        return self


class Calibration(StrictModel):
    """How the threshold was chosen: on ``split`` ID images, accepting ``target_id_tpr`` of them.

    ``histogram`` (artifacts exported since it was added; ``None`` in older ones) summarises the
    calibration scores themselves.
    """

    split: str = "val"
    target_id_tpr: float = Field(0.95, gt=0, le=1)
    n_samples: int = Field(..., ge=1)
    rule: str = CALIBRATION_RULE
    histogram: ScoreHistogram | None = None


class Provenance(StrictModel):
    """Where the detector came from: creation time, training summary, library versions."""

    created: str
    training: dict[str, Any] = {}
    versions: dict[str, str] = {}


class DetectorSpec(StrictModel):
    """The content of ``detector.json`` (format 2), the same for every kind.

    Attributes:
        format_version: Incremented when the layout changes; older files are upgraded on load.
        kind: The ``KINDS`` registry name that loads the artifact.
        name: The detector's name (the run name).
        input: What the model takes.
        preprocess: Resize and normalisation applied to every image (the training pipeline's).
        class_names: The ID classes (dense: the segmentation classes, background first).
        score: The OOD score the threshold applies to.
        threshold: ``is_ood = score < threshold``.
        calibration: How ``threshold`` was chosen.
        head: The kind's own section (architecture and kind-specific settings).
        metrics: Evaluation figures at export time.
        provenance: Creation time, training summary, library versions.
        checksums: SHA-256 of each file of the artifact.
    """

    format_version: int = FORMAT_VERSION
    kind: str
    name: str
    input: InputSpec = InputSpec()
    preprocess: Preprocess
    class_names: list[str]
    score: ScoreSpec
    threshold: float
    calibration: Calibration
    head: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    provenance: Provenance
    checksums: dict[str, str] = {}

    @property
    def weights_sha256(self) -> str:
        """Checksum of ``model.safetensors``."""
        return self.checksums.get(WEIGHTS_FILE, "")

    @property
    def version(self) -> str:
        """First 12 hex digits of the weights' SHA-256: changes whenever the weights do."""
        return self.weights_sha256[:12]


def _upgrade_threshold(old: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    t = dict(old.get("threshold") or {})
    value = t.pop("value", None)
    return value, t


def upgrade_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A format-1 ``detector.json`` (classifier or dense) in the format-2 layout; values are unchanged.

    Format 1 had the head's fields at the top level (``backbone``/``head`` for classifiers,
    ``segmenter``/``pixel_score``/``pooling``/``pixel_threshold``/``map_range`` for dense detectors),
    ``threshold`` with its calibration inside, and ``training``/``versions``/``created``/
    ``weights_sha256`` at the top level.
    """
    old = dict(data)
    kind = old.pop("kind", "classifier")
    threshold, calibration = _upgrade_threshold(old)
    common = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "name": old.get("name"),
        "preprocess": old.get("preprocess"),
        "class_names": old.get("class_names"),
        "threshold": threshold,
        "calibration": calibration,
        "metrics": old.get("metrics", {}),
        "provenance": {
            "created": old.get("created", ""),
            "training": old.get("training", {}),
            "versions": old.get("versions", {}),
        },
        "checksums": {WEIGHTS_FILE: old.get("weights_sha256", "")},
    }
    if kind == "dense":
        common["score"] = {"name": old.get("pixel_score"), "params": {}}
        common["head"] = {
            key: old[key] for key in ("segmenter", "pooling", "pixel_threshold", "map_range") if key in old
        }
    else:
        common["score"] = old.get("score")
        common["head"] = {"backbone": old.get("backbone"), "head": old.get("head", {})}
    return common
