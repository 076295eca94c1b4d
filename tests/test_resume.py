"""A `tympan train` killed with SIGKILL resumes from its per-epoch checkpoints and ends with
the same weights as an uninterrupted run (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from tympan.config import ModelConfig, load_params, to_dict

from conftest import REPO

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


def _manifest(cache_dir: Path) -> Path:
    """A manifest for the cache's recordings (train logs it as the run's dataset)."""
    import pandas as pd

    path = cache_dir.parent / f"{cache_dir.name}-manifest.csv"
    if not path.exists():
        index = pd.read_csv(cache_dir / "index.csv")
        manifest = index[["path", "label", "group", "sha256"]].assign(
            duration_s=0.5, sample_rate=8000, channels=1
        )
        manifest.to_csv(path, index=False)
    return path


def train_command(params_file: Path, cache_dir: Path, out: Path) -> list[str]:
    """`tympan train` on the cache (a manifest made for it), as `dvc repro` runs it."""
    return [
        str(BIN / "tympan"),
        "--params",
        str(params_file),
        "train",
        "--features",
        str(cache_dir),
        "--manifest",
        str(_manifest(cache_dir)),
        "--out",
        str(out),
    ]


def _train(params_file: Path, cache_dir: Path, out: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        train_command(params_file, cache_dir, out),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _members(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return torch.load(out / "bundle.pt", map_location="cpu", weights_only=True)["members"]


@pytest.mark.slow  # over 20 s; run with -m slow (the 20-minute default run)
def test_a_killed_train_resumes_and_matches_an_uninterrupted_run(tone_cache_dir, tmp_path):
    base = load_params(REPO / "params.yaml")
    params = replace(
        base,
        model=replace(ModelConfig(), channels=8, hidden=16),
        train=replace(base.train, seeds=(0, 1), epochs=40, patience=40, batch_size=8),
        tracking=replace(base.tracking, experiment="resume-test"),
    )
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(to_dict(params), sort_keys=False))
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}",
        "TYMPAN_CHECKPOINTS": str(tmp_path / "checkpoints"),
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }

    straight = _train(params_file, tone_cache_dir, tmp_path / "straight", env)
    assert straight.wait(timeout=600) == 0, straight.stdout.read()

    killed = _train(params_file, tone_cache_dir, tmp_path / "resumed", env)
    deadline = time.time() + 300
    checkpoint = None
    while time.time() < deadline and checkpoint is None:
        found = sorted((tmp_path / "checkpoints").glob("*/1.pt"))  # seed 1, the second member
        checkpoint = found[0] if found else None
        time.sleep(0.01)
    assert checkpoint is not None, "no checkpoint of the second member appeared"
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "resumed" / "bundle.pt").exists()

    again = _train(params_file, tone_cache_dir, tmp_path / "resumed", env)
    output = again.stdout.read()
    assert again.wait(timeout=600) == 0, output
    assert "train: 0 resumed from its epoch-40 checkpoint" in output  # finished before the kill
    assert "train: 1 resumed from its epoch-" in output
    # the killed process's parent and seed runs are closed as KILLED, not left RUNNING
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs(
        [client.get_experiment_by_name("resume-test").experiment_id], order_by=["start_time"]
    )
    statuses = [(r.info.run_name, r.info.status) for r in runs]
    # seed 0 had finished before the kill; its parent and seed 1 had not
    killed_runs = [name for name, status in statuses if status == "KILLED"]
    assert killed_runs == ["train-demo", "seed-1"], statuses
    assert output.count("of the interrupted run marked KILLED") == 2
    assert all(status in ("FINISHED", "KILLED") for _, status in statuses), statuses
    assert not checkpoint.parent.exists()  # removed once the bundle is written

    expected, got = _members(tmp_path / "straight"), _members(tmp_path / "resumed")
    assert list(got) == list(expected) == ["0", "1"]
    for name in expected:
        for key, tensor in expected[name].items():
            torch.testing.assert_close(got[name][key], tensor, rtol=0, atol=0)
    record = json.loads((tmp_path / "resumed" / "train.json").read_text())
    assert record["seeds"]["1"]["epochs_run"] == 40
