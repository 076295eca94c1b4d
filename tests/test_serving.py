"""The registered champion served by the real `mlflow models serve` on 127.0.0.1.

The model declares the side attribute `speaker` (as S1's models use `language`), so every
request carries it, and the server runs with a 1 MiB item limit to test the limit over HTTP.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import soundfile as sf

from tympan import stages
from tympan.config import load_params
from tympan.serving import Predictor

from audio_helpers import encode
from conftest import REPO, free_port, fsdd_subset, run_to_evaluate

pytestmark = pytest.mark.integration

SILENCE_WAV = encode(np.zeros(8000, dtype=np.float32), 8000)

MODEL = "tympan-fsdd-test"
SPEAKERS = ["jackson", "nicolas", "george"]
LIMIT_MB = "1"


@pytest.fixture(scope="module")
def served(tmp_path_factory, fsdd_root):
    """Train a small FSDD model through the stages, register it, and serve @champion."""
    tmp = tmp_path_factory.mktemp("serve")
    root = fsdd_subset(fsdd_root, tmp / "fsdd", SPEAKERS, range(0, 12))
    params = load_params(REPO / "pipelines" / "fsdd.yaml")
    params = replace(
        params,
        data=replace(params.data, root=str(root)),
        model=replace(params.model, side_attributes=("speaker",)),
        train=replace(params.train, seeds=(0, 1), epochs=4),
        register=replace(params.register, name=MODEL),
        tracking=replace(params.tracking, experiment="serving-test"),
    )
    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        run_to_evaluate(params, tmp)
        stages.run_register(
            params,
            tmp / "models",
            tmp / "metrics",
            tmp / "split.json",
            tmp / "test_set.json",
            tmp / "registered.json",
            tmp / "card.md",
        )
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved

    port = free_port()
    log = open(tmp / "server.log", "w")  # noqa: SIM115 - closed after the server stops
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "models",
            "serve",
            "-m",
            f"models:/{MODEL}@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env={**os.environ, "MLFLOW_TRACKING_URI": uri, "TYMPAN_MAX_ITEM_MB": LIMIT_MB},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        if server.poll() is not None:
            tail = (tmp / "server.log").read_text()[-3000:]
            pytest.fail(f"mlflow models serve exited {server.returncode}:\n{tail}")
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(
                f"server not ready after 240 s:\n{(tmp / 'server.log').read_text()[-3000:]}"
            )
        time.sleep(1)
    yield url, Predictor.load(tmp / "models" / "bundle.pt")
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)
    log.close()


def _clips(fsdd_root: Path) -> tuple[list[bytes], list[str]]:
    """Unseen FSDD recordings (takes 40+) of the trained speakers, as files and one re-encoded
    at 44.1 kHz stereo FLAC; and each clip's speaker."""
    meta = pd.read_csv(fsdd_root / "metadata.csv")
    meta = meta[meta["speaker"].isin(SPEAKERS) & (meta["take"] >= 40)]
    picked = meta.groupby("digit").head(1).head(6)
    clips = [(fsdd_root / f).read_bytes() for f in picked["filename"]]
    speakers = [*picked["speaker"], picked["speaker"].iloc[0]]
    wave, rate = sf.read(fsdd_root / picked["filename"].iloc[0], dtype="float32")
    t_old = np.arange(len(wave)) / rate
    t_new = np.arange(int(len(wave) * 44100 / rate)) / 44100
    upsampled = np.interp(t_new, t_old, wave).astype(np.float32)
    clips.append(encode(np.stack([upsampled, upsampled], axis=1), 44100, fmt="FLAC"))
    return clips, speakers


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_served_predictions_match_in_process_predict(served, fsdd_root):
    url, predictor = served
    clips, speakers = _clips(fsdd_root)
    expected = predictor.predict(clips, {"speaker": speakers})
    for body in (
        {"inputs": {"audio": [_b64(c) for c in clips], "speaker": speakers}},
        {
            "dataframe_split": {
                "columns": ["audio", "speaker"],
                "data": [[_b64(c), s] for c, s in zip(clips, speakers, strict=True)],
            }
        },
    ):
        response = requests.post(f"{url}/invocations", json=body, timeout=60)
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        assert len(predictions) == len(clips)
        for got, want in zip(predictions, expected, strict=True):
            assert got["label"] == want["label"]
            assert got["windows"] == 1
            assert got["probabilities"] == pytest.approx(want["probabilities"], rel=1e-4, abs=1e-6)
    # the resampled stereo copy of clip 0 gets the same answer as the original
    assert predictions[-1]["label"] == predictions[0]["label"]


