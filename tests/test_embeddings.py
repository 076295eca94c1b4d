"""Frozen encoder embeddings as a cached feature set (issue 16, item 2): computed once at
featurize, keyed by the encoder's weights hash, reused when nothing changed, and a head trained
on them without ever running the encoder again."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_encoders import _tiny_transformers

from tympan.config import (
    EncoderConfig,
    FeatureConfig,
    ModelConfig,
    StackConfig,
    TrainConfig,
    params_from_dict,
)
from tympan.features import build_cache, open_cache
from tympan.features.stack import FeatureStack, _encoder
from tympan.training import fit

from audio_helpers import tone, write

RATE = 16_000


def _tones(folder, n=36):
    """Low (200-400 Hz) vs high (1.5-3 kHz) tones at random gains, 0.5 s at 16 kHz."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        label = "low" if i % 2 else "high"
        freq = rng.uniform(200, 400) if label == "low" else rng.uniform(1500, 3000)
        path = write(folder / f"{i}.wav", tone(freq, 0.5, RATE, amp=rng.uniform(0.1, 0.9)), RATE)
        rows.append(
            {
                "path": str(path),
                "label": label,
                "group": str(i),
                "split": ["train", "train", "train", "train", "val", "test"][(i // 2) % 6],
                "sha256": f"{i:064x}",
            }
        )
    return pd.DataFrame(rows)


def save_trained(path, cfg, model, cache, net, encoder: dict | None) -> Path:
    """`save_bundle` of one trained member `net` on `cache` (its labels, input shape and train
    statistics), with the encoder export `encoder`."""
    from tympan.serving.bundle import save_bundle

    save_bundle(
        path,
        cfg,
        model,
        cache.labels,
        tuple(cache.features.shape[1:]),
        cache.mean,
        cache.std,
        {0: net.state_dict()},
        encoder=encoder,
    )
    return path


def _features(encoder: EncoderConfig, **stack) -> FeatureConfig:
    return FeatureConfig(
        sample_rate=RATE,
        seconds=0.5,
        dtype="float32",
        stack=StackConfig(kinds=("embedding",), encoder=encoder, **stack),
    )


def test_embeddings_are_cached_once_keyed_by_the_weights_and_reused(tmp_path, capsys):
    _tiny_transformers("wav2vec2", tmp_path / "w2v")
    encoder = EncoderConfig(source="transformers", name=str(tmp_path / "w2v"))
    cfg = _features(encoder)
    table = _tones(tmp_path / "audio", n=12)
    cache = build_cache(table, cfg, tmp_path / "cache")
    assert cache.features.shape == (12, 1, 32, 3)  # (clips, 1, dim, layers: embeddings + 2)
    frontend = FeatureStack(cfg, cfg.stack)
    waves = torch.stack([torch.from_numpy(tone(300, 0.5, RATE))] * 2)
    assert frontend(waves).shape == (2, 1, 32, 3)
    key = json.loads((tmp_path / "cache" / "meta.json").read_text())["sets"]["embedding"]["key"]
    assert "embedding reused" not in capsys.readouterr().out

    # the same params again: the set is copied from the cache it replaces, no encoder run
    again = build_cache(table, cfg, tmp_path / "cache")
    assert "featurize: embedding reused" in capsys.readouterr().out
    np.testing.assert_array_equal(np.asarray(again.features), np.asarray(cache.features))

    # other weights under the same directory name: another hash, so the set is computed again
    import transformers as tf

    model = tf.AutoModel.from_pretrained(tmp_path / "w2v")
    with torch.no_grad():
        model.feature_projection.projection.weight.mul_(2.0)
    model.save_pretrained(tmp_path / "w2v")
    _encoder.cache_clear()
    changed = build_cache(table, cfg, tmp_path / "cache")
    out = capsys.readouterr().out
    assert "embedding reused" not in out and "computing embedding" in out
    if key is not None:
        assert (
            json.loads((tmp_path / "cache" / "meta.json").read_text())["sets"]["embedding"] != key
        )
    assert not np.allclose(np.asarray(changed.features), np.asarray(cache.features))


def test_a_head_on_cached_crepe_embeddings_learns_and_never_runs_the_encoder(tmp_path, monkeypatch):
    cfg = _features(EncoderConfig(source="crepe", name="tiny", hop_s=0.05), layers="last")
    cache = build_cache(_tones(tmp_path / "audio"), cfg, tmp_path / "cache")
    assert cache.features.shape == (36, 1, 256, 1)

    def no_encoder(*args, **kwargs):
        raise AssertionError("training ran the encoder")

    monkeypatch.setattr("tympan.encoders.load_encoder", no_encoder)
    _encoder.cache_clear()
    cache = open_cache(tmp_path / "cache")
    model = ModelConfig(name="embedding_head", head=(), dropout=0.0)
    result = fit(
        cache, model, TrainConfig(epochs=15, batch_size=8, lr=3e-3), 0, torch.device("cpu")
    )
    losses = [e.train_loss for e in result.history]
    assert losses[-1] < losses[0] * 0.7
    assert result.history[result.best_epoch - 1].val["val_accuracy"] >= 0.8


def test_layer_weights_start_equal_and_are_learnt():
    from tympan.models.dense import EmbeddingHead

    head = EmbeddingHead(ModelConfig(name="embedding_head", head=(8,)), (1, 16, 4), 2)
    torch.testing.assert_close(head.layer_weights, torch.full((4,), 0.25))
    x = torch.zeros(6, 1, 16, 4)
    x[:3, 0, 0, 2], x[3:, 0, 0, 2] = 5.0, -5.0  # only layer 2 tells the classes apart
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(x), y).backward()
        opt.step()
    assert head.layer_weights.argmax() == 2


def test_embedding_params_are_checked(tmp_path):
    crepe = {"source": "crepe", "name": "tiny"}
    with pytest.raises(Exception, match=r"needs stack\.encoder"):
        params_from_dict({"features": {"stack": {"kinds": ["embedding"]}}})
    with pytest.raises(Exception, match="stands alone"):
        params_from_dict(
            {"features": {"stack": {"kinds": ["logmel", "embedding"], "encoder": crepe}}}
        )
    with pytest.raises(Exception, match="would need the encoder at every batch"):
        params_from_dict(
            {
                "features": {"seconds": 1.0, "stack": {"kinds": ["embedding"], "encoder": crepe}},
                "augment": {"time_masks": 2, "time_mask_width": 2},
            }
        )
    cfg = _features(EncoderConfig(source="crepe", name="tiny"))
    with pytest.raises(ValueError, match="the encoder's own rate, 16000 Hz"):
        FeatureStack(replace(cfg, sample_rate=8000), cfg.stack)


@pytest.mark.parametrize("kind", ["transformers", "crepe"])
def test_the_bundle_carries_the_encoder_and_serves_what_training_computed(tmp_path, kind):
    from tympan.config import Params
    from tympan.serving.bundle import Predictor
    from tympan.serving.pyfunc import requirements
    from tympan.stages import _encoder_export
    from tympan.training import predict

    if kind == "transformers":
        _tiny_transformers("wav2vec2", tmp_path / "w2v")
        spec = EncoderConfig(source="transformers", name=str(tmp_path / "w2v"))
    else:
        spec = EncoderConfig(source="crepe", name="tiny", hop_s=0.05)
    cfg = _features(spec)
    table = _tones(tmp_path / "audio", n=12)
    cache = build_cache(table, cfg, tmp_path / "cache")
    model = ModelConfig(name="embedding_head", head=(8,), dropout=0.0)
    result = fit(cache, model, TrainConfig(epochs=2, batch_size=4), 0, torch.device("cpu"))
    params = replace(Params(), features=cfg, model=model)
    exported = _encoder_export(params, cache)
    save_trained(tmp_path / "bundle.pt", cfg, model, cache, result.model, exported)
    expected = predict(
        result.model, cache.features, np.arange(len(table)), 256, torch.device("cpu")
    )

    # the serving side has no source to read: the model's own copy of the weights is used
    shutil.rmtree(tmp_path / "w2v", ignore_errors=True)
    _encoder.cache_clear()
    monkey = pytest.MonkeyPatch()
    monkey.setattr("tympan.encoders.load_encoder", lambda *a: pytest.fail("read the source"))
    try:
        predictor = Predictor.load(tmp_path / "bundle.pt")
        served = predictor.predict_proba(table["path"].tolist())
    finally:
        monkey.undo()
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-5)
    assert predictor.encoder["hash"] == exported["hash"]
    needs = {r.split("==")[0] for r in requirements(exported)}
    assert ({"transformers", "safetensors"} if kind == "transformers" else {"torchcrepe"}) <= needs

    # a damaged copy is refused, naming the encoder
    from tympan.encoders import from_export

    damaged = {**exported, "state": {k: v.clone() for k, v in exported["state"].items()}}
    first = next(k for k, v in damaged["state"].items() if v.is_floating_point())
    damaged["state"][first] += 1.0
    with pytest.raises(ValueError, match="does not hash to what was exported"):
        from_export(damaged)


