"""The served model: raw audio in, label and probabilities out, with the training front end.

`Predictor` and `PayloadError` load lazily, so `python -m tympan.serving.client` (standard
library only) starts without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tympan.serving.bundle import PayloadError, Predictor

__all__ = ["PayloadError", "Predictor"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from tympan.serving import bundle

        return getattr(bundle, name)
    raise AttributeError(f"module 'tympan.serving' has no attribute {name!r}")