def test_long_recording_is_windowed_over_http(served, fsdd_root):
    url, predictor = served
    clips, speakers = _clips(fsdd_root)
    waves = [sf.read(io.BytesIO(c), dtype="float32")[0] for c in clips[:5]]
    long = encode(np.concatenate(waves), 8000)  # about 2 s of several digits
    expected = predictor.predict([long], {"speaker": [speakers[0]]})[0]
    assert expected["windows"] > 1
    body = {"inputs": {"audio": [_b64(long)], "speaker": [speakers[0]]}}
    response = requests.post(f"{url}/invocations", json=body, timeout=60)
    assert response.status_code == 200, response.text
    (got,) = response.json()["predictions"]
    assert got["windows"] == expected["windows"]
    assert got["probabilities"] == pytest.approx(expected["probabilities"], rel=1e-4, abs=1e-6)


def _oversized() -> str:
    """A valid WAV just over the server's 1 MiB item limit (about 33 s at 16 kHz)."""
    return _b64(encode(np.zeros(600_000, dtype=np.float32), 16000))


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (
            {"inputs": {"audio": ["%%%not-base64%%%"], "speaker": ["george"]}},
            "item 0: 'audio' is not valid base64",
        ),
        (
            {"inputs": {"audio": [_b64(b"hello, I am not a sound")], "speaker": ["george"]}},
            "item 0: not decodable audio",
        ),
        ({"inputs": {"audio": [""], "speaker": ["george"]}}, "item 0: empty audio"),
        (
            {"inputs": {"audio": [_oversized()], "speaker": ["george"]}},
            "item 0: larger than the 1 MiB limit",
        ),
        ({"inputs": {"audio": [_b64(SILENCE_WAV)]}}, "missing side attribute 'speaker'"),
        (
            {"inputs": {"audio": [_b64(SILENCE_WAV)], "speaker": ["yweweler"]}},
            "item 0: unknown speaker 'yweweler' (known: george, jackson, nicolas)",
        ),
        ({"inputs": {"sound": ["AAAA"]}}, "audio"),
        ({"instances": 42}, ""),
    ],
)
def test_bad_payloads_get_400_and_the_server_keeps_serving(served, fsdd_root, body, needle):
    url, _ = served
    response = requests.post(f"{url}/invocations", json=body, timeout=60)
    assert 400 <= response.status_code < 500, response.text
    assert needle in response.json()["message"]
    clips, speakers = _clips(fsdd_root)
    good = {"inputs": {"audio": [_b64(clips[0])], "speaker": speakers[:1]}}
    assert requests.post(f"{url}/invocations", json=good, timeout=60).status_code == 200


def test_bad_second_item_is_named(served, fsdd_root):
    url, _ = served
    clips, speakers = _clips(fsdd_root)
    good = _b64(clips[0])
    response = requests.post(
        f"{url}/invocations",
        json={"inputs": {"audio": [good, "@@"], "speaker": speakers[:2]}},
        timeout=60,
    )
    assert response.status_code == 400
    assert "item 1" in response.json()["message"]


def test_not_json_is_rejected(served):
    url, _ = served
    response = requests.post(
        f"{url}/invocations",
        data="this is not json",
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert 400 <= response.status_code < 500


def test_client_posts_files_and_reports_errors(served, fsdd_root, tmp_path, capsys):
    from tympan.serving import client

    url, predictor = served
    meta = pd.read_csv(fsdd_root / "metadata.csv")
    files = [fsdd_root / f for f in meta[meta["take"] == 45]["filename"].head(3)]
    client.main([*map(str, files), "--url", f"{url}/invocations", "--side", "speaker=george"])
    lines = capsys.readouterr().out.strip().splitlines()
    expected = predictor.predict([f.read_bytes() for f in files], {"speaker": ["george"] * 3})
    assert [line.split(": ")[1].split(" ")[0] for line in lines] == [e["label"] for e in expected]
    (tmp_path / "bad.wav").write_text("not audio")
    with pytest.raises(SystemExit, match=r"400.*item 0: not decodable audio"):
        client.main(
            [str(tmp_path / "bad.wav"), "--url", f"{url}/invocations", "--side", "speaker=george"]
        )
    with pytest.raises(SystemExit, match="cannot reach"):
        client.main([str(files[0]), "--url", f"http://127.0.0.1:{free_port()}/invocations"])
