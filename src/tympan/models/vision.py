"""torchvision backbones (S4): AlexNet, VGG16, ResNet50, DenseNet121, and the final
DenseNet121 -> Bi-GRU -> additive attention model.

Weights never come from the network: `model.weights` names a local file holding the
backbone's state dict (e.g. ImageNet weights saved once with `torch.save(net.state_dict())`),
otherwise the backbone starts from random initialisation. For one-channel inputs the first
convolution's pretrained filters are summed over the RGB channels. `freeze: true` trains the
head only (S4's frozen-backbone transfer).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from tympan.config import ModelConfig
from tympan.models.layers import dense_head, flat_size, join

BACKBONES = ("alexnet", "vgg16", "resnet50", "densenet121")


class WeightsError(ValueError):
    """A `model.weights` file that is missing or does not fit the backbone."""


def _first_conv(net: nn.Module, name: str) -> tuple[nn.Module, str]:
    if name == "resnet50":
        return net, "conv1"
    if name == "densenet121":
        return net.features, "conv0"
    return net.features, "0"  # alexnet, vgg16


def backbone(name: str, channels: int, weights: str | None) -> nn.Module:
    """The torchvision network `name` with `channels` input channels, its classifier kept
    (callers take the feature part); weights from the local file `weights` when given."""
    net = getattr(torchvision.models, name)(weights=None)
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(f"model.weights: {path} is not a file (weights are local only)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise WeightsError(
                f"model.weights: {path} does not fit torchvision {name}: {str(exc)[:300]}"
            ) from None
    if channels != 3:
        parent, attr = _first_conv(net, name)
        old = getattr(parent, attr)
        new = nn.Conv2d(
            channels,
            old.out_channels,
            old.kernel_size,
            old.stride,
            old.padding,
            bias=old.bias is not None,
        )
        with torch.no_grad():
            new.weight.copy_(old.weight.sum(dim=1, keepdim=True).repeat(1, channels, 1, 1))
            if old.bias is not None:
                new.bias.copy_(old.bias)
        setattr(parent, attr, new)
    return net


def feature_part(net: nn.Module, name: str) -> nn.Module:
    """`(batch, C, H, W)` -> feature maps `(batch, C', H', W')` (before pooling)."""
    if name == "resnet50":
        return nn.Sequential(*list(net.children())[:-2])
    if name == "densenet121":
        return nn.Sequential(net.features, nn.ReLU())
    return net.features


class VisionNet(nn.Module):
    """`(batch, C, H, W)` -> `(batch, outputs)`: a torchvision backbone's feature maps,
    global average pool, dropout, dense `head` (S4: 128 with dropout 0.5)."""

    def __init__(
        self,
        cfg: ModelConfig,
        input_shape: tuple[int, int, int],
        outputs: int,
        extra: int = 0,
        name: str = "resnet50",
    ) -> None:
        super().__init__()
        self.body = feature_part(backbone(name, input_shape[0], cfg.weights), name)
        if cfg.freeze:
            self.body.requires_grad_(False)
        self.frozen = cfg.freeze
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(cfg.dropout))
        width = flat_size(nn.Sequential(self.body, self.pool), input_shape)
        self.head = dense_head(width + extra, cfg.head, outputs, cfg.dropout, cfg.batch_norm)

    def train(self, mode: bool = True) -> VisionNet:
        super().train(mode)
        if self.frozen:  # a frozen backbone keeps its batch-norm statistics too
            self.body.eval()
        return self

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(join(self.pool(self.body(x)), extra))


class AdditiveAttention(nn.Module):
    """`(batch, steps, size)` -> `(batch, size)`: softmax over steps of v^T tanh(W h_t)."""

    def __init__(self, size: int, hidden: int) -> None:
        super().__init__()
        self.project = nn.Linear(size, hidden)
        self.score = nn.Linear(hidden, 1, bias=False)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        weights = F.softmax(self.score(torch.tanh(self.project(seq))), dim=1)
        return (weights * seq).sum(dim=1)


class DenseNetBiGRUAttention(nn.Module):
    """S4's final model: DenseNet121 feature maps `(batch, C', H', W')` averaged over H' into
    a sequence over W' (time), a bidirectional GRU of `units[0]`, additive attention, then
    the dense `head` (S4: 64) with dropout (0.5)."""

    def __init__(
        self, cfg: ModelConfig, input_shape: tuple[int, int, int], outputs: int, extra: int = 0
    ) -> None:
        super().__init__()
        self.body = feature_part(
            backbone("densenet121", input_shape[0], cfg.weights), "densenet121"
        )
        if cfg.freeze:
            self.body.requires_grad_(False)
        with torch.no_grad():
            channels = self.body.eval()(torch.zeros(1, *input_shape)).shape[1]
        self.body.train()
        units = cfg.units[0]
        self.gru = nn.GRU(channels, units, batch_first=True, bidirectional=True)
        self.attention = AdditiveAttention(2 * units, 2 * units)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = dense_head(2 * units + extra, cfg.head, outputs, cfg.dropout, cfg.batch_norm)

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        maps = self.body(x)  # (batch, C', H', W')
        seq, _ = self.gru(maps.mean(dim=2).transpose(1, 2))  # (batch, W', 2 * units)
        return self.head(join(self.dropout(self.attention(seq)), extra))


def vision(name: str):
    def build(cfg, input_shape, outputs, extra=0) -> VisionNet:
        return VisionNet(cfg, input_shape, outputs, extra, name)

    build.__name__ = name
    return build
