"""Optuna studies over tympan's training function: storage, queue, workers, objective.

The study holds exactly `tune.n_trials` queued trials: `tympan tune` (the DVC stage) tops the
queue up, and every process, the stage itself or `tympan tune --worker` on other machines,
pops queued trials until none is left. A trial that was running in a killed process stops
sending heartbeats; the next process to look fails it and re-queues a copy
(RetryHeartbeatStaleTrialCallback), so a restarted study continues where it stopped and still ends
at exactly `n_trials` finished (complete or pruned) trials.

Under cross-validation (a feature cache with CV folds) the search is nested: one study per
outer fold k (`<study name>-fold-<k>`), whose trials train on fold k's train rows and are
scored on fold k's val rows, both dealt from the other folds; fold k's test rows never reach
them. Each trial records its fold and the count and digest of the rows it trained and
validated on, and each fold's MLflow parent run holds those rows (`tuning/rows.json`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import random
import statistics
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote, quote_plus

import mlflow
import numpy as np
import optuna
import sqlalchemy
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from tympan import tracking
from tympan.config import (
    LOWER_IS_BETTER,
    TUNE_STORAGE_ENV,
    Params,
    TuneConfig,
    in_project,
    masked,
    to_dict,
    url_password,
)
from tympan.features import FeatureCache
from tympan.training import SeedTrainer
from tympan.tuning.space import apply_overrides, grid_values, sample

log = logging.getLogger(__name__)
# Heartbeats and stale-trial retry are what make studies resumable; Optuna still labels them
# experimental, which would print a warning on every run.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

QUEUED = "tympan.queued"
SCHEMA_RACE_RETRIES = 5
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class TuneError(RuntimeError):
    """A study that cannot run: storage unreachable, wrong direction, SQLite with workers."""


class SurplusTrial(RuntimeError):
    """A trial created after the queue ran empty (a race between workers); recorded as failed."""


def direction(metric: str) -> str:
    return "minimize" if metric in LOWER_IS_BETTER else "maximize"


def storage_url(cfg: TuneConfig) -> str:
    """The study's storage: $TYMPAN_TUNE_STORAGE when set, else `tune.storage`.

    The variable is the one place a password may be written; show or record the result only
    through `config.masked`.
    """
    url = in_project(os.environ.get(TUNE_STORAGE_ENV) or cfg.storage)
    try:
        url_password(url)
    except ValueError:
        raise TuneError(
            f"{TUNE_STORAGE_ENV} is not a database URL such as "
            "postgresql+psycopg2://user:password@host:5432/optuna (not shown: it may hold a "
            "password)"
        ) from None
    return url


def storage_source(cfg: TuneConfig) -> str:
    """Where the storage URL came from, for messages: the variable or the params key."""
    return TUNE_STORAGE_ENV if os.environ.get(TUNE_STORAGE_ENV) else "tune.storage"


def _without_password(text: str, url: str) -> str:
    """`text` (a driver's error) with the URL's password, as written or URL-escaped, hidden."""
    password = url_password(url)
    if not password:
        return text
    for form in {password, quote(password, safe=""), quote_plus(password)}:
        text = text.replace(form, "***")
    return text


def open_storage(params: Params, worker: bool = False) -> RDBStorage:
    """RDB storage with heartbeats and retry of trials whose process died."""
    cfg = params.tune
    url = storage_url(cfg)
    if worker and url.startswith("sqlite"):
        raise TuneError(
            f"{storage_source(cfg)}={masked(url)}: SQLite locks the whole database on every "
            "write, so several workers stall or fail; share one study through PostgreSQL "
            f"instead, e.g. tune.storage: postgresql+psycopg2://user@127.0.0.1:5432/optuna with "
            f"the password in PGPASSWORD or ~/.pgpass (or the whole URL in {TUNE_STORAGE_ENV})"
        )
    for attempt in range(SCHEMA_RACE_RETRIES + 1):
        try:
            return RDBStorage(
                url,
                heartbeat_interval=cfg.heartbeat_s,
                grace_period=2 * cfg.heartbeat_s,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
                engine_kwargs={} if url.startswith("sqlite") else {"pool_pre_ping": True},
            )
        except sqlalchemy.exc.IntegrityError:
            # Workers started together on an empty database all create Optuna's tables; the
            # losers see a duplicate-key error. Once one has won, opening simply works.
            if attempt == SCHEMA_RACE_RETRIES:
                raise
            time.sleep(0.5 * (attempt + 1))
        except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as exc:
            reason = _without_password(str(exc).strip().splitlines()[0][:300], url)
            raise TuneError(
                f"cannot open the Optuna storage {masked(url)} ({reason}); check "
                f"{storage_source(cfg)}, the password (PGPASSWORD, ~/.pgpass or "
                f"{TUNE_STORAGE_ENV}), that the server is up on that host and port, and that "
                "the database exists"
            ) from None
    raise AssertionError("unreachable")  # pragma: no cover


def make_sampler(params: Params) -> optuna.samplers.BaseSampler:
    cfg = params.tune
    if cfg.sampler == "grid":
        return optuna.samplers.GridSampler(grid_values(params), seed=cfg.sampler_seed)
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=cfg.sampler_seed)
    return optuna.samplers.TPESampler(seed=cfg.sampler_seed, n_startup_trials=5)


def make_pruner(params: Params) -> optuna.pruners.BasePruner:
    if params.tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
    if params.tune.pruner == "hyperband":  # train.epochs is never searched with a pruner
        return optuna.pruners.HyperbandPruner(min_resource=2, max_resource=params.train.epochs)
    if params.tune.pruner == "sha":  # asynchronous successive halving: rungs at 2, 6, 18 epochs
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=2, reduction_factor=3)
    return optuna.pruners.NopPruner()


def study_name(params: Params, feature_key: str, splits: str | None = None) -> str:
    """`tune.study_name` plus a hash of all that decides a trial's result: the name the
    dashboard lists, the MLflow runs carry (`optuna.study`) and train records.

    The base model/train params, the space, seeds, metric, sampler, pruner and the feature
    cache key go in; `n_trials`, `timeout_s`, storage and heartbeat do not, nor the params.yaml
    values of searched params (every trial sets its own). The same config therefore resumes
    its study (also with a larger n_trials or another value of a searched param), and a
    changed one starts anew instead of reusing trials trained on something else. `splits`
    (nested CV: `splits_digest` of the fold assignment) goes in too, so that another fold
    assignment starts new fold studies.
    """
    tune = to_dict(params.tune)
    for volatile in ("enabled", "n_trials", "timeout_s", "storage", "heartbeat_s", "study_name"):
        tune.pop(volatile)
    base = {"model": to_dict(params.model), "train": to_dict(params.train)}
    # kept out when off (studies from before augment resume), in when on or searched
    if params.augment.enabled or "augment" in params.tune.space:
        base["augment"] = to_dict(params.augment)
    for name in params.tune.dimensions:
        section, key = name.split(".", 1)
        base.get(section, {}).pop(key, None)
    identity = {**base, "tune": tune, "features": feature_key}
    if splits is not None:
        identity["splits"] = splits
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    return f"{params.tune.study_name}-{digest}"


def fold_study_name(name: str, fold: int) -> str:
    """Nested CV: outer fold `fold`'s own study."""
    return f"{name}-fold-{fold}"


def splits_digest(cache: FeatureCache) -> str:
    """Hash of every row's audio and its split in every CV fold (content, not file paths, so
    workers on other machines name the same studies)."""
    columns = ["sha256", *(f"split_{k}" for k in cache.folds)]
    text = cache.index[columns].to_csv(index=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def rows_digest(rows: np.ndarray) -> str:
    """A short hash of a set of feature-cache row ids (order ignored)."""
    text = ",".join(str(r) for r in np.sort(np.asarray(rows, dtype=np.int64)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fold_rows(cache: FeatureCache, fold: int) -> dict[str, Any]:
    """What fold `fold`'s trials may use (`cache` as `for_fold` gives it): its train and val
    row ids with their digests, and how many test rows they never see."""
    train, val = cache.rows("train"), cache.rows("val")
    return {
        "fold": fold,
        "train": train.tolist(),
        "val": val.tolist(),
        "train_sha256": rows_digest(train),
        "val_sha256": rows_digest(val),
        "test_rows_never_used": len(cache.rows("test")),
    }


def open_study(params: Params, storage: RDBStorage, name: str) -> optuna.Study:
    cfg = params.tune
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=make_sampler(params),
        pruner=make_pruner(params),
        direction=direction(cfg.metric),
        load_if_exists=True,
    )
    if study.direction.name.lower() != direction(cfg.metric):
        raise TuneError(
            f"study {name!r} in {masked(storage_url(cfg))} was created to "
            f"{study.direction.name.lower()}, but tune.metric={cfg.metric} needs "
            f"{direction(cfg.metric)}; choose another tune.study_name"
        )
    if study.metric_names != [cfg.metric]:  # the dashboard's and trials table's value column
        study.set_metric_names([cfg.metric])
    return study


def top_up(study: optuna.Study, params: Params) -> int:
    """Queue trials until finished + running + queued == n_trials; -> how many were added.

    With the grid sampler the queue holds the grid points themselves (in a seeded order, at
    most n_trials of them), so the whole table is run exactly once.
    """
    counted = study.get_trials(
        deepcopy=False, states=(*FINISHED, TrialState.RUNNING, TrialState.WAITING)
    )
    if params.tune.sampler != "grid":
        missing = max(0, params.tune.n_trials - len(counted))
        for _ in range(missing):
            study.enqueue_trial({}, user_attrs={QUEUED: True})
        return missing
    grid = grid_values(params)
    points = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    random.Random(params.tune.sampler_seed).shuffle(points)
    # a queued point's params are its fixed_params (a running trial may have suggested only some)
    seen = [t.system_attrs.get("fixed_params") or t.params for t in counted]
    todo = [p for p in points[: params.tune.n_trials] if p not in seen]
    for point in todo:
        study.enqueue_trial(point, user_attrs={QUEUED: True})
    return len(todo)


def count_trials(study: optuna.Study, *states: TrialState) -> int:
    """Trials of the study in any of `states`."""
    return len(study.get_trials(deepcopy=False, states=states))


def work(
    study: optuna.Study, objective: Callable[[optuna.Trial], float], timeout_s: float | None
) -> None:
    """Run queued trials in this process until the queue is empty or time is up."""
    optuna.storages.fail_stale_trials(study)

    def stop_when_empty(study: optuna.Study, _: optuna.trial.FrozenTrial) -> None:
        if not count_trials(study, TrialState.WAITING):
            study.stop()

    if count_trials(study, TrialState.WAITING):
        study.optimize(
            objective, timeout=timeout_s, catch=(SurplusTrial,), callbacks=[stop_when_empty]
        )


def wait_for_queue(study: optuna.Study, wait_s: float) -> None:
    """A worker started before `tympan tune` queued the study waits up to `wait_s` seconds."""
    deadline = time.monotonic() + wait_s
    while not study.get_trials(deepcopy=False) and time.monotonic() < deadline:
        time.sleep(1.0)


def wait_for_study(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float],
    timeout_s: float | None,
    poll_s: float,
) -> None:
    """Work, then wait for trials running elsewhere; re-queued trials are worked here too."""
    start = time.monotonic()
    while True:
        left = None if timeout_s is None else timeout_s - (time.monotonic() - start)
        if left is not None and left <= 0:
            log.warning(
                "tune.timeout_s reached with %d trial(s) unfinished",
                count_trials(study, TrialState.WAITING, TrialState.RUNNING),
            )
            return
        work(study, objective, left)
        if not count_trials(study, TrialState.WAITING, TrialState.RUNNING):
            return
        time.sleep(poll_s)


def parent_run(study: optuna.Study, params: Params, rows: dict[str, Any] | None = None) -> str:
    """The study's MLflow parent run, shared by every worker (its id is a study attribute).

    `rows` (nested CV: `fold_rows`) is logged with a new run as `tuning/rows.json`, and its
    fold tags the run (`tympan.fold`)."""
    tracking.setup(params.tracking.experiment)
    client = MlflowClient()
    run_id = study.user_attrs.get("mlflow_parent_run_id")
    if run_id:
        try:
            client.get_run(run_id)
            return run_id
        except mlflow.exceptions.MlflowException:
            log.warning(
                "study's MLflow run %s is not in this tracking store; starting another", run_id
            )
    storage = masked(storage_url(params.tune))  # the one in use, never its password
    tags = tracking.run_tags("tune", params.preset)
    tags.update({"optuna.study": study.study_name, "optuna.storage": storage})
    if rows is not None:
        tags.update({"tympan.fold": str(rows["fold"]), "tympan.tuning": "nested_cv"})
    tune = {**to_dict(params.tune), "storage": storage}
    with mlflow.start_run(run_name=f"tune-{study.study_name}", tags=tags) as run:
        mlflow.log_params({f"tune.{k}": v for k, v in tune.items() if k != "space"})
        mlflow.log_dict(tune["space"], "search_space.json")
        if rows is not None:
            mlflow.log_dict(rows, "tuning/rows.json")
    study.set_user_attr("mlflow_parent_run_id", run.info.run_id)
    return run.info.run_id


def _best_value(trainer: SeedTrainer, metric: str) -> float:
    """The seed's `metric` at the epoch whose weights it keeps so far (`train.keep`)."""
    return float(trainer.best.metric(metric))


def _record_rows(trial: optuna.Trial, fold: int, trainers: Iterable[SeedTrainer]) -> None:
    """The rows a nested-CV trial's trainers use, as it records them (all seeds share them)."""
    used = {
        (rows_digest(t.train_rows), len(t.train_rows), rows_digest(t.val_rows), len(t.val_rows))
        for t in trainers
    }
    if len(used) != 1:
        raise TuneError(f"trial {trial.number}: the seeds of fold {fold} train on different rows")
    train_sha, n_train, val_sha, n_val = used.pop()
    attrs = {
        "tympan.fold": fold,
        "rows.train": n_train,
        "rows.train_sha256": train_sha,
        "rows.val": n_val,
        "rows.val_sha256": val_sha,
    }
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    mlflow.log_params({"fold": fold, "n_train": n_train, "n_val": n_val})
    mlflow.set_tags({"tympan.rows.train": train_sha, "tympan.rows.val": val_sha})


def make_objective(
    params: Params,
    cache: FeatureCache,
    device: Any,
    parent_run_id: str,
    fold: int | None = None,
) -> Callable[[optuna.Trial], float]:
    """Sample -> config -> the training function over `tune.seeds` in lockstep -> seed mean.

    `fold` (nested CV, `cache` as `for_fold(fold)` gives it): each trial records the fold and
    the count and digest of the rows its trainers trained and validated on (Optuna user attrs
    `tympan.fold`, `rows.train`, `rows.train_sha256`, `rows.val`, `rows.val_sha256`; the
    same as MLflow params and tags of its run)."""
    cfg = params.tune
    client = MlflowClient()
    experiment_id = client.get_run(parent_run_id).info.experiment_id

    def objective(trial: optuna.Trial) -> float:
        if not trial.user_attrs.get(QUEUED):
            trial.set_user_attr("tympan.surplus", "created after the queue ran empty")
            raise SurplusTrial(f"trial {trial.number}: the study already has its n_trials")
        sampled = sample(trial, params)
        config = apply_overrides(params, sampled, source=f"trial {trial.number}")
        tags = {
            "tympan.stage": "tune",
            "tympan.preset": params.preset,
            "optuna.trial": str(trial.number),
            "optuna.study": trial.study.study_name,
        }
        if fold is not None:
            tags["tympan.fold"] = str(fold)
        with mlflow.start_run(
            run_name=f"trial-{trial.number}",
            parent_run_id=parent_run_id,
            experiment_id=experiment_id,
            tags=tags,
        ) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            mlflow.log_params({**sampled, "trial": trial.number})
            trainers = {
                seed: SeedTrainer(
                    cache,
                    config.model,
                    config.train,
                    seed,
                    device,
                    config.augment,
                    aggregate=config.segment.aggregate,
                )
                for seed in cfg.seeds
            }
            if fold is not None:
                _record_rows(trial, fold, trainers.values())
            seed_runs = {
                seed: client.create_run(
                    experiment_id,
                    run_name=f"trial-{trial.number}-seed-{seed}",
                    tags={**tags, "mlflow.parentRunId": run.info.run_id, "tympan.seed": str(seed)},
                ).info.run_id
                for seed in cfg.seeds
            }
            epoch, state, pruned = 0, "complete", None
            try:
                while any(not t.done for t in trainers.values()):
                    epoch += 1
                    for seed, trainer in trainers.items():
                        if trainer.done:
                            continue
                        entry = trainer.step()
                        now = int(time.time() * 1000)
                        client.log_batch(
                            seed_runs[seed],
                            metrics=[
                                Metric(k, v, now, entry.epoch)
                                for k, v in tracking.finite(entry.flat()).items()
                            ],
                        )
                    mean = statistics.fmean(_best_value(t, cfg.metric) for t in trainers.values())
                    trial.report(mean, epoch)
                    mlflow.log_metric(f"seed_mean_{cfg.metric}", mean, step=epoch)
                    if trial.should_prune():
                        state = "pruned"
                        raise optuna.TrialPruned(f"epoch {epoch}: seed mean {mean:.4f}")
            except optuna.TrialPruned as exc:  # re-raised below, once the run is closed
                pruned = exc
            except BaseException:
                state = "failed"
                raise
            finally:
                values = [_best_value(t, cfg.metric) for t in trainers.values() if t.best]
                epochs = sum(len(t.result.history) for t in trainers.values())
                trial.set_user_attr("epochs_trained", epochs)
                if values:
                    trial.set_user_attr("seed_values", values)
                    trial.set_user_attr("seed_std", statistics.pstdev(values))
                    mlflow.log_metrics(
                        {
                            f"{cfg.metric}_mean": statistics.fmean(values),
                            f"{cfg.metric}_std": statistics.pstdev(values),
                            "epochs_trained": epochs,
                        }
                    )
                mlflow.set_tag("optuna.state", state)
                for seed_run in seed_runs.values():
                    client.set_terminated(seed_run, "FINISHED" if state != "failed" else "FAILED")
        if pruned is not None:
            raise pruned
        value = statistics.fmean(values)
        log.info(
            "trial %d: %s %.4f +- %.4f over seeds %s (%d epochs)",
            trial.number,
            cfg.metric,
            value,
            statistics.pstdev(values),
            list(cfg.seeds),
            epochs,
        )
        return value

    return objective
