"""`dvc repro` end to end in a temporary git + DVC repo, with the real MLflow SQLite store."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import copy_demo

pytestmark = pytest.mark.integration

BIN = str(Path(sys.executable).parent)


def _run(cwd: Path, *cmd: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    )
    return done.stdout + done.stderr


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", output))


def _set(params_file: Path, section: str, key: str, value) -> None:
    raw = yaml.safe_load(params_file.read_text())
    raw[section][key] = value
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture(scope="module")
def repo(demo_build, tmp_path_factory) -> Path:
    """This module's copy of the demo project after its first `dvc repro` (seeds 0 and 1, two
    epochs; this machine's remote set as `make run` sets it), committed."""
    return copy_demo(demo_build, tmp_path_factory.mktemp("pipeline"))


def test_repro_runs_every_stage_then_nothing(repo, demo_build):
    assert _ran(demo_build.log) == {  # the first `dvc repro`, in the project this one copies
        "demo",
        "ingest",
        "split",
        "featurize",
        "tune",
        "train",
        "evaluate",
        "register",
    }
    assert yaml.safe_load((repo / "tuning/best_params.yaml").read_text()) == {
        "optuna": {"study": None, "trial": None}  # no values: train reads params.yaml alone
    }
    metrics = json.loads((repo / "metrics/test.json").read_text())
    assert metrics["n_test"] > 0 and set(metrics["seeds"]) == {"0", "1"}
    assert 0.0 <= metrics["ensemble"]["accuracy"] <= 1.0
    assert (repo / "plots/confusion.csv").read_text().startswith("actual,predicted")
    headline = json.loads((repo / "metrics/headline.json").read_text())
    assert headline["test_accuracy"] == metrics["ensemble"]["accuracy"]
    breakdown = json.loads((repo / "metrics/breakdown.json").read_text())
    assert set(breakdown) == {"snr_db", "session"}
    labels = set(json.loads((repo / "metrics/classes.json").read_text()))
    assert set(pd.read_csv(repo / "plots/roc.csv")["class"]) == labels
    assert len(pd.read_csv(repo / "plots/worst.csv")) == 10
    card = (repo / "reports/model_card.md").read_text()
    assert card.startswith("# Model card: tympan-demo v1 (@champion)")
    assert "## By snr_db" in card and "## Known limits" in card
    assert (repo / "data/features/sets/logmel.npy").exists()
    assert (
        json.loads((repo / "reports/split.json").read_text())["checks"]["groups_in_two_splits"] == 0
    )

    second = _run(repo, "dvc", "repro")
    assert _ran(second) == set()
    assert "Data and pipelines are up to date" in second
    assert "up to date" in _run(repo, "dvc", "status")


def test_changing_train_lr_reruns_only_downstream(repo, tmp_path):
    assert _run(repo, "git", "status", "--porcelain") == ""  # the first repro is committed
    _set(repo / "params.yaml", "train", "lr", 0.0005)
    output = _run(repo, "dvc", "repro")
    # tune reads the train params as its base (it does no work while disabled)
    assert _ran(output) == {"tune", "train", "evaluate", "register"}
    assert "Stage 'featurize' didn't change, skipping" in output
    # DVC compares the two experiments: metrics by name, plots rendered for both revisions
    diff = json.loads(_run(repo, "dvc", "metrics", "diff", "--json", "--all"))
    assert "test_accuracy" in diff["metrics/headline.json"]
    old = json.loads(_run(repo, "git", "show", "HEAD:metrics/headline.json"))
    new = json.loads((repo / "metrics/headline.json").read_text())
    change = diff["metrics/headline.json"]["test_accuracy"]
    assert (change["old"], change["new"]) == (old["test_accuracy"], new["test_accuracy"])
    _run(repo, "dvc", "plots", "diff", "HEAD", "-o", str(tmp_path / "dvc_plots"))
    html = (tmp_path / "dvc_plots" / "index.html").read_text()
    assert "plots/roc.csv" in html and "plots/worst" in html and "loss per epoch" in html


def test_mlflow_runs_tags_and_registry(repo):
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("tympan-demo")
    assert experiment.artifact_location == (repo / "mlartifacts").resolve().as_uri()
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2  # one per train invocation
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    manifest_md5 = next(
        o["md5"] for o in lock["ingest"]["outs"] if o["path"] == "data/manifest.csv"
    )
    features_md5 = next(o["md5"] for o in lock["featurize"]["outs"] if o["path"] == "data/features")
    for parent in parents:
        tags = parent.data.tags
        assert tags["tympan.stage"] == "train" and tags["tympan.preset"] == "demo"
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", tags["git.commit"])
        assert tags["dvc.manifest"] == manifest_md5
        assert tags["dvc.features"] == features_md5
        assert parent.data.params["train.seeds"] == "[0, 1]"
        assert "test_accuracy" in parent.data.metrics
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(c.data.tags["tympan.seed"] for c in children) == ["0", "1"]
        for child in children:
            history = client.get_metric_history(child.info.run_id, "val_loss")
            assert [m.step for m in history] == [1, 2]
            assert "test_accuracy" in child.data.metrics
    lrs = sorted(p.data.params["train.lr"] for p in parents)
    assert lrs == ["0.0005", "0.001"]

    versions = {int(v.version): v for v in client.search_model_versions("name='tympan-demo'")}
    assert sorted(versions) == [1, 2]
    champion = client.get_model_version_by_alias("tympan-demo", "champion")
    v1, v2 = (float(versions[i].tags["test_accuracy"]) for i in (1, 2))
    registered = json.loads((repo / "reports/registered.json").read_text())
    assert registered["version"] == 2
    if v2 > v1:
        assert str(champion.version) == "2" and registered["alias"] == "champion"
    else:
        assert str(champion.version) == "1" and registered["alias"] == "challenger"
        assert str(client.get_model_version_by_alias("tympan-demo", "challenger").version) == "2"
    assert "champion" in versions[2].tags["tympan.promotion"]
    # same data, same split: the two versions are comparable, and each carries its card
    assert versions[1].tags["tympan.test_set"] == versions[2].tags["tympan.test_set"]
    assert "same test set" in versions[2].tags["tympan.promotion"]
    assert versions[2].description.startswith("# Model card: tympan-demo v2")
    assert float(versions[2].tags["test_accuracy_seed_std"]) >= 0.0


