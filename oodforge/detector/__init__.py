"""Detectors: one contract (spec, prediction, calibration, describe) for every kind.

``Detector.load(path)`` loads any artifact directory (``model.safetensors`` + ``detector.json``); the
``kind`` in the spec picks the class from :data:`KINDS`. Built in: ``classifier``
(:class:`ClassifierDetector`) and ``dense`` (:class:`DenseDetector`). A new kind is one file: subclass
:class:`Detector`, decorate it with :func:`register_kind`, and import it (or name it in
``OODFORGE_PLUGINS`` / an ``oodforge.detector_kinds`` entry point) before loading.

Example:
    >>> from oodforge.detector import Detector
    >>> detector = Detector.load("runs/oal/detector")
    >>> detector.predict(["digit.png"]).is_ood
"""

from oodforge.artifacts import SPEC_FILE, WEIGHTS_FILE, ArtifactError
from oodforge.detector.base import KINDS, Detector, load_plugins, make_spec, read_spec, register_kind
from oodforge.detector.calibration import calibrate, score_histogram
from oodforge.detector.classifier import ClassifierDetector, ClassifierHead
from oodforge.detector.dense import MAP_ENCODING, DenseDetector, DenseHead, anomaly_png
from oodforge.detector.prediction import Prediction
from oodforge.detector.spec import (
    FORMAT_VERSION,
    Calibration,
    DetectorSpec,
    InputSpec,
    ScoreHistogram,
    ScoreSpec,
)

__all__ = [
    "FORMAT_VERSION",
    "KINDS",
    "MAP_ENCODING",
    "SPEC_FILE",
    "WEIGHTS_FILE",
    "ArtifactError",
    "Calibration",
    "ClassifierDetector",
    "ClassifierHead",
    "DenseDetector",
    "DenseHead",
    "Detector",
    "DetectorSpec",
    "InputSpec",
    "Prediction",
    "ScoreHistogram",
    "ScoreSpec",
    "anomaly_png",
    "calibrate",
    "load_plugins",
    "make_spec",
    "read_spec",
    "register_kind",
    "score_histogram",
]
