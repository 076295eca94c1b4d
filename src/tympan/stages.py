"""The pipeline stages: each reads its inputs, calls the library, writes its outputs.

`tympan <stage>` (cli.py) parses paths and calls one function here; dvc.yaml says which paths
and which params each stage gets. Stages that track (train, evaluate, register) share one
MLflow parent run per `train` invocation, whose id travels in `models/train.json`.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
from dataclasses import asdict
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tympan import tracking
from tympan.config import Params, flatten, to_dict
from tympan.data import demo
from tympan.data.ingest import ingest
from tympan.data.manifest import read_manifest, read_table
from tympan.data.splits import split_manifest, split_report
from tympan.evaluation.metrics import classification_metrics, confusion
from tympan.evaluation.plots import confusion_matrix_plot, learning_curves
from tympan.features import build_cache, open_cache
from tympan.serving.bundle import Predictor, save_bundle
from tympan.training import fit, predict_proba, resolve_device

log = logging.getLogger(__name__)

BUNDLE = "bundle.pt"
TRAIN_RECORD = "train.json"
HISTORY = "history.csv"
CURVES = "learning_curves.png"


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def run_demo(params: Params, out: Path) -> None:
    demo.generate(params.demo, out)


def run_ingest(params: Params, manifest: Path, rejects: Path, summary: Path) -> None:
    table, rejected = ingest(params.data, manifest, rejects, summary)
    print(f"ingest: {len(table)} recordings accepted, {len(rejected)} rejected ({rejects})")


def run_split(params: Params, manifest: Path, out: Path, report: Path) -> None:
    table = read_manifest(manifest)
    splits = split_manifest(table, params.split)
    table = table.merge(splits, on="path", validate="one_to_one")
    checked = split_report(table, params.split)  # raises LeakageError before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    splits.to_csv(out, index=False)
    _write_json(report, checked)
    print(
        f"split ({params.split.strategy}): {checked['recordings']} recordings, "
        f"{checked['groups']} groups, no group or file in two splits"
    )


def run_featurize(params: Params, manifest: Path, splits: Path, out: Path) -> None:
    assignment = read_table(splits, ("path", "split"))
    table = read_manifest(manifest).merge(assignment, on="path", how="left", validate="one_to_one")
    if table["split"].isna().any():
        missing = table.loc[table["split"].isna(), "path"].iloc[0]
        raise ValueError(f"{splits}: no split for {missing}; re-run the split stage")
    cache = build_cache(table, params.features, out)
    print(
        f"featurize: {cache.features.shape} {cache.features.dtype} -> {out} "
        f"(key {cache.meta['key']}, stats from {len(cache.rows('train'))} train clips)"
    )


def _tuned(params: Params, tuned: Path | None) -> tuple[Params, dict]:
    """Params with the tune stage's best values applied (none when tuning was off)."""
    if tuned is None:
        return params, {}
    from tympan.tuning.space import apply_overrides

    found = yaml.safe_load(tuned.read_text()) or {}
    overrides = found.get("params") or {}
    if not overrides:
        return params, {}
    return apply_overrides(params, overrides, source=str(tuned)), found


def run_train(
    params: Params, features: Path, manifest: Path, out: Path, tuned: Path | None = None
) -> None:
    params, tuning = _tuned(params, tuned)
    cache = open_cache(features)
    device = resolve_device(params.train.device)
    out.mkdir(parents=True, exist_ok=True)
    tracking.setup(params.tracking.experiment)
    tags = tracking.run_tags(
        "train",
        params.preset,
        {"data": Path(params.data.root), "manifest": manifest, "features": features},
    )
    tags["device"] = tracking.device_name(device)
    if tuning:
        tags.update(
            {"optuna.study": tuning["study"], "optuna.best_trial": str(tuning["best_trial"])}
        )
    history: list[dict] = []
    record: dict = {"seeds": {}}
    members: dict[int, dict[str, torch.Tensor]] = {}
    with mlflow.start_run(run_name=f"train-{params.preset}", tags=tags) as parent:
        mlflow.log_params(
            flatten(
                {
                    "features": to_dict(params.features),
                    "model": to_dict(params.model),
                    "train": to_dict(params.train),
                }
            )
        )
        mlflow.log_params(
            {
                "n_train": len(cache.rows("train")),
                "n_val": len(cache.rows("val")),
                "n_classes": len(cache.labels),
                "feature_key": cache.meta["key"],
            }
        )
        record.update(parent_run_id=parent.info.run_id, experiment_id=parent.info.experiment_id)
        for seed in params.train.seeds:
            with mlflow.start_run(
                run_name=f"seed-{seed}", nested=True, tags={**tags, "tympan.seed": str(seed)}
            ) as child:
                mlflow.log_params({"seed": seed})
                result = fit(
                    cache,
                    params.model,
                    params.train,
                    seed,
                    device,
                    on_epoch=lambda e: mlflow.log_metrics(
                        {k: v for k, v in asdict(e).items() if k != "epoch"}, step=e.epoch
                    ),
                )
                best = result.history[result.best_epoch - 1]
                mlflow.log_metrics(
                    {
                        "best_epoch": result.best_epoch,
                        "best_val_loss": best.val_loss,
                        "best_val_accuracy": best.val_accuracy,
                        "best_val_f1_macro": best.val_f1_macro,
                    }
                )
                history += [{"seed": seed, **asdict(e)} for e in result.history]
                members[seed] = {k: v.cpu() for k, v in result.model.state_dict().items()}
                record["seeds"][str(seed)] = {
                    "run_id": child.info.run_id,
                    "best_epoch": result.best_epoch,
                    "epochs_run": len(result.history),
                    "stopped_early": result.stopped_early,
                    "val_loss": best.val_loss,
                    "val_accuracy": best.val_accuracy,
                    "val_f1_macro": best.val_f1_macro,
                }
        accuracies = [s["val_accuracy"] for s in record["seeds"].values()]
        mlflow.log_metrics(
            {
                "val_accuracy_mean": statistics.fmean(accuracies),
                "val_accuracy_std": statistics.pstdev(accuracies),
            }
        )
        save_bundle(
            out / BUNDLE,
            params.features,
            params.model,
            cache.labels,
            tuple(cache.features.shape[2:]),
            cache.mean,
            cache.std,
            members,
        )
        pd.DataFrame(history).to_csv(out / HISTORY, index=False)
        learning_curves(pd.DataFrame(history), out / CURVES)
        mlflow.log_artifact(str(out / CURVES), "plots")
        mlflow.log_artifact(str(out / HISTORY), "plots")
    _write_json(out / TRAIN_RECORD, record)
    print(
        f"train: {len(members)} seed(s) on {device}; val accuracy "
        f"{statistics.fmean(accuracies):.4f} +- {statistics.pstdev(accuracies):.4f}; "
        f"MLflow run {record['parent_run_id']}"
    )


