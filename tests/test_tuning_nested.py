"""Tuning under cross-validation is nested: one study per outer fold, on that fold's own
train/val split, so no trial ever trains or is scored on the recordings its fold tests on;
train applies each fold's own values; the split report and model card name the protocol."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from tympan import stages
from tympan.config import ConfigError, CVConfig, Params, SearchParam
from tympan.data.splits import tuning_protocol
from tympan.evaluation.card import CardInputs, model_card
from tympan.features import open_cache
from tympan.tuning.best import (
    Tuned,
    read_best_params,
    write_best_params,
    write_best_params_per_fold,
)
from tympan.tuning.study import rows_digest

from conftest import register_in

FOLDS = 3
LRS = (0.001, 0.003)


@pytest.fixture(scope="module")
def nested(tmp_path_factory, repo_params) -> tuple[Params, Path]:
    """The demo shrunk to 48 clips in 6 sessions, 3-fold CV by session, taken through split,
    featurize and a real nested search (2 learning rates per fold, one seed, two epochs)."""
    d = tmp_path_factory.mktemp("nested")
    tune = replace(
        repo_params.tune,
        enabled=True,
        n_trials=2,
        seeds=(0,),
        sampler="grid",
        pruner="none",
        storage=f"sqlite:///{d / 'optuna.db'}",
        study_name="nested",
        heartbeat_s=1,
        space={"train": {"lr": SearchParam("categorical", choices=LRS)}},
    )
    params = replace(
        repo_params,
        demo=replace(repo_params.demo, clips_per_class=8, groups=6),
        data=replace(repo_params.data, root=str(d / "demo")),
        split=replace(repo_params.split, val=0.2),
        cv=CVConfig(folds=FOLDS),
        train=replace(repo_params.train, seeds=(0,), epochs=2, batch_size=16),
        evaluate=replace(repo_params.evaluate, worst_k=2),
        tune=tune,
        tracking=replace(repo_params.tracking, experiment="nested"),
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{d / 'mlruns.db'}")
        stages.run_demo(params, d / "demo")
        stages.run_ingest(params, d / "manifest.csv", d / "rejects.csv", d / "ingest.json")
        stages.run_split(params, d / "manifest.csv", d / "splits.csv", d / "split.json")
        stages.run_featurize(params, d / "manifest.csv", d / "splits.csv", d / "features")
        stages.run_tune(
            params, d / "features", d / "best.yaml", d / "trials.csv", d / "summary.json"
        )
        yield params, d


@pytest.fixture
def tracked(nested, monkeypatch) -> tuple[Params, Path]:
    """`nested` with its MLflow store as the tracking URI of the test."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{nested[1] / 'mlruns.db'}")
    return nested


