"""The one place that talks to MLflow: URI, experiment, run names and tags, DVC hashes and
the datasets a run used.

Tracking defaults to `sqlite:///mlruns.db` in the working folder with artifacts in
`mlartifacts/`; `MLFLOW_TRACKING_URI` overrides both (any tracking server works).

What an MLflow user looks for is where MLflow puts it: the commit in the standard
`mlflow.source.git.*` tags, the data in the run's datasets (`mlflow.log_input`, digest = the
md5 DVC recorded, source = where DVC keeps it), the experiment marked as model training so
`mlflow ui` opens on its runs, and under `dvc exp run` the DVC experiment's name in each run's
name.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
import yaml
from mlflow.data.dataset import Dataset
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import register_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric
from mlflow.types import Schema, TensorSpec

from tympan.config import in_project

DEFAULT_URI = "sqlite:///mlruns.db"
DEFAULT_ARTIFACTS = "mlartifacts"
# MLflow's experiment kind: `custom_model_development` is "machine learning" (model training)
# as opposed to GenAI development. MLflow 3.17's own UI lays out the experiment page by its
# GenAI / Model training switch instead (GenAI unless the browser remembers otherwise, or the
# URL says `workflowType=machine_learning`: `ui_url`); the tag states the kind for every other
# reader (the API, the experiment's kind selector, servers that lay pages out by it).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
# What `dvc exp run` puts in the environment of every stage it runs
DVC_EXP_NAME = "DVC_EXP_NAME"
DVC_EXP_BASELINE_REV = "DVC_EXP_BASELINE_REV"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the project's SQLite store (in the DVC project when a queued
    experiment runs in a copy of it: `config.in_project`)."""
    return in_project(os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI))


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


