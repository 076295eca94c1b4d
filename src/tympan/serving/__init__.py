"""The served model: raw audio in, label and probabilities out, with the training front end."""

from tympan.serving.bundle import PayloadError, Predictor

__all__ = ["PayloadError", "Predictor"]