def test_no_trial_trains_or_validates_on_its_folds_test_recordings(tracked):
    params, d = tracked
    splits = pd.read_csv(d / "splits.csv")
    manifest = pd.read_csv(d / "manifest.csv").merge(splits, on="path")
    cache = open_cache(d / "features")
    best = yaml.safe_load((d / "best.yaml").read_text())
    assert set(best["tuned"]) == set(best["optuna"]) == {f"fold_{k}" for k in range(FOLDS)}
    client = MlflowClient()
    for k in range(FOLDS):
        name = best["optuna"][f"fold_{k}"]["study"]
        assert name.startswith("nested-") and name.endswith(f"-fold-{k}")
        study = optuna.load_study(study_name=name, storage=params.tune.storage)
        assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2
        assert {t.params["train.lr"] for t in study.trials} == set(LRS)  # each fold's own grid
        # the rows this fold's study may use, as its MLflow run recorded them
        parent = study.user_attrs["mlflow_parent_run_id"]
        assert client.get_run(parent).data.tags["tympan.fold"] == str(k)
        rows = mlflow.artifacts.load_dict(f"runs:/{parent}/tuning/rows.json")
        assert rows["fold"] == k
        used = cache.index.iloc[rows["train"] + rows["val"]]
        test = manifest[manifest[f"split_{k}"] == "test"]
        assert len(test) > 0 and rows["test_rows_never_used"] == len(test)
        assert set(used["path"]).isdisjoint(test["path"])  # no test recording of this fold
        assert set(used["group"]).isdisjoint(test["group"])  # nor any of its sessions
        assert set(used["path"]) == set(manifest["path"]) - set(test["path"])  # the rest, all
        assert set(cache.index.iloc[rows["train"]]["path"]).isdisjoint(
            cache.index.iloc[rows["val"]]["path"]
        )
        # every trial recorded exactly these rows as the ones its trainers used
        for trial in study.trials:
            attrs = trial.user_attrs
            assert attrs["tympan.fold"] == k
            assert (attrs["rows.train"], attrs["rows.train_sha256"]) == (
                len(rows["train"]),
                rows_digest(rows["train"]),
            )
            assert (attrs["rows.val"], attrs["rows.val_sha256"]) == (
                len(rows["val"]),
                rows_digest(rows["val"]),
            )
            run = client.get_run(attrs["mlflow_run_id"])
            assert run.data.tags["tympan.fold"] == str(k)
            assert run.data.tags["tympan.rows.train"] == rows["train_sha256"]
            assert run.data.params["n_val"] == str(len(rows["val"]))
    trials = pd.read_csv(d / "trials.csv")
    assert sorted(trials["fold"].unique()) == list(range(FOLDS)) and len(trials) == FOLDS * 2
    assert {"rows_train_sha256", "rows_val_sha256"} <= set(trials.columns)
    figures = json.loads((d / "summary.json").read_text())
    assert figures["folds"] == FOLDS and figures["trials_complete"] == FOLDS * 2
    assert figures["seed_epochs"] == FOLDS * 2 * 1 * 2  # folds x trials x seeds x epochs
    assert set(figures) == {
        "best_val_accuracy",
        "best_val_accuracy_fold_std",
        "folds",
        "trials_complete",
        "trials_pruned",
        "trials_fail",
        "seed_epochs",
    }