def test_two_served_models_naming_one_encoder_keep_their_own_weights(tmp_path):
    """Two bundles made from the same encoder directory, its weights changed in between, served
    side by side in one process: each computes with its own copy."""
    from tympan.serving.bundle import Predictor

    _tiny_transformers("wav2vec2", tmp_path / "w2v")
    cfg = _features(EncoderConfig(source="transformers", name=str(tmp_path / "w2v")))
    table = _tones(tmp_path / "audio", n=12)
    model = ModelConfig(name="embedding_head", head=(), dropout=0.0)
    hashes, expected = [], []
    for version in ("a", "b"):
        if version == "b":  # other weights under the same name
            import transformers as tf

            changed = tf.AutoModel.from_pretrained(tmp_path / "w2v")
            with torch.no_grad():
                changed.feature_projection.projection.weight.mul_(3.0)
            changed.save_pretrained(tmp_path / "w2v")
            _encoder.cache_clear()
        cache = build_cache(table, cfg, tmp_path / f"cache-{version}")
        result = fit(cache, model, TrainConfig(epochs=1, batch_size=4), 0, torch.device("cpu"))
        encoder = _encoder(cfg.stack.encoder)
        hashes.append(encoder.weights_hash)
        save_trained(tmp_path / f"{version}.pt", cfg, model, cache, result.model, encoder.export())
        expected.append(Predictor.load(tmp_path / f"{version}.pt").predict_proba(table["path"]))
    assert hashes[0] != hashes[1]
    first, second = (Predictor.load(tmp_path / f"{v}.pt") for v in ("a", "b"))
    assert first.frontend.encoder.weights_hash == hashes[0]
    assert second.frontend.encoder.weights_hash == hashes[1]
    np.testing.assert_allclose(first.predict_proba(table["path"]), expected[0], rtol=1e-5)
    np.testing.assert_allclose(second.predict_proba(table["path"]), expected[1], rtol=1e-5)


