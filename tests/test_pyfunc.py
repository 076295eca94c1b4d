"""The model package: bundle -> Predictor and MLflow pyfunc save -> load -> predict on batches."""

import base64

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from tympan.serving import PayloadError, Predictor
from tympan.serving.bundle import decode_items
from tympan.serving.pyfunc import AudioModel, example_input, requirements, signature

from audio_helpers import encode, tone


def _clips():
    """Low and high tones in several rates, channel counts and containers."""
    low44 = encode(tone(300, 0.5, 44100), 44100)
    high_stereo = encode(np.stack([tone(3000, 0.7, 22050)] * 2, axis=1), 22050, fmt="FLAC")
    low_ogg = encode(tone(250, 0.4, 16000), 16000, fmt="OGG", subtype="VORBIS")
    high8k = encode(tone(2800, 0.5, 8000), 8000)
    return [low44, high_stereo, low_ogg, high8k], ["low", "high", "low", "high"]


def test_predictor_labels_each_item_and_batch_equals_single(tone_bundle):
    predictor = Predictor.load(tone_bundle)
    clips, expected = _clips()
    batch = predictor.predict_proba(clips)
    single = np.concatenate([predictor.predict_proba([c]) for c in clips])
    np.testing.assert_allclose(batch, single, rtol=1e-5, atol=1e-6)
    assert [predictor.labels[i] for i in batch.argmax(1)] == expected
    answers = predictor.predict(clips)
    assert [a["label"] for a in answers] == expected
    assert all(sum(a["probabilities"].values()) == pytest.approx(1.0) for a in answers)


def test_payload_errors_name_the_item():
    good = base64.b64encode(encode(tone(300, 0.2, 8000), 8000)).decode()
    with pytest.raises(PayloadError, match="item 1: 'audio' is not valid base64"):
        decode_items([good, "%%% not base64 %%%"])
    with pytest.raises(PayloadError, match="item 0: empty audio"):
        decode_items([""])
    with pytest.raises(PayloadError, match="must be a base64 string, got int"):
        decode_items([good, good, 7])


def _save(bundle, path):
    """Save the pyfunc exactly as register logs it (signature, example, pinned requirements)."""
    mlflow.pyfunc.save_model(
        path,
        python_model=AudioModel(),
        artifacts={"bundle": str(bundle)},
        signature=signature(),
        input_example=example_input(8000),
        pip_requirements=requirements(),
    )
    return path


def test_pyfunc_round_trip(tone_bundle, tmp_path):
    path = _save(tone_bundle, tmp_path / "model")
    model = mlflow.pyfunc.load_model(str(path))
    clips, expected = _clips()
    frame = pd.DataFrame({"audio": [base64.b64encode(c).decode() for c in clips]})
    out = model.predict(frame)
    assert list(out.columns) == ["label", "probabilities"]
    assert out["label"].tolist() == expected
    direct = Predictor.load(tone_bundle).predict(clips)
    for row, ref in zip(out["probabilities"], direct, strict=True):
        assert row == pytest.approx(ref["probabilities"], rel=1e-5)

    with pytest.raises(MlflowException, match="item 2: not decodable audio") as err:
        bad = frame.copy()
        bad.loc[2, "audio"] = base64.b64encode(b"this is not a sound file").decode()
        model.predict(bad)
    assert err.value.get_http_status_code() == 400
    with pytest.raises(MlflowException, match="audio"):
        model.predict(pd.DataFrame({"sound": ["x"]}))


def test_logged_input_example_serves(tone_bundle, tmp_path):
    from mlflow.models import validate_serving_input
    from mlflow.models.utils import load_serving_example

    path = _save(tone_bundle, tmp_path / "model")
    out = validate_serving_input(str(path), load_serving_example(str(path)))
    assert len(out) == 2 and set(out["label"]) <= {"low", "high"}
