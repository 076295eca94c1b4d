"""Each study's network, built from its preset's `model` section on the study's own input,
against the study's description in ../shared/SEEDS.md: layer by layer, and the weight count.

Networks are built on torch's meta device (shapes without memory), so S5's 570M-weight
network and VGG16 cost nothing. Counts are torch's; where Keras counts differently the test
says by how much and why.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from tympan.config import ModelConfig, load_params
from tympan.models import build_model
from tympan.models.classical import estimator

from conftest import REPO

ESC50 = 50


def _model(preset: str) -> ModelConfig:
    return load_params(REPO / "pipelines" / f"{preset}.yaml").model


def _build(cfg: ModelConfig, shape: tuple[int, int, int], outputs: int, **kwargs) -> nn.Module:
    """The architecture alone: pretrained weights (`imagenet`) are not read."""
    with torch.device("meta"):
        return build_model(replace(cfg, weights=None), shape, outputs, **kwargs).net


def _count(module: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def _layers(module: nn.Module, kind: type) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, kind)]


def _dense(module: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in _layers(module, nn.Linear)]


def _dropouts(module: nn.Module) -> list[float]:
    return [m.p for m in _layers(module, nn.Dropout)]


def test_s1_flattened_mel_and_language_embedding_dense_64_32_1():
    """S1: the 128 x 256 log-mel flattened, joined with an 8-dim language embedding, dense
    64 and 32 (ReLU), one sigmoid output."""
    cfg = _model("s1_deception_ensemble")
    vocab = {"language": ["chinese", "english"]}  # the languages of the real attribute table
    with torch.device("meta"):
        model = build_model(cfg, (1, 128, 256), 1, side_vocab=vocab)
    assert [e.embedding_dim for e in model.embed] == [8]
    assert model.embed[0].num_embeddings == 3  # Keras' 2, plus a row for an unseen language
    assert _dense(model.net) == [(128 * 256 + 8, 64), (64, 32), (32, 1)]
    assert _dropouts(model.net) == [0.0, 0.0]
    assert _count(model.net) == 2_099_841  # Keras: the same, plus 16 in Embedding(2, 8)


def test_s2_resnet18_d2l_layout():
    """S2: 7x7 conv 64 stride 2, BN, ReLU, 3x3 max-pool; stages 64, 128, 256, 512 of two
    residual blocks with 1x1 shortcuts on downsampling; global average pool; linear to 2."""
    net = _build(_model("s2_deception_resnet"), (1, 224, 224), 2)
    convs = _layers(net, nn.Conv2d)
    first = convs[0]
    assert (first.out_channels, first.kernel_size, first.stride) == (64, (7, 7), (2, 2))
    three = [c.out_channels for c in convs if c.kernel_size == (3, 3)]
    assert three == [64] * 4 + [128] * 4 + [256] * 4 + [512] * 4
    shortcuts = [(c.in_channels, c.out_channels) for c in convs if c.kernel_size == (1, 1)]
    assert shortcuts == [(64, 128), (128, 256), (256, 512)]
    assert _dense(net) == [(512, 2)] and set(_dropouts(net)) == {0.0}
    assert _count(net) == 11_174_274


def test_s3_cnn_conv64_pool2_dense128():
    """S3: Conv2D 64 3x3 ReLU, MaxPool 2x2, Dropout 0.1, Flatten, Dense 128 ReLU, Dropout
    0.2, Dense 2, on the 40 x 63 MFCC chunk; the augmented run's dropouts 0.2 / 0.3."""
    net = _build(_model("s3_accent_cnn"), (1, 40, 63), 2)
    (conv,) = _layers(net, nn.Conv2d)
    assert (conv.out_channels, conv.kernel_size) == (64, (3, 3))
    assert [m.kernel_size for m in _layers(net, nn.MaxPool2d)] == [2]
    assert _dense(net) == [(64 * 19 * 30, 128), (128, 2)]
    assert _dropouts(net) == [0.1, 0.2]
    assert _count(net) == 4_670_466  # Keras counts the same
    augmented = _build(_model("s3_accent_cnn_augmented"), (1, 40, 63), 2)
    assert _dropouts(augmented) == [0.2, 0.3] and _count(augmented) == 4_670_466


def test_s3_lstm_steps_over_the_40_coefficients():
    """S3: LSTM(64, sequences) -> LSTM(64) -> Dropout 0.2 -> Dense 128 -> Dropout 0.1 ->
    Dense 2 on a (40, 63) input: 40 steps of 63 features."""
    net = _build(_model("s3_accent_lstm"), (1, 40, 63), 2)
    lstms = _layers(net, nn.LSTM)
    assert [(m.input_size, m.hidden_size, m.bidirectional) for m in lstms] == [
        (63, 64, False),
        (64, 64, False),
    ]
    assert _dense(net) == [(64, 128), (128, 2)]
    assert _dropouts(net) == [0.2, 0.1]
    # Keras: 74,370; torch's LSTM has two bias vectors per layer (4 x 64 extra each)
    assert _count(net) == 74_882 == 74_370 + 2 * 4 * 64


