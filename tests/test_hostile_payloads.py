"""Hostile and careless requests against the served model in-process (`Predictor`, the pyfunc).

Each refusal names the item and the limit, and a refusal that the header can decide costs the
header: the tests replace the decoder with one that fails the test if it is reached. The same
cases over HTTP, against the real servers, are in test_serving.py.
"""

from __future__ import annotations

import base64
import pickle
from fractions import Fraction
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from tympan.audio import resample, resample_ratio, resampled_length
from tympan.audio.io import MAX_RATIO_PRODUCT, MAX_RATIO_TERM
from tympan.serving import PayloadError, Predictor
from tympan.serving import bundle as bundle_module
from tympan.serving.bundle import Limits, decode_items
from tympan.serving.pyfunc import MODEL_CODE, AudioModel, RequestRefused, signature

from audio_helpers import encode, tone, truncated, with_rate

USUAL_RATES = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000, 192000)
FEATURE_RATES = (8000, 16000, 22050, 32000, 44100, 48000)


@pytest.fixture
def no_decoding(monkeypatch):
    """Any decode of a request item fails the test: the refusal must come from the header."""

    def refuse(source):
        raise AssertionError("a request item was decoded before the header check refused it")

    monkeypatch.setattr(bundle_module, "decode", refuse)


def _hour_of_flac() -> bytes:
    """An hour of a constant signal at 1 kHz: about 11 kB of FLAC."""
    return encode(np.full(3600 * 1000, 0.3, dtype=np.float32), 1000, fmt="FLAC")


def _hour_of_8bit_200hz() -> bytes:
    """The probe's 0.69 MiB hour: 8-bit samples at 200 Hz."""
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, 3600 * 200).astype(np.float32)
    return encode(noise, 200, subtype="PCM_U8")


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (
            lambda: with_rate(encode(tone(440, 0.05, 16000), 16000), 1_000_003),
            "item 1: sample rate 1000003 Hz is outside 1000-384000 Hz",
        ),
        (_hour_of_8bit_200hz, "item 1: sample rate 200 Hz is outside 1000-384000 Hz"),
        (_hour_of_flac, "item 1: 3600.0 s of audio is over the 600 s limit per item"),
        (lambda: None, "item 1: truncated: header declares"),
    ],
)
def test_refusals_from_the_header_never_decode(tone_bundle, no_decoding, tmp_path, make, needle):
    predictor = Predictor.load(tone_bundle)
    item = make()
    if item is None:
        item = truncated(tmp_path / "cut.wav").read_bytes()
    good = encode(tone(300, 0.5, 8000), 8000)
    with pytest.raises(PayloadError, match=needle.replace("(", r"\(")):
        predictor.predict([good, item])


def test_request_audio_adds_up_to_a_limit(tone_bundle, monkeypatch, no_decoding):
    monkeypatch.setenv("TYMPAN_MAX_AUDIO_S", "60")
    monkeypatch.setenv("TYMPAN_MAX_REQUEST_AUDIO_S", "100")
    predictor = Predictor.load(tone_bundle)
    assert predictor.limits == Limits(100 * 2**20, 60.0, 100.0)
    minute = encode(np.full(50 * 1000, 0.3, dtype=np.float32), 1000, fmt="FLAC")
    with pytest.raises(PayloadError, match=r"items 0-2 hold 150.0 s of audio, over the 100 s"):
        predictor.predict([minute, minute, minute])


def test_default_limits_follow_the_windows(tone_bundle):
    predictor = Predictor.load(tone_bundle)  # 0.5 s windows every 0.5 s
    expected = 0.5 + (bundle_module.DEFAULT_MAX_WINDOWS - 1) * 0.5
    assert predictor.limits.item_audio_s == pytest.approx(expected)
    assert predictor.limits.request_audio_s == pytest.approx(4 * expected)


def test_a_bad_limit_in_the_environment_is_named(tone_bundle, monkeypatch):
    monkeypatch.setenv("TYMPAN_MAX_AUDIO_S", "-5")
    with pytest.raises(ValueError, match="TYMPAN_MAX_AUDIO_S='-5' must be a positive number"):
        Predictor.load(tone_bundle)


def test_a_coprime_rate_is_served_at_a_bounded_ratio(tone_bundle):
    """The probe's 16,001 Hz header took 34 s and 5.4 GB; it now costs a usual clip."""
    predictor = Predictor.load(tone_bundle)
    clip = encode(tone(300, 0.5, 8000), 8000)
    (usual,) = predictor.predict_proba([clip])
    (odd,) = predictor.predict_proba([with_rate(clip, 8001)])
    np.testing.assert_allclose(odd, usual, atol=0.02)


@pytest.mark.parametrize("orig", USUAL_RATES)
@pytest.mark.parametrize("new", FEATURE_RATES)
def test_usual_rate_pairs_resample_exactly(orig, new):
    got = Fraction(*resample_ratio(orig, new))
    assert got == Fraction(orig, new)


