"""oodforge shared core: datasets, backbones, scores, metrics, config and the detector artifact."""

__version__ = "0.1.0"
