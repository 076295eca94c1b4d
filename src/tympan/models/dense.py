"""S1: the flattened spectrogram and side-attribute embeddings through dense layers."""

from __future__ import annotations

import math

import torch
from torch import nn

from tympan.config import ModelConfig
from tympan.models.layers import dense_head, join


class FlatMLP(nn.Module):
    """`(batch, C, bins, frames)` flattened, joined with the side embeddings `(batch, extra)`
    (S1: an 8-dim language embedding) -> dense `head` (S1: 64, 32) -> `(batch, outputs)`."""

    def __init__(
        self, cfg: ModelConfig, input_shape: tuple[int, int, int], outputs: int, extra: int = 0
    ) -> None:
        super().__init__()
        sizes = cfg.head or (64, 32)
        self.head = dense_head(math.prod(input_shape) + extra, sizes, outputs, cfg.dense_dropout)

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(join(x.flatten(1), extra))
