"""Registry of model families by name, and the classifier that owns its normalisation."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tympan.config import ModelConfig
from tympan.features import Normalizer
from tympan.models.cnn import SmallCNN

Builder = Callable[[ModelConfig, tuple[int, int], int], nn.Module]

FAMILIES: dict[str, Builder] = {"s3_cnn": SmallCNN}


class AudioClassifier(nn.Module):
    """Train-split normalisation followed by a network from the registry.

    `(batch, 1, n_mels, frames)` log-mel -> logits `(batch, n_classes)`. The statistics are
    buffers, so they travel in the state dict with the weights.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        input_shape: tuple[int, int],
        n_classes: int,
        mean: torch.Tensor,
        std: torch.Tensor,
    ) -> None:
        super().__init__()
        self.normalize = Normalizer(mean, std)
        self.net = FAMILIES[cfg.name](cfg, input_shape, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def build_model(
    cfg: ModelConfig,
    input_shape: tuple[int, int],
    n_classes: int,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
) -> AudioClassifier:
    """Build a family by `cfg.name`; statistics default to identity (filled by a state dict)."""
    if cfg.name not in FAMILIES:
        raise KeyError(f"model.name={cfg.name!r} is not a known family ({', '.join(FAMILIES)})")
    n_mels = input_shape[0]
    mean = torch.zeros(n_mels) if mean is None else mean
    std = torch.ones(n_mels) if std is None else std
    return AudioClassifier(cfg, input_shape, n_classes, mean, std)
