"""S4's AlexNet, trained from scratch: Krizhevsky et al. 2012's layer sizes.

torchvision's `alexnet` is the later single-GPU variant (64/192/384/256/256 filters); S4 ran
the original widths, 96/256/384/384/256, with two dense layers of 4096.
"""

from __future__ import annotations

import torch
from torch import nn

from tympan.config import ModelConfig
from tympan.models.layers import dense_head, flat_size, join

# (filters, kernel, stride, padding, max-pool after it)
LAYERS = (
    (96, 11, 4, 0, True),
    (256, 5, 1, 2, True),
    (384, 3, 1, 1, False),
    (384, 3, 1, 1, False),
    (256, 3, 1, 1, True),
)
MIN_SIZE = 67  # the smallest side the three pools leave one value of


class AlexNet2012(nn.Module):
    """`(batch, C, H, W)` -> `(batch, outputs)`: five convolutions (96 11 x 11 stride 4, 256
    5 x 5, 384, 384 and 256 3 x 3; ReLU each) with 3 x 3 stride-2 max-pools after the first,
    second and fifth, flattened (6,400 values at 224 x 224), then the dense `head` (S4: 4096,
    4096) with its dropout and the output layer. Local response normalisation, which S4 does
    not mention, is left out."""

    def __init__(
        self, cfg: ModelConfig, input_shape: tuple[int, int, int], outputs: int, extra: int = 0
    ) -> None:
        super().__init__()
        if cfg.weights:
            raise ValueError(
                "model.weights: alexnet2012 has no published weights (S4 trained it from "
                "scratch); set model.weights: null"
            )
        layers: list[nn.Module] = []
        width = input_shape[0]
        for filters, kernel, stride, padding, pool in LAYERS:
            layers += [nn.Conv2d(width, filters, kernel, stride, padding), nn.ReLU()]
            if pool:
                layers.append(nn.MaxPool2d(3, stride=2))
            width = filters
        self.features = nn.Sequential(*layers, nn.Flatten())
        if min(input_shape[1:]) < MIN_SIZE:
            raise ValueError(
                f"alexnet2012 needs inputs of at least {MIN_SIZE} x {MIN_SIZE}, got "
                f"{input_shape[1]} x {input_shape[2]} (features.stack.image)"
            )
        flat = flat_size(self.features, input_shape)
        self.head = dense_head(flat + extra, cfg.head, outputs, cfg.dense_dropout, cfg.batch_norm)

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(join(self.features(x), extra))