# 40 s: the fine-tuned transformers model goes through `mlflow models serve` in the default run
# (test_finetune), and CREPE's in-process parity and declared requirements are tested here and
# in test_deploy
@pytest.mark.slow
@pytest.mark.integration
def test_a_registered_embedding_model_serves_over_http_as_in_process(tmp_path, fsdd_root):
    """FSDD through the stages on CREPE-tiny embeddings, registered, then `mlflow models serve`:
    the same answers as the in-process predictor, a long recording windowed the same way."""

    from tympan.config import load_params

    from conftest import REPO, assert_served_as_in_process, fsdd_subset, register_through_stages

    root = fsdd_subset(fsdd_root, tmp_path / "fsdd", ["jackson", "george"], range(0, 8))
    params = load_params(REPO / "pipelines" / "fsdd.yaml")
    stack = StackConfig(
        kinds=("embedding",),
        encoder=EncoderConfig(source="crepe", name="tiny", hop_s=0.05),
        layers="last",
    )
    params = replace(
        params,
        data=replace(params.data, root=str(root)),
        features=replace(params.features, sample_rate=RATE, stack=stack),
        model=ModelConfig(name="embedding_head", head=(32,), dropout=0.1),
        augment=replace(params.augment, time_shift=0.0, time_masks=0, freq_masks=0),
        train=replace(params.train, seeds=(0,), epochs=3),
        register=replace(params.register, name="tympan-crepe-test"),
        tracking=replace(params.tracking, experiment="embedding-serve-test"),
    )
    uri = register_through_stages(params, tmp_path)
    card = (tmp_path / "card.md").read_text()
    assert "- Encoder: crepe tiny" in card and "weights sha256" in card

    assert_served_as_in_process("tympan-crepe-test", uri, tmp_path, root)


def test_the_embeddings_benchmark_reports_every_figure(tmp_path):
    """benchmarks/embeddings.py on a few FSDD clips: extraction, cached and uncached head
    epochs, a fine-tuning epoch; a hub id not in the cache is a line, not a failure. (The
    figures themselves are in the README; nothing asserts a time.)"""
    import os
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "rows.json"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "embeddings.py"),
            *("--encoders", "w2v-tiny", "--hub", "facebook/wav2vec2-base"),
            *("--clips", "8", "--epochs", "1", "--every-epochs", "1", "--device", "cpu"),
            *("--json", str(out)),
        ],
        env={**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": ""},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "hub:facebook/wav2vec2-base: skipped, encoder 'facebook/wav2vec2-base'" in done.stdout
    (row,) = json.loads(out.read_text())
    assert (row["encoder"], row["weights"], row["dim"], row["layers"]) == (
        "w2v-tiny",
        "random",
        32,
        3,
    )
    for key in ("clips_per_s", "cached_epoch_s", "every_epoch_s", "finetune_epoch_s"):
        assert row[key] > 0, key
