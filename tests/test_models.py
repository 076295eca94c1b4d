"""Every model family: forward and backward shapes on CPU, side attributes, torchvision
weights from a local file or torchvision's cache (hash-checked), frozen backbones, and the
classical baselines."""

from __future__ import annotations

import re
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
    "pooled_cnn": {"channels": 4, "kernel": 3, "head": (8,)},
    "parallel_cnn": {
        "filters": 4,
        "kernels": ((3, 4), (5, 6)),
        "head": (16, 8),
        "batch_norm": True,
    },
    "alexnet": {"head": (16,)},
    "alexnet2012": {"head": (16, 16)},
    "vgg16": {"head": (16,)},
    "resnet50": {"head": (16,)},
    "densenet121": {"head": (16,)},
    "densenet_bigru_attention": {"units": (8,), "head": (16,)},
    "embedding_head": {"head": (8,)},
}
NEURAL = list(SMALL)
# AlexNet's and VGG's stride and pooling need at least 64 x 64 (S4's AlexNet 67 x 67)
SHAPES = {"alexnet": (64, 64), "alexnet2012": (67, 67), "vgg16": (64, 64)}
# the other forms some families take (model.steps, model.pooling)
VARIANTS = [
    ("lstm", {"steps": "bins", "head_dropout": 0.1}),
    ("bigru", {"steps": "bins"}),
    ("densenet_bigru_attention", {"steps": "pooled"}),
    ("densenet121", {"pooling": "flatten"}),
]


def _cfg(name: str, **extra) -> ModelConfig:
    return replace(ModelConfig(name=name), **{**SMALL[name], **extra})


def test_every_neural_family_is_tested():
    classical = {"logreg", "random_forest", "linear_svm", "svc", "knn"}
    # finetune is built around a pretrained encoder: tests/test_finetune.py
    assert set(NEURAL) | classical | {"finetune"} == set(FAMILIES)


@pytest.mark.parametrize(
    ("name", "variant"), [(n, {}) for n in NEURAL] + VARIANTS, ids=lambda v: str(v or "")
)
@pytest.mark.parametrize("outputs", [1, 5])
def test_forward_backward_shapes(name, variant, outputs):
    torch.manual_seed(0)
    bins, frames = SHAPES.get(name, (40, 48))
    model = build_model(_cfg(name, **variant), (1, bins, frames), outputs)
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


@pytest.mark.parametrize("name", ["logreg", "random_forest", "linear_svm", "svc", "knn"])
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


def test_steps_that_do_not_apply_are_named():
    with pytest.raises(ValueError, match=r"model\.steps=pooled does not apply to lstm"):
        build_model(_cfg("lstm", steps="pooled"), (1, 40, 48), 2)
    with pytest.raises(ValueError, match=r"model\.steps=bins does not apply to densenet_bigru"):
        build_model(_cfg("densenet_bigru_attention", steps="bins"), (1, 64, 64), 2)
    with pytest.raises(ValueError, match="at least 67 x 67"):
        build_model(_cfg("alexnet2012"), (3, 64, 64), 2)
    with pytest.raises(ValueError, match="alexnet2012 has no published weights"):
        build_model(_cfg("alexnet2012", weights="imagenet"), (3, 67, 67), 2)
    with pytest.raises(ValueError, match=r"leaves a 2 x 3 map, smaller than model.pool=4"):
        build_model(_cfg("parallel_cnn", kernels=((39, 46),), pool=4), (1, 40, 48), 2)


def test_bins_as_steps_reads_one_step_per_bin():
    """`steps: bins` (S3's LSTM): the sequence runs over the bins, each step the frames; a
    change confined to the last bin changes only the last step."""
    from tympan.models.recurrent import bins_as_sequence

    x = torch.arange(2 * 1 * 4 * 3, dtype=torch.float32).view(2, 1, 4, 3)
    seq = bins_as_sequence(x)
    assert seq.shape == (2, 4, 3)
    torch.testing.assert_close(seq[1, 2], x[1, 0, 2])


def test_the_pooled_attention_passes_its_one_step_through():
    """S4's final form: the globally pooled maps are one step; Keras' AdditiveAttention over
    one step has weight 1, so the head sees the GRU's output itself."""
    torch.manual_seed(0)
    model = build_model(_cfg("densenet_bigru_attention", steps="pooled"), (1, 64, 64), 3).eval()
    net = model.net
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        pooled = net.body(model.normalize(x)).mean(dim=(2, 3))
        seq, _ = net.gru(pooled[:, None])
        torch.testing.assert_close(net.attention(seq), seq)
        torch.testing.assert_close(model(x), net.head(seq[:, 0]))
    two = torch.randn(2, 5, 16)  # over several steps it is a softmax-weighted mix
    attention = type(net.attention)(16)
    mixed = attention(two)
    assert mixed.shape == two.shape and not torch.allclose(mixed, two)


def test_svc_scores_follow_its_own_predictions():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1, 2], 10)
    x = torch.from_numpy(rng.normal(size=(30, 1, 4, 5)) + y[:, None, None, None] * 0.7).float()
    model = build_model(ModelConfig(name="svc"), (1, 4, 5), 3)
    model.net.fit(model.normalize(x), y, regression=False, seed=0)
    svc = model.net.fitted
    assert svc[-1].kernel == "linear" and svc[-1].C == 1.0
    predicted = svc.predict(model.net.inputs(model.normalize(x)))
    np.testing.assert_array_equal(model(x).argmax(1).numpy(), predicted)
    binary = build_model(ModelConfig(name="svc"), (1, 4, 5), 2)
    binary.net.fit(binary.normalize(x[:20]), y[:20], regression=False, seed=0)
    inputs = binary.net.inputs(binary.normalize(x[:20]))
    np.testing.assert_array_equal(
        binary(x[:20]).argmax(1).numpy(), binary.net.fitted.predict(inputs)
    )


