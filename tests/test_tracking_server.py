"""A shared MLflow tracking server (issue 17, item 1), started by scripts/mlflow-server.sh as a
team would run it: PostgreSQL backend store, artifacts proxied by the server, MLflow's basic
auth on. A request without credentials is refused; with them (MLFLOW_TRACKING_USERNAME /
PASSWORD in the environment, as every process here has them) the stages, tune with a worker,
the registry and `mlflow models serve -m models:/NAME@champion` work as against the SQLite
default, and two
registrations at once leave the better version `@champion`."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import mlflow
import pytest
import requests
from mlflow.tracking import MlflowClient

from conftest import REPO, free_port, fsdd_subset, register_in, run_to_evaluate

pytestmark = pytest.mark.integration
SCRIPT = REPO / "scripts" / "mlflow-server.sh"
BIN = Path(sys.executable).parent


def _start(folder: Path, *options: str, env: dict[str, str] | None = None) -> str:
    """scripts/mlflow-server.sh on two free ports (the server's, PostgreSQL's next to it)."""
    for _ in range(20):
        port = free_port()
        if port < 65535:
            try:
                import socket

                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port + 1))
                break
            except OSError:
                continue
    done = subprocess.run(
        [str(SCRIPT), str(folder), str(port), *options],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **(env or {})},
    )
    if done.returncode != 0:
        pytest.fail(f"mlflow-server.sh failed:\n{done.stderr[-3000:]}")
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("MLFLOW_TRACKING_URI=http://127.0.0.1:")
    return line.split("=", 1)[1]


def _stop(folder: Path) -> None:
    subprocess.run([str(SCRIPT), str(folder), "stop"], capture_output=True, timeout=120)
    shutil.rmtree(folder, ignore_errors=True)


PASSWORD = "not-in-any-log-3141"  # the admin's, given to the server by the environment only


@pytest.fixture(scope="module")
def server():
    """The server, its folder; this process and its children authenticate as its admin."""
    folder = Path(tempfile.mkdtemp(prefix="tympan-mlflow-"))
    uri = _start(folder, "--auth", env={"MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD})
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=PASSWORD)
    yield uri, folder
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _stop(folder)


def test_the_shared_server_refuses_requests_without_credentials(server):
    uri, folder = server
    api = f"{uri}/api/2.0/mlflow/experiments/search"
    refused = requests.post(api, json={"max_results": 1}, timeout=30)
    assert refused.status_code == 401
    wrong = requests.post(api, json={"max_results": 1}, auth=("admin", "nope"), timeout=30)
    assert wrong.status_code == 401
    allowed = requests.post(api, json={"max_results": 1}, auth=("admin", PASSWORD), timeout=30)
    assert allowed.status_code == 200, allowed.text
    assert PASSWORD not in (folder / "server.log").read_text()
    assert PASSWORD not in (folder / "basic_auth.ini").read_text()


def test_the_stages_register_and_serve_against_the_shared_server(
    server, tmp_path, fsdd_root, monkeypatch
):
    from test_serving import _start as start_http
    from test_serving import _stop as stop_http

    from tympan.config import load_params
    from tympan.serving import Predictor

    uri, folder = server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # nothing may land in a local ./mlruns
    root = fsdd_subset(fsdd_root, tmp_path / "fsdd", ["jackson", "george"], range(0, 6))
    params = load_params(REPO / "pipelines" / "fsdd.yaml")
    params = replace(
        params,
        data=replace(params.data, root=str(root)),
        train=replace(params.train, seeds=(0,), epochs=2),
        register=replace(params.register, name="tympan-shared-server"),
        tracking=replace(params.tracking, experiment="shared-server"),
    )
    run_to_evaluate(params, tmp_path)
    register_in(params, tmp_path)

    registered = json.loads((tmp_path / "registered.json").read_text())
    assert registered["alias"] == "champion"
    client = MlflowClient(uri)
    run = client.get_run(registered["run_id"])
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied by the server
    stored = {p.name for p in (folder / "artifacts").rglob("*") if p.is_file()}
    assert {"MLmodel", "bundle.pt", "requirements.txt", "model_card.md"} <= stored
    assert not (tmp_path / "mlruns").exists()
    assert run.data.metrics and "train.lr" in run.data.params

    url, http = start_http(
        [
            *(
                str(BIN / "mlflow"),
                "models",
                "serve",
                "-m",
                "models:/tympan-shared-server@champion",
            ),
            *("--env-manager", "local", "-h", "127.0.0.1"),
        ],
        {"MLFLOW_TRACKING_URI": uri},
        tmp_path / "serve.log",
    )
    try:
        files = sorted(root.rglob("*.wav"))[:3]
        body = {"inputs": {"audio": [base64.b64encode(f.read_bytes()).decode() for f in files]}}
        response = requests.post(f"{url}/invocations", json=body, timeout=120)
        assert response.status_code == 200, response.text
        got = [p["label"] for p in response.json()["predictions"]]
    finally:
        stop_http(http)
    expected = Predictor.load(tmp_path / "models" / "bundle.pt").predict(
        [f.read_bytes() for f in files]
    )
    assert got == [e["label"] for e in expected]


# Registers through tympan's promotion with a pause between reading @champion and acting on
# it, so that two of these started together both read the same old champion: the lost-update
# window, made certain.
RACER = r"""
import json, sys, time
from mlflow.tracking import MlflowClient
from tympan import tracking
from tympan.evaluation.card import promotion