def test_best_params_per_fold_round_trip(tmp_path):
    folds = {k: Tuned({"train.lr": lr}, f"s-fold-{k}", k) for k, lr in enumerate(LRS)}
    write_best_params_per_fold(tmp_path / "best.yaml", folds)
    raw = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert raw["tuned"] == {"fold_0": {"train": {"lr": 0.001}}, "fold_1": {"train": {"lr": 0.003}}}
    found = read_best_params(tmp_path / "best.yaml")
    assert found.folds == folds and found.values == {}
    assert found.per_fold("train.lr") == "fold 0: 0.001; fold 1: 0.003"
    raw["tuned"]["train"] = {"lr": 0.1}  # fold keys beside a section: not a file tune writes
    (tmp_path / "best.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="only fold_<k> keys"):
        read_best_params(tmp_path / "best.yaml")


def test_train_applies_each_folds_own_values(tracked, capsys):
    params, d = tracked
    lrs = {0: 0.0005, 1: 0.002, 2: 0.004}
    write_best_params_per_fold(
        d / "own.yaml", {k: Tuned({"train.lr": lr}, f"s-fold-{k}", 7 + k) for k, lr in lrs.items()}
    )
    stages.run_train(params, d / "features", d / "manifest.csv", d / "own", d / "own.yaml")
    assert "fold 2 (study s-fold-2, trial 9):" in capsys.readouterr().out
    record = json.loads((d / "own" / stages.TRAIN_RECORD).read_text())
    assert record["tuning"]["protocol"] == "nested_cv" and record["tuned"] == {}
    assert record["params"]["train"]["lr"] == "fold 0: 0.0005; fold 1: 0.002; fold 2: 0.004"
    history = pd.read_csv(d / "own" / stages.HISTORY)
    client = MlflowClient()
    for name, member in record["seeds"].items():
        lr = lrs[member["fold"]]
        assert member["tuned"] == {"train.lr": lr}
        run = client.get_run(member["run_id"])
        assert run.data.params["train.lr"] == str(lr)
        assert run.data.tags["optuna.study"] == f"s-fold-{member['fold']}"
        # the learning rate the optimiser really used, epoch by epoch
        assert history.loc[history["member"] == name, "lr"].iloc[0] == pytest.approx(lr)
    parent = client.get_run(record["parent_run_id"])
    assert parent.data.tags["tympan.tuning"] == "nested_cv"
    assert parent.data.tags["tympan.tuned_params"] == "train.lr (per fold)"


def test_train_refuses_one_set_of_values_under_cv(tracked):
    params, d = tracked
    write_best_params(d / "flat.yaml", {"train.lr": 0.002}, "s", 0)
    with pytest.raises(ConfigError, match=r"one set of tuned values.*re-run the tune stage"):
        stages.run_train(params, d / "features", d / "manifest.csv", d / "flat", d / "flat.yaml")


def test_a_model_shape_param_cannot_be_tuned_per_fold(tracked):
    params, d = tracked
    space = {"model": {"channels": SearchParam("categorical", choices=(8, 16))}}
    shaped = replace(params, tune=replace(params.tune, space=space))
    with pytest.raises(ConfigError, match=r"tune.space.model.channels under 3-fold CV"):
        stages.run_tune(shaped, d / "features", d / "b.yaml", d / "t.csv", d / "s.json")
    dropout = {"model": {"dropout": SearchParam("categorical", choices=(0.1, 0.3))}}
    from tympan.tuning.space import validate_nested_space

    validate_nested_space(replace(params, tune=replace(params.tune, space=dropout)), FOLDS)


def test_split_report_and_model_card_name_the_protocol(tracked):
    params, d = tracked
    report = json.loads((d / "split.json").read_text())
    assert report["tuning"]["kind"] == "nested_cv" and report["tuning"]["outer_folds"] == FOLDS
    assert report["tuning"]["text"].startswith("nested CV: 3 outer folds, each tuned by its own")
    # the real chain: the search's own values -> train -> evaluate -> register
    stages.run_train(params, d / "features", d / "manifest.csv", d / "models", d / "best.yaml")
    stages.run_evaluate(
        params, d / "features", d / "models", d / "metrics", d / "plots", d / "test_set.json"
    )
    register_in(params, d)
    card = (d / "card.md").read_text()
    assert f"- Tuning: {report['tuning']['text']}." in card
    assert "## Tuning" in card and "Tuned per fold (nested CV)" in card
    best = yaml.safe_load((d / "best.yaml").read_text())
    for k in range(FOLDS):
        lr = best["tuned"][f"fold_{k}"]["train"]["lr"]
        study, trial = best["optuna"][f"fold_{k}"]["study"], best["optuna"][f"fold_{k}"]["trial"]
        assert f"| {k} | `{study}` | {trial} | {lr} |" in card
    assert "Tuning mismatch" not in card
    registered = json.loads((d / "registered.json").read_text())
    version = MlflowClient().get_model_version(registered["name"], str(registered["version"]))
    assert version.tags["tympan.tuning"] == "nested_cv"


@pytest.mark.parametrize(
    ("tuned", "cv", "kind", "words"),
    [
        (False, CVConfig(folds=5), "none", "no tuning"),
        (True, CVConfig(), "val_split", "tuned on the val split"),
        (True, CVConfig(folds=5), "nested_cv", "nested CV: 5 outer folds"),
    ],
)
def test_every_protocol_has_its_sentence_in_the_card(tuned, cv, kind, words):
    protocol = tuning_protocol(tuned, cv)
    assert protocol["kind"] == kind and protocol["text"].startswith(words)
    card = model_card(
        CardInputs(
            name="m",
            version="1",
            alias="champion",
            reason="no champion yet",
            preset="demo",
            metric="accuracy",
            tags={},
            split={"strategy": "group", "seed": 0, "tuning": protocol},
            test_set={"hash": "h", "clips": 10, "groups": 2},
            results={
                "ensemble": {"accuracy": 0.5},
                "seed_mean": {"accuracy": 0.5},
                "seed_std": {"accuracy": 0.0},
            },
            tuning={"protocol": "none"},
        )
    )
    assert f"- Tuning: {protocol['text']}." in card
    assert ("Tuning mismatch" in card) == (kind != "none")
