"""`mlflow run .` on the project's MLproject, in a temporary git + DVC repo with the real
MLflow SQLite store: the record lands in `tracking.experiment`, and a run where DVC skipped
every stage says so."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO, copy_project

pytestmark = pytest.mark.integration

BIN = str(Path(sys.executable).parent)


def _run(cwd: Path, uri: str, *cmd: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", MLFLOW_TRACKING_URI=uri)
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.fixture
def project(tmp_path) -> Path:
    root = copy_project(tmp_path / "project")
    shutil.copy(REPO / "MLproject", root / "MLproject")
    params = root / "params.yaml"
    raw = yaml.safe_load(params.read_text())
    raw["demo"].update(clips_per_class=4, groups=4)
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "t@example.com"],
        ["git", "config", "user.name", "t"],
        ["dvc", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "init"],
    ):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)
    return root


def test_mlflow_run_records_in_tracking_experiment_and_says_when_dvc_ran_nothing(project):
    uri = f"sqlite:///{project.parent / 'mlruns.db'}"
    mlflow_run = [f"{BIN}/mlflow", "run", ".", "--env-manager", "local", "-e", "stage"]
    first = _run(project, uri, *mlflow_run, "-P", "name=demo")  # no --experiment-name
    assert "Running stage 'demo'" in first

    client = MlflowClient(uri)
    tympan = client.get_experiment_by_name("tympan-demo")
    assert tympan.tags["mlflow.experimentKind"] == "custom_model_development"
    (stub,) = client.search_runs(["0"])  # where `mlflow run` put its own run
    (record,) = client.search_runs([tympan.experiment_id])
    assert stub.data.tags["tympan.record_run_id"] == record.info.run_id
    assert "--experiment-name tympan-demo" in stub.data.tags["mlflow.note.content"]
    assert record.info.status == "FINISHED"
    assert record.data.tags["tympan.dvc.ran"] == "demo"
    assert record.data.tags["tympan.project_run_id"] == stub.info.run_id
    assert record.data.tags["mlflow.project.entryPoint"] == "stage"
    assert record.data.params == {"name": "demo"}

    again = [*mlflow_run, "-P", "name=demo", "--experiment-name", "tympan-demo"]
    second = _run(project, uri, *again)
    assert "Data and pipelines are up to date." in second
    runs = client.search_runs([tympan.experiment_id], order_by=["attributes.start_time DESC"])
    latest = runs[0]
    assert len(runs) == 2 and "tympan.record_run_id" not in latest.data.tags  # it is the record
    assert latest.data.tags["tympan.dvc.ran"] == "none"
    assert latest.data.tags["mlflow.note.content"].startswith(
        "DVC found every stage up to date and ran none"
    )
