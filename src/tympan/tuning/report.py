"""What a finished search leaves behind: best params file, trials table, MLflow plots and tags
(one study, or under nested CV one per outer fold)."""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import optuna
import pandas as pd
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from tympan.config import Params, masked
from tympan.tuning.best import (
    Tuned,
    write_best_params,
    write_best_params_per_fold,
    write_untuned,
)
from tympan.tuning.study import TuneError, count_trials, direction, storage_url

log = logging.getLogger(__name__)
# what a nested-CV trial records of the rows it used (tympan.tuning.study._record_rows)
ROW_ATTRS = ("rows.train", "rows.train_sha256", "rows.val", "rows.val_sha256")


def trials_table(study: optuna.Study, fold: int | None = None) -> pd.DataFrame:
    """One row per trial; with `fold` (nested CV) also its fold and the count and digest of
    the rows it trained and validated on."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        rows.append(
            {
                **({} if fold is None else {"fold": fold}),
                "number": trial.number,
                "state": trial.state.name.lower(),
                "value": trial.value,
                "seed_std": attrs.get("seed_std"),
                "epochs_trained": attrs.get("epochs_trained", 0),
                "retry_of": trial.system_attrs.get("failed_trial"),
                **(
                    {}
                    if fold is None
                    else {key.replace(".", "_"): attrs.get(key) for key in ROW_ATTRS}
                ),
                **{f"param.{k}": v for k, v in trial.params.items()},
            }
        )
    return pd.DataFrame(rows)


def _study_result(study: optuna.Study) -> dict:
    """One study's best trial, trials per state and seed-epochs; a study with no complete
    trial is a TuneError."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise TuneError(
            f"study {study.study_name!r}: no trial completed (all pruned or failed); "
            "see the trials in optuna-dashboard and widen tune.space or raise tune.n_trials"
        )
    best = study.best_trial
    counts = {
        state.name.lower(): count_trials(study, state)
        for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    }
    trials = study.get_trials(deepcopy=False)
    epochs = sum(int(t.user_attrs.get("epochs_trained", 0)) for t in trials)
    return {
        "study": study.study_name,
        "best_trial": best.number,
        "value": best.value,
        "seed_std": best.user_attrs.get("seed_std"),
        "trials": counts,
        "epochs_trained": epochs,
        "params": dict(best.params),
        "complete": [t.value for t in complete],
    }


def write_outputs(
    studies: dict[int | None, optuna.Study],
    params: Params,
    out: Path,
    trials_csv: Path,
    summary_json: Path,
) -> dict:
    """Best params for train (a DVC params file), the trials table, the search's figures (a
    DVC metrics file) and each study's summary in MLflow; -> the summary.

    `studies` is `{None: study}` without CV, `{k: fold k's study}` under nested CV; then the
    best params hold each fold's own values and the figures are over folds (the mean of the
    folds' best values and its spread, trials and seed-epochs summed)."""
    results = {fold: _study_result(study) for fold, study in studies.items()}
    metric = params.tune.metric
    summary = {
        "storage": masked(storage_url(params.tune)),
        "metric": metric,
        "direction": direction(metric),
        "seeds": list(params.tune.seeds),
        "trials": {
            state: sum(r["trials"][state] for r in results.values())
            for state in ("complete", "pruned", "fail")
        },
        "epochs_trained": sum(r["epochs_trained"] for r in results.values()),
    }
    counts = summary["trials"]
    if None in results:  # without CV: one study
        one = results[None]
        summary = {"study": one["study"], **summary}
        summary.update({k: one[k] for k in ("best_trial", "value", "seed_std", "params")})
        write_best_params(out, one["params"], one["study"], one["best_trial"])
        figures = {
            f"best_{metric}": one["value"],
            f"best_{metric}_seed_std": one["seed_std"],
        }
        table = trials_table(studies[None])
    else:
        values = [r["value"] for r in results.values()]
        summary.update(
            value=statistics.fmean(values),
            fold_std=statistics.pstdev(values),
            folds={
                fold: {k: r[k] for k in ("study", "best_trial", "value", "seed_std", "params")}
                for fold, r in results.items()
            },
        )
        write_best_params_per_fold(
            out,
            {fold: Tuned(r["params"], r["study"], r["best_trial"]) for fold, r in results.items()},
        )
        figures = {
            f"best_{metric}": summary["value"],
            f"best_{metric}_fold_std": summary["fold_std"],
            "folds": len(results),
        }
        table = pd.concat(
            [trials_table(study, fold) for fold, study in studies.items()], ignore_index=True
        )
    figures.update(
        {
            **{f"trials_{state}": n for state, n in counts.items()},
            "seed_epochs": summary["epochs_trained"],
        }
    )
    summary_json.parent.mkdir(parents=True, exist_ok=True)
    summary_json.write_text(json.dumps(figures, indent=2) + "\n")
    table.to_csv(trials_csv, index=False)
    for fold, study in studies.items():
        _log_study(study, params, results[fold], out, trials_csv)
    return summary


def _log_study(
    study: optuna.Study, params: Params, result: dict, out: Path, trials_csv: Path
) -> None:
    """The study's best trial, figures, plots and the stage's outputs on its MLflow run."""
    best = study.best_trial
    metric = params.tune.metric
    client = MlflowClient()
    best_run = best.user_attrs.get("mlflow_run_id")
    if best_run:
        client.set_tag(best_run, "tympan.best_trial", "true")
    with mlflow.start_run(run_id=study.user_attrs["mlflow_parent_run_id"]):
        mlflow.set_tags({"optuna.best_trial": str(best.number), "optuna.best_run": best_run or ""})
        mlflow.log_metrics(
            {
                f"best_{metric}": best.value,
                "trials_complete": result["trials"]["complete"],
                "trials_pruned": result["trials"]["pruned"],
                "epochs_trained": result["epochs_trained"],
            }
        )
        values = result["complete"]
        if len(values) > 1:
            mlflow.log_metric(f"{metric}_spread_over_trials", statistics.pstdev(values))
        mlflow.log_artifact(str(trials_csv), "tuning")
        mlflow.log_artifact(str(out), "tuning")
        _log_plot(
            optuna.visualization.matplotlib.plot_optimization_history,
            study,
            "optimization_history.png",
        )
        if len(values) >= 2:
            _log_plot(
                optuna.visualization.matplotlib.plot_param_importances,
                study,
                "param_importances.png",
            )


def _log_plot(plot, study: optuna.Study, name: str) -> None:
    try:
        axes = plot(study)
    except (ValueError, RuntimeError) as exc:  # e.g. importances when every value is equal
        log.warning("skipped %s: %s", name, exc)
        return
    figure = axes.figure if hasattr(axes, "figure") else axes[0].figure
    figure.set_size_inches(8, 5)
    figure.tight_layout()
    mlflow.log_figure(figure, f"tuning/{name}")
    plt.close(figure)


def write_disabled(out: Path, trials_csv: Path, summary_json: Path) -> None:
    """`tune.enabled: false`: train uses params.yaml as it is."""
    write_untuned(out)
    summary_json.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(columns=["number", "state", "value"]).to_csv(trials_csv, index=False)
    summary_json.write_text("{}\n")
