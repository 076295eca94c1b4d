"""The S3 accent CNN: Conv2D, max-pool, dropout, dense, dropout, linear."""

from __future__ import annotations

import torch
from torch import nn

from tympan.config import ModelConfig


class SmallCNN(nn.Module):
    """`(batch, 1, n_mels, frames)` -> logits `(batch, n_classes)`.

    One convolution of `channels` filters (`kernel` x `kernel`, ReLU), `pool` x `pool` max-pool,
    dropout, then a `hidden`-unit dense layer with dropout and the output layer. `extra` inputs
    `(batch, extra)` (side-attribute embeddings) join the flattened features before the dense
    layer.
    """

    def __init__(
        self, cfg: ModelConfig, input_shape: tuple[int, int], n_classes: int, extra: int = 0
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, cfg.channels, cfg.kernel, padding="valid"),
            nn.ReLU(),
            nn.MaxPool2d(cfg.pool),
            nn.Dropout(cfg.dropout_conv),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, 1, *input_shape)).shape[1]
        self.head = nn.Sequential(
            nn.Linear(flat + extra, cfg.hidden),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, n_classes),
        )

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        flat = self.features(x)
        if extra is not None:
            flat = torch.cat([flat, extra], dim=1)
        return self.head(flat)