@pytest.mark.slow  # test_dvc_state and test_tuning_nested cover tuned values in the default run
def test_enabled_tune_feeds_its_best_params_to_train(repo):
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["tune"].update(
        enabled=True,
        n_trials=2,
        seeds=[0],
        sampler="grid",
        pruner="none",
        storage="sqlite:///optuna.db",
        space={"train": {"lr": {"type": "categorical", "choices": [0.002, 0.004]}}},
    )
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    output = _run(repo, "dvc", "repro")
    # split re-runs to name the tuning protocol in its report; the splits are the same, so
    # featurize does not
    assert _ran(output) == {"split", "tune", "train", "evaluate", "register"}
    assert "Stage 'featurize' didn't change, skipping" in output
    report = json.loads((repo / "reports/split.json").read_text())
    assert report["tuning"]["kind"] == "val_split"
    assert json.loads((repo / "tuning/summary.json").read_text())["trials_complete"] == 2
    best = yaml.safe_load((repo / "tuning/best_params.yaml").read_text())
    assert best["tuned"]["train"]["lr"] in (0.002, 0.004)
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("tympan-demo")
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string="tags.`tympan.stage` = 'train'",
        order_by=["attributes.start_time DESC"],
    )
    latest = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert latest.data.params["train.lr"] == str(best["tuned"]["train"]["lr"])
    assert latest.data.tags["optuna.best_trial"] == str(best["optuna"]["trial"])
    tune_runs = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`tympan.stage` = 'tune'"
    )
    trial_runs = [r for r in tune_runs if "optuna.trial" in r.data.tags]
    assert len([r for r in trial_runs if "tympan.seed" not in r.data.tags]) == 2


def test_default_local_remote_push_and_pull(repo):
    """`dvc push`/`dvc pull` work after `make run` (`make remote`): this machine's default
    remote is a folder beside the project."""
    remote = (repo.parent / "tympan-dvc-remote").resolve()
    assert "local" in _run(repo, "dvc", "remote", "list")
    _run(repo, "dvc", "push")
    assert remote.is_dir() and any(remote.rglob("*"))
    shutil.rmtree(repo / "data" / "features")
    shutil.rmtree(repo / ".dvc" / "cache")
    _run(repo, "dvc", "pull")
    assert (repo / "data" / "features" / "sets" / "logmel.npy").exists()
    assert "up to date" in _run(repo, "dvc", "status")
    assert "Cache and remote 'local' are in sync" in _run(repo, "dvc", "status", "--cloud")


@pytest.mark.slow  # over 20 s; run with -m slow (the 20-minute default run)
def test_switching_a_feature_param_back_restores_from_the_run_cache(repo):
    """A changed feature param recomputes the features; a state seen before is restored from
    DVC's run-cache (no stage run). The remote test emptied the cache, so the first visit to
    each state runs once."""
    features = repo / "data" / "features" / "sets" / "logmel.npy"
    before = features.read_bytes()

    def featurize_with(n_mels: int) -> str:
        _set(repo / "params.yaml", "features", "n_mels", n_mels)
        return _run(repo, "dvc", "repro", "--single-item", "featurize")

    assert "Running stage 'featurize'" in featurize_with(32)
    assert np.load(features, mmap_mode="r").shape[1] == 32
    featurize_with(40)
    for n_mels in (32, 40):  # both states are in the run-cache now
        again = featurize_with(n_mels)
        assert "Running stage 'featurize'" not in again
        assert "checking out outputs" in again
    assert features.read_bytes() == before


def test_adding_a_feature_set_reuses_the_others_from_the_dvc_cache(repo):
    """`dvc repro` deletes data/features before featurize runs; the sets whose key is
    unchanged come back from DVC's cache (the version dvc.lock records), and only the new or
    changed set is computed."""
    logmel = repo / "data" / "features" / "sets" / "logmel.npy"
    before = logmel.read_bytes()
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["features"]["stack"]["kinds"] = ["logmel", "zcr"]
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    out = _run(repo, "dvc", "repro", "--single-item", "featurize")
    assert "featurize: logmel reused from DVC's cache" in out
    assert "featurize: computing zcr for" in out
    assert logmel.read_bytes() == before
    meta = json.loads((repo / "data" / "features" / "meta.json").read_text())
    assert list(meta["sets"]) == ["logmel", "zcr"] and meta["shape"][2] == 40 + 1
