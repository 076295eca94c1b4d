"""k-fold cross-validation: fold assignment, per-fold leak checks and statistics, and the
train/evaluate stages run once per fold with figures over folds x seeds."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tympan.config import ConfigError, CVConfig, SplitConfig, params_from_dict
from tympan.data.splits import LeakageError, SplitError, split_manifest, split_report
from tympan.features import open_cache
from tympan.features.cache import train_stats

from conftest import run_to_evaluate


def _manifest(groups: int = 12, per_group: int = 4, labels: int = 3) -> pd.DataFrame:
    rows = []
    for g in range(groups):
        for i in range(per_group):
            rows.append(
                {
                    "path": f"g{g}_{i}.wav",
                    "label": f"c{g % labels}",
                    "group": f"g{g}",
                    "sha256": f"{g * 100 + i:064x}",
                    "fold": str(g % 4 + 1),
                }
            )
    return pd.DataFrame(rows)


def test_dealt_folds_keep_groups_whole_and_every_fold_has_three_splits():
    manifest = _manifest()
    out = split_manifest(manifest, SplitConfig(val=0.2), CVConfig(folds=3))
    assert list(out.columns) == ["path", "cv_fold", "split_0", "split_1", "split_2", "split"]
    table = manifest.merge(out, on="path")
    assert (table.groupby("group")["cv_fold"].nunique() == 1).all()
    assert sorted(table["cv_fold"].unique()) == [0, 1, 2]
    for k in range(3):
        split = table[f"split_{k}"]
        assert (split == "test").to_numpy().tolist() == (table["cv_fold"] == k).tolist()
        assert set(split) == {"train", "val", "test"}
        assert (table.groupby("group")[f"split_{k}"].nunique() == 1).all()
    assert (table["split"] == table["split_0"]).all()
    report = split_report(table, SplitConfig(val=0.2), CVConfig(folds=3))
    assert report["cv"] == {"folds": 3, "column": None}
    assert [f["checks"]["groups_in_two_splits"] for f in report["folds"]] == [0, 0, 0]
    assert sum(f["recordings"]["test"] for f in report["folds"]) == len(manifest)


def test_folds_from_a_column_follow_its_values_and_move_straddling_groups():
    manifest = _manifest()
    manifest.loc[manifest["path"] == "g0_3.wav", "fold"] = "3"  # g0 straddles folds 1 and 3
    out = split_manifest(manifest, SplitConfig(val=0.15), CVConfig(folds=4, column="fold"))
    table = manifest.merge(out, on="path")
    others = table[table["group"] != "g0"]
    assert (others["cv_fold"] == others["fold"].astype(int) - 1).all()
    assert set(table.loc[table["group"] == "g0", "cv_fold"]) == {0}  # 3 of its 4 are fold 1
    with pytest.raises(SplitError, match=r"cv.folds=5 but column 'fold' has 4 values"):
        split_manifest(manifest, SplitConfig(), CVConfig(folds=5, column="fold"))
    with pytest.raises(SplitError, match=r"cv\.column='nope' is not a manifest column"):
        split_manifest(manifest, SplitConfig(), CVConfig(folds=4, column="nope"))


def test_a_group_in_two_test_folds_is_leakage():
    manifest = _manifest()
    table = manifest.merge(split_manifest(manifest, SplitConfig(), CVConfig(folds=3)), on="path")
    table.loc[table["path"] == "g0_0.wav", "cv_fold"] = (table["cv_fold"].iloc[0] + 1) % 3
    with pytest.raises(LeakageError, match="more than one test fold"):
        split_report(table, SplitConfig(), CVConfig(folds=3))


def test_cv_params_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"cv\.folds must be 0"):
        params_from_dict({"cv": {"folds": 1}})
    with pytest.raises(SplitError, match=r"split\.val=0\.7"):
        split_manifest(_manifest(), SplitConfig(val=0.7), CVConfig(folds=3))


@pytest.mark.integration
def test_cv_trains_and_evaluates_once_per_fold(tmp_path, mlflow_store, repo_params, capsys):
    from tympan import stages
    from tympan.cli import main

    params = replace(
        repo_params,
        demo=replace(repo_params.demo, clips_per_class=8, groups=6),
        data=replace(repo_params.data, root=str(tmp_path / "demo")),
        split=replace(repo_params.split, val=0.2),
        cv=CVConfig(folds=3),
        train=replace(repo_params.train, seeds=(0, 1), epochs=2, batch_size=16),
        evaluate=replace(repo_params.evaluate, worst_k=3),
    )
    d = tmp_path
    stages.run_demo(params, d / "demo")
    run_to_evaluate(params, d)

    cache = open_cache(d / "features")
    assert cache.folds == [0, 1, 2]
    for k in cache.folds:  # each fold scales with its own train rows only
        fold = cache.for_fold(k)
        mean, std = train_stats(cache.features, fold.rows("train"))
        np.testing.assert_allclose(fold.mean, mean, rtol=1e-5)
        np.testing.assert_allclose(fold.std, std, rtol=1e-5)
    assert not np.allclose(cache.for_fold(1).mean, cache.for_fold(2).mean)

    results = json.loads((d / "metrics" / "test.json").read_text())
    members = [f"fold{k}-seed{s}" for k in range(3) for s in (0, 1)]
    assert list(results["seeds"]) == members
    assert results["n_test"] == len(cache.index)  # every recording tested once
    assert set(results["cv"]["per_fold"]) == {"0", "1", "2"}
    accuracies = [results["seeds"][m]["accuracy"] for m in members]
    assert results["seed_mean"]["accuracy"] == pytest.approx(np.mean(accuracies))
    assert results["seed_std"]["accuracy"] == pytest.approx(np.std(accuracies))
    assert all(np.isfinite(v) for v in results["ensemble"].values())
    predictions = pd.read_csv(d / "plots" / "test_predictions.csv")
    assert sorted(predictions["path"]) == sorted(cache.index["path"])

    record = json.loads((d / "models" / stages.TRAIN_RECORD).read_text())
    client = MlflowClient()
    for name, info in record["seeds"].items():
        run = client.get_run(info["run_id"])
        assert run.data.tags["tympan.fold"] == str(info["fold"]) == name[4]
        assert run.data.params["n_train"] == str(len(cache.for_fold(info["fold"]).rows("train")))
        assert "test_accuracy" in run.data.metrics
    held_out = json.loads((d / "test_set.json").read_text())
    assert held_out["clips"] == len(cache.index)

    # what each stage says: which fold and member of how many, and that figures are per member
    said = capsys.readouterr()
    assert "featurize: CV fold 2 (3 of 3): normalisation statistics" in said.out
    assert "train member 6 of 6 (fold 2, seed 1): 2/2 epochs (100%)" in said.err
    assert "train: 6 members (3 folds x 2 seeds)" in said.out
    assert "(out-of-fold ensemble of 6 members (3 folds x 2 seeds)), per member (fold x seed)" in (
        said.out
    )
    registered = {"name": "m", "version": 1, "alias": "champion", "reason": "first"}
    registered["metric"] = "accuracy"
    (d / "registered.json").write_text(json.dumps({**registered, "tracking_uri": mlflow_store}))
    main(
        [
            "summary",
            "--registered",
            str(d / "registered.json"),
            "--metrics",
            str(d / "metrics/test.json"),
        ]
    )
    summary = capsys.readouterr().out
    assert "out of fold (ensemble of 6 members (3 folds x 2 seeds); per-member mean +- std)" in (
        summary
    )
    assert "  accuracy  " in summary and " members " in summary and " seeds " not in summary


def test_fold_number_is_in_the_test_set_hash():
    from tympan.evaluation.card import fingerprint

    index = _manifest().assign(cv_fold=[0, 1, 2] * 16)
    assert fingerprint(index)["hash"] != fingerprint(index.assign(cv_fold=[1, 2, 0] * 16))["hash"]
    assert fingerprint(index.drop(columns="cv_fold"))["hash"] != fingerprint(index)["hash"]
