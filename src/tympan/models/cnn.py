"""Convolutional families: the S3 accent CNN, S5's parallel CNN and its CRNN predecessor, and a
small VGG-style CNN with global pooling (`pooled_cnn`)."""

from __future__ import annotations

import torch
from torch import nn

from tympan.config import ModelConfig
from tympan.models.layers import as_sequence, dense_head, flat_size, join, last_step


class SmallCNN(nn.Module):
    """S3: `(batch, C, bins, frames)` -> `(batch, outputs)`.

    One convolution of `channels` filters (`kernel` x `kernel`, ReLU), `pool` x `pool` max-pool,
    dropout, then a `hidden`-unit dense layer with dropout and the output layer. `extra` inputs
    `(batch, extra)` (side-attribute embeddings) join the flattened features before the dense
    layer.
    """

    def __init__(
        self, cfg: ModelConfig, input_shape: tuple[int, int, int], outputs: int, extra: int = 0
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(input_shape[0], cfg.channels, cfg.kernel, padding="valid"),
            nn.ReLU(),
            nn.MaxPool2d(cfg.pool),
            nn.Dropout(cfg.dropout_conv),
            nn.Flatten(),
        )
        # measured in training mode, as since the first release: the dropout's draw here is
        # part of the seeded initialisation, so earlier runs stay reproducible
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *input_shape)).shape[1]
        self.head = nn.Sequential(
            nn.Linear(flat + extra, cfg.hidden),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, outputs),
        )

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(join(self.features(x), extra))


class ParallelCNN(nn.Module):
    """S5 (after Tripathi et al. 2019): `(batch, C, bins, frames)` -> `(batch, outputs)`.

    One branch per `kernels` entry `(kh, kw)`: Conv2d of `filters` filters, ReLU, `pool` x
    `pool` max-pool (S5: 2; a last row or column that does not fill a window is dropped, as
    Keras' `MaxPooling2D` does); the branches' flattened outputs are concatenated and go
    through the dense head (`head`, with `batch_norm`, ReLU and `dropout`; S5: 400 and 200
    with batch norm). The first dense layer's width is the concatenation's: with S5's
    128 x 94 inputs and pool 2 it is 1,424,400 wide (a 570M-parameter layer); pool 8 makes
    it 78,600.
    """

    def __init__(
        self, cfg: ModelConfig, input_shape: tuple[int, int, int], outputs: int, extra: int = 0
    ) -> None:
        super().__init__()
        bins, frames = input_shape[1:]
        for kh, kw in cfg.kernels:
            if kh > bins or kw > frames:
                raise ValueError(
                    f"model.kernels: ({kh}, {kw}) is larger than the input ({bins} bins x "
                    f"{frames} frames)"
                )
            if min(bins - kh, frames - kw) + 1 < cfg.pool:
                raise ValueError(
                    f"model.kernels: ({kh}, {kw}) leaves a {bins - kh + 1} x {frames - kw + 1} "
                    f"map, smaller than model.pool={cfg.pool}"
                )
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(input_shape[0], cfg.filters, (kh, kw)),
                nn.ReLU(),
                nn.MaxPool2d(cfg.pool),
                nn.Dropout(cfg.dropout_conv),
                nn.Flatten(),
            )
            for kh, kw in cfg.kernels
        )
        flat = sum(flat_size(branch, input_shape) for branch in self.branches)
        self.head = dense_head(flat + extra, cfg.head, outputs, cfg.dense_dropout, cfg.batch_norm)

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(join(torch.cat([branch(x) for branch in self.branches], dim=1), extra))


class CRNN(nn.Module):
    """S5's first try (Yang & Hirschberg 2018): two conv blocks (`channels` filters, `kernel`,
    batch norm, ReLU, 2 x 2 max-pool), then the frames as a sequence through two
    bidirectional LSTMs of `units` (one size per layer), the last step -> dense head."""

    def __init__(
        self, cfg: ModelConfig, input_shape: tuple[int, int, int], outputs: int, extra: int = 0
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        width = input_shape[0]
        for _ in range(2):
            blocks += [
                nn.Conv2d(width, cfg.channels, cfg.kernel, padding="same"),
                nn.BatchNorm2d(cfg.channels),
                nn.ReLU(),
                nn.MaxPool2d(2, ceil_mode=True),
                nn.Dropout(cfg.dropout_conv),
            ]
            width = cfg.channels
        self.conv = nn.Sequential(*blocks)
        with torch.no_grad():
            _, channels, bins, _ = self.conv.eval()(torch.zeros(1, *input_shape)).shape
        self.conv.train()
        units = cfg.units if len(cfg.units) >= 2 else cfg.units * 2
        self.rnn = nn.ModuleList()
        size = channels * bins
        for hidden in units:
            self.rnn.append(nn.LSTM(size, hidden, batch_first=True, bidirectional=True))
            size = 2 * hidden
        self.head = dense_head(size + extra, cfg.head, outputs, cfg.dense_dropout, cfg.batch_norm)

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        seq = as_sequence(self.conv(x))
        for layer in self.rnn:
            seq, _ = layer(seq)
        return self.head(join(last_step(seq, bidirectional=True), extra))


class PooledCNN(nn.Module):
    """`(batch, C, bins, frames)` -> `(batch, outputs)`: three conv blocks of `channels`,
    2 x `channels` and 4 x `channels` filters (`kernel`, batch norm, ReLU, 2 x 2 max-pool,
    `dropout_conv`), then the mean and max over bins and frames `(batch, 8 x channels)` into
    the dense head. Global pooling makes the decision independent of where in the window a word
    sits and keeps the head small (a keyword-spotting staple)."""

    def __init__(
        self, cfg: ModelConfig, input_shape: tuple[int, int, int], outputs: int, extra: int = 0
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        width = input_shape[0]
        for scale in (1, 2, 4):
            blocks += [
                nn.Conv2d(width, scale * cfg.channels, cfg.kernel, padding="same", bias=False),
                nn.BatchNorm2d(scale * cfg.channels),
                nn.ReLU(),
                nn.MaxPool2d(2, ceil_mode=True),
                nn.Dropout(cfg.dropout_conv),
            ]
            width = scale * cfg.channels
        self.conv = nn.Sequential(*blocks)
        self.head = dense_head(
            2 * width + extra, cfg.head, outputs, cfg.dense_dropout, cfg.batch_norm
        )

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        maps = self.conv(x)  # (batch, 4 x channels, bins / 8, frames / 8)
        pooled = torch.cat([maps.mean(dim=(2, 3)), maps.amax(dim=(2, 3))], dim=1)
        return self.head(join(pooled, extra))
