"""Dense models: S1's flattened spectrogram with side-attribute embeddings, and the head on a
pretrained encoder's cached embeddings (issue 16)."""

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


class EmbeddingHead(nn.Module):
    """A head on cached encoder embeddings `(batch, 1, dim, layers)` (`features.stack.kinds:
    [embedding]`): the layers mixed by softmax weights learnt from zero (equal at the start;
    SUPERB's weighted sum of hidden states; one layer: itself), joined with the side
    embeddings, then dense `head` (empty: a linear probe) -> `(batch, outputs)`."""

    def __init__(
        self, cfg: ModelConfig, input_shape: tuple[int, int, int], outputs: int, extra: int = 0
    ) -> None:
        super().__init__()
        channels, dim, layers = input_shape
        if channels != 1:
            raise ValueError(f"embedding_head takes (1, dim, layers) input, got {input_shape}")
        self.layer_logits = nn.Parameter(torch.zeros(layers))
        self.head = dense_head(dim + extra, cfg.head, outputs, cfg.dense_dropout)

    @property
    def layer_weights(self) -> torch.Tensor:
        """`(layers,)`: how much each encoder layer counts (sums to 1)."""
        return torch.softmax(self.layer_logits, dim=0)

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        mixed = (x[:, 0] * self.layer_weights).sum(dim=-1)  # (batch, dim)
        return self.head(join(mixed, extra))