def test_s4_alexnet_krizhevsky_widths_and_dense_4096_x2():
    net = _build(_model("s4_esc50_alexnet"), (3, 224, 224), ESC50)
    convs = _layers(net, nn.Conv2d)
    assert [c.out_channels for c in convs] == [96, 256, 384, 384, 256]
    assert [c.kernel_size[0] for c in convs] == [11, 5, 3, 3, 3] and convs[0].stride == (4, 4)
    assert _dense(net) == [(256 * 5 * 5, 4096), (4096, 4096), (4096, ESC50)]
    assert _count(net) == 46_951_858


def test_s4_vgg16_frozen_with_dense_4096_x2_on_the_flattened_maps():
    net = _build(_model("s4_esc50_vgg16"), (3, 224, 224), ESC50)
    assert [c.out_channels for c in _layers(net.body, nn.Conv2d)] == (
        [64] * 2 + [128] * 2 + [256] * 3 + [512] * 6
    )
    assert _dense(net) == [(512 * 7 * 7, 4096), (4096, 4096), (4096, ESC50)]
    assert _count(net.body) == 14_714_688 and _count(net.body, trainable=True) == 0
    assert _count(net, trainable=True) == 119_750_706 and _count(net) == 134_465_394


@pytest.mark.parametrize(
    ("preset", "width", "backbone", "total"),
    [
        ("s4_esc50_resnet50", 2048, 23_508_032, 23_776_754),
        ("s4_esc50_densenet", 1024, 6_953_856, 7_091_506),
    ],
)
def test_s4_frozen_imagenet_backbones_with_dense_128_and_dropout_05(preset, width, backbone, total):
    cfg = _model(preset)
    assert cfg.weights == "imagenet" and cfg.freeze
    net = _build(cfg, (3, 224, 224), ESC50)
    assert _dense(net) == [(width, 128), (128, ESC50)]
    assert _dropouts(net) == [0.5]
    assert _count(net.body) == backbone and _count(net.body, trainable=True) == 0
    assert _count(net, trainable=True) == width * 128 + 128 + 128 * ESC50 + ESC50
    assert _count(net) == total


def test_s4_final_densenet_pooled_to_one_step_bigru_attention_dense_64():
    """S4's final: DenseNet121 (random init) -> global pool -> ONE step -> Bi-GRU 64 ->
    additive attention -> Dense 64 -> Dropout 0.5 -> 50, on the 128 x 431 log-mel."""
    cfg = _model("s4_esc50_final")
    assert cfg.weights is None and not cfg.freeze
    net = _build(cfg, (1, 128, 431), ESC50)
    assert net.pooled
    (gru,) = _layers(net, nn.GRU)
    assert (gru.input_size, gru.hidden_size, gru.bidirectional) == (1024, 64, True)
    assert _count(gru) == 418_560  # Keras' GRU (reset_after) has both biases too: the same
    assert _count(net.attention) == 128  # Keras' AdditiveAttention scale
    assert _dense(net) == [(128, 64), (64, ESC50)] and _dropouts(net) == [0.5]
    assert _count(net.body) == 6_947_584  # DenseNet121's features on one channel
    assert _count(net) == 7_377_778
    sequence = _build(_model("s4_esc50_final_sequence"), (1, 128, 431), ESC50)
    assert not sequence.pooled and _dropouts(sequence) == [0.5, 0.5]


def test_s4_baselines_knn5_linear_svc_c1_forest_100():
    cfg = _model("s4_esc50_baselines")
    forest = estimator(cfg, regression=False, seed=0)
    assert forest.n_estimators == 100
    knn = estimator(replace(cfg, name="knn"), regression=False, seed=0)
    assert knn[-1].n_neighbors == 5
    svc = estimator(replace(cfg, name="svc"), regression=False, seed=0)
    assert type(svc[-1]).__name__ == "SVC" and svc[-1].kernel == "linear" and svc[-1].C == 1.0
    assert cfg.classical_input == "flat"


def test_s5_parallel_cnn_four_branches_dense_400_200():
    """S5: four Conv2D branches of 200 filters, kernels 12x16 to 30x40, each 2x2 max-pooled
    (floored, as Keras), concatenated; Dense 400 and 200 with batch norm; one linear output;
    on the 128-mel, 6 s at 8 kHz (94 frames) input."""
    net = _build(_model("s5_valence_parallel_cnn"), (1, 128, 94), 1)
    convs = _layers(net, nn.Conv2d)
    assert [(c.out_channels, c.kernel_size) for c in convs] == [
        (200, (12, 16)),
        (200, (18, 24)),
        (200, (24, 32)),
        (200, (30, 40)),
    ]
    maps = (58 * 39) + (55 * 35) + (52 * 31) + (49 * 27)  # each branch's pooled map
    assert _dense(net) == [(200 * maps, 400), (400, 200), (200, 1)]
    assert 200 * maps == 1_424_400
    assert [b.num_features for b in _layers(net, nn.BatchNorm1d)] == [400, 200]
    assert _count(net) == 570_361_201  # trainable; Keras adds 1,200 non-trainable BN stats
