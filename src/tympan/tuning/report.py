"""What a finished study leaves behind: best params file, trials table, MLflow plots and tags."""

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
from tympan.tuning.best import write_best_params, write_untuned
from tympan.tuning.study import TuneError, count_trials, direction, storage_url

log = logging.getLogger(__name__)


def trials_table(study: optuna.Study) -> pd.DataFrame:
    rows = []
    for trial in study.get_trials(deepcopy=False):
        rows.append(
            {
                "number": trial.number,
                "state": trial.state.name.lower(),
                "value": trial.value,
                "seed_std": trial.user_attrs.get("seed_std"),
                "epochs_trained": trial.user_attrs.get("epochs_trained", 0),
                "retry_of": trial.system_attrs.get("failed_trial"),
                **{f"param.{k}": v for k, v in trial.params.items()},
            }
        )
    return pd.DataFrame(rows)


def write_outputs(
    study: optuna.Study,
    params: Params,
    parent_run_id: str,
    out: Path,
    trials_csv: Path,
    summary_json: Path,
) -> dict:
    """Best params for train (a DVC params file), the trials table, the study's figures (a
    DVC metrics file) and its summary in MLflow; -> the summary."""
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
    table = trials_table(study)
    epochs = int(table["epochs_trained"].sum())
    summary = {
        "study": study.study_name,
        "storage": masked(storage_url(params.tune)),
        "metric": params.tune.metric,
        "direction": direction(params.tune.metric),
        "best_trial": best.number,
        "value": best.value,
        "seed_std": best.user_attrs.get("seed_std"),
        "seeds": list(params.tune.seeds),
        "trials": counts,
        "epochs_trained": epochs,
        "params": dict(best.params),
    }
    write_best_params(out, best.params, study.study_name, best.number)
    figures = {
        f"best_{params.tune.metric}": best.value,
        f"best_{params.tune.metric}_seed_std": summary["seed_std"],
        **{f"trials_{state}": n for state, n in counts.items()},
        "seed_epochs": epochs,
    }
    summary_json.parent.mkdir(parents=True, exist_ok=True)
    summary_json.write_text(json.dumps(figures, indent=2) + "\n")
    table.to_csv(trials_csv, index=False)

    client = MlflowClient()
    best_run = best.user_attrs.get("mlflow_run_id")
    if best_run:
        client.set_tag(best_run, "tympan.best_trial", "true")
    with mlflow.start_run(run_id=parent_run_id):
        mlflow.set_tags({"optuna.best_trial": str(best.number), "optuna.best_run": best_run or ""})
        mlflow.log_metrics(
            {
                f"best_{params.tune.metric}": best.value,
                "trials_complete": counts["complete"],
                "trials_pruned": counts["pruned"],
                "epochs_trained": epochs,
            }
        )
        values = [t.value for t in complete]
        if len(values) > 1:
            mlflow.log_metric(f"{params.tune.metric}_spread_over_trials", statistics.pstdev(values))
        mlflow.log_artifact(str(trials_csv), "tuning")
        mlflow.log_artifact(str(out), "tuning")
        _log_plot(
            optuna.visualization.matplotlib.plot_optimization_history,
            study,
            "optimization_history.png",
        )
        if len(complete) >= 2:
            _log_plot(
                optuna.visualization.matplotlib.plot_param_importances,
                study,
                "param_importances.png",
            )
    return summary


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
