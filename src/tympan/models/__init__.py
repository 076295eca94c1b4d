"""Model families, one parameterised module each, looked up by name."""

from tympan.models.registry import AudioClassifier, build_model

__all__ = ["AudioClassifier", "build_model"]