uri, name, version, pause = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
client = MlflowClient(uri)
mine = client.get_model_version(name, version).tags


def decide(champion):
    time.sleep(pause)
    return promotion("accuracy", float(mine["test_accuracy"]), mine["tympan.test_set"],
                     champion, 0.0)


def beats(one, other):
    return promotion("accuracy", float(one["test_accuracy"]), one["tympan.test_set"],
                     other, 0.0)[0] == "champion"


print(json.dumps(tracking.promote(client, name, version, decide, beats)))
"""


def test_two_registrations_at_once_leave_the_better_version_champion(server, tmp_path):
    uri, _ = server
    client = MlflowClient(uri)
    name = "tympan-race"
    client.create_registered_model(name)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=client.create_experiment("race")) as run:
        mlflow.log_text("placeholder", "model/MLmodel")
    source = f"runs:/{run.info.run_id}/model"
    old = client.create_model_version(name, source, run.info.run_id).version
    tags = {"tympan.test_set": "abc", "test_accuracy": "0.80"}
    for key, value in tags.items():
        client.set_model_version_tag(name, old, key, value)
    client.set_registered_model_alias(name, "champion", old)

    for better_first in (True, False):
        versions = {}
        for accuracy in ("0.90", "0.85"):
            version = client.create_model_version(name, source, run.info.run_id).version
            for key, value in {**tags, "test_accuracy": accuracy}.items():
                client.set_model_version_tag(name, version, key, value)
            versions[accuracy] = version
        order = ["0.90", "0.85"] if better_first else ["0.85", "0.90"]
        racers = [
            subprocess.Popen(
                [sys.executable, "-c", RACER, uri, name, versions[acc], str(pause)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONPATH": str(REPO / "src")},
            )
            for acc, pause in zip(order, (1.0, 1.6), strict=True)
        ]
        answers = {}
        for acc, racer in zip(order, racers, strict=True):
            out, err = racer.communicate(timeout=120)
            assert racer.returncode == 0, err[-2000:]
            answers[acc] = json.loads(out.strip().splitlines()[-1])
        # both beat the old champion; the later write may be the worse one: the re-reads fix it
        assert client.get_model_version_by_alias(name, "champion").version == versions["0.90"]
        assert answers["0.90"][0] == "champion"
        assert answers["0.85"][0] == "challenger"
        assert f"v{versions['0.90']}, registered at the same time" in answers["0.85"][1]
        # the next round starts from this champion
        client.set_model_version_tag(name, versions["0.90"], "test_accuracy", "0.80")


def test_tune_and_its_worker_log_their_trials_to_the_shared_server(
    server, tmp_path, tone_cache_dir
):
    """`tympan tune` and a `tympan tune --worker` beside it (one Optuna study in a database
    both reach) log every trial's MLflow run to the shared server, authenticated from the
    environment (the same holds for every stage: they all read MLFLOW_TRACKING_URI)."""
    from test_tuning import _stage_args, _tympan, _write_params, tune_params

    uri, _ = server
    # the study in a database of the server's own PostgreSQL (trusted on 127.0.0.1)
    pg_port = int(uri.rsplit(":", 1)[1]) + 1
    bindir = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1]
    subprocess.run(
        [str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(pg_port), "-U", "postgres", "tune"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    storage = f"postgresql+psycopg2://postgres@127.0.0.1:{pg_port}/tune"
    params = tune_params(
        tmp_path, sampler="random", n_trials=4, seeds=(0,), heartbeat_s=2, storage=storage
    )
    params = replace(params, tracking=replace(params.tracking, experiment="shared-tune"))
    params_file = _write_params(params, tmp_path / "params.yaml")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    coordinator = _tympan(params_file, *_stage_args(tmp_path, tone_cache_dir), env=env)
    worker = _tympan(params_file, "--worker", "--features", str(tone_cache_dir), env=env)
    outputs = [p.communicate(timeout=600)[0] for p in (coordinator, worker)]
    for process, output in zip((coordinator, worker), outputs, strict=True):
        assert process.returncode == 0, output[-3000:]
        assert PASSWORD not in output
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("shared-tune")
    runs = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`tympan.stage` = 'tune'"
    )
    trials = {r.data.tags["optuna.trial"] for r in runs if "optuna.trial" in r.data.tags}
    assert len(trials) == 4
