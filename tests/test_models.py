"""Every model family: forward and backward shapes on CPU, side attributes, torchvision
weights from a local file, frozen backbones, and the classical baselines."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from tympan.config import ModelConfig
from tympan.models import build_model
from tympan.models.registry import FAMILIES
from tympan.models.vision import WeightsError

SMALL = {
    "s3_cnn": {"channels": 4, "pool": 4, "hidden": 8},
    "s1_mlp": {"head": (16, 8)},
    "resnet18": {"init": "xavier", "head": (16,)},
    "lstm": {"units": (16, 8), "head": (8,)},
    "bilstm": {"units": (16, 8), "batch_norm": True},
    "gru": {"units": (16,)},
    "bigru": {"units": (16,), "head": (8,)},
    "crnn": {"channels": 4, "kernel": 3, "units": (8, 8)},
    "parallel_cnn": {
        "filters": 4,
        "kernels": ((3, 4), (5, 6)),
        "head": (16, 8),
        "batch_norm": True,
    },
    "alexnet": {"head": (16,)},
    "vgg16": {"head": (16,)},
    "resnet50": {"head": (16,)},
    "densenet121": {"head": (16,)},
    "densenet_bigru_attention": {"units": (8,), "head": (16,)},
}
NEURAL = list(SMALL)
# AlexNet's and VGG's stride and pooling need at least 64 x 64
SHAPES = {"alexnet": (64, 64), "vgg16": (64, 64)}


def _cfg(name: str, **extra) -> ModelConfig:
    return replace(ModelConfig(name=name), **{**SMALL[name], **extra})


def test_every_neural_family_is_tested():
    assert set(NEURAL) | {"logreg", "random_forest", "linear_svm", "knn"} == set(FAMILIES)


@pytest.mark.parametrize("name", NEURAL)
@pytest.mark.parametrize("outputs", [1, 5])
def test_forward_backward_shapes(name, outputs):
    torch.manual_seed(0)
    bins, frames = SHAPES.get(name, (40, 48))
    model = build_model(_cfg(name), (1, bins, frames), outputs)
    x = torch.randn(3, 1, bins, frames, requires_grad=True)
    out = model.train()(x)
    assert out.shape == (3, outputs)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x[:2]), model(x[:2]))  # eval is deterministic


@pytest.mark.parametrize("name", ["s1_mlp", "resnet18", "bigru", "parallel_cnn", "s3_cnn"])
def test_side_attributes_change_the_output(name):
    torch.manual_seed(0)
    vocab = {"language": ["english", "mandarin", "spanish"]}
    model = build_model(_cfg(name, side_dim=8), (1, 40, 48), 2, side_vocab=vocab).eval()
    x = torch.randn(2, 1, 40, 48)
    english, spanish = torch.tensor([[1], [1]]), torch.tensor([[3], [3]])
    with torch.no_grad():
        assert not torch.allclose(model(x, english), model(x, spanish))
    with pytest.raises(ValueError, match="needs side attributes"):
        model(x)


@pytest.mark.parametrize("name", ["alexnet", "vgg16", "resnet50", "densenet121"])
def test_three_channel_images(name):
    model = build_model(_cfg(name), (3, 64, 64), 4)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 4)


def test_local_weights_load_and_frozen_backbone_trains_the_head_only(tmp_path):
    import torchvision

    torch.manual_seed(1)
    source = torchvision.models.densenet121(weights=None)
    path = tmp_path / "densenet121.pt"
    torch.save(source.state_dict(), path)
    model = build_model(_cfg("densenet121", weights=str(path), freeze=True), (1, 64, 64), 3)
    first = model.net.body[0].conv0.weight
    expected = source.features.conv0.weight.sum(dim=1, keepdim=True)
    torch.testing.assert_close(first, expected)  # RGB filters summed for one channel
    assert not any(p.requires_grad for p in model.net.body.parameters())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("net.head") for n in trainable)
    model.train()
    assert not model.net.body.training  # batch-norm statistics stay frozen too
    with pytest.raises(WeightsError, match="is not a file"):
        build_model(_cfg("resnet50", weights=str(tmp_path / "nope.pt")), (1, 64, 64), 3)
    with pytest.raises(WeightsError, match="does not fit torchvision resnet50"):
        build_model(_cfg("resnet50", weights=str(path)), (1, 64, 64), 3)


def test_parallel_cnn_kernel_larger_than_the_input_is_named():
    cfg = _cfg("parallel_cnn", kernels=((50, 4),))
    with pytest.raises(ValueError, match=r"model.kernels: \(50, 4\) is larger than the input"):
        build_model(cfg, (1, 40, 48), 2)


@pytest.mark.parametrize("name", ["logreg", "random_forest", "linear_svm", "knn"])
@pytest.mark.parametrize("summary", [False, True])
def test_classical_baselines_fit_and_round_trip_through_the_state_dict(name, summary):
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 12)
    x = torch.from_numpy(rng.normal(size=(36, 1, 8, 10)) + y[:, None, None, None] * 2).float()
    cfg = replace(
        ModelConfig(name=name), classical_input="summary" if summary else "flat", n_estimators=20
    )
    model = build_model(cfg, (1, 8, 10), 3)
    model.net.fit(model.normalize(x), y, regression=False, seed=0)
    log_p = model(x)
    assert log_p.shape == (36, 3)
    assert (log_p.exp().sum(1) - 1).abs().max() < 1e-4
    assert (log_p.argmax(1).numpy() == y).mean() > 0.9
    fresh = build_model(cfg, (1, 8, 10), 3)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), log_p)
    with pytest.raises(ValueError, match="takes no side attributes"):
        build_model(cfg, (1, 8, 10), 3, side_vocab={"language": ["a"]})


def test_classical_regression_predicts_one_value():
    rng = np.random.default_rng(0)
    target = rng.uniform(1, 5, 40)
    x = torch.from_numpy(rng.normal(size=(40, 1, 4, 6)) + target[:, None, None, None]).float()
    model = build_model(replace(ModelConfig(name="random_forest"), n_estimators=20), (1, 4, 6), 1)
    model.net.fit(model.normalize(x), target, regression=True, seed=0)
    out = model(x)
    assert out.shape == (40, 1)
    assert np.abs(out[:, 0].numpy() - target).mean() < 0.5


class _Planted:
    """Unpickling this writes a marker file: a pickle passed off as a fitted estimator."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).write_text, (self.marker, "code ran on load"))


