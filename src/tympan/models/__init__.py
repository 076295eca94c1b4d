"""Model families, one parameterised module each, looked up by name."""

from tympan.models.registry import HEADS, AudioClassifier, build_model, to_output

__all__ = ["HEADS", "AudioClassifier", "build_model", "to_output"]