def log_metrics_once(run_id: str, values: dict[str, float]) -> dict[str, float]:
    """Log to `run_id` each metric whose latest value there is not already this one, so a
    stage run again on the same inputs adds no point to any metric's history; -> the logged."""
    client = mlflow.MlflowClient()
    latest = client.get_run(run_id).data.metrics
    fresh = {k: v for k, v in finite(values).items() if latest.get(k) != v}
    if fresh:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in fresh.items()])
    return fresh


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

    Under `tympan repro` (the MLproject's command) MLFLOW_RUN_ID names the run that records
    the whole reproduction, in `tracking.experiment`; stages log into that run.
    """
    connect()
    if "MLFLOW_RUN_ID" in os.environ:
        return mlflow.get_run(os.environ["MLFLOW_RUN_ID"]).info.experiment_id
    experiment_id = ensure_experiment(experiment)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def ensure_experiment(experiment: str) -> str:
    """The id of `experiment`, created if missing (artifacts beside a SQLite store), and marked
    as model training unless someone already chose its kind. Call `connect` first."""
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        try:
            return mlflow.create_experiment(
                experiment,
                artifact_location=artifact_location(tracking_uri()),
                tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING},
            )
        except mlflow.exceptions.MlflowException:  # created meanwhile by another process
            found = mlflow.get_experiment_by_name(experiment)
    if EXPERIMENT_KIND_TAG not in found.tags:
        mlflow.MlflowClient().set_experiment_tag(
            found.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING
        )
    return found.experiment_id


def ui_url(base: str, experiment_id: str) -> str:
    """The `mlflow ui` page of an experiment's training runs: MLflow 3.17 opens an experiment
    on its GenAI overview (traces, tokens, latency) unless the URL asks for model training."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def run_name(base: str) -> str:
    """`base`, prefixed `<experiment>/` under `dvc exp run` so each run names its DVC
    experiment (`dvc exp show` and `mlflow ui` then read alike)."""
    experiment = os.environ.get(DVC_EXP_NAME)
    return f"{experiment}/{base}" if experiment else base


def system_metrics(cuda: bool) -> bool | None:
    """`log_system_metrics` for `mlflow.start_run`: on for CUDA runs (GPU utilisation and
    memory), and as MLflow's own switch says when it is set: MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING
    =true records CPU, memory and disk on any run, =false records none."""
    if os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING") is not None:
        return None  # MLflow reads it
    return True if cuda else None


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


def git_commit() -> str:
    """HEAD commit, with `-dirty` when tracked files differ; `unknown` outside git."""
    head = _git("rev-parse", "HEAD")
    if head is None:
        return "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return f"{head}-dirty" if dirty else head


def git_source_tags() -> dict[str, str]:
    """MLflow's standard source tags for the working folder's repository: the commit (which
    `mlflow ui` shows as the run's source), branch and remote URL when there are any. MLflow
    would otherwise read them from the repository holding the `tympan` script, which need not
    be the project (a shared environment, a git worktree)."""
    head = _git("rev-parse", "HEAD")
    if head is None:
        return {}
    tags = {"mlflow.source.git.commit": head}
    branch = _git("symbolic-ref", "--short", "-q", "HEAD")
    if branch:
        tags["mlflow.source.git.branch"] = branch
    remote = _git("remote", "get-url", "origin")
    if remote:
        tags["mlflow.source.git.repoURL"] = remote
    return tags


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


# a version that took @champion tags itself first, so that another process registering at the
# same time finds it (`promote`)
CLAIM_TAG = "tympan.claim"


def champion_of(client, name: str) -> dict[str, str] | None:
    """The version `@champion` points to, as `{version, **tags}`; None when there is none."""
    from mlflow.exceptions import MlflowException

    try:
        current = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None
    return {"version": str(current.version), **current.tags}


def promote(
    client,
    name: str,
    version: str,
    decide,
    beats,
    settle_s: float = 0.25,
    rounds: int = 8,
) -> tuple[str, str]:
    """Give `version` `@champion` or `@challenger`, as `decide(current champion or None)` says
    (-> (alias, reason)), safely when other processes register versions of `name` at the
    same moment (a team on one tracking server).

    Reading the alias and then setting it is not atomic: two registrations that both read the
    old champion would each take `@champion`, and the last write would win whether or not it
    is the better model. So a version that wins tags itself (`tympan.claim`), sets the alias,
    then re-reads under a retry: among the champion it was compared with and every version
    claiming since, the best by the promotion rule (`beats(a, b)`: does version a, as tags,
    beat b) must hold the alias; whoever reads otherwise sets it right, until it reads the
    same twice. Every contender computes the same best from the same claims, and a later
    claimant always sees the earlier ones (their tag precedes their alias write), so the alias
    ends on the best. -> `version`'s own alias and reason."""
    champion = champion_of(client, name)
    alias, reason = decide(champion)
    if alias != "champion":
        client.set_registered_model_alias(name, alias, version)
        return alias, reason
    client.set_model_version_tag(name, version, CLAIM_TAG, "champion")
    client.set_registered_model_alias(name, "champion", version)
    floor = int(champion["version"]) if champion else 0
    steady = 0
    best = version
    for _ in range(rounds):
        time.sleep(settle_s)
        claims = sorted(
            (
                v
                for v in client.search_model_versions(f"name = '{name}'")
                if v.tags.get(CLAIM_TAG) == "champion" and int(v.version) > floor
            ),
            key=lambda v: int(v.version),
        )
        contenders = ([champion] if champion else []) + [
            {"version": str(v.version), **v.tags} for v in claims
        ]
        winner = contenders[0]
        for other in contenders[1:]:
            if beats(other, winner):
                winner = other
        best = winner["version"]
        holder = champion_of(client, name)
        if holder is not None and holder["version"] == best:
            steady += 1
            if steady == 2:
                break
            continue
        steady = 0
        client.set_registered_model_alias(name, "champion", best)
    if best == version:
        return "champion", reason
    client.set_registered_model_alias(name, "challenger", version)
    return "challenger", (
        f"{reason}; but v{best}, registered at the same time, beats it and holds @champion"
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()}"


def run_tags(stage: str, preset: str, data: dict[str, Path] | None = None) -> dict[str, str]:
    """Tags every tympan run carries: stage, preset, git commit (MLflow's standard tags, and
    `git.commit` with `-dirty` when tracked files differ), DVC hashes of its inputs and, under
    `dvc exp run`, the DVC experiment's name and baseline commit."""
    tags = {
        "tympan.stage": stage,
        "tympan.preset": preset,
        "git.commit": git_commit(),
        **git_source_tags(),
    }
    for name, path in (data or {}).items():
        tags[f"dvc.{name}"] = dvc_hash(path)
    if os.environ.get(DVC_EXP_NAME):
        tags["dvc.exp_name"] = os.environ[DVC_EXP_NAME]
    if os.environ.get(DVC_EXP_BASELINE_REV):
        tags["dvc.exp_baseline_rev"] = os.environ[DVC_EXP_BASELINE_REV]
    return tags


class DvcSource(DatasetSource):
    """A dataset as DVC keeps it: `path` in the DVC project `repo` (its git remote, or the
    folder when it has none) at git revision `rev`, with the md5 DVC recorded (a folder's ends
    in `.dir`). `load()` fetches it with DVC (`dvc get REPO PATH --rev REV` does the same)."""

    def __init__(self, repo: str, path: str, rev: str, md5: str) -> None:
        self.repo, self.path, self.rev, self.md5 = repo, path, rev, md5

    @staticmethod
    def _get_source_type() -> str:
        return "dvc"

    def load(self, dst_path: str | None = None) -> str:
        """Fetch the data into `dst_path` (a new temporary folder by default); -> its path."""
        import tempfile

        from dvc.api import DVCFileSystem

        target = Path(dst_path or tempfile.mkdtemp()) / Path(self.path).name
        DVCFileSystem(self.repo, rev=self.rev or None).get(
            self.path, str(target), recursive=self.md5.endswith(".dir")
        )
        return str(target)

    @staticmethod
    def _can_resolve(raw_source: object) -> bool:
        return False  # built by `datasets` below, never guessed from a string

    @classmethod
    def _resolve(cls, raw_source: object) -> DvcSource:
        raise NotImplementedError("a DvcSource is built with its repo, path, rev and md5")

    def to_dict(self) -> dict[str, str]:
        return {"repo": self.repo, "path": self.path, "rev": self.rev, "md5": self.md5}

    @classmethod
    def from_dict(cls, source_dict: dict) -> DvcSource:
        return cls(source_dict["repo"], source_dict["path"], source_dict["rev"], source_dict["md5"])


register_dataset_source(DvcSource)  # so mlflow.data.get_source(...) rebuilds it from a run


def dvc_source(path: Path) -> DvcSource:
    """Where DVC keeps `path`: the repository's remote (else its folder), the path inside it,
    HEAD and the md5 DVC recorded."""
    top = Path(_git("rev-parse", "--show-toplevel") or Path.cwd()).resolve()
    real = path.resolve()
    inside = real.relative_to(top) if real.is_relative_to(top) else path
    repo = _git("remote", "get-url", "origin") or str(top)
    return DvcSource(repo, inside.as_posix(), _git("rev-parse", "HEAD") or "", dvc_hash(path))


def datasets(
    manifest: Path, table: pd.DataFrame, features: Path, shape: tuple[int, ...], dtype: str
) -> list[Dataset]:
    """The manifest (a table: its columns, row count and `label` target) and the feature set
    (metadata only: `(clips, C, bins, frames)` of `dtype`) as MLflow datasets, each digest
    the md5 DVC recorded, each source where DVC keeps it."""
    manifest_source, features_source = dvc_source(manifest), dvc_source(features)
    return [
        mlflow.data.from_pandas(
            table,
            source=manifest_source,
            name="manifest",
            digest=manifest_source.md5,
            targets="label",
        ),
        MetaDataset(
            features_source,
            name="features",
            digest=features_source.md5,
            schema=Schema([TensorSpec(np.dtype(dtype), (-1, *shape[1:]), "features")]),
        ),
    ]


def log_datasets(found: list[Dataset], context: str = "training") -> None:
    """`mlflow.log_input` of each dataset into the active run."""
    with warnings.catch_warnings():  # MLflow's hint on integer columns is about model inputs
        warnings.filterwarnings("ignore", "Hint: Inferred schema contains integer", UserWarning)
        for dataset in found:
            mlflow.log_input(dataset, context=context)
