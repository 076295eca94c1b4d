"""Members and experiments spread over processes by DVC's own queue: `dvc exp run --queue` twice
and `dvc queue start -j 2` on the demo run two experiments at once, each in its own copy of the
workspace, each with its own MLflow run in the project's store, neither clobbering the other's
outputs nor the workspace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import copy_demo

pytestmark = pytest.mark.integration


def test_relative_sqlite_stores_resolve_to_the_project_from_a_queued_copy(tmp_path, monkeypatch):
    """A queued experiment runs in a copy of the workspace with DVC_ROOT naming the project:
    the default stores must be the project's, not the copy's (deleted when it ends)."""
    from tympan.config import TuneConfig, in_project
    from tympan.tracking import tracking_uri
    from tympan.tuning.study import storage_url

    project, copy = tmp_path / "project", tmp_path / "project" / ".dvc" / "tmp" / "exps" / "x"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("TYMPAN_TUNE_STORAGE", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(project))
    assert tracking_uri() == f"sqlite:///{project.resolve()}/mlruns.db"
    assert storage_url(TuneConfig()) == f"sqlite:///{project.resolve()}/optuna.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///stores/m.db")  # relative: the same
    assert tracking_uri() == f"sqlite:///{project.resolve()}/stores/m.db"
    for kept in ("sqlite:////abs/m.db", "http://127.0.0.1:5000", "postgresql://u@h/db"):
        assert in_project(kept) == kept
    monkeypatch.chdir(project)  # `dvc repro` in the project: DVC_ROOT is the working folder
    assert in_project("sqlite:///mlruns.db") == "sqlite:///mlruns.db"
    monkeypatch.delenv("DVC_ROOT")
    monkeypatch.chdir(copy)
    assert in_project("sqlite:///mlruns.db") == "sqlite:///mlruns.db"


BIN = str(Path(sys.executable).parent)


def _run(cwd: Path, *cmd: str, check: bool = True) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert done.returncode == 0, (
            f"{' '.join(cmd)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        )
    return done.stdout + done.stderr


def _queue_idle(project: Path) -> str:
    """Wait until no queued experiment is queued or running -> `dvc queue status`."""
    deadline = time.time() + 600
    while time.time() < deadline:
        status = _run(project, "dvc", "queue", "status")
        if "Queued" not in status and "Running" not in status:
            return status
        time.sleep(2)
    raise AssertionError(f"the queue did not drain:\n{status}")


@pytest.mark.slow  # 80-100 s: the queue's workers, a workspace copy per experiment
def test_two_queued_experiments_run_at_once_into_one_store(demo_build, tmp_path):
    project = copy_demo(demo_build, tmp_path)
    before = (project / "models" / "train.json").read_text()
    for name, lr in (("lr-a", "0.002"), ("lr-b", "0.004")):
        # up to train: the queue's workings are the same for evaluate and register (each of
        # which would add a process per experiment)
        _run(project, "dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.lr={lr}", "train")
    started = time.time()
    _run(project, "dvc", "queue", "start", "-j", "2")
    try:
        status = _queue_idle(project)
    finally:
        _run(project, "dvc", "queue", "stop", "--kill", check=False)
    seconds = time.time() - started
    assert status.count("Success") == 2, status + _run(project, "dvc", "queue", "logs", "lr-a")

    # the workspace is the baseline's still
    assert (project / "models" / "train.json").read_text() == before
    assert "lr-a" not in _run(project, "git", "status", "--porcelain")

    # two experiments, each with its own params and its own train run in the project's store
    shown = json.loads(_run(project, "dvc", "exp", "show", "--json"))
    experiments = {
        e["name"]: e["revs"][0]["data"]
        for rev in shown
        for e in rev.get("experiments") or []
        if e.get("name") in ("lr-a", "lr-b")
    }
    assert set(experiments) == {"lr-a", "lr-b"}
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("tympan-demo")
    runs = {}
    for name, data in experiments.items():
        lr = data["params"]["params.yaml"]["data"]["train"]["lr"]
        found = client.search_runs(
            [experiment.experiment_id],
            f"tags.`dvc.exp_name` = '{name}' AND tags.`tympan.stage` = 'train'",
        )
        parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
        assert len(parents) == 1, (name, [r.info.run_name for r in found])
        assert parents[0].data.params["train.lr"] == str(lr)
        runs[name] = parents[0]
    assert {name: float(r.data.params["train.lr"]) for name, r in runs.items()} == {
        "lr-a": 0.002,
        "lr-b": 0.004,
    }
    # no clobbered outputs: each experiment's outputs (`dvc exp apply`) name its own run
    for name, run in runs.items():
        _run(project, "dvc", "exp", "apply", name)
        record = json.loads((project / "models" / "train.json").read_text())
        assert record["parent_run_id"] == run.info.run_id
        assert str(record["params"]["train"]["lr"]) == run.data.params["train.lr"]
    print(f"two queued experiments, 2 jobs: {seconds:.0f} s")
