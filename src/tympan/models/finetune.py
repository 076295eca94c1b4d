"""A pretrained encoder fine-tuned end to end (issue 16, item 3): `model.name: finetune` on
`features.stack.kinds: [waveform]`, the encoder named by `features.stack.encoder`.

The frozen way (`kinds: [embedding]` + `embedding_head`) runs the encoder once, at featurize;
this one runs it at every batch and trains it, with the same head on top: hidden states pooled
over time per layer (`stack.pooling`), the layers kept (`stack.layers`) mixed by learnt softmax
weights, side attributes joined, dense `head`. So a frozen run and a fine-tuned one differ in
what is trained, not in what the head sees.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from tympan.config import ModelConfig, StackConfig
from tympan.models.dense import EmbeddingHead


class FineTuned(nn.Module):
    """`(batch, 1, 1, samples)` audio at the encoder's rate -> `(batch, outputs)`.

    `encoder` (a `tympan.encoders.Encoder`) is copied, so the process's frozen copy (featurize's,
    a served model's) is never touched, then made trainable as `cfg` says
    (`Encoder.prepare_finetune`). `encoder_groups(lr)` gives the optimiser its layers at
    `cfg.encoder_lr` (else `lr`), decayed by `cfg.layer_decay` per layer below the top."""

    def __init__(
        self,
        cfg: ModelConfig,
        input_shape: tuple[int, int, int],
        outputs: int,
        extra: int,
        encoder: nn.Module,
        stack: StackConfig,
    ) -> None:
        super().__init__()
        if input_shape[:2] != (1, 1):
            raise ValueError(f"finetune takes (1, 1, samples) waveforms, got {input_shape}")
        self.encoder = copy.deepcopy(encoder).prepare_finetune(
            cfg.freeze_feature_encoder,
            cfg.gradient_checkpointing,
            cfg.mask_time_prob,
            cfg.mask_feature_prob,
        )
        self.pooling, self.last = stack.pooling, stack.layers == "last"
        self.encoder_lr, self.layer_decay = cfg.encoder_lr, cfg.layer_decay
        width = encoder.dim * (2 if stack.pooling == "mean_std" else 1)
        layers = 1 if self.last else encoder.layers
        self.head = EmbeddingHead(cfg, (1, width, layers), outputs, extra)

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        from tympan.encoders import pooled

        hidden = self.encoder(x[:, 0, 0])  # (batch, layers, frames, dim)
        if self.last:
            hidden = hidden[:, -1:]
        features = pooled(hidden, self.pooling).transpose(1, 2)  # (batch, dim, layers)
        return self.head(features[:, None].float(), extra)

    def encoder_groups(self, lr: float) -> list[dict]:
        """Optimiser parameter groups for the trainable encoder weights, one per depth:
        `encoder_lr` (else `lr`) x `layer_decay ** (top - depth)`."""
        base = self.encoder_lr if self.encoder_lr is not None else lr
        named = [(n, p) for n, p in self.encoder.named_parameters() if p.requires_grad]
        depths = [self.encoder.layer_index(n) for n, _ in named]
        top = max([d for d in depths if d is not None], default=0)
        groups: dict[int, list[nn.Parameter]] = {}
        for (_, param), depth in zip(named, depths, strict=True):
            groups.setdefault(top if depth is None else depth, []).append(param)
        return [
            {"params": params, "lr": base * self.layer_decay ** (top - depth)}
            for depth, params in sorted(groups.items())
        ]
