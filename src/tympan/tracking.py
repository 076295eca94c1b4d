"""The one place that talks to MLflow: URI, experiment, run tags and DVC hashes.

Tracking defaults to `sqlite:///mlruns.db` in the working folder with artifacts in
`mlartifacts/`; `MLFLOW_TRACKING_URI` overrides both (any tracking server works).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path

import mlflow
import torch
import yaml

DEFAULT_URI = "sqlite:///mlruns.db"
DEFAULT_ARTIFACTS = "mlartifacts"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)


def artifact_location(uri: str) -> str | None:
    """For a SQLite store, `mlartifacts/` beside the database file; else the server's default."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///"))
    return (database.parent / DEFAULT_ARTIFACTS).resolve().as_uri()


def finite(values: dict[str, float]) -> dict[str, float]:
    """The entries MLflow accepts: it refuses NaN (a classical baseline has no train loss or
    learning rate)."""
    return {k: float(v) for k, v in values.items() if v == v}


def end_stale_runs(experiment_id: str, checkpoints: str) -> list[str]:
    """Mark KILLED the runs of a killed `train` (tag `tympan.checkpoints`, still RUNNING), so
    `mlflow ui` does not show them running for ever; the resumed run logs their curves again.
    -> the ids marked."""
    client = mlflow.MlflowClient()
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`tympan.checkpoints` = '{checkpoints}' and status = 'RUNNING'",
    )
    for run in found:
        client.set_terminated(run.info.run_id, "KILLED")
    return [run.info.run_id for run in found]


def connect() -> str:
    """Point MLflow (tracking and registry) at the project store; -> the URI."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    return uri


def setup(experiment: str) -> str:
    """Connect and select (or create) `experiment`; -> its id.

    Under `mlflow run` (MLFLOW_RUN_ID set) the project run's experiment is kept, and stages
    log into that run.
    """
    uri = connect()
    if "MLFLOW_RUN_ID" in os.environ:
        return mlflow.get_run(os.environ["MLFLOW_RUN_ID"]).info.experiment_id
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        mlflow.set_experiment(experiment_id=found.experiment_id)
        return found.experiment_id
    location = artifact_location(uri)
    try:
        experiment_id = mlflow.create_experiment(experiment, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created meanwhile by another process
        experiment_id = mlflow.get_experiment_by_name(experiment).experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def git_commit() -> str:
    """HEAD commit, with `-dirty` when tracked files differ; `unknown` outside git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}-dirty" if dirty else head


def dvc_hash(path: str | Path, lock: str | Path = "dvc.lock") -> str:
    """The md5 DVC recorded for `path` in dvc.lock, else one computed the same way.

    For a file that is the md5 of its bytes; for a folder, the md5 of its sorted listing of
    (relative path, md5) pairs, suffixed `.dir` like DVC's directory hashes.
    """
    path = Path(path)
    lock = Path(lock)
    if lock.exists():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for stage in stages.values():
            for entry in stage.get("outs", []) + stage.get("deps", []):
                if Path(entry["path"]) == path and "md5" in entry:
                    current = _md5(path)
                    if current is None or current == entry["md5"] or path.is_dir():
                        return entry["md5"]
    return _md5(path) or "missing"


def _md5(path: Path) -> str | None:
    if path.is_file():
        digest = hashlib.md5()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    if path.is_dir():
        listing = [
            (p.relative_to(path).as_posix(), _md5(p))
            for p in sorted(path.rglob("*"))
            if p.is_file()
        ]
        return hashlib.md5(json.dumps(listing).encode()).hexdigest() + ".dir"
    return None


def register_model(model_uri: str, name: str) -> str:
    """Register `model_uri` as a new version of the registered model `name`; -> the version.

    MLflow announces a registration on stderr (`Successfully registered model ...`, `Registered
    model ... already exists`, `Created version ...`) with `print`, not its logger, so no log
    level hides it; `tympan register` says the same in its own line. MLflow's event stream is
    off for this one call, which would also hold back a warning of its own.
    """
    from mlflow.utils.logging_utils import MLFLOW_LOGGING_STREAM

    was = MLFLOW_LOGGING_STREAM.enabled
    MLFLOW_LOGGING_STREAM.enabled = False
    try:
        return str(mlflow.register_model(model_uri, name).version)
    finally:
        MLFLOW_LOGGING_STREAM.enabled = was


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()}"


def run_tags(stage: str, preset: str, data: dict[str, Path] | None = None) -> dict[str, str]:
    """Tags every tympan run carries: stage, preset, git commit, DVC hashes of its inputs."""
    tags = {"tympan.stage": stage, "tympan.preset": preset, "git.commit": git_commit()}
    for name, path in (data or {}).items():
        tags[f"dvc.{name}"] = dvc_hash(path)
    return tags
