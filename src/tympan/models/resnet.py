"""S2: ResNet-18 in the d2l layout, for one- or three-channel feature images."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from tympan.config import ModelConfig
from tympan.models.layers import dense_head, join, xavier_


class Residual(nn.Module):
    """Two 3 x 3 conv + batch norm; a 1 x 1 conv shortcut when the stride or width changes."""

    def __init__(self, inputs: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, channels, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(channels), nn.BatchNorm2d(channels)
        self.shortcut = (
            nn.Conv2d(inputs, channels, 1, stride=stride)
            if stride != 1 or inputs != channels
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNet18(nn.Module):
    """`(batch, C, H, W)` -> `(batch, outputs)`: 7 x 7 conv 64 stride 2, batch norm, ReLU,
    3 x 3 max-pool; stages of 64, 128, 256, 512 channels with two residual blocks each (the
    later three halve the resolution); global average pool; dropout and the dense `head`.
    `init: xavier` gives S2's Xavier-uniform initialisation."""

    def __init__(
        self, cfg: ModelConfig, input_shape: tuple[int, int, int], outputs: int, extra: int = 0
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(input_shape[0], 64, 7, stride=2, padding=3),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        ]
        width = 64
        for i, channels in enumerate((64, 128, 256, 512)):
            layers += [Residual(width, channels, 1 if i == 0 else 2), Residual(channels, channels)]
            width = channels
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(cfg.dropout)]
        self.body = nn.Sequential(*layers)
        self.head = dense_head(512 + extra, cfg.head, outputs, cfg.dense_dropout, cfg.batch_norm)
        if cfg.init == "xavier":
            xavier_(self)

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(join(self.body(x), extra))