def run_tune(
    params: Params,
    features: Path,
    out: Path | None,
    trials: Path | None,
    worker: bool = False,
    wait_s: float = 0.0,
) -> None:
    """The tune stage (writes `out` and `trials`) or a worker on a shared study (writes nothing)."""
    from tympan.tuning.report import write_disabled, write_outputs
    from tympan.tuning.space import validate_space
    from tympan.tuning.study import (
        TuneError,
        make_objective,
        open_storage,
        open_study,
        parent_run,
        study_name,
        top_up,
        wait_for_queue,
        wait_for_study,
        work,
    )

    if not params.tune.enabled:
        if worker:
            raise TuneError(
                "tune.enabled is false in the params file: there is no study to work on"
            )
        write_disabled(out, trials)
        print(f"tune: disabled (tune.enabled: false); train uses the params file as it is ({out})")
        return
    validate_space(params)
    cache = open_cache(features)
    storage = open_storage(params, worker=worker)
    study = open_study(params, storage, study_name(params, cache.meta["key"]))
    device = resolve_device(params.train.device)
    if worker:
        wait_for_queue(study, wait_s)
    else:
        added = top_up(study, params)
        print(
            f"tune: study {study.study_name}, {added} trial(s) queued, "
            f"{params.tune.n_trials} in all"
        )
    objective = make_objective(params, cache, device, parent_run(study, params))
    if worker:
        work(study, objective, params.tune.timeout_s)
        print(f"tune worker: queue of {study.study_name} is empty")
        return
    wait_for_study(
        study, objective, params.tune.timeout_s, poll_s=max(1.0, params.tune.heartbeat_s / 4)
    )
    summary = write_outputs(study, params, study.user_attrs["mlflow_parent_run_id"], out, trials)
    print(
        f"tune: best trial {summary['best_trial']} {summary['metric']} {summary['value']:.4f} "
        f"+- {summary['seed_std']:.4f} with {summary['params']}; {summary['trials']}, "
        f"{summary['epochs_trained']} seed-epochs -> {out}"
    )


def _summary(per_seed: dict[str, dict[str, float]]) -> tuple[dict, dict]:
    names = next(iter(per_seed.values())).keys()
    mean = {k: statistics.fmean(s[k] for s in per_seed.values()) for k in names}
    std = {k: statistics.pstdev(s[k] for s in per_seed.values()) for k in names}
    return mean, std


