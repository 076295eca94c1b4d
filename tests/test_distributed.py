"""`tympan train` under torchrun (gloo on this CPU): N ranks at batch b train the curve one
process trains at batch N x b, only rank 0 logs and writes, a killed rank fails the whole run
and a re-run resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import psutil
import pytest
import torch
import yaml
from test_resume import _manifest, _members, train_command

from tympan.config import ModelConfig, load_params, to_dict
from tympan.features import build_cache
from tympan.stages import run_train
from tympan.training.distributed import DistributedError, Rank, from_env, shard

from conftest import REPO, TONE_FEATURES, random_tones

BIN = Path(sys.executable).parent
RANKS = 2
BATCH = 4  # 33 training clips in global batches of 8: the last (1 clip) leaves rank 1 idle
EPOCHS = 20


def test_rank_from_torchrun_environment():
    assert from_env({}) is None
    assert from_env({"WORLD_SIZE": "1", "RANK": "0"}) is None  # a world of one: as without
    assert from_env({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"}) == Rank(2, 4, 0)
    with pytest.raises(DistributedError, match="torchrun"):
        from_env({"WORLD_SIZE": "2"})


def test_each_rank_takes_its_slice_and_an_idle_rank_counts_nothing():
    chunk = np.arange(7)
    parts = [shard(chunk, Rank(r, 3, r)) for r in range(3)]
    assert [p.tolist() for p, _ in parts] == [[0, 1, 2], [3, 4], [5, 6]]
    assert all(counts for _, counts in parts)
    rows, counts = shard(np.arange(2), Rank(2, 3, 2))
    assert not counts and rows.tolist() == [0, 1]  # the whole chunk, with a zero share


@pytest.fixture(scope="module")
def odd_cache(tmp_path_factory) -> Path:
    """Low vs high tones: 33 training clips, 10 validation, 6 test, both classes in each."""
    tmp = tmp_path_factory.mktemp("odd")
    rows = random_tones(tmp, 49, lambda i: "train" if i < 33 else "val" if i < 43 else "test", 1)
    build_cache(pd.DataFrame(rows), TONE_FEATURES, tmp / "cache")
    return tmp / "cache"


def _params(tmp: Path, name: str, batch: int) -> tuple[Path, object]:
    """Two seeds without dropout (its draws differ by rank) on the tone cache."""
    base = load_params(REPO / "params.yaml")
    params = replace(
        base,
        model=replace(ModelConfig(), channels=8, hidden=16, dropout=0.0, dropout_conv=0.0),
        train=replace(
            base.train, seeds=(0, 1), epochs=EPOCHS, early_stopping=False, batch_size=batch
        ),
        tracking=replace(base.tracking, experiment="ddp-test"),
    )
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(to_dict(params), sort_keys=False))
    return path, params


def _torchrun(params_file: Path, cache_dir: Path, out: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [
            str(BIN / "torchrun"),
            "--standalone",
            f"--nproc-per-node={RANKS}",
            "--no-python",
            *train_command(params_file, cache_dir, out),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _env(tmp: Path) -> dict[str, str]:
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlruns.db'}",
        "TYMPAN_CHECKPOINTS": str(tmp / "checkpoints"),
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }


def _rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process | None:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


@dataclass(frozen=True)
class Resumed:
    """A run on RANKS ranks whose rank 1 was killed during the second member, and its re-run."""

    tmp: Path
    killed: str  # the killed launch's output
    killed_code: int
    output: str  # the re-run's
    bundle_before_rerun: bool


@pytest.fixture(scope="module")
def resumed(odd_cache, tmp_path_factory) -> Resumed:
    tmp = tmp_path_factory.mktemp("ddp")
    params_file, _ = _params(tmp, "ranks", BATCH)
    env = _env(tmp)
    launch = _torchrun(params_file, odd_cache, tmp / "models", env)
    deadline = time.time() + 300
    checkpoint = None
    while time.time() < deadline and checkpoint is None and launch.poll() is None:
        found = sorted((tmp / "checkpoints").glob("*/1.pt"))  # seed 1, the second member
        checkpoint = found[0] if found else None
        time.sleep(0.01)
    assert checkpoint is not None, "no checkpoint of the second member appeared"
    victim = _rank_process(launch, 1)
    assert victim is not None, "no process with RANK=1 under torchrun"
    victim.send_signal(signal.SIGKILL)
    killed = launch.stdout.read()
    code = launch.wait(timeout=120)  # the whole run ends: no rank waits for the dead one
    before = (tmp / "models" / "bundle.pt").exists()
    again = _torchrun(params_file, odd_cache, tmp / "models", env)
    output = again.stdout.read()
    assert again.wait(timeout=600) == 0, output
    return Resumed(tmp, killed, code, output, before)


@pytest.mark.integration
def test_a_killed_rank_fails_the_run_and_a_rerun_resumes(resumed):
    assert resumed.killed_code != 0, resumed.killed
    assert "exitcode  : -9" in resumed.killed and "Signal 9 (SIGKILL)" in resumed.killed, (
        resumed.killed[-3000:]
    )
    assert not resumed.bundle_before_rerun
    leftovers = [
        p
        for p in psutil.Process().children(recursive=True)
        if p.status() != psutil.STATUS_ZOMBIE and "tympan" in " ".join(p.cmdline())
    ]
    assert not leftovers, leftovers
    assert f"train: 0 resumed from its epoch-{EPOCHS} checkpoint" in resumed.output
    assert "train: 1 resumed from its epoch-" in resumed.output
    # only rank 0 logged: one parent run per launch, one child run per member and launch
    client = mlflow.MlflowClient(_env(resumed.tmp)["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("ddp-test").experiment_id])
    statuses = [(r.info.run_name, r.info.status) for r in runs]
    parents = sorted(status for name, status in statuses if name.startswith("train-"))
    # rank 0 fails on the lost connection (FAILED), or is stopped by torchrun before it does
    # (left RUNNING, then marked KILLED by the re-run): never left RUNNING
    assert parents in (["FAILED", "FINISHED"], ["FINISHED", "KILLED"]), statuses
    assert "RUNNING" not in {status for _, status in statuses}, statuses
    finished = next(
        r for r in runs if r.info.run_name.startswith("train-") and r.info.status == "FINISHED"
    )
    assert finished.data.params["world_size"] == str(RANKS)
    assert finished.data.params["train.batch_size"] == str(BATCH)
    assert finished.data.tags["tympan.world_size"] == str(RANKS)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == finished.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["seed-0", "seed-1"]
    record = json.loads((resumed.tmp / "models" / "train.json").read_text())
    assert record["world_size"] == RANKS


@pytest.mark.integration
def test_ranks_train_the_curve_of_one_process_at_the_global_batch(
    resumed, odd_cache, tmp_path, mlflow_store
):
    """The resumed run's curve against one process at batch RANKS x BATCH, uninterrupted."""
    line = f"data-parallel over {RANKS} ranks (gloo), global batch {BATCH} x {RANKS}"
    assert line in resumed.output
    _, params = _params(tmp_path, "one", BATCH * RANKS)
    run_train(params, odd_cache, _manifest(odd_cache), tmp_path / "one")
    ranks = pd.read_csv(resumed.tmp / "models" / "history.csv")
    one = pd.read_csv(tmp_path / "one" / "history.csv")
    assert len(ranks) == len(one) == 2 * EPOCHS
    for column in ("train_loss", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(ranks[column], one[column], rtol=1e-4, atol=1e-6)
    assert ranks["train_loss"].iloc[EPOCHS - 1] < 0.5 * ranks["train_loss"].iloc[0]  # learnt


@pytest.mark.slow  # a third launch (25 s): the bitwise check of what the curve check shows
@pytest.mark.integration
def test_the_resumed_run_ends_on_the_uninterrupted_runs_weights(resumed, odd_cache, tmp_path):
    params_file, _ = _params(tmp_path, "ranks", BATCH)
    run = _torchrun(params_file, odd_cache, tmp_path / "models", _env(tmp_path))
    output = run.stdout.read()
    assert run.wait(timeout=600) == 0, output
    expected, got = _members(tmp_path / "models"), _members(resumed.tmp / "models")
    assert list(got) == list(expected) == ["0", "1"]
    for name in expected:
        for key, tensor in expected[name].items():
            torch.testing.assert_close(got[name][key], tensor, rtol=0, atol=0)
