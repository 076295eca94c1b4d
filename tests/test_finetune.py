"""Fine-tuning a pretrained encoder end to end (issue 16, item 3) with tiny encoders made on the
spot: `model.name: finetune` on `features.stack.kinds: [waveform]`, the encoder's own learning
rate and layer-wise decay, a frozen feature encoder, gradient checkpointing, SpecAugment-style
masking, exact resume, and a served model that computes what training computed."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from test_embeddings import RATE, _tones
from test_encoders import _tiny_torchaudio_config, _tiny_transformers

from tympan.config import (
    EncoderConfig,
    FeatureConfig,
    ModelConfig,
    StackConfig,
    TrainConfig,
    params_from_dict,
)
from tympan.encoders import load_encoder, spec_masked
from tympan.features import build_cache
from tympan.features.stack import _encoder
from tympan.models import build_model
from tympan.training import fit
from tympan.training.loop import SeedTrainer

# a feature encoder striding 80 samples (wav2vec2's own: 320): 200 frames a second, not 1,600,
# keeps the tiny model's attention cheap enough to fine-tune in a test
COARSE = {"conv_kernel": (10, 8), "conv_stride": (10, 8)}


def _features(encoder: EncoderConfig, **stack) -> FeatureConfig:
    return FeatureConfig(
        sample_rate=RATE,
        seconds=0.5,
        dtype="float32",
        stack=StackConfig(kinds=("waveform",), encoder=encoder, **stack),
    )


@pytest.fixture(scope="module")
def w2v(tmp_path_factory):
    folder = tmp_path_factory.mktemp("w2v") / "tiny"
    torch.manual_seed(0)
    _tiny_transformers("wav2vec2", folder, **COARSE)
    return EncoderConfig(source="transformers", name=str(folder))


@pytest.fixture(scope="module")
def tone_waves(tmp_path_factory, w2v):
    folder = tmp_path_factory.mktemp("finetune")
    return build_cache(_tones(folder / "audio", n=24), _features(w2v), folder / "cache")


def _model(**extra) -> ModelConfig:
    return ModelConfig(**{"name": "finetune", "head": (), "dropout": 0.0, **extra})


def test_the_waveform_set_is_the_clip_at_the_encoders_rate(tone_waves, w2v, tmp_path):
    assert tone_waves.features.shape == (24, 1, 1, RATE // 2)
    assert "encoder" not in tone_waves.meta  # the clips do not depend on the weights
    first = np.asarray(tone_waves.features[np.array([0])])[0, 0, 0]
    assert np.abs(first).max() > 0.05  # audio, not a normalised or empty set
    # float32 even where features.dtype stores spectral sets in float16 (params.yaml's)
    table = _tones(tmp_path / "audio", n=6)
    half = build_cache(table, replace(_features(w2v), dtype="float16"), tmp_path / "half")
    assert half.features.sets["waveform"].dtype == np.float32
    rows = np.arange(6)
    read = np.asarray(half.features[rows])
    assert read.dtype == np.float32
    np.testing.assert_array_equal(read, np.asarray(tone_waves.features[rows]))


def test_fine_tuning_trains_the_encoder_and_lowers_the_loss(tone_waves, w2v):
    train = TrainConfig(epochs=4, batch_size=6, lr=3e-3, seeds=(0,))
    frozen = load_encoder(w2v)
    result = fit(tone_waves, _model(encoder_lr=1e-3), train, 0, torch.device("cpu"), progress=False)
    losses = [e.train_loss for e in result.history]
    assert losses[-1] < losses[0] * 0.8, losses
    encoder = result.model.net.encoder.model
    before = dict(frozen.model.named_parameters())
    moved = [n for n, p in encoder.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("encoder.layers.") for n in moved)  # the transformer was trained
    # the convolutional feature encoder stays as pretrained (freeze_feature_encoder)
    assert not any(n.startswith("feature_extractor.") for n in moved)
    # and the process's shared frozen copy (featurize's) was not touched
    shared = _encoder(w2v)
    for name, param in shared.model.named_parameters():
        torch.testing.assert_close(param, before[name])


def test_encoder_lr_and_layer_decay_give_each_depth_its_rate(tone_waves, w2v):
    model = build_model(
        _model(encoder_lr=1e-4, layer_decay=0.5, freeze_feature_encoder=False),
        (1, 1, RATE // 2),
        2,
        features=tone_waves.feature_config,
    )
    groups = model.param_groups(1e-2)
    assert groups[0]["lr"] == 1e-2  # the head (and layer weights) at train.lr
    head = {id(p) for p in model.net.head.parameters()}
    assert head <= {id(p) for p in groups[0]["params"]}
    rates = [g["lr"] for g in groups[1:]]
    # depth 0 (feature encoder, projection, positional conv), layers 1 and 2 (the top)
    assert rates == pytest.approx([2.5e-5, 5e-5, 1e-4])
    named = {id(p): n for n, p in model.net.encoder.named_parameters()}
    bottom = {named[id(p)] for p in groups[1]["params"]}
    assert any(n.startswith("model.feature_extractor.") for n in bottom)
    top = {named[id(p)] for p in groups[3]["params"]}
    layer1 = {n for n in named.values() if n.startswith("model.encoder.layers.1.")}
    assert layer1 <= top and not any(".layers.0." in n or "feature_extractor" in n for n in top)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups for p in g["params"]) == trainable


def test_gradient_checkpointing_gives_the_same_gradients(tone_waves, w2v):
    x = torch.from_numpy(np.asarray(tone_waves.features[np.arange(4)]))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(
            _model(gradient_checkpointing=checkpointing),
            (1, 1, RATE // 2),
            2,
            features=tone_waves.feature_config,
        ).eval()  # no dropout: the two passes draw nothing
        model.net.encoder.model.train()  # checkpointing acts in training mode only
        model.net.encoder.model.config.layerdrop = 0.0
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        model(x).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)
    crepe = FeatureConfig(
        sample_rate=RATE,
        stack=StackConfig(kinds=("waveform",), encoder=EncoderConfig(source="crepe", name="tiny")),
    )
    with pytest.raises(ValueError, match="does not support it"):
        build_model(_model(gradient_checkpointing=True), (1, 1, RATE), 2, features=crepe)


def test_masking_acts_in_training_only_and_is_the_models_own_for_wav2vec2(tone_waves, w2v):
    x = torch.from_numpy(np.asarray(tone_waves.features[np.arange(3)]))
    model = build_model(
        _model(mask_time_prob=0.3), (1, 1, RATE // 2), 2, features=tone_waves.feature_config
    )
    config = model.net.encoder.model.config
    assert (config.mask_time_prob, config.apply_spec_augment) == (0.3, True)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    # training mode: wav2vec2's own SpecAugment replaces frames with its learnt mask vector
    encoder = model.net.encoder.model
    seen = {}
    hook = encoder.encoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(h=args[0].detach().clone()), with_kwargs=True
    )
    encoder.train()
    with torch.no_grad():
        model.net.encoder(x[:, 0, 0])
    hook.remove()
    masked = (seen["h"] == encoder.masked_spec_embed.detach()).all(dim=-1)
    assert masked.any() and not masked.all()


def test_spectrogram_masking_for_ast_and_whisper_inputs():
    torch.manual_seed(0)
    x = torch.randn(4, 100, 32) + 5.0  # (batch, frames, bins), as AST's extractor gives
    out = spec_masked(x, 1, 0.2, 0.2)
    zero = out == 0
    frames, bins = zero.all(dim=2), zero.all(dim=1)
    assert frames.any(dim=1).all() and bins.any(dim=1).all()  # every clip, both axes
    assert 0.05 < frames.float().mean() < 0.35
    kept = ~zero
    assert torch.equal(out[kept], x[kept])
    transposed = spec_masked(x.transpose(1, 2), 2, 0.2, 0.0)  # Whisper's (batch, bins, frames)
    assert (transposed == 0).all(dim=1).any(dim=1).all()
    assert not (transposed == 0).all(dim=2).any()


def test_ast_fine_tunes_with_tympans_masking(tmp_path):
    _tiny_transformers("ast", tmp_path / "ast")
    features = _features(EncoderConfig(source="transformers", name=str(tmp_path / "ast")))
    model = build_model(
        _model(mask_time_prob=0.2, mask_feature_prob=0.2), (1, 1, RATE // 2), 2, features=features
    )
    assert model.net.encoder.spec_mask == (0.2, 0.2)
    x = torch.randn(2, 1, 1, RATE // 2) * 0.1
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()  # the tiny AST has no dropout: what differs is the masking
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))
    model(x).sum().backward()
    trained = [n for n, p in model.net.encoder.named_parameters() if p.grad is not None]
    assert any(".layers.1." in n for n in trained)
    depths = {model.net.encoder.layer_index(n) for n in trained}
    assert depths == {0, 1, 2}  # patch embeddings, two layers (hidden states skip the last norm)


def test_a_torchaudio_encoder_fine_tunes_with_its_feature_encoder_frozen(tmp_path):
    from torchaudio.models import wav2vec2_model

    config = _tiny_torchaudio_config()
    torch.manual_seed(0)
    torch.save(
        {"config": config, "state_dict": wav2vec2_model(**config).state_dict()},
        tmp_path / "tiny.pt",
    )
    spec = EncoderConfig(source="torchaudio", name="WAV2VEC2_BASE", path=str(tmp_path / "tiny.pt"))
    model = build_model(_model(layer_decay=0.8), (1, 1, RATE // 2), 3, features=_features(spec))
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(".feature_extractor." in n for n in frozen)
    model.train()
    model(torch.randn(2, 1, 1, RATE // 2) * 0.1).sum().backward()
    layer = model.net.encoder.model.encoder.transformer.layers[1]
    assert layer.attention.k_proj.weight.grad is not None
    assert [g["lr"] for g in model.param_groups(1e-3)][1:] == pytest.approx([6.4e-4, 8e-4, 1e-3])


def test_fine_tuning_resumes_exactly_with_masking_on(tone_waves, w2v, tmp_path):
    train = TrainConfig(epochs=2, batch_size=8, lr=2e-3, seeds=(0,))
    model = _model(mask_time_prob=0.2)
    cpu = torch.device("cpu")
    whole = fit(tone_waves, model, train, 0, cpu, progress=False)
    trainer = SeedTrainer(tone_waves, model, train, 0, cpu, checkpoint=tmp_path / "c.pt")
    trainer.step()
    np.random.seed(123)  # anything else drawing from numpy's global generator in between
    torch.manual_seed(123)
    resumed = fit(tone_waves, model, train, 0, cpu, progress=False, checkpoint=tmp_path / "c.pt")
    assert resumed.resumed_at == 1
    assert [e.train_loss for e in resumed.history] == pytest.approx(
        [e.train_loss for e in whole.history], rel=1e-5
    )


def test_finetune_params_are_checked():
    base = {
        "features": {"sample_rate": RATE, "stack": {"kinds": ["waveform"]}},
        "model": {"name": "finetune"},
        "augment": {"time_shift": 0.0, "time_masks": 0, "freq_masks": 0},
    }
    with pytest.raises(ValueError, match=r"needs features.stack.encoder"):
        params_from_dict(base)
    encoder = {"source": "crepe", "name": "tiny"}
    stack = {"kinds": ["waveform"], "encoder": encoder}
    ok = {**base, "features": {"sample_rate": RATE, "stack": stack}}
    assert params_from_dict(ok).model.name == "finetune"
    with pytest.raises(ValueError, match=r"is for model\.name: finetune"):
        build_model(ModelConfig(), (1, 1, 8000), 2, features=_features(EncoderConfig()))
    with pytest.raises(ValueError, match=r"takes features\.stack\.kinds: \[waveform\]"):
        params_from_dict({**ok, "features": {"stack": {"kinds": ["logmel"]}}})
    with pytest.raises(ValueError, match="masking is for transformers encoders"):
        params_from_dict({**ok, "model": {"name": "finetune", "mask_time_prob": 0.1}})
    with pytest.raises(ValueError, match=r"augment\.time_masks act on log-mel frames"):
        params_from_dict({**ok, "augment": {"time_masks": 2, "time_mask_width": 4}})
    with pytest.raises(ValueError, match=r"waveform .* stands alone"):
        params_from_dict({**ok, "features": {"stack": {**stack, "kinds": ["waveform", "zcr"]}}})
    wrong_rate = replace(_features(EncoderConfig(source="crepe", name="tiny")), sample_rate=8000)
    with pytest.raises(ValueError, match="encoder's own rate, 16000 Hz"):
        build_model(_model(), (1, 1, 4000), 2, features=wrong_rate)


@pytest.mark.integration
def test_a_registered_fine_tuned_model_serves_over_http_as_in_process(tmp_path, fsdd_root):
    """FSDD through the stages with a tiny wav2vec2 fine-tuned end to end, registered, its
    source directory deleted, then `mlflow models serve`: the same answers as in process, a
    long recording windowed the same way; the bundle holds the architecture once and the
    tuned weights in each member, the card and registry name the starting weights."""
    import shutil

    import mlflow

    from tympan.config import load_params
    from tympan.serving import Predictor
    from tympan.serving.pyfunc import requirements

    from conftest import REPO, assert_served_as_in_process, fsdd_subset, register_through_stages

    torch.manual_seed(0)
    _tiny_transformers("wav2vec2", tmp_path / "w2v", **COARSE)
    start = load_encoder(EncoderConfig(source="transformers", name=str(tmp_path / "w2v")))
    root = fsdd_subset(fsdd_root, tmp_path / "fsdd", ["jackson", "george"], range(0, 5))
    params = load_params(REPO / "pipelines" / "fsdd.yaml")
    encoder = EncoderConfig(source="transformers", name=str(tmp_path / "w2v"))
    params = replace(
        params,
        data=replace(params.data, root=str(root)),
        features=replace(
            params.features,
            sample_rate=RATE,
            stack=StackConfig(kinds=("waveform",), encoder=encoder, layers="last"),
        ),
        model=_model(head=(16,), encoder_lr=5e-4, layer_decay=0.8, mask_time_prob=0.1),
        augment=replace(params.augment, time_shift=0.0, time_masks=0, freq_masks=0),
        train=replace(params.train, seeds=(0, 1), epochs=2, batch_size=16),
        register=replace(params.register, name="tympan-finetune-test"),
        tracking=replace(params.tracking, experiment="finetune-serve-test"),
    )
    uri = register_through_stages(params, tmp_path)
    card = (tmp_path / "card.md").read_text()
    assert f"weights sha256 `{start.weights_hash}` (fine-tuned from these weights" in card
    bundle = torch.load(tmp_path / "models" / "bundle.pt", weights_only=True)
    assert "state" not in bundle["encoder"] and bundle["encoder"]["hash"] == start.weights_hash
    key = "net.encoder.model.encoder.layers.1.attention.k_proj.weight"
    tuned = [member[key] for member in bundle["members"].values()]
    assert not torch.equal(tuned[0], start.model.encoder.layers[1].attention.k_proj.weight)
    assert not torch.equal(tuned[0], tuned[1])  # each seed fine-tuned its own copy
    client = mlflow.MlflowClient(uri)
    version = client.get_model_version_by_alias("tympan-finetune-test", "champion")
    assert version.tags["tympan.encoder_finetuned"] == "true"
    assert version.tags["tympan.encoder_sha256"] == start.weights_hash
    assert {"transformers", "safetensors"} <= {
        r.split("==")[0] for r in requirements(bundle["encoder"])
    }

    shutil.rmtree(tmp_path / "w2v")  # the served model needs no file but its own
    _encoder.cache_clear()
    assert_served_as_in_process("tympan-finetune-test", uri, tmp_path, root)

    # in process, the bundle's model computes what the trained member computed
    from tympan.features import open_cache

    cache = open_cache(tmp_path / "features")
    rows = cache.rows("test")[:3]
    x = torch.from_numpy(np.asarray(cache.features[rows]))
    member = Predictor.load(tmp_path / "models" / "bundle.pt").members[0]
    trained = build_model(
        params.model, (1, 1, RATE), len(cache.labels), features=params.features, encoder=start
    )
    trained.load_state_dict(bundle["members"]["0"])
    with torch.no_grad():
        torch.testing.assert_close(member(x), trained.eval()(x))
