"""The model package: bundle -> Predictor and MLflow pyfunc save -> load -> predict on batches."""

import base64
import socket

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from tympan.features import window_starts
from tympan.serving import PayloadError, Predictor
from tympan.serving.bundle import decode_items
from tympan.serving.pyfunc import (
    MODEL_CODE,
    example_input,
    no_delay_on_listeners,
    requirements,
    signature,
)

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
    side_vocab = Predictor.load(bundle).side_vocab
    mlflow.pyfunc.save_model(
        path,
        python_model=str(MODEL_CODE),
        artifacts={"bundle": str(bundle)},
        signature=signature(tuple(side_vocab)),
        input_example=example_input(8000, side_vocab),
        pip_requirements=requirements(),
    )
    return path


def test_pyfunc_round_trip(tone_bundle, tmp_path):
    path = _save(tone_bundle, tmp_path / "model")
    model = mlflow.pyfunc.load_model(str(path))
    clips, expected = _clips()
    frame = pd.DataFrame({"audio": [base64.b64encode(c).decode() for c in clips]})
    out = model.predict(frame)
    assert list(out.columns) == ["label", "probabilities", "windows"]
    assert out["label"].tolist() == expected
    assert out["windows"].tolist() == [1, 1, 1, 1]  # clips of training length are one window
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


def test_payload_size_limit_comes_from_the_environment(monkeypatch):
    clip = encode(tone(300, 1.0, 16000), 16000)  # 32 kB
    monkeypatch.setenv("TYMPAN_MAX_ITEM_MB", "0.01")
    with pytest.raises(PayloadError, match=r"item 1: larger than the 0.01 MiB limit"):
        decode_items([base64.b64encode(encode(tone(300, 0.05, 8000), 8000)).decode(), clip])
    monkeypatch.setenv("TYMPAN_MAX_ITEM_MB", "1")
    assert decode_items([clip]) == [clip]


@pytest.mark.parametrize(
    ("length", "window", "hop", "min_last", "starts"),
    [
        (3000, 4000, 2000, 0.5, [0]),  # shorter than a window: padded like training
        (6000, 4000, 2000, 0.5, [0]),  # up to window + hop: one window, cropped like training
        (8000, 4000, 2000, 0.5, [0, 2000, 4000]),  # tiles exactly: no extra window
        (9000, 4000, 2000, 0.5, [0, 2000, 4000, 6000]),  # tail holds 3000 >= 2000 samples
        (9000, 4000, 2000, 0.8, [0, 2000, 4000]),  # tail of 3000 < 3200: dropped
    ],
)
def test_window_starts(length, window, hop, min_last, starts):
    assert window_starts(length, window, hop, min_last) == starts


def test_long_recording_is_windowed_and_averaged(tone_bundle):
    predictor = Predictor.load(tone_bundle)  # 0.5 s windows, hop 0.5 s, at 8 kHz
    wave = np.concatenate([tone(300, 1.5, 8000), tone(3000, 1.5, 8000)])  # 3 s: 6 windows
    (answer,) = predictor.predict([encode(wave, 8000)])
    assert answer["windows"] == 6
    pieces = [encode(wave[i : i + 4000], 8000) for i in range(0, 24000, 4000)]
    per_window = predictor.predict_proba(pieces)
    assert [predictor.labels[i] for i in per_window.argmax(1)] == ["low"] * 3 + ["high"] * 3
    np.testing.assert_allclose(
        list(answer["probabilities"].values()), per_window.mean(0), rtol=1e-4, atol=1e-5
    )