def test_a_classical_member_never_unpickles_its_blob(tmp_path):
    """The estimator is stored in skops' format and loaded with an allowlist of types: a
    pickle (or a skops file naming another type) in its place is refused, and runs nothing."""
    import pickle

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 10)
    x = torch.from_numpy(rng.normal(size=(20, 1, 4, 6)) + y[:, None, None, None]).float()
    cfg = replace(ModelConfig(name="random_forest"), n_estimators=5)
    model = build_model(cfg, (1, 4, 6), 2)
    model.net.fit(model.normalize(x), y, regression=False, seed=0)
    marker = tmp_path / "pwned"
    state = model.state_dict()
    state["net.blob"] = torch.frombuffer(
        bytearray(pickle.dumps(_Planted(marker))), dtype=torch.uint8
    )
    fresh = build_model(cfg, (1, 4, 6), 2)
    fresh.load_state_dict(state)
    with pytest.raises(Exception):  # noqa: B017 - skops refuses a non-skops file its own way
        fresh(x)
    assert not marker.exists()


def test_a_classical_member_refuses_a_skops_file_with_untrusted_types():
    import os

    import skops.io
    from sklearn.preprocessing import FunctionTransformer

    cfg = replace(ModelConfig(name="logreg"))
    model = build_model(cfg, (1, 4, 6), 2)
    state = model.state_dict()
    hostile = skops.io.dumps(FunctionTransformer(func=os.system))
    state["net.blob"] = torch.frombuffer(bytearray(hostile), dtype=torch.uint8)
    model.load_state_dict(state)
    with pytest.raises(RuntimeError, match="types tympan does not trust"):
        model(torch.zeros(2, 1, 4, 6))
