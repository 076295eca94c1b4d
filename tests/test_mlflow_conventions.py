"""What an MLflow user looks for, where MLflow puts it, in a real SQLite store: datasets via
`mlflow.log_input`, the standard git tags, the DVC experiment in run names, only the params
the model used, system metrics on CPU when asked, the experiment marked as model training."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tympan import stages, tracking
from tympan.config import DemoConfig, SplitConfig, TrainConfig

pytestmark = pytest.mark.integration


def _git_repo(folder: Path) -> str:
    """A one-commit git repository in `folder`; -> its HEAD."""
    for cmd in (
        ["init", "-q"],
        ["config", "user.email", "t@example.com"],
        ["config", "user.name", "t"],
        ["commit", "-q", "--allow-empty", "-m", "init"],
    ):
        subprocess.run(["git", *cmd], cwd=folder, check=True)
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture
def featurized(tmp_path, monkeypatch, repo_params, mlflow_store):
    """The demo preset on 36 generated clips up to the feature cache, in a git repository that
    is the working folder (as under `dvc repro`); -> (params, HEAD)."""
    head = _git_repo(tmp_path)
    monkeypatch.chdir(tmp_path)
    params = replace(
        repo_params,
        demo=DemoConfig(clips_per_class=6, groups=6, seconds=0.5),
        data=replace(repo_params.data, root="data/demo"),
        split=SplitConfig(strategy="group", val=0.2, test=0.2),
        features=replace(repo_params.features, workers=1),
        train=replace(TrainConfig(), seeds=(0,), epochs=2, batch_size=8),
    )
    stages.run_demo(params, Path("data/demo"))
    stages.run_ingest(params, Path("manifest.csv"), Path("rejects.csv"), Path("ingest.json"))
    stages.run_split(params, Path("manifest.csv"), Path("splits.csv"), Path("split.json"))
    stages.run_featurize(params, Path("manifest.csv"), Path("splits.csv"), Path("features"))
    return params, head


def test_a_train_run_says_what_it_used_where_mlflow_users_look(featurized, monkeypatch):
    params, head = featurized
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-lark")  # what `dvc exp run` sets
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    stages.run_train(params, Path("features"), Path("manifest.csv"), Path("models"))

    record = json.loads(Path("models/train.json").read_text())
    client = MlflowClient()
    parent = client.get_run(record["parent_run_id"])
    child = client.get_run(record["seeds"]["0"]["run_id"])

    assert parent.info.run_name == "lucky-lark/train-demo"
    assert parent.data.tags["dvc.exp_name"] == "lucky-lark"
    for run in (parent, child):
        assert run.data.tags["mlflow.source.git.commit"] == head
        assert run.data.tags["mlflow.source.git.branch"]

        inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
        assert set(inputs) == {"manifest", "features"}
        assert inputs["manifest"].dataset.digest == tracking.dvc_hash(Path("manifest.csv"))
        assert inputs["features"].dataset.digest == tracking.dvc_hash(Path("features"))
        assert inputs["features"].dataset.digest.endswith(".dir")
        for found in inputs.values():
            assert found.dataset.source_type == "dvc"
            assert {t.key: t.value for t in found.tags}["mlflow.data.context"] == "training"
        source = mlflow.data.get_source(inputs["manifest"])
        assert isinstance(source, tracking.DvcSource)
        assert (source.path, source.rev) == ("manifest.csv", head)
        assert json.loads(inputs["manifest"].dataset.profile)["num_rows"] == 36
        assert "label" in inputs["manifest"].dataset.schema

    # CPU run, system metrics asked for through MLflow's own switch
    assert any(k.startswith("system/cpu_utilization") for k in parent.data.metrics)

    logged = parent.data.params
    assert logged["model.name"] == "s3_cnn" and logged["model.channels"] == "32"
    for unused in ("model.filters", "model.units", "model.weights", "train.momentum"):
        assert unused not in logged, unused  # other families' and SGD's
    assert not [k for k in logged if k.startswith("augment.")]  # all off
    assert "features.workers" not in logged and "features.stack.n_mfcc" not in logged
    assert logged["features.n_mels"] == "40" and logged["train.lr"] == "0.001"
    assert record["params"]["model"]["name"] == "s3_cnn"  # what register's model card lists

    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_system_metrics_follow_mlflows_switch(monkeypatch):
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", raising=False)
    assert tracking.system_metrics(cuda=True) is True
    assert tracking.system_metrics(cuda=False) is None  # MLflow's default: off
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    assert tracking.system_metrics(cuda=True) is None  # MLflow reads "false": off on GPUs too


def test_an_existing_experiment_is_marked_unless_its_kind_was_chosen(mlflow_store):
    tracking.connect()
    plain = mlflow.create_experiment("plain")
    chosen = mlflow.create_experiment("chosen", tags={tracking.EXPERIMENT_KIND_TAG: "finetuning"})
    assert tracking.ensure_experiment("plain") == plain
    assert tracking.ensure_experiment("chosen") == chosen
    client = MlflowClient()
    assert client.get_experiment(plain).tags[tracking.EXPERIMENT_KIND_TAG] == (
        "custom_model_development"
    )
    assert client.get_experiment(chosen).tags[tracking.EXPERIMENT_KIND_TAG] == "finetuning"


def test_train_under_a_record_run_logs_into_it_and_its_experiment(featurized, monkeypatch):
    """What `tympan repro` gives DVC's stage commands: MLFLOW_RUN_ID and MLFLOW_EXPERIMENT_ID
    of the record (`mlflow run` sets the latter to Default's 0 when not told otherwise)."""
    params, _ = featurized
    tracking.connect()
    experiment_id = tracking.ensure_experiment(params.tracking.experiment)
    record = MlflowClient().create_run(experiment_id, run_name="repro").info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", record)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    stages.run_train(params, Path("features"), Path("manifest.csv"), Path("models"))
    trained = json.loads(Path("models/train.json").read_text())
    assert trained["parent_run_id"] == record
    child = MlflowClient().get_run(trained["seeds"]["0"]["run_id"])
    assert child.info.experiment_id == experiment_id
    assert child.data.tags["mlflow.parentRunId"] == record
