"""Registry of model families by name, and the classifier that owns its normalisation."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tympan.config import FeatureConfig, ModelConfig
from tympan.features import Normalizer
from tympan.models.alexnet import AlexNet2012
from tympan.models.classical import Classical
from tympan.models.cnn import CRNN, ParallelCNN, PooledCNN, SmallCNN
from tympan.models.dense import EmbeddingHead, FlatMLP
from tympan.models.finetune import FineTuned
from tympan.models.recurrent import bigru, bilstm, gru, lstm
from tympan.models.resnet import ResNet18
from tympan.models.vision import DenseNetBiGRUAttention, vision

# (cfg, input_shape (C, bins, frames), outputs, extra) -> a module with forward(x, extra=None);
# `extra` is the width of the side-attribute vector joined before the family's dense layers.
Builder = Callable[[ModelConfig, tuple[int, int, int], int, int], nn.Module]

FAMILIES: dict[str, Builder] = {
    "s3_cnn": SmallCNN,
    "s1_mlp": FlatMLP,
    "embedding_head": EmbeddingHead,
    "finetune": FineTuned,  # built by AudioClassifier with its encoder (below)
    "resnet18": ResNet18,
    "lstm": lstm,
    "bilstm": bilstm,
    "gru": gru,
    "bigru": bigru,
    "crnn": CRNN,
    "pooled_cnn": PooledCNN,
    "parallel_cnn": ParallelCNN,
    "alexnet": vision("alexnet"),
    "alexnet2012": AlexNet2012,
    "vgg16": vision("vgg16"),
    "resnet50": vision("resnet50"),
    "densenet121": vision("densenet121"),
    "densenet_bigru_attention": DenseNetBiGRUAttention,
    "logreg": Classical,
    "random_forest": Classical,
    "linear_svm": Classical,
    "svc": Classical,
    "knn": Classical,
}

_HEAD = ("head", "batch_norm", "dropout", "head_dropout")
_RECURRENT = ("units", "steps", *_HEAD)
_VISION = ("weights", "freeze", "pooling", *_HEAD)
# The `model.*` fields each family reads beyond `name` (tests/test_models.py records what the
# builders really read); `side_attributes` and `side_dim` count when side attributes are set.
FAMILY_FIELDS: dict[str, tuple[str, ...]] = {
    "s3_cnn": ("channels", "kernel", "pool", "hidden", "dropout_conv", "dropout"),
    "s1_mlp": ("head", "dropout", "head_dropout"),
    "embedding_head": ("head", "dropout", "head_dropout"),
    "finetune": (
        "encoder_lr",
        "layer_decay",
        "freeze_feature_encoder",
        "gradient_checkpointing",
        "mask_time_prob",
        "mask_feature_prob",
        "head",
        "dropout",
        "head_dropout",
    ),
    "resnet18": ("init", *_HEAD),
    "lstm": _RECURRENT,
    "bilstm": _RECURRENT,
    "gru": _RECURRENT,
    "bigru": _RECURRENT,
    "crnn": ("channels", "kernel", "dropout_conv", "units", *_HEAD),
    "pooled_cnn": ("channels", "kernel", "dropout_conv", *_HEAD),
    "parallel_cnn": ("filters", "kernels", "pool", "dropout_conv", *_HEAD),
    "alexnet": _VISION,
    "alexnet2012": ("weights", *_HEAD),
    "vgg16": _VISION,
    "resnet50": _VISION,
    "densenet121": _VISION,
    "densenet_bigru_attention": ("units", "steps", "weights", "freeze", *_HEAD),
    "logreg": ("classical_input", "c"),
    "random_forest": ("classical_input", "n_estimators"),
    "linear_svm": ("classical_input", "c"),
    "svc": ("classical_input", "c"),
    "knn": ("classical_input", "n_neighbors"),
}


def model_fields(cfg: ModelConfig) -> tuple[str, ...]:
    """The `model.*` fields that shape `cfg.name`'s model, `name` first."""
    side = ("side_attributes", "side_dim") if cfg.side_attributes else ()
    return ("name", *FAMILY_FIELDS[cfg.name], *side)


