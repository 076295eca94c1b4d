"""Pieces the families share: the dense head, initialisation, frames as a sequence."""

from __future__ import annotations

import torch
from torch import nn


def dense_head(
    in_features: int,
    sizes: tuple[int, ...],
    outputs: int,
    dropout: float,
    batch_norm: bool = False,
) -> nn.Sequential:
    """`(batch, in_features)` -> `(batch, outputs)`: for each size Linear, optional BatchNorm,
    ReLU and dropout, then a linear output layer."""
    layers: list[nn.Module] = []
    width = in_features
    for size in sizes:
        layers.append(nn.Linear(width, size))
        if batch_norm:
            layers.append(nn.BatchNorm1d(size))
        layers += [nn.ReLU(), nn.Dropout(dropout)]
        width = size
    layers.append(nn.Linear(width, outputs))
    return nn.Sequential(*layers)


def join(features: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    """`(batch, n)` audio features and `(batch, extra)` side embeddings -> `(batch, n + extra)`."""
    return features if extra is None else torch.cat([features, extra], dim=1)


def as_sequence(x: torch.Tensor) -> torch.Tensor:
    """`(batch, C, bins, frames)` -> `(batch, frames, C * bins)`: one step per frame."""
    batch, channels, bins, frames = x.shape
    return x.permute(0, 3, 1, 2).reshape(batch, frames, channels * bins)


def last_step(seq: torch.Tensor, bidirectional: bool) -> torch.Tensor:
    """`(batch, steps, H)` -> `(batch, H)`: the last step's output; for a bidirectional layer
    the forward half's last step and the backward half's first (each direction's summary)."""
    if not bidirectional:
        return seq[:, -1]
    half = seq.shape[2] // 2
    return torch.cat([seq[:, -1, :half], seq[:, 0, half:]], dim=1)


def xavier_(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every convolution and linear layer (S2)."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d | nn.Conv1d | nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def flat_size(body: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Width of `body`'s flattened output for one `(C, bins, frames)` input (no grad, eval)."""
    was_training = body.training
    body.eval()
    with torch.no_grad():
        width = body(torch.zeros(1, *input_shape)).flatten(1).shape[1]
    body.train(was_training)
    return width
