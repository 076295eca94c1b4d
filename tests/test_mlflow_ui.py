"""`mlflow ui` as a user sees it: a real `mlflow server` on 127.0.0.1 over a SQLite store of
tympan's experiment, read by a real headless Chromium (Debian's package, installed when
missing as `scripts/postgres.sh` installs PostgreSQL)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from tympan import tracking

from conftest import free_port

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("no chromium, and no root to install Debian's (apt-get install chromium)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env, capture_output=True
    )
    return shutil.which("chromium") or pytest.fail("apt-get installed no chromium")


@pytest.fixture
def server(tmp_path, mlflow_store):
    """`mlflow server` over a store holding tympan's experiment with one training run."""
    uri = tracking.connect()
    experiment_id = tracking.ensure_experiment("tympan-demo")
    with mlflow.start_run(experiment_id=experiment_id, run_name="train-demo"):
        mlflow.log_metric("val_accuracy", 0.9)
    port = free_port()
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 (closed below)
    command = [str(BIN / "mlflow"), "server", "--backend-store-uri", uri, "--host", "127.0.0.1"]
    proc = subprocess.Popen(
        [*command, "--port", str(port), "--workers", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its uvicorn and job-runner children go with it
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
                time.sleep(0.5)
        yield base, experiment_id
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()


def _rendered(url: str, browser: str) -> str:
    """The page's DOM after its scripts ran (`--screenshot=FILE` instead shows it)."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000"]
    done = subprocess.run(
        [browser, *flags, "--window-size=1400,900", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    return done.stdout


def test_the_printed_ui_link_opens_tympans_training_runs(server):
    """MLflow 3.17 lays the page out by its GenAI / Model training switch, GenAI unless the
    browser remembers otherwise: the experiment-kind tag alone still opens the GenAI
    overview (traces, latency), so tympan prints the link that asks for model training."""
    browser = _chromium()
    base, experiment_id = server
    kind = mlflow.MlflowClient().get_experiment(experiment_id).tags
    assert kind[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    page = _rendered(tracking.ui_url(base, experiment_id), browser)
    assert f"<title>Runs - Experiment {experiment_id} - MLflow</title>" in page
    assert "train-demo" in page  # the run is listed
    assert "Latency" not in page and "Tool calls" not in page  # not the GenAI overview
