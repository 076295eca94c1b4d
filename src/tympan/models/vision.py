"""torchvision backbones (S4): AlexNet, VGG16, ResNet50, DenseNet121, and the final
DenseNet121 -> Bi-GRU -> additive attention model.

Weights never come from the network: `model.weights: imagenet` reads torchvision's published
file from its local cache, hash-checked (`tympan.models.weights`), a path names a local
state-dict file, and without either the backbone starts from random initialisation. For
one-channel inputs the first convolution's pretrained filters are summed over the RGB
channels. `freeze: true` trains the head only (S4's frozen-backbone transfer).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from tympan.config import ModelConfig
from tympan.models.layers import dense_head, flat_size, join
from tympan.models.weights import WeightsError, load_state, resolve

BACKBONES = ("alexnet", "vgg16", "resnet50", "densenet121")
__all__ = ["BACKBONES", "DenseNetBiGRUAttention", "VisionNet", "WeightsError", "backbone"]


def _first_conv(net: nn.Module, name: str) -> tuple[nn.Module, str]:
    if name == "resnet50":
        return net, "conv1"
    if name == "densenet121":
        return net.features, "conv0"
    return net.features, "0"  # alexnet, vgg16


def backbone(name: str, channels: int, weights: str | None) -> nn.Module:
    """The torchvision network `name` with `channels` input channels, its classifier kept
    (callers take the feature part); weights from `weights` (`imagenet` or a local file)."""
    import torchvision  # 2 s to import: only where a backbone is built

    net = getattr(torchvision.models, name)(weights=None)
    if weights:
        path = resolve(name, weights)
        state = load_state(name, path)
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
    global average pool (or flattened, `pooling: flatten`), the dense `head` with its dropout
    (S4's ResNet50 and DenseNet121: 128 with dropout 0.5; VGG16: 4096 x 2 on the flattened
    maps)."""

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
        self.pool = (
            nn.Flatten()
            if cfg.pooling == "flatten"
            else nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        )
        width = flat_size(nn.Sequential(self.body, self.pool), input_shape)
        self.head = dense_head(width + extra, cfg.head, outputs, cfg.dense_dropout, cfg.batch_norm)

    def train(self, mode: bool = True) -> VisionNet:
        super().train(mode)
        if self.frozen:  # a frozen backbone keeps its batch-norm statistics too
            self.body.eval()
        return self

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(join(self.pool(self.body(x)), extra))


class AdditiveAttention(nn.Module):
    """`(batch, steps, size)` -> `(batch, size)`: softmax over steps of v^T tanh(W h_t)
    (Bahdanau's score with a learnt projection; tympan's sequence form of S4's model)."""

    def __init__(self, size: int, hidden: int) -> None:
        super().__init__()
        self.project = nn.Linear(size, hidden)
        self.score = nn.Linear(hidden, 1, bias=False)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        weights = F.softmax(self.score(torch.tanh(self.project(seq))), dim=1)
        return (weights * seq).sum(dim=1)


class KerasAdditiveAttention(nn.Module):
    """Keras' `AdditiveAttention` (use_scale) as self-attention, `(batch, steps, size)` ->
    `(batch, steps, size)`: for each query step i, softmax over key steps j of
    `sum(scale * tanh(h_i + h_j))`, applied to the values h_j. Its only weights are `scale`
    `(size,)`; over a single step the softmax is 1 and the output is its input."""

    def __init__(self, size: int) -> None:
        super().__init__()
        limit = (3.0 / size) ** 0.5  # Keras' glorot_uniform for a vector: fan in = out = size
        self.scale = nn.Parameter(torch.empty(size).uniform_(-limit, limit))

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        scores = (self.scale * torch.tanh(seq[:, :, None] + seq[:, None, :])).sum(-1)
        return F.softmax(scores, dim=-1) @ seq


class DenseNetBiGRUAttention(nn.Module):
    """S4's final model, `(batch, C, H, W)` -> `(batch, outputs)`: DenseNet121 feature maps
    `(batch, C', H', W')`, a bidirectional GRU of `units[0]`, additive attention, then the
    dense `head` (S4: 64) with its dropout (0.5).

    `steps: pooled` is S4's form: the maps globally average-pooled to `(batch, 1, C')`, one
    step through the GRU, Keras' `AdditiveAttention` over that step (weight 1), then the
    head. `steps: frames` (tympan's sequence form) averages the maps over H' into a sequence
    over W' (time), with a learnt-projection attention over its steps and dropout before the
    head.
    """

    def __init__(
        self, cfg: ModelConfig, input_shape: tuple[int, int, int], outputs: int, extra: int = 0
    ) -> None:
        super().__init__()
        if cfg.steps not in ("pooled", "frames"):
            raise ValueError(
                f"model.steps={cfg.steps} does not apply to densenet_bigru_attention "
                "(pooled: S4's one step; frames: the maps' time axis)"
            )
        self.pooled = cfg.steps == "pooled"
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
        if self.pooled:
            self.attention: nn.Module = KerasAdditiveAttention(2 * units)
            self.dropout: nn.Module = nn.Identity()
        else:
            self.attention = AdditiveAttention(2 * units, 2 * units)
            self.dropout = nn.Dropout(cfg.dropout)
        self.head = dense_head(
            2 * units + extra, cfg.head, outputs, cfg.dense_dropout, cfg.batch_norm
        )

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        maps = self.body(x)  # (batch, C', H', W')
        if self.pooled:
            seq, _ = self.gru(maps.mean(dim=(2, 3))[:, None])  # (batch, 1, 2 * units)
            summary = self.attention(seq)[:, 0]  # (batch, 2 * units)
        else:
            seq, _ = self.gru(maps.mean(dim=2).transpose(1, 2))  # (batch, W', 2 * units)
            summary = self.attention(seq)
        return self.head(join(self.dropout(summary), extra))


def vision(name: str):
    def build(cfg, input_shape, outputs, extra=0) -> VisionNet:
        return VisionNet(cfg, input_shape, outputs, extra, name)

    build.__name__ = name
    return build