class AudioClassifier(nn.Module):
    """Train-split normalisation followed by a network from the registry.

    `(batch, C, bins, frames)` features, and side-attribute codes `(batch, n_side)` when the
    model declares side attributes -> `(batch, outputs)`: class logits, one logit (binary
    cross-entropy) or one prediction (regression). Each side attribute has an embedding of
    `side_dim` per value (row 0: a value unseen in training). The statistics are buffers, so
    they travel in the state dict with the weights. `finetune` takes the clip itself: no
    normalisation (its encoder's feature extractor has its own), and `encoder` / `features`:
    the pretrained encoder (`tympan.encoders.Encoder`) and the params naming it.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        input_shape: tuple[int, int, int],
        outputs: int,
        mean: torch.Tensor,
        std: torch.Tensor,
        side_vocab: dict[str, list[str]] | None = None,
        encoder: nn.Module | None = None,
        features: FeatureConfig | None = None,
    ) -> None:
        super().__init__()
        self.side_vocab = dict(side_vocab or {})
        if cfg.name == "finetune":  # the waveform as it is
            mean, std = torch.zeros_like(mean), torch.ones_like(std)
        self.normalize = Normalizer(mean, std)
        self.embed = nn.ModuleList(
            nn.Embedding(len(values) + 1, cfg.side_dim) for values in self.side_vocab.values()
        )
        extra = cfg.side_dim * len(self.embed)
        if cfg.name == "finetune":
            self.net = FineTuned(cfg, input_shape, outputs, extra, *_encoder(encoder, features))
        else:
            self.net = FAMILIES[cfg.name](cfg, input_shape, outputs, extra)

    def param_groups(self, lr: float) -> list[dict]:
        """Optimiser groups of the trainable weights: all at `lr`, except a fine-tuned
        encoder's, at their own rates (`FineTuned.encoder_groups`)."""
        own = self.net.encoder_groups(lr) if isinstance(self.net, FineTuned) else []
        taken = {id(p) for group in own for p in group["params"]}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in taken]
        return [{"params": rest, "lr": lr}, *own]

    def forward(self, x: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        if not self.embed:
            return self.net(self.normalize(x))
        if side is None or side.shape != (x.shape[0], len(self.embed)):
            raise ValueError(
                f"this model needs side attributes {list(self.side_vocab)} as codes "
                f"(batch, {len(self.embed)}), got {None if side is None else tuple(side.shape)}"
            )
        extra = torch.cat([emb(side[:, i]) for i, emb in enumerate(self.embed)], dim=1)
        return self.net(self.normalize(x), extra)


def _encoder(encoder: nn.Module | None, features: FeatureConfig | None):
    """finetune's encoder (given, else the one `features.stack.encoder` names) and stack."""
    if features is None:
        raise ValueError("model.name: finetune is built with the feature params (its encoder)")
    if encoder is None:
        from tympan.features.stack import encoder_for

        encoder = encoder_for(features.stack.encoder)
    if encoder.sample_rate != features.sample_rate:
        raise ValueError(
            f"features.sample_rate must be the encoder's own rate, {encoder.sample_rate} Hz, to "
            f"fine-tune it (audio is resampled once, at featurize), got {features.sample_rate}"
        )
    return encoder, features.stack


def build_model(
    cfg: ModelConfig,
    input_shape: tuple[int, int, int],
    outputs: int,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    side_vocab: dict[str, list[str]] | None = None,
    encoder: nn.Module | None = None,
    features: FeatureConfig | None = None,
) -> AudioClassifier:
    """Build a family by `cfg.name` for `(C, bins, frames)` inputs; statistics default to
    identity (filled by a state dict). `finetune` needs `features` (its encoder's params) and
    takes `encoder` when given (a served model's), else loads what the params name."""
    if cfg.name not in FAMILIES:
        raise KeyError(f"model.name={cfg.name!r} is not a known family ({', '.join(FAMILIES)})")
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (channels, bins, frames), got {input_shape}")
    if cfg.name != "finetune" and features is not None and "waveform" in features.stack.kinds:
        raise ValueError(
            "features.stack.kinds: waveform (the clip itself) is for model.name: finetune, "
            f"got model.name: {cfg.name}"
        )
    bins = input_shape[1]
    mean = torch.zeros(bins) if mean is None else mean
    std = torch.ones(bins) if std is None else std
    return AudioClassifier(cfg, input_shape, outputs, mean, std, side_vocab, encoder, features)


# What a model's outputs mean (stored in the bundle): class logits, one logit, a value.
HEADS = ("softmax", "sigmoid", "identity")


def to_output(out: torch.Tensor, head: str) -> torch.Tensor:
    """Network outputs `(batch, k)` -> class probabilities `(batch, n_classes)` (softmax; a
    sigmoid's p as `[1 - p, p]`) or predictions `(batch, 1)` (identity)."""
    if head == "softmax":
        return torch.softmax(out.float(), dim=1)
    if head == "sigmoid":
        p = torch.sigmoid(out.float()[:, :1])
        return torch.cat([1 - p, p], dim=1)
    if head == "identity":
        return out.float()
    raise ValueError(f"unknown output head {head!r} (known: {', '.join(HEADS)})")