def run_evaluate(params: Params, features: Path, models: Path, metrics: Path, plots: Path) -> None:
    cache = open_cache(features)
    record = json.loads((models / TRAIN_RECORD).read_text())
    predictor = Predictor.load(models / BUNDLE)
    device = torch.device("cpu")
    rows = cache.rows("test")
    targets = cache.targets()[rows]
    per_seed_probs = {
        seed: predict_proba(member, cache.features, rows, 256, device)
        for seed, member in zip(record["seeds"], predictor.members, strict=True)
    }
    per_seed = {seed: classification_metrics(targets, p) for seed, p in per_seed_probs.items()}
    ensemble_probs = np.mean(list(per_seed_probs.values()), axis=0)
    ensemble = classification_metrics(targets, ensemble_probs)
    mean, std = _summary(per_seed)
    results = {
        "n_test": len(rows),
        "ensemble": ensemble,
        "seed_mean": mean,
        "seed_std": std,
        "seeds": per_seed,
    }
    _write_json(metrics, results)

    plots.mkdir(parents=True, exist_ok=True)
    predicted = ensemble_probs.argmax(axis=1)
    labels = np.asarray(cache.labels)
    predictions = pd.DataFrame(
        {
            "path": cache.index["path"].to_numpy()[rows],
            "actual": labels[targets],
            "predicted": labels[predicted],
            "confidence": ensemble_probs.max(axis=1).round(4),
        }
    )
    predictions[["actual", "predicted"]].to_csv(plots / "confusion.csv", index=False)
    predictions.to_csv(plots / "test_predictions.csv", index=False)
    matrix = confusion(targets, ensemble_probs)
    confusion_matrix_plot(
        matrix,
        cache.labels,
        plots / "confusion.png",
        f"test, ensemble of {len(per_seed)} (accuracy {ensemble['accuracy']:.3f})",
    )
    shutil.copyfile(models / CURVES, plots / CURVES)  # drawn by train from the same history

    tracking.connect()
    client = MlflowClient()
    for seed, values in per_seed.items():
        run_id = record["seeds"][seed]["run_id"]
        for key, value in values.items():
            client.log_metric(run_id, f"test_{key}", value)
    with mlflow.start_run(run_id=record["parent_run_id"]):
        mlflow.log_metrics({f"test_{k}": v for k, v in ensemble.items()})
        mlflow.log_metrics({f"test_seed_mean_{k}": v for k, v in mean.items()})
        mlflow.log_metrics({f"test_seed_std_{k}": v for k, v in std.items()})
        mlflow.log_artifact(str(metrics), "metrics")
        mlflow.log_artifact(str(plots / "confusion.png"), "plots")
        mlflow.log_artifact(str(plots / "test_predictions.csv"), "plots")
        mlflow.log_text(matrix_to_text(matrix, cache.labels), "plots/confusion.txt")
    print(
        f"evaluate: test accuracy ensemble {ensemble['accuracy']:.4f}, per seed "
        f"{mean['accuracy']:.4f} +- {std['accuracy']:.4f} on {len(rows)} clips"
    )


def matrix_to_text(matrix: np.ndarray, labels: list[str]) -> str:
    width = max(len(label) for label in labels) + 1
    lines = ["true \\ predicted".ljust(width) + " ".join(label.rjust(width) for label in labels)]
    for label, row in zip(labels, matrix, strict=True):
        lines.append(label.ljust(width) + " ".join(str(v).rjust(width) for v in row))
    return "\n".join(lines) + "\n"


def promotion(
    metric: str, value: float, best: float, min_delta: float, champion_version: str
) -> tuple[str, str]:
    """`champion` only when `value` beats the champion's `best` by more than `min_delta`."""
    if value > best + min_delta:
        verdict, alias = "beats", "champion"
    else:
        verdict, alias = "does not beat", "challenger"
    return alias, (
        f"test {metric} {value:.4f} {verdict} champion v{champion_version} "
        f"({best:.4f}) by more than {min_delta}"
    )


def run_register(params: Params, models: Path, metrics: Path, out: Path) -> None:
    from tympan.serving.pyfunc import log_audio_model

    cfg = params.register
    record = json.loads((models / TRAIN_RECORD).read_text())
    results = json.loads(metrics.read_text())
    value = results["ensemble"][cfg.metric]
    spread = results["seed_std"][cfg.metric]
    tracking.connect()
    client = MlflowClient()
    with mlflow.start_run(run_id=record["parent_run_id"]) as run:
        info = log_audio_model(models / BUNDLE, params.features.sample_rate, cfg.name)
        tags = dict(run.data.tags)
    version = str(info.registered_model_version)
    version_tags = {
        "git.commit": tags.get("git.commit", "unknown"),
        "dvc.data": tags.get("dvc.data", "unknown"),
        "dvc.features": tags.get("dvc.features", "unknown"),
        "tympan.preset": params.preset,
        f"test_{cfg.metric}": repr(value),  # exact: the next version is compared against it
        f"test_{cfg.metric}_seed_std": repr(spread),
    }
    for key, tag in version_tags.items():
        client.set_model_version_tag(cfg.name, version, key, tag)

    try:
        champion = client.get_model_version_by_alias(cfg.name, "champion")
    except MlflowException:
        champion = None
    if champion is None:
        alias, reason = "champion", "no champion yet"
    else:
        best = float(champion.tags.get(f"test_{cfg.metric}", "-inf"))
        alias, reason = promotion(cfg.metric, value, best, cfg.min_delta, str(champion.version))
    client.set_registered_model_alias(cfg.name, alias, version)
    client.set_model_version_tag(cfg.name, version, "tympan.promotion", reason)
    result = {
        "name": cfg.name,
        "version": int(version),
        "alias": alias,
        "reason": reason,
        "metric": cfg.metric,
        "value": value,
        "seed_std": spread,
        "model_uri": f"models:/{cfg.name}/{version}",
        "run_id": record["parent_run_id"],
        "tracking_uri": tracking.tracking_uri(),
    }
    _write_json(out, result)
    print(f"register: {cfg.name} v{version} -> @{alias} ({reason})")
