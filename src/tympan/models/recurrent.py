"""Recurrent families over spectrogram frames: LSTM, Bi-LSTM, GRU, Bi-GRU (S3, S4)."""

from __future__ import annotations

import torch
from torch import nn

from tympan.config import ModelConfig
from tympan.models.layers import as_sequence, dense_head, join, last_step


def bins_as_sequence(x: torch.Tensor) -> torch.Tensor:
    """`(batch, C, bins, frames)` -> `(batch, bins, C * frames)`: one step per bin."""
    batch, channels, bins, frames = x.shape
    return x.permute(0, 2, 1, 3).reshape(batch, bins, channels * frames)


class FrameRNN(nn.Module):
    """`(batch, C, bins, frames)` -> `(batch, outputs)`: each frame a step of `C * bins`
    (`steps: frames`), or each bin a step of `C * frames` (`steps: bins`: S3's LSTM, whose
    (40, 63) MFCC input made the 40 coefficients the steps).

    One recurrent layer per entry of `units` (S3's LSTM: 64, 64; S4's: 64, 32), LSTM or GRU,
    one- or bidirectional, with batch norm between layers when `batch_norm` (S4). The last
    step's output (for a bidirectional layer: the forward direction's last step and the
    backward direction's first) goes through `dropout` and the dense `head`, whose layers
    drop `head_dropout` (S3: 0.2 after the LSTMs, 0.1 after dense 128).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        input_shape: tuple[int, int, int],
        outputs: int,
        extra: int = 0,
        cell: str = "lstm",
        bidirectional: bool = False,
    ) -> None:
        super().__init__()
        if cfg.steps not in ("frames", "bins"):
            raise ValueError(
                f"model.steps={cfg.steps} does not apply to {cfg.name} (frames or bins)"
            )
        self.by_bins = cfg.steps == "bins"
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        directions = 2 if bidirectional else 1
        self.layers = nn.ModuleList()
        self.norms = nn.ModuleList()
        size = input_shape[0] * input_shape[2 if self.by_bins else 1]
        for units in cfg.units:
            self.layers.append(rnn(size, units, batch_first=True, bidirectional=bidirectional))
            size = directions * units
            self.norms.append(nn.BatchNorm1d(size) if cfg.batch_norm else nn.Identity())
        self.bidirectional = bidirectional
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = dense_head(size + extra, cfg.head, outputs, cfg.dense_dropout, cfg.batch_norm)

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        seq = bins_as_sequence(x) if self.by_bins else as_sequence(x)
        for layer, norm in zip(self.layers, self.norms, strict=True):
            seq, _ = layer(seq)
            seq = norm(seq.transpose(1, 2)).transpose(1, 2)
        return self.head(join(self.dropout(last_step(seq, self.bidirectional)), extra))


def lstm(cfg, input_shape, outputs, extra=0) -> FrameRNN:
    return FrameRNN(cfg, input_shape, outputs, extra, "lstm", False)


def bilstm(cfg, input_shape, outputs, extra=0) -> FrameRNN:
    return FrameRNN(cfg, input_shape, outputs, extra, "lstm", True)


def gru(cfg, input_shape, outputs, extra=0) -> FrameRNN:
    return FrameRNN(cfg, input_shape, outputs, extra, "gru", False)


def bigru(cfg, input_shape, outputs, extra=0) -> FrameRNN:
    return FrameRNN(cfg, input_shape, outputs, extra, "gru", True)
