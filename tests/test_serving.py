"""The registered champion served by the real `mlflow models serve` and `tympan serve` on
127.0.0.1.

The model declares the side attribute `speaker` (as S1's models use `language`), so every
request carries it, and the servers run with a 1 MiB item limit to test the limit over HTTP
(`tympan serve` also with a 2 MiB request limit). Hostile cases: every refusal is a 4xx of a
few hundred bytes naming the item and the limit, and the server answers a good request after.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
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

from tympan.config import load_params
from tympan.serving import Predictor

from audio_helpers import encode, tone, with_rate
from conftest import REPO, free_port, fsdd_subset, register_through_stages

pytestmark = pytest.mark.integration

SILENCE_WAV = encode(np.zeros(8000, dtype=np.float32), 8000)

MODEL = "tympan-fsdd-test"
SPEAKERS = ["jackson", "nicolas", "george"]
LIMIT_MB = "1"
REQUEST_LIMIT_MB = "2"


@pytest.fixture(scope="module")
def registered(tmp_path_factory, fsdd_root):
    """Train a small FSDD model through the stages and register it: -> (folder, tracking URI)."""
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
    return tmp, register_through_stages(params, tmp)


def _start(command: list[str], env: dict[str, str], log_path: Path) -> tuple[str, object]:
    """Start a server on a free 127.0.0.1 port and wait for /ping: -> (url, process)."""
    port = free_port()
    log = open(log_path, "w")  # noqa: SIM115 - closed with the process by _stop
    server = subprocess.Popen(
        [*command, "-p", str(port)],
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server.log = log
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        if server.poll() is not None:
            pytest.fail(f"{command[0]} exited {server.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return url, server
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"server not ready after 240 s:\n{log_path.read_text()[-3000:]}")
        time.sleep(1)


def _stop(server) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)
    server.log.close()


@pytest.fixture(scope="module")
def served(registered):
    """`mlflow models serve` of @champion, with a 1 MiB item limit."""
    tmp, uri = registered
    bin_dir = Path(sys.executable).parent
    url, server = _start(
        [
            *(str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion"),
            *("--env-manager", "local", "-h", "127.0.0.1"),
        ],
        {"MLFLOW_TRACKING_URI": uri, "TYMPAN_MAX_ITEM_MB": LIMIT_MB},
        tmp / "mlflow-server.log",
    )
    yield url, Predictor.load(tmp / "models" / "bundle.pt")
    _stop(server)


@pytest.fixture(scope="module")
def guarded(registered):
    """`tympan serve` of @champion: the same app behind the request guard (2 MiB bodies)."""
    tmp, uri = registered
    bin_dir = Path(sys.executable).parent
    url, server = _start(
        [str(bin_dir / "tympan"), "serve", "-m", f"models:/{MODEL}@champion"],
        {
            "MLFLOW_TRACKING_URI": uri,
            "TYMPAN_MAX_ITEM_MB": LIMIT_MB,
            "TYMPAN_MAX_REQUEST_MB": REQUEST_LIMIT_MB,
        },
        tmp / "tympan-server.log",
    )
    yield url, Predictor.load(tmp / "models" / "bundle.pt")
    _stop(server)


@pytest.fixture(params=["mlflow models serve", "tympan serve"])
def server(request):
    """Each case that the model itself decides runs against both servers."""
    return request.getfixturevalue("served" if request.param.startswith("mlflow") else "guarded")


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


def test_served_predictions_match_in_process_predict(server, fsdd_root):
    url, predictor = server
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
def test_bad_payloads_get_400_and_the_server_keeps_serving(server, fsdd_root, body, needle):
    url, _ = server
    response = requests.post(f"{url}/invocations", json=body, timeout=60)
    assert 400 <= response.status_code < 500, response.text
    assert needle in response.json()["message"]
    clips, speakers = _clips(fsdd_root)
    good = {"inputs": {"audio": [_b64(clips[0])], "speaker": speakers[:1]}}
    assert requests.post(f"{url}/invocations", json=good, timeout=60).status_code == 200


def test_bad_second_item_is_named(server, fsdd_root):
    url, _ = server
    clips, speakers = _clips(fsdd_root)
    good = _b64(clips[0])
    response = requests.post(
        f"{url}/invocations",
        json={"inputs": {"audio": [good, "@@"], "speaker": speakers[:2]}},
        timeout=60,
    )
    assert response.status_code == 400
    assert "item 1" in response.json()["message"]


def test_not_json_is_rejected(server):
    url, _ = server
    response = requests.post(
        f"{url}/invocations",
        data="this is not json",
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert 400 <= response.status_code < 500


def _folder(fsdd_root: Path, folder: Path) -> tuple[list[Path], Path]:
    """Three unseen FSDD clips in `folder/clips/`, plus a file that is not audio."""
    meta = pd.read_csv(fsdd_root / "metadata.csv")
    names = meta[meta["take"] == 45]["filename"].head(3)
    (folder / "clips").mkdir(parents=True)
    files = []
    for name in names:
        files.append(folder / "clips" / Path(name).name)
        files[-1].write_bytes((fsdd_root / name).read_bytes())
    bad = folder / "clips" / "zz_bad.wav"
    bad.write_text("not audio")
    return sorted(files), bad


def test_client_posts_files_and_folders_and_reports_errors(served, fsdd_root, tmp_path, capsys):
    from tympan.serving import client

    url, predictor = served
    files, bad = _folder(fsdd_root, tmp_path)
    bad.unlink()
    client.main(
        [str(tmp_path / "clips"), "--url", f"{url}/invocations", "--side", "speaker=george"]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    expected = predictor.predict([f.read_bytes() for f in files], {"speaker": ["george"] * 3})
    assert [line.split(": ")[0] for line in lines] == [str(f) for f in files]
    assert [line.split(": ")[1].split(" ")[0] for line in lines] == [e["label"] for e in expected]
    bad.write_text("not audio")
    long_reason = r"^400: item 3: not decodable audio \(.*\)$"  # the whole message, not cut
    with pytest.raises(SystemExit, match=long_reason):
        client.main(
            [str(tmp_path / "clips"), "--url", f"{url}/invocations", "--side", "speaker=george"]
        )
    with pytest.raises(SystemExit, match="cannot reach"):
        client.main([str(files[0]), "--url", f"http://127.0.0.1:{free_port()}/invocations"])


def test_the_client_starts_without_torch():
    code = "import sys, tympan.serving.client; print(sorted(set(sys.modules) & {'torch', 'numpy'}))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.slow  # over 20 s; run with -m slow (the 20-minute default run)
def test_tympan_predict_scores_a_folder_and_lists_bad_files(
    registered, served, fsdd_root, tmp_path
):
    _, uri = registered
    _, predictor = served
    files, bad = _folder(fsdd_root, tmp_path)
    tympan_cli = str(Path(sys.executable).parent / "tympan")
    out = tmp_path / "predictions.csv"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    model = f"models:/{MODEL}@champion"
    result = subprocess.run(
        [
            *(tympan_cli, "predict", str(tmp_path / "clips"), "--model", model),
            *("--out", str(out), "--side", "speaker=george"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "3 of 4 files scored, 1 refused" in result.stdout
    table = pd.read_csv(out, dtype={"label": str})
    table["error"] = table["error"].fillna("")
    assert table["path"].tolist() == [*map(str, files), str(bad)]
    expected = predictor.predict([f.read_bytes() for f in files], {"speaker": ["george"] * 3})
    assert table["label"].tolist()[:3] == [e["label"] for e in expected]
    for (_, row), want in zip(table.head(3).iterrows(), expected, strict=True):
        assert row["confidence"] == pytest.approx(max(want["probabilities"].values()), rel=1e-5)
        assert row["error"] == ""
    assert table["error"].iloc[3].startswith("not decodable audio")
    # the model needs `speaker`: said before any file is read
    missing = subprocess.run(
        [tympan_cli, "predict", str(files[0]), "--model", model, "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert missing.returncode != 0
    assert "needs the side attribute(s) speaker" in missing.stderr

    # `mlflow models predict` on the client's request body gives the same labels
    from tympan.serving import client

    body = tmp_path / "body.json"
    client.main([*map(str, files), "--side", "speaker=george", "--write-request", str(body)])
    answer = tmp_path / "answer.json"
    subprocess.run(
        [
            *(str(Path(sys.executable).parent / "mlflow"), "models", "predict", "-m", model),
            *("-i", str(body), "-t", "json", "-o", str(answer), "--env-manager", "local"),
        ],
        check=True,
        capture_output=True,
        env=env,
        timeout=300,
    )
    predictions = json.loads(answer.read_text())["predictions"]
    assert [p["label"] for p in predictions] == table["label"].tolist()[:3]


# --- hostile requests (issue: hostile input and faults) ----------------------------------------

REPLY_LIMIT = 4096  # bytes: no refusal may be larger, whatever the request


def _good(url: str, fsdd_root: Path) -> None:
    clips, speakers = _clips(fsdd_root)
    body = {"inputs": {"audio": [_b64(clips[0])], "speaker": speakers[:1]}}
    assert requests.post(f"{url}/invocations", json=body, timeout=60).status_code == 200


def _hostile_items() -> dict[str, tuple[bytes, str]]:
    """Each probe finding as (audio bytes, what the 400 must say)."""
    second = encode(tone(440, 1.0, 16000), 16000)
    hour_flac = encode(np.full(3600 * 1000, 0.3, dtype=np.float32), 1000, fmt="FLAC")
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, 3600 * 200).astype(np.float32)
    return {
        "1,000,003 Hz header": (with_rate(second[:244], 1_000_003), "sample rate 1000003 Hz"),
        "8-bit 200 Hz hour": (encode(noise, 200, subtype="PCM_U8"), "sample rate 200 Hz"),
        "FLAC hour in 11 kB": (hour_flac, "3600.0 s of audio is over the"),
        "float at 1e30": (
            encode(np.full(8000, 1e30, dtype=np.float32), 8000, subtype="FLOAT"),
            "extreme amplitude",
        ),
        "header claims more data": (second[: len(second) // 3], "truncated: header declares"),
        "over the item limit": (
            encode(np.zeros(600_000, dtype=np.float32), 16000),
            "larger than the 1 MiB limit per item (TYMPAN_MAX_ITEM_MB)",
        ),
    }


@pytest.mark.parametrize("case", list(_hostile_items()))
def test_hostile_items_get_a_short_400_naming_item_and_limit(server, fsdd_root, case):
    url, _ = server
    data, needle = _hostile_items()[case]
    clips, speakers = _clips(fsdd_root)
    body = {"inputs": {"audio": [_b64(clips[0]), _b64(data)], "speaker": speakers[:2]}}
    response = requests.post(f"{url}/invocations", json=body, timeout=60)
    assert response.status_code == 400, response.text[:500]
    assert len(response.content) < REPLY_LIMIT
    message = response.json()["message"]
    assert message.startswith("item 1: ") and needle in message
    _good(url, fsdd_root)


def test_odd_rates_and_base64_variants_are_served(server, fsdd_root):
    """A 16,001 Hz header costs a usual clip; GNU-wrapped and URL-safe base64 are accepted."""
    url, predictor = server
    clips, speakers = _clips(fsdd_root)
    odd = with_rate(clips[0], 8001)
    items = [
        base64.encodebytes(clips[0]).decode(),
        base64.urlsafe_b64encode(clips[1]).decode().rstrip("="),
        _b64(odd),
    ]
    body = {"inputs": {"audio": items, "speaker": speakers[:2] + speakers[:1]}}
    response = requests.post(f"{url}/invocations", json=body, timeout=60)
    assert response.status_code == 200, response.text[:500]
    got = [p["label"] for p in response.json()["predictions"]]
    expected = predictor.predict([clips[0], clips[1], odd], {"speaker": body["inputs"]["speaker"]})
    assert got == [e["label"] for e in expected]


def test_a_refused_large_request_is_not_echoed(server, fsdd_root):
    """The probe's refused 150 MB request got a 153 MB reply: the item limit's refusal now
    answers in a few hundred bytes (here 1.4 MiB of base64 over a 1 MiB item limit)."""
    url, _ = server
    big = _b64(encode(np.zeros(700_000, dtype=np.float32), 16000))
    body = {"inputs": {"audio": [big], "speaker": ["george"]}}
    response = requests.post(f"{url}/invocations", json=body, timeout=60)
    assert response.status_code in (400, 413)
    assert len(response.content) < REPLY_LIMIT
    assert big[:100] not in response.text


def _http_reply(sock: socket.socket) -> str:
    """One HTTP reply read whole: the headers, then as many body bytes as they declare (a
    single recv may return the headers alone)."""
    data = b""
    while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"content-length: *(\d+)", head, re.I)
    while length and len(body) < int(length.group(1)) and (chunk := sock.recv(65536)):
        body += chunk
    return (head + b"\r\n\r\n" + body).decode(errors="replace")


def test_guard_refuses_an_oversized_body_from_its_header(guarded, fsdd_root):
    """Content-Length over TYMPAN_MAX_REQUEST_MB: 413 before a byte of the body is sent."""
    url, _ = guarded
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 153000000\r\n\r\n"
        )
        reply = _http_reply(sock)
    assert reply.startswith("HTTP/1.1 413"), reply[:300]
    assert "over the 2 MiB limit (TYMPAN_MAX_REQUEST_MB)" in reply
    _good(url, fsdd_root)


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"x" * (3 * 2**20), 413, "over the 2 MiB limit"),
        (b"{\xc3\x28" * 100_000, 400, "not UTF-8"),
        (b"{" + b"junk " * 200_000, 400, "not valid JSON"),
        (b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "nested too deep"),
    ],
    ids=["3 MiB over a 2 MiB limit", "binary junk", "1 MiB of junk", "nested 100,000 deep"],
)
def test_guard_refuses_what_mlflow_would_parse_and_echo(guarded, fsdd_root, body, status, needle):
    url, _ = guarded
    response = requests.post(
        f"{url}/invocations",
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert response.status_code == status, response.text[:300]
    assert len(response.content) < REPLY_LIMIT
    assert needle in response.json()["message"]
    _good(url, fsdd_root)