def test_side_attributes_are_required_and_checked(tone_side_bundle, tmp_path):
    predictor = Predictor.load(tone_side_bundle)
    assert predictor.side_vocab == {"mic": ["a", "b"]}
    clips, _ = _clips()
    answers = predictor.predict(clips, {"mic": ["a", "b", "b", "a"]})
    assert len(answers) == 4
    with pytest.raises(PayloadError, match="missing side attribute 'mic'"):
        predictor.predict(clips)
    with pytest.raises(PayloadError, match=r"item 2: unknown mic 'c' \(known: a, b\)"):
        predictor.predict(clips, {"mic": ["a", "b", "c", "a"]})
    with pytest.raises(PayloadError, match="item 1: missing side attribute 'mic'"):
        predictor.predict(clips, {"mic": ["a", None, "a", "a"]})

    path = _save(tone_side_bundle, tmp_path / "model")
    model = mlflow.pyfunc.load_model(str(path))
    frame = pd.DataFrame(
        {"audio": [base64.b64encode(c).decode() for c in clips], "mic": ["a", "b", "b", "a"]}
    )
    out = model.predict(frame)
    assert out["label"].tolist() == [a["label"] for a in answers]
    with pytest.raises(MlflowException, match="missing side attribute 'mic'") as err:
        model.predict(frame[["audio"]])
    assert err.value.get_http_status_code() == 400


def test_logged_input_example_with_side_attributes_serves(tone_side_bundle, tmp_path):
    from mlflow.models import validate_serving_input
    from mlflow.models.utils import load_serving_example

    path = _save(tone_side_bundle, tmp_path / "model")
    assert '"mic"' in load_serving_example(str(path))
    out = validate_serving_input(str(path), load_serving_example(str(path)))
    assert len(out) == 2


def test_each_serving_worker_takes_its_share_of_the_cores(monkeypatch, tmp_path):
    """torch threads per worker: the usable cores over the workers (from TYMPAN_SERVE_WORKERS,
    else the parent's `--workers N`, as uvicorn's supervisor has it), unless set explicitly."""
    import os

    from tympan.serving import pyfunc

    cores = len(os.sched_getaffinity(0))
    for name in (pyfunc.WORKERS_ENV, pyfunc.THREADS_ENV, "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(pyfunc.WORKERS_ENV, "2")
    assert pyfunc.worker_threads() == max(1, cores // 2)
    monkeypatch.setenv(pyfunc.WORKERS_ENV, "64")
    assert pyfunc.worker_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert pyfunc.worker_threads() == 3
    monkeypatch.setenv(pyfunc.THREADS_ENV, "5")
    assert pyfunc.worker_threads() == 5

    # no variable: the parent's command line, as `mlflow models serve --workers 2` starts it
    for name in (pyfunc.WORKERS_ENV, pyfunc.THREADS_ENV, "OMP_NUM_THREADS"):
        monkeypatch.delenv(name)
    cmdline = tmp_path / "cmdline"
    cmdline.write_bytes(b"uvicorn\0--port\x005001\0--workers\x002\0mlflow.app:app\0")
    real = pyfunc.Path

    def fake(path, *rest):
        return real(cmdline) if str(path).startswith("/proc/") else real(path, *rest)

    monkeypatch.setattr(pyfunc, "Path", fake)
    assert pyfunc.server_workers() == 2
    cmdline.write_bytes(b"uvicorn\0--workers=4\0app\0")
    assert pyfunc.server_workers() == 4
    cmdline.write_bytes(b"python\0-m\0pytest\0")
    assert pyfunc.server_workers() == 1


def test_a_bound_server_socket_gets_no_delay_and_its_connections_inherit_it():
    """uvicorn --workers N binds its socket with protocol 0, which asyncio does not recognise
    as TCP: without TCP_NODELAY on it, every reply waited ~40 ms for a delayed ACK."""
    bound = socket.socket(socket.AF_INET)  # as uvicorn's bind_socket makes it: protocol 0
    bound.bind(("127.0.0.1", 0))
    other = socket.create_server(("127.0.0.1", 0))
    outgoing = socket.create_connection(other.getsockname())  # a client's: left alone
    try:
        assert bound.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        assert no_delay_on_listeners() >= 2
        assert bound.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert outgoing.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        bound.listen()
        with socket.create_connection(bound.getsockname()):
            accepted, _ = bound.accept()
            with accepted:  # what a worker answers on
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        for s in (bound, other, outgoing):
            s.close()