@pytest.mark.parametrize("orig", [1000, 1009, 16001, 44099, 96001, 191999, 383999, 384000])
@pytest.mark.parametrize("new", [8000, 16000, 22050, 44100])
def test_any_allowed_rate_pair_has_a_small_kernel_and_a_close_ratio(orig, new):
    o, n = resample_ratio(orig, new)
    assert o * n <= MAX_RATIO_PRODUCT or max(o, n) <= MAX_RATIO_TERM
    assert abs(Fraction(o, n) / Fraction(orig, new) - 1) < 1e-3
    frames = 3 * orig // 10
    out = resample(torch.zeros(frames), orig, new)
    assert out.shape[-1] == resampled_length(frames, orig, new)


def test_a_tone_keeps_its_pitch_through_an_odd_rate():
    rate = 16001
    t = np.arange(rate) / rate
    wave = torch.from_numpy(np.sin(2 * np.pi * 1000 * t).astype(np.float32))
    out = resample(wave, rate, 16000).numpy()
    spectrum = np.abs(np.fft.rfft(out * np.hanning(len(out))))
    peak_hz = np.argmax(spectrum) * 16000 / len(out)
    assert peak_hz == pytest.approx(1000, abs=1.5)


@pytest.mark.parametrize(
    ("wave", "needle"),
    [
        (np.full(4000, 1e30, dtype=np.float32), "item 1: extreme amplitude: peak +600.0 dBFS"),
        (np.full(4000, np.nan, dtype=np.float32), "item 1: contains NaN or infinite samples"),
    ],
)
def test_extreme_amplitude_is_refused(tone_bundle, wave, needle):
    predictor = Predictor.load(tone_bundle)
    good = encode(tone(300, 0.5, 8000), 8000)
    with pytest.raises(PayloadError, match=needle.replace("+", r"\+")):
        predictor.predict([good, encode(wave, 8000, subtype="FLOAT")])


def test_a_float_clip_over_full_scale_is_still_served(tone_bundle):
    predictor = Predictor.load(tone_bundle)
    loud = encode(tone(300, 0.5, 8000, amp=2.0), 8000, subtype="FLOAT")  # +6 dBFS
    (answer,) = predictor.predict([loud])
    assert answer["label"] == "low"
    assert all(np.isfinite(list(answer["probabilities"].values())))


def test_base64_with_line_breaks_or_the_url_safe_alphabet_is_accepted():
    clip = encode(tone(300, 0.3, 8000), 8000)
    gnu = base64.encodebytes(clip).decode()  # a line break every 76 characters
    url_safe = base64.urlsafe_b64encode(clip).decode().rstrip("=")
    assert "\n" in gnu and ("-" in url_safe or "_" in url_safe)
    assert decode_items([gnu, url_safe, base64.b64encode(clip).decode()]) == [clip] * 3
    with pytest.raises(PayloadError, match="item 0: 'audio' is not valid base64"):
        decode_items(["abc*def"])


def test_refused_request_keeps_its_own_message():
    """MLflow's scoring server prefixes a predict error with the whole request; ours stays."""
    refused = RequestRefused("item 3: sample rate 200 Hz is outside 1000-384000 Hz")
    refused.message = f"Failed to predict data '{'A' * 10_000_000}'. \nError: {refused.message}"
    assert refused.message == "item 3: sample rate 200 Hz is outside 1000-384000 Hz"
    assert len(refused.serialize_as_json()) < 300
    assert refused.get_http_status_code() == 400


def _save(bundle: Path, path: Path) -> Path:
    mlflow.pyfunc.save_model(
        path,
        python_model=str(MODEL_CODE),
        artifacts={"bundle": str(bundle)},
        signature=signature(),
    )
    return path


class _Planted:
    """Unpickling this writes a marker file: what a replaced model pickle would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran on load"))


def test_the_model_loads_without_unpickling_code(tone_bundle, tmp_path):
    path = _save(tone_bundle, tmp_path / "model")
    assert not [p for p in path.rglob("*") if p.suffix in (".pkl", ".pickle", ".cloudpickle")]
    flavor = yaml.safe_load((path / "MLmodel").read_text())["flavors"]["python_function"]
    assert "model_code_path" in flavor and "python_model" not in flavor
    # whoever can write the artifact store plants a pickle where MLflow keeps one
    marker = tmp_path / "pwned"
    (path / "python_model.pkl").write_bytes(pickle.dumps(_Planted(marker)))
    model = mlflow.pyfunc.load_model(str(path))
    clip = base64.b64encode(encode(tone(300, 0.5, 8000), 8000)).decode()
    assert model.predict(pd.DataFrame({"audio": [clip]}))["label"].tolist() == ["low"]
    assert not marker.exists()
    assert isinstance(model.unwrap_python_model(), AudioModel)