# --- ImageNet weights from torchvision's cache (weights made on the spot) -----------------


@pytest.fixture
def made_up_imagenet(tmp_path, monkeypatch):
    """A random DenseNet121 state dict saved in torchvision's published form (old layer
    names) under TORCH_HOME as the file name whose hash prefix is its own sha256's, with the
    published URL pointed at that name. -> (source network, cache file)."""
    import hashlib

    import torchvision

    from tympan.models import weights

    torch.manual_seed(2)
    source = torchvision.models.densenet121(weights=None)
    published = {}
    for key, value in source.state_dict().items():  # norm1 -> norm.1, as the file has them
        if key.endswith("num_batches_tracked"):  # not in the published file either
            continue
        key = re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", key)
        published[key] = value
    blob = tmp_path / "blob.pth"
    torch.save(published, blob)
    prefix = hashlib.sha256(blob.read_bytes()).hexdigest()[:8]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = f"https://download.pytorch.org/models/densenet121-{prefix}.pth"
    monkeypatch.setattr(weights, "published_url", lambda name: url)
    return source, blob


def test_published_urls_carry_the_hash_prefix():
    from tympan.models import weights

    assert weights.published_url("densenet121").endswith("/densenet121-a639ec97.pth")
    assert weights.hash_prefix(weights.published_url("densenet121")) == "a639ec97"
    for name in ("alexnet", "vgg16", "resnet50"):
        assert len(weights.hash_prefix(weights.published_url(name))) >= 8


def test_imagenet_weights_load_from_the_cache_after_their_hash_is_checked(made_up_imagenet):
    import shutil

    from tympan.models import weights

    source, blob = made_up_imagenet
    cfg = _cfg("densenet121", weights="imagenet", freeze=True)
    with pytest.raises(WeightsError) as missing:
        build_model(cfg, (3, 64, 64), 3)
    path = weights.cache_path("densenet121")
    assert str(path) in str(missing.value) and "tympan weights fetch densenet121" in str(
        missing.value
    )
    assert path.parent == weights.cache_dir() and "torch/hub/checkpoints" in str(path)
    path.parent.mkdir(parents=True)
    shutil.copyfile(blob, path)
    model = build_model(cfg, (3, 64, 64), 3)
    torch.testing.assert_close(model.net.body[0].conv0.weight, source.features.conv0.weight)
    layer = model.net.body[0].denseblock1.denselayer1
    torch.testing.assert_close(
        layer.norm1.running_mean, source.features.denseblock1.denselayer1.norm1.running_mean
    )
    # the same file under a path of its own is checked too, by its published name
    assert build_model(replace(cfg, weights=str(path)), (3, 64, 64), 3) is not None
    path.write_bytes(path.read_bytes()[:-1] + b"x")  # damaged
    with pytest.raises(WeightsError, match="does not match the published"):
        build_model(cfg, (3, 64, 64), 3)


def test_weights_fetch_downloads_into_the_cache_and_checks_the_hash(made_up_imagenet, monkeypatch):
    import shutil

    from tympan.cli import main
    from tympan.models import weights

    _, blob = made_up_imagenet
    asked = []

    def download(url, dst, hash_prefix=None, progress=True):
        asked.append(url)
        shutil.copyfile(served, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    served = tmp = blob.with_name("wrong.pth")
    tmp.write_bytes(b"not the weights")
    with pytest.raises(WeightsError, match="does not match the published"):
        weights.fetch("densenet121")
    assert not any(weights.cache_dir().iterdir())  # nothing half-fetched is left
    served = blob
    path = weights.fetch("densenet121")
    assert path == weights.cache_path("densenet121") and path.read_bytes() == blob.read_bytes()
    assert asked == [weights.published_url("densenet121")] * 2
    main(["weights", "where", "densenet121"])  # present and intact: no error


def test_a_served_model_needs_no_weights_file(made_up_imagenet, tmp_path):
    """The bundle holds every weight: the predictor does not read model.weights again."""
    import shutil

    from tympan.config import FeatureConfig, StackConfig
    from tympan.models import weights
    from tympan.serving.bundle import Predictor, save_bundle

    _, blob = made_up_imagenet
    path = weights.cache_path("densenet121")
    path.parent.mkdir(parents=True)
    shutil.copyfile(blob, path)
    features = FeatureConfig(
        sample_rate=8000,
        seconds=0.5,
        n_fft=256,
        hop_length=128,
        stack=StackConfig(image=(32, 32), image_channels=3),
    )
    cfg = _cfg("densenet121", weights="imagenet", freeze=True)
    model = build_model(cfg, (3, 32, 32), 2)
    bundle = tmp_path / "bundle.pt"
    mean, std = np.zeros(32, np.float32), np.ones(32, np.float32)
    save_bundle(bundle, features, cfg, ["a", "b"], (3, 32, 32), mean, std, {0: model.state_dict()})
    path.unlink()
    predictor = Predictor.load(bundle)
    torch.testing.assert_close(
        predictor.members[0].state_dict()["net.head.0.weight"],
        model.state_dict()["net.head.0.weight"],
    )
