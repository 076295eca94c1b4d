"""`tympan repro`: `dvc repro` recorded as one MLflow run in `tracking.experiment` (the
MLproject's command).

`mlflow run .` creates its run before the command starts, in the experiment named by
`--experiment-name` (or MLFLOW_EXPERIMENT_NAME), else in Default. The record belongs in
`tracking.experiment`, beside every `dvc repro` run: when the project run is there it is the
record; otherwise the record is a new run there carrying the project run's name, source tags
and parameters, and the project run points at it. DVC's stages log into the record (train
opens it as its parent run; evaluate and register write to the run that trained their model).

DVC runs only the stages whose inputs changed. When it runs none, the record says so and
names the run that recorded the outputs in the workspace, instead of staying empty; when it
runs only stages that log elsewhere, it names them and that run too.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlflow.entities import Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from tympan import tracking
from tympan.config import Params

NOTE = "mlflow.note.content"  # the run's description in `mlflow ui`
COPIED = ("mlflow.source.", "mlflow.project.", "mlflow.user", "mlflow.gitRepoURL")


class ReproError(RuntimeError):
    """`dvc repro` failed; the record run says so too."""


def repro(
    params: Params, targets: list[str], single_item: bool, train_record: Path
) -> tuple[str, list[str]]:
    """Run `dvc repro [targets]` (`--single-item` as DVC's) with its stages logging into one
    record run; -> (the record's id, the stages DVC ran)."""
    tracking.connect()
    client = MlflowClient()
    experiment_id = tracking.ensure_experiment(params.tracking.experiment)
    project_id = os.environ.get("MLFLOW_RUN_ID")
    record_id = _record(client, experiment_id, project_id, params)
    owned = record_id != project_id  # `mlflow run` ends its own run; tympan ends the others
    try:
        with _environment(MLFLOW_RUN_ID=record_id, MLFLOW_EXPERIMENT_ID=experiment_id):
            ran = _dvc_repro(targets, single_item)
    except Exception as exc:
        client.set_tag(record_id, NOTE, f"`dvc repro` failed: {exc}")
        if owned:
            client.set_terminated(record_id, RunStatus.to_string(RunStatus.FAILED))
        raise ReproError(f"dvc repro failed: {exc}") from exc
    outputs = _outputs_run(train_record)
    tags = {"tympan.dvc.ran": ", ".join(ran) or "none", NOTE: _note(ran, outputs, record_id)}
    if outputs and outputs != record_id:
        tags["tympan.outputs_run_id"] = outputs
    client.log_batch(record_id, tags=[RunTag(k, v) for k, v in tags.items()])
    if owned:
        client.set_terminated(record_id)
    return record_id, ran


def _record(
    client: MlflowClient, experiment_id: str, project_id: str | None, params: Params
) -> str:
    """The run that records this reproduction, in `experiment_id`."""
    if project_id is None:  # `tympan repro` by hand
        run = client.create_run(
            experiment_id,
            run_name=tracking.run_name("repro"),
            tags=tracking.run_tags("repro", params.preset),
        )
        return run.info.run_id
    project = client.get_run(project_id)
    if project.info.experiment_id == experiment_id:
        return project_id
    tags = {k: v for k, v in project.data.tags.items() if k.startswith(COPIED)}
    tags.update(tracking.run_tags("repro", params.preset))
    tags["tympan.project_run_id"] = project_id
    run = client.create_run(experiment_id, run_name=project.info.run_name, tags=tags)
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in project.data.params.items()])
    name = params.tracking.experiment
    client.log_batch(
        project_id,
        tags=[
            RunTag("tympan.record_run_id", run.info.run_id),
            RunTag("tympan.record_experiment_id", experiment_id),
            RunTag(
                NOTE,
                f"Recorded in experiment '{name}' (tracking.experiment) as run "
                f"{run.info.run_id}. `mlflow run . --experiment-name {name}` records the "
                "project run there directly.",
            ),
        ],
    )
    return run.info.run_id


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    """`values` set (and MLFLOW_EXPERIMENT_NAME unset) in os.environ, which DVC's stage
    commands inherit; restored afterwards."""
    saved = {k: os.environ.get(k) for k in [*values, "MLFLOW_EXPERIMENT_NAME"]}
    os.environ.update(values)
    os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _dvc_repro(targets: list[str], single_item: bool) -> list[str]:
    """`dvc repro` through DVC's API (its own output, as the command prints it); -> the
    stages that ran, restored from DVC's run-cache included."""
    from dvc.logger import setup
    from dvc.repo import Repo

    setup(logging.INFO)
    with Repo() as repo:
        stages = repo.reproduce(targets=targets or None, single_item=single_item)
    if not stages:
        print("Data and pipelines are up to date.")
    return [stage.addressing for stage in stages]


def _outputs_run(train_record: Path) -> str | None:
    """The run that trained the model now in the workspace (train's record), if any."""
    if not train_record.exists():
        return None
    return json.loads(train_record.read_text()).get("parent_run_id")


def _note(ran: list[str], outputs: str | None, record_id: str) -> str:
    """The record's description: what DVC ran and where the outputs' runs are."""
    where = f" The model in the workspace was trained by run {outputs}." if outputs else ""
    if not ran:
        return (
            "DVC found every stage up to date and ran none (`dvc repro`: Data and pipelines "
            f"are up to date), so this run holds nothing new.{where}"
        )
    done = f"DVC ran {', '.join(ran)}."
    if outputs == record_id:
        return f"{done} This run is train's parent run: its params, metrics and model."
    return (
        f"{done} Only train opens a run of its own; evaluate and register log into the run "
        f"that trained the model they use.{where}"
    )
