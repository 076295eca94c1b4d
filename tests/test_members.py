"""Members (CV folds x seeds) trained several at a time in worker processes: the same members,
in the same order, with the same weights and MLflow child runs as one at a time."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from tympan import stages
from tympan.config import CVConfig
from tympan.training.members import process_count


def test_process_count_follows_the_param_the_members_and_the_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert process_count(1, 6, cpu) == 1
    assert process_count(4, 6, cpu) == 4
    assert process_count(8, 3, cpu) == 3  # never more workers than members
    assert 1 <= process_count(0, 64, cpu) <= 64  # 0: one per CPU
    assert process_count(4, 6, cuda) == 1  # one process already keeps a GPU busy


@pytest.mark.integration
def test_members_in_two_processes_equal_members_one_at_a_time(tmp_path, mlflow_store, repo_params):
    params = replace(
        repo_params,
        demo=replace(repo_params.demo, clips_per_class=6, groups=6),
        data=replace(repo_params.data, root=str(tmp_path / "demo")),
        split=replace(repo_params.split, val=0.2),
        cv=CVConfig(folds=2),
        train=replace(repo_params.train, seeds=(0, 1), epochs=2, batch_size=16, processes=1),
    )
    d = tmp_path
    stages.run_demo(params, d / "demo")
    stages.run_ingest(params, d / "manifest.csv", d / "rejects.csv", d / "ingest.json")
    stages.run_split(params, d / "manifest.csv", d / "splits.csv", d / "split.json")
    stages.run_featurize(params, d / "manifest.csv", d / "splits.csv", d / "features")
    stages.run_train(params, d / "features", d / "manifest.csv", d / "one", None)
    two = replace(params, train=replace(params.train, processes=2))
    stages.run_train(two, d / "features", d / "manifest.csv", d / "two", None)

    one_rec = json.loads((d / "one" / stages.TRAIN_RECORD).read_text())
    two_rec = json.loads((d / "two" / stages.TRAIN_RECORD).read_text())
    names = [f"fold{k}-seed{s}" for k in (0, 1) for s in (0, 1)]
    assert list(one_rec["seeds"]) == list(two_rec["seeds"]) == names
    for name in names:
        a, b = one_rec["seeds"][name], two_rec["seeds"][name]
        assert a["run_id"] != b["run_id"]
        for key in ("best_epoch", "epochs_run", "seed", "fold"):
            assert a[key] == b[key], (name, key)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4, abs=1e-6)
        assert b["val_accuracy"] == pytest.approx(a["val_accuracy"], abs=1e-9)

    one_bundle = torch.load(d / "one" / stages.BUNDLE, weights_only=False)
    two_bundle = torch.load(d / "two" / stages.BUNDLE, weights_only=False)
    assert list(one_bundle["members"]) == list(two_bundle["members"]) == names
    for name in names:
        for key, value in one_bundle["members"][name].items():
            torch.testing.assert_close(
                two_bundle["members"][name][key], value, rtol=1e-4, atol=1e-5
            )
    one_hist = pd.read_csv(d / "one" / stages.HISTORY)
    two_hist = pd.read_csv(d / "two" / stages.HISTORY)
    assert one_hist[["member", "epoch"]].equals(two_hist[["member", "epoch"]])
    np.testing.assert_allclose(two_hist["val_loss"], one_hist["val_loss"], rtol=1e-4)

    # every worker's member is a child of the parent run, with a metric per epoch
    client = MlflowClient()
    parent = two_rec["parent_run_id"]
    children = client.search_runs(
        [two_rec["experiment_id"]], f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert sorted(r.info.run_id for r in children) == sorted(
        two_rec["seeds"][n]["run_id"] for n in names
    )
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags["tympan.fold"] in ("0", "1")
        assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 2
        assert "best_val_loss" in run.data.metrics
