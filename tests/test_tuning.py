"""The tune stage: space checks, lockstep seeds, real Optuna storage, resume, workers, dashboard."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import requests
import torch
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from tympan import stages
from tympan.config import (
    TUNE_STORAGE_ENV,
    ConfigError,
    CVConfig,
    ModelConfig,
    Params,
    SearchParam,
    SplitConfig,
    TrainConfig,
    TuneConfig,
    load_params,
    masked,
    to_dict,
)
from tympan.data.splits import split_manifest
from tympan.features import build_cache, open_cache
from tympan.training import SeedTrainer, fit
from tympan.tuning.space import grid_values, validate_space
from tympan.tuning.study import TuneError, make_pruner, open_storage, study_name

from conftest import REPO, TONE_FEATURES, copy_project, free_port

BIN = Path(sys.executable).parent
SMALL_SPACE = {
    "model.dropout": SearchParam("categorical", choices=(0.1, 0.3)),
    "train.lr": SearchParam("categorical", choices=(0.001, 0.003)),
}
# The test server's role that must log in with a password (scripts/postgres.sh ROLE); the
# password is new each run and must never be written anywhere by tympan.
PG_ROLE = "tympan_secret"
PG_PASSWORD = f"pw-{secrets.token_hex(12)}"
PASSWORD_VARIABLES = (TUNE_STORAGE_ENV, "PGPASSWORD", "PGPASSFILE")


def nested(space: dict[str, SearchParam]) -> dict[str, dict[str, SearchParam]]:
    """`{"train.lr": spec}` as params.yaml holds it: `{"train": {"lr": spec}}`."""
    out: dict[str, dict[str, SearchParam]] = {}
    for name, spec in space.items():
        section, key = name.split(".", 1)
        out.setdefault(section, {})[key] = spec
    return out


def tune_params(tmp: Path, **tune) -> Params:
    """The repo's params shrunk to the tone cache: tiny model, a few epochs, two seeds.
    `space` is given by param name (`{"train.lr": SearchParam(...)}`)."""
    from tympan.config import load_params

    base = load_params(REPO / "params.yaml")
    tune["space"] = nested(tune.get("space", SMALL_SPACE))
    cfg = replace(
        TuneConfig(),
        enabled=True,
        n_trials=4,
        seeds=(0, 1),
        sampler="grid",
        pruner="none",
        storage=f"sqlite:///{tmp / 'optuna.db'}",
        study_name="t",
        heartbeat_s=1,
    )
    return replace(
        base,
        model=ModelConfig(channels=4, hidden=8),
        train=replace(base.train, epochs=3, batch_size=8),
        tune=replace(cfg, **tune),
        tracking=replace(base.tracking, experiment="tune-test"),
    )


def _run_tune(params: Params, cache_dir: Path, tmp: Path, **kw) -> dict:
    """Run the tune stage; -> its metrics file (best value, trials per state, seed-epochs)."""
    stages.run_tune(
        params, cache_dir, tmp / "best.yaml", tmp / "trials.csv", tmp / "summary.json", **kw
    )
    return json.loads((tmp / "summary.json").read_text())


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"train.lr": SearchParam("float", 0.01, 0.001)}, "empty or inverted range"),
        ({"train.lr": SearchParam("float", 0.01, 0.01)}, "empty or inverted range"),
        ({"train.nesterov": SearchParam("float", 0.1, 0.9)}, "not a tunable param"),
        ({"train.task": SearchParam("categorical", choices=("a", "b"))}, "not a tunable param"),
        (
            {"optimizer.lr": SearchParam("float", 0.1, 0.9)},
            r"tune.space.optimizer is not a section the search can set \(tune.space.<section>",
        ),
        ({"train.seeds": SearchParam("categorical", choices=(1, 2))}, "not a tunable param"),
        ({"train.batch_size": SearchParam("categorical", choices=(32,))}, "fewer than two"),
        ({"train.batch_size": SearchParam("categorical", choices=(32, 32))}, "fewer than two"),
        ({"train.lr": SearchParam("float", 0.0, 0.1, log=True)}, "log-scaled, so low must be > 0"),
        ({"train.batch_size": SearchParam("float", 8, 64)}, "train.batch_size must be an integer"),
        ({"train.epochs": SearchParam("int", 5.5, 10)}, "must be integers"),
        ({}, "tune.space is empty"),
        (
            {"train.lr": SearchParam("float", -1.0, 0.1)},
            r"tune.space.train.lr.low: train.lr=-1.0 is out of range: must be a finite number > 0",
        ),
        (
            {"model.dropout": SearchParam("float", 0.1, 1.0)},
            r"tune.space.model.dropout.high: model.dropout=1.0 is out of range: "
            r"must be a number in \[0, 1\)",
        ),
        (
            {"train.batch_size": SearchParam("categorical", choices=(0, 32))},
            r"tune.space.train.batch_size.choices\[0\]: train.batch_size=0 is out of range",
        ),
        (
            {"train.epochs": SearchParam("int", 0, 60, step=10)},
            r"tune.space.train.epochs.low: train.epochs=0 is out of range: must be an integer >= 1",
        ),
        (
            {"augment.noise_p": SearchParam("float", 0.1, 1.5)},
            r"augment.noise_p=1.5 is out of range: must be a number in \[0, 1\]",
        ),
        (  # what `-S tune.space.model.dropout={type: categorical, ...}` merges into a range
            {"model.dropout": SearchParam("categorical", 0.1, 0.6, choices=(0.1, 0.3))},
            r"tune.space.model.dropout is categorical but also has low, high; to replace a "
            r"dimension from the command line, drop it first: dvc exp run "
            r"-S '~tune.space.model.dropout' -S '\+tune.space.model.dropout=",
        ),
        ({"train.lr": SearchParam("float", 1e-4, 1e-2, choices=(1e-3,))}, "also has choices"),
    ],
)
def test_bad_search_spaces_fail_before_any_trial(tmp_path, space, message):
    params = tune_params(tmp_path, space=space)
    with pytest.raises(ConfigError, match=message):
        validate_space(params)
    with pytest.raises(ConfigError, match=message):  # the stage's first step: no cache opened
        stages.run_tune(params, tmp_path / "no-features", tmp_path / "b.yaml", tmp_path / "t.csv")


def test_grid_reproduces_the_s5_table():
    space = {
        "model.dropout": SearchParam("categorical", choices=(0.3, 0.5, 0.7)),
        "train.batch_size": SearchParam("categorical", choices=(16, 32)),
        "train.epochs": SearchParam("int", 10, 20, step=10),
    }
    params = replace(
        Params(), tune=replace(TuneConfig(), sampler="grid", pruner="none", space=nested(space))
    )
    validate_space(params)  # epochs as a plain parameter: allowed without a pruner
    grid = grid_values(params)
    assert grid == {
        "model.dropout": [0.3, 0.5, 0.7],
        "train.batch_size": [16, 32],
        "train.epochs": [10, 20],
    }
    with pytest.raises(ConfigError, match="grid needs a finite grid"):
        validate_space(
            replace(
                params,
                tune=replace(
                    params.tune,
                    space=nested({"train.lr": SearchParam("float", 1e-4, 1e-2, log=True)}),
                ),
            )
        )


def test_unreachable_storage_is_a_clear_error_without_the_password(
    tmp_path, monkeypatch, caplog, capsys
):
    port = free_port()  # nothing listens there
    monkeypatch.setenv(
        TUNE_STORAGE_ENV, f"postgresql+psycopg2://u:{PG_PASSWORD}@127.0.0.1:{port}/x"
    )
    with pytest.raises(TuneError, match="cannot open the Optuna storage") as err:
        open_storage(tune_params(tmp_path))  # the variable wins over tune.storage
    assert f"postgresql+psycopg2://u:***@127.0.0.1:{port}/x" in str(err.value)
    assert TUNE_STORAGE_ENV in str(err.value)
    printed = capsys.readouterr()
    for text in (str(err.value), caplog.text, printed.out, printed.err):
        assert PG_PASSWORD not in text


def test_a_malformed_storage_variable_is_refused_without_being_shown(tmp_path, monkeypatch):
    monkeypatch.setenv(TUNE_STORAGE_ENV, f"postgres ql:/u:{PG_PASSWORD}@host")
    with pytest.raises(TuneError, match=f"{TUNE_STORAGE_ENV} is not a database URL") as err:
        open_storage(tune_params(tmp_path))
    assert PG_PASSWORD not in str(err.value)


def test_sqlite_is_refused_for_workers(tmp_path):
    with pytest.raises(TuneError, match="PostgreSQL"):
        open_storage(tune_params(tmp_path), worker=True)


def test_lockstep_seeds_equal_sequential_fit(tone_cache):
    model_cfg, cfg = ModelConfig(channels=4, hidden=8), TrainConfig(epochs=3, batch_size=8)
    device = torch.device("cpu")
    trainers = [SeedTrainer(tone_cache, model_cfg, cfg, seed, device) for seed in (0, 1)]
    while not all(t.done for t in trainers):
        for trainer in trainers:
            if not trainer.done:
                trainer.step()
    for seed, trainer in zip((0, 1), trainers, strict=True):
        alone = fit(tone_cache, model_cfg, cfg, seed, device, progress=False)
        assert [e.val_loss for e in trainer.finish().history] == [e.val_loss for e in alone.history]


def test_study_writes_best_params_and_tracks_every_trial(tmp_path, tone_cache_dir, mlflow_store):
    params = tune_params(tmp_path)
    figures = _run_tune(params, tone_cache_dir, tmp_path)
    assert figures == {
        "best_val_accuracy": pytest.approx(figures["best_val_accuracy"]),
        "best_val_accuracy_seed_std": pytest.approx(figures["best_val_accuracy_seed_std"]),
        "trials_complete": 4,
        "trials_pruned": 0,
        "trials_fail": 0,
        "seed_epochs": 4 * 2 * 3,  # trials x seeds x epochs (no early stop)
    }
    name = study_name(params, open_cache(tone_cache_dir).meta["key"])
    study = optuna.load_study(study_name=name, storage=params.tune.storage)
    combos = {(t.params["model.dropout"], t.params["train.lr"]) for t in study.trials}
    assert combos == {(0.1, 0.001), (0.1, 0.003), (0.3, 0.001), (0.3, 0.003)}  # the whole grid
    assert figures["best_val_accuracy"] == pytest.approx(study.best_value)
    assert study.metric_names == ["val_accuracy"]  # the dashboard's value column
    for trial in study.trials:
        assert trial.user_attrs["seed_std"] >= 0 and len(trial.user_attrs["seed_values"]) == 2
        assert sorted(trial.intermediate_values) == [1, 2, 3]
    # the best values in params.yaml's layout (a DVC params file of train), with their origin
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    winner = study.best_trial
    assert best == {
        "optuna": {"study": name, "trial": winner.number},
        "tuned": {
            "model": {"dropout": winner.params["model.dropout"]},
            "train": {"lr": winner.params["train.lr"]},
        },
    }

    client = MlflowClient()
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.data.tags["optuna.best_trial"] == str(winner.number)
    # one study name everywhere: the hashed one the dashboard lists
    assert name.startswith("t-") and parent.data.tags["optuna.study"] == name
    assert parent.info.run_name == f"tune-{name}"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "tuning")}
    assert {"tuning/optimization_history.png", "tuning/param_importances.png"} <= artifacts
    runs = client.search_runs([parent.info.experiment_id])
    trial_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trial_runs) == 4
    for run in trial_runs:
        assert run.data.tags["optuna.state"] == "complete"
        seeds = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == run.info.run_id]
        assert sorted(r.data.tags["tympan.seed"] for r in seeds) == ["0", "1"]
        assert {r.data.tags["optuna.study"] for r in [run, *seeds]} == {name}
    best_run = study.best_trial.user_attrs["mlflow_run_id"]
    assert client.get_run(best_run).data.tags["tympan.best_trial"] == "true"


def test_rerun_resumes_and_a_larger_budget_continues(tmp_path, tone_cache_dir, mlflow_store):
    params = tune_params(tmp_path, sampler="tpe", n_trials=2)
    _run_tune(params, tone_cache_dir, tmp_path)
    name = study_name(params, open_cache(tone_cache_dir).meta["key"])
    first = [
        (t.number, t.value)
        for t in optuna.load_study(study_name=name, storage=params.tune.storage).trials
    ]
    again = _run_tune(params, tone_cache_dir, tmp_path)  # same budget: nothing to run
    assert again["trials_complete"] == 2
    more = _run_tune(
        replace(params, tune=replace(params.tune, n_trials=3)), tone_cache_dir, tmp_path
    )
    study = optuna.load_study(study_name=name, storage=params.tune.storage)
    assert more["trials_complete"] == 3 and len(study.trials) == 3
    assert [(t.number, t.value) for t in study.trials[:2]] == first
    other = replace(params, train=replace(params.train, weight_decay=0.01))
    assert study_name(other, "k") != study_name(params, "k")  # a changed base starts anew


def test_a_searched_params_value_is_not_part_of_the_study():
    """Every trial sets the searched params itself, so their params.yaml values change no
    trial: setting one (`-S train.lr=...` with tuning on) resumes the same study."""
    params = tune_params(Path("/unused"))  # searches model.dropout and train.lr
    searched = replace(params, train=replace(params.train, lr=0.123))
    assert study_name(searched, "k") == study_name(params, "k")
    fixed = replace(params, train=replace(params.train, batch_size=4))
    assert study_name(fixed, "k") != study_name(params, "k")


@pytest.mark.parametrize("pruner", ["median", "hyperband", "sha"])
def test_epochs_are_the_budget_not_a_dimension_when_pruning(tmp_path, pruner):
    """A pruner compares trials epoch by epoch; searching epochs would compare a 10-epoch
    trial's last value with a 60-epoch trial's at unequal budgets."""
    space = {"train.epochs": SearchParam("int", 10, 60, step=10), **SMALL_SPACE}
    with pytest.raises(ConfigError, match=f"tune.space.train.epochs with tune.pruner={pruner}"):
        validate_space(tune_params(tmp_path, pruner=pruner, space=space))
    validate_space(tune_params(tmp_path, pruner="none", space=space))  # S5's grid
    for name in ("params.yaml", *(f"pipelines/{p.name}" for p in REPO.glob("pipelines/*.yaml"))):
        preset = load_params(REPO / name)
        assert "train.epochs" not in preset.tune.dimensions or preset.tune.pruner == "none", name


def test_the_space_is_nested_so_dvc_set_param_reaches_each_bound(tmp_path):
    """`dvc exp run -S tune.space.train.lr.high=0.01` addresses tune -> space -> train -> lr
    -> high; a flat `train.lr:` key cannot be reached that way, so it is refused with the form
    to write."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert raw["tune"]["space"]["train"]["lr"]["high"] == 0.003
    raw["tune"]["space"] = {"train.lr": {"type": "float", "low": 0.0001, "high": 0.01}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ConfigError) as err:
        load_params(tmp_path / "params.yaml")
    assert str(err.value) == (
        f"{tmp_path / 'params.yaml'}: tune.space.train.lr is written flat; write the space "
        "nested by section so `dvc exp run -S tune.space.train.lr.high=...` can reach it: "
        "space: {train: {lr: {type: float, low: 0.0001, high: 0.01}}}"
    )


@pytest.mark.parametrize(
    ("pruner", "kind"),
    [
        ("median", optuna.pruners.MedianPruner),
        ("hyperband", optuna.pruners.HyperbandPruner),
        ("sha", optuna.pruners.SuccessiveHalvingPruner),
        ("none", optuna.pruners.NopPruner),
    ],
)
def test_each_pruner_name_makes_its_optuna_pruner(tmp_path, pruner, kind):
    assert isinstance(make_pruner(tune_params(tmp_path, pruner=pruner)), kind)


@pytest.mark.parametrize("pruner", ["median", "sha"])
def test_pruned_trials_are_recorded_as_pruned(tmp_path, tone_cache_dir, mlflow_store, pruner):
    space = {"train.lr": SearchParam("float", 1e-5, 1e-2, log=True)}
    params = tune_params(tmp_path, sampler="random", pruner=pruner, n_trials=8, space=space)
    params = replace(params, train=replace(params.train, epochs=6, patience=6))
    figures = _run_tune(params, tone_cache_dir, tmp_path)
    assert figures["trials_complete"] + figures["trials_pruned"] == 8
    assert figures["trials_pruned"] >= 1  # lrs near 1e-5 barely learn: the pruner drops them
    table = (tmp_path / "trials.csv").read_text()
    assert table.startswith("number,state,value")


def _write_params(params: Params, path: Path) -> Path:
    path.write_text(yaml.safe_dump(to_dict(params), sort_keys=False))
    return path


def _stage_args(tmp: Path, cache_dir: Path) -> list[str]:
    """`tympan tune` arguments of the DVC stage, with outputs in `tmp`."""
    return [
        "--features",
        str(cache_dir),
        "--out",
        str(tmp / "best.yaml"),
        "--trials",
        str(tmp / "trials.csv"),
        "--summary",
        str(tmp / "summary.json"),
    ]


def _tympan(params_file: Path, *args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "tympan"), "--params", str(params_file), "tune", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.mark.slow  # over 20 s; run with -m slow (the 20-minute default run)
@pytest.mark.integration
def test_killed_study_resumes_with_the_lost_trial_retried(tmp_path, tone_cache_dir):
    params = tune_params(tmp_path, sampler="tpe", n_trials=3, heartbeat_s=1)
    params = replace(params, train=replace(params.train, epochs=40, patience=40))
    params_file = _write_params(params, tmp_path / "params.yaml")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}"}
    outs = _stage_args(tmp_path, tone_cache_dir)
    name = study_name(params, open_cache(tone_cache_dir).meta["key"])
    first = _tympan(params_file, *outs, env=env)
    deadline = time.monotonic() + 120
    running = []
    while not running and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.5)
        try:
            study = optuna.load_study(study_name=name, storage=params.tune.storage)
        except KeyError:
            continue
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    assert running, f"no trial started: {first.communicate()[0][-2000:]}"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    time.sleep(3)  # past the grace period of two heartbeats

    second = _tympan(params_file, *outs, env=env)
    output = second.communicate(timeout=600)[0]
    assert second.returncode == 0, output[-3000:]
    study = optuna.load_study(study_name=name, storage=params.tune.storage)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 3
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert [t.number for t in failed] == [running[0].number]
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == running[0].number]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server; -> the URL of its trusted `optuna` database. The role PG_ROLE must
    log in with PG_PASSWORD (see `_role_url`)."""
    base = Path(tempfile.mkdtemp(prefix="tympan-pg-"))
    base.chmod(0o755)  # the server runs as the postgres user, which must reach its data folder
    data = base / "data"
    port = free_port()
    started = subprocess.run(
        [str(REPO / "scripts" / "postgres.sh"), str(data), str(port), PG_ROLE],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TYMPAN_PG_PASSWORD": PG_PASSWORD},
    )
    if started.returncode != 0:
        pytest.fail(f"could not start PostgreSQL:\n{started.stderr[-3000:]}")
    url = started.stdout.strip().splitlines()[-1]
    yield url
    stop = ["pg_ctl", "-D", str(data), "-m", "fast", "stop"]
    bindir = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1]
    stop[0] = str(bindir / "pg_ctl")
    if os.geteuid() == 0:
        stop = ["runuser", "-u", "postgres", "--", *stop]
    subprocess.run(stop, capture_output=True, timeout=60)
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.integration
def test_workers_share_one_study_on_postgresql(tmp_path, tone_cache_dir, postgres):
    params = tune_params(tmp_path, sampler="tpe", n_trials=6, storage=postgres, heartbeat_s=2)
    params_file = _write_params(params, tmp_path / "params.yaml")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}"}
    MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]).search_experiments()  # create the store
    coordinator = _tympan(params_file, *_stage_args(tmp_path, tone_cache_dir), env=env)
    workers = [
        _tympan(params_file, "--worker", "--features", str(tone_cache_dir), env=env)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in (coordinator, *workers)]
    for process, output in zip((coordinator, *workers), outputs, strict=True):
        assert process.returncode == 0, output[-3000:]
    name = study_name(params, open_cache(tone_cache_dir).meta["key"])
    study = optuna.load_study(study_name=name, storage=postgres)
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) == 6  # exactly n_trials
    assert not study.get_trials(states=(TrialState.WAITING, TrialState.RUNNING))
    for trial in study.get_trials(states=(TrialState.FAIL,)):
        assert "tympan.surplus" in trial.user_attrs  # only a race-created extra may fail
    assert json.loads((tmp_path / "summary.json").read_text())["trials_complete"] == len(
        study.get_trials(states=(TrialState.COMPLETE,))
    )
    runs = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]).search_runs(
        [
            MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
            .get_experiment_by_name("tune-test")
            .experiment_id
        ],
        filter_string="tags.`tympan.stage` = 'tune'",
    )
    assert (
        len({r.data.tags.get("optuna.trial") for r in runs if "optuna.trial" in r.data.tags}) == 6
    )


@pytest.fixture(scope="module")
def cv_tone_cache_dir(tone_cache_dir, tmp_path_factory) -> Path:
    """The tone clips dealt into three CV folds (each clip its own group)."""
    clips = open_cache(tone_cache_dir).index[["path", "label", "group", "sha256"]]
    folds = split_manifest(clips, SplitConfig(val=0.2), CVConfig(folds=3))
    out = tmp_path_factory.mktemp("cv_tones") / "cache"
    build_cache(clips.merge(folds, on="path"), TONE_FEATURES, out)
    return out


@pytest.mark.integration
def test_a_worker_works_every_folds_study_under_nested_cv(tmp_path, cv_tone_cache_dir, postgres):
    """Under CV the stage queues one study per outer fold; a worker started beside it works
    through every fold's queue, and every fold ends with exactly n_trials."""
    params = tune_params(
        tmp_path, n_trials=2, seeds=(0,), storage=postgres, heartbeat_s=2, study_name="nested"
    )
    params = replace(params, train=replace(params.train, epochs=2))
    params_file = _write_params(params, tmp_path / "params.yaml")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}"}
    MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]).search_experiments()  # create the store
    coordinator = _tympan(params_file, *_stage_args(tmp_path, cv_tone_cache_dir), env=env)
    worker = _tympan(params_file, "--worker", "--features", str(cv_tone_cache_dir), env=env)
    outputs = [p.communicate(timeout=600)[0] for p in (coordinator, worker)]
    for process, output in zip((coordinator, worker), outputs, strict=True):
        assert process.returncode == 0, output[-3000:]
    assert "tune: nested CV over 3 outer folds" in outputs[0]
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    for k in range(3):
        name = best["optuna"][f"fold_{k}"]["study"]
        assert f"tune worker: queue of {name} is empty" in outputs[1]
        study = optuna.load_study(study_name=name, storage=postgres)
        assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 2
        assert not study.get_trials(states=(TrialState.WAITING, TrialState.RUNNING))
        assert {
            t.user_attrs.get("tympan.fold") for t in study.get_trials(states=(TrialState.COMPLETE,))
        } == {k}


@pytest.mark.integration
def test_dashboard_reads_the_study_over_http(tmp_path, tone_cache_dir, mlflow_store):
    params = tune_params(
        tmp_path, n_trials=2, space={"train.lr": SearchParam("categorical", choices=(0.001, 0.003))}
    )
    _run_tune(params, tone_cache_dir, tmp_path)
    port = free_port()
    server = subprocess.Popen(
        [
            str(BIN / "optuna-dashboard"),
            params.tune.storage,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                response = requests.get(f"http://127.0.0.1:{port}/api/studies", timeout=2)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline and server.poll() is None, "dashboard down"
                time.sleep(0.5)
        assert response.status_code == 200
        studies = response.json()["study_summaries"]
        name = study_name(params, open_cache(tone_cache_dir).meta["key"])
        assert [s["study_name"] for s in studies] == [name]
        detail = requests.get(
            f"http://127.0.0.1:{port}/api/studies/{studies[0]['study_id']}", timeout=10
        ).json()
        assert len(detail["trials"]) == 2
        assert detail["objective_names"] == ["val_accuracy"]  # not "Objective 0"
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # its server does not stop on SIGTERM
        server.wait(timeout=30)


@pytest.mark.integration
def test_workers_starting_together_on_an_empty_database(tmp_path, postgres):
    import threading

    import psycopg2

    admin = psycopg2.connect(postgres.replace("postgresql+psycopg2", "postgresql"))
    admin.autocommit = True
    admin.cursor().execute("CREATE DATABASE fresh_race")
    admin.close()
    url = postgres.rsplit("/", 1)[0] + "/fresh_race"
    params = tune_params(tmp_path, storage=url)
    barrier, errors = threading.Barrier(4), []

    def open_one() -> None:
        barrier.wait()
        try:
            open_storage(params, worker=True)
        except Exception as exc:  # collected and reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []


def _role_url(postgres: str, password: str | None = None) -> str:
    """The password role's own database on the test server, with or without the password."""
    url = make_url(postgres).set(username=PG_ROLE, password=password, database=PG_ROLE)
    return url.render_as_string(hide_password=False)


def _files_holding(folder: Path, secret: str) -> list[str]:
    return [
        str(path)
        for path in folder.rglob("*")
        if path.is_file() and secret.encode() in path.read_bytes()
    ]


@pytest.mark.integration
def test_the_password_role_really_needs_its_password(tmp_path, postgres, monkeypatch):
    for name in PASSWORD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    params = tune_params(tmp_path, storage=_role_url(postgres))
    with pytest.raises(TuneError, match="no password supplied"):
        open_storage(params)
    wrong = f"wrong-{secrets.token_hex(6)}"
    monkeypatch.setenv("PGPASSWORD", wrong)
    with pytest.raises(TuneError, match="password authentication failed") as err:
        open_storage(params)
    assert wrong not in str(err.value)
    # libpq's password file works as well as PGPASSWORD (psycopg2 asks libpq for what is missing)
    monkeypatch.delenv("PGPASSWORD")
    pgpass = tmp_path / "pgpass"
    port = make_url(postgres).port
    pgpass.write_text(f"127.0.0.1:{port}:{PG_ROLE}:{PG_ROLE}:{PG_PASSWORD}\n")
    pgpass.chmod(0o600)  # libpq ignores a password file others can read
    monkeypatch.setenv("PGPASSFILE", str(pgpass))
    open_storage(params).remove_session()


@pytest.mark.integration
@pytest.mark.parametrize(
    "supplied_by",
    # libpq's own variable runs under -m slow (20 s; the same never-recorded checks as tympan's)
    [TUNE_STORAGE_ENV, pytest.param("PGPASSWORD", marks=pytest.mark.slow)],
)
def test_a_password_from_the_environment_is_never_recorded(
    tmp_path, tone_cache_dir, postgres, supplied_by
):
    """The real stage (`tympan -v tune`) against the password role: the password is used, and
    no file it writes (MLflow store and artifacts, best params, trials) nor its output holds it."""
    params = tune_params(tmp_path, n_trials=2, seeds=(0,), study_name=f"secret-{supplied_by}")
    params = replace(params, train=replace(params.train, epochs=2))
    env = {k: v for k, v in os.environ.items() if k not in PASSWORD_VARIABLES}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlruns.db'}"
    if supplied_by == TUNE_STORAGE_ENV:  # the whole URL; tune.storage (SQLite here) is ignored
        env[TUNE_STORAGE_ENV] = _role_url(postgres, PG_PASSWORD)
        recorded = masked(env[TUNE_STORAGE_ENV])
        port = make_url(postgres).port
        assert recorded == f"postgresql+psycopg2://{PG_ROLE}:***@127.0.0.1:{port}/{PG_ROLE}"
    else:  # tune.storage names the role, libpq takes the password from the environment
        params = replace(params, tune=replace(params.tune, storage=_role_url(postgres)))
        env["PGPASSWORD"] = PG_PASSWORD
        recorded = _role_url(postgres)
    params_file = _write_params(params, tmp_path / "params.yaml")
    stage = _stage_args(tmp_path, tone_cache_dir)
    done = subprocess.run(
        [str(BIN / "tympan"), "-v", "--params", str(params_file), "tune", *stage],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"from {'tune.storage' if supplied_by == 'PGPASSWORD' else supplied_by}" in done.stdout

    assert PG_PASSWORD not in done.stdout and PG_PASSWORD not in done.stderr
    assert (tmp_path / "mlruns.db").exists() and (tmp_path / "mlartifacts").is_dir()
    assert _files_holding(tmp_path, PG_PASSWORD) == []  # the store's bytes, artifacts, outputs
    assert not (tmp_path / "optuna.db").exists()  # the SQLite tune.storage was not used

    name = study_name(params, open_cache(tone_cache_dir).meta["key"])
    study = optuna.load_study(study_name=name, storage=_role_url(postgres, PG_PASSWORD))
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2
    assert yaml.safe_load((tmp_path / "best.yaml").read_text())["optuna"]["study"] == name
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.data.params["tune.storage"] == recorded
    assert parent.data.tags["optuna.storage"] == recorded


@pytest.mark.integration
def test_dvc_lock_records_params_yaml_which_cannot_hold_a_password(tmp_path):
    """dvc.lock copies the tune section of params.yaml: with the password in the environment
    it holds the URL without it, and a params.yaml holding one fails before DVC records it."""
    project = copy_project(tmp_path / "project")
    (project / "data" / "features").mkdir(parents=True)
    (project / "data" / "features" / "meta.json").write_text("{}")  # tune is off: not read
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env[TUNE_STORAGE_ENV] = f"postgresql+psycopg2://u:{PG_PASSWORD}@127.0.0.1:1/optuna"

    def dvc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["dvc", *args], cwd=project, env=env, capture_output=True, text=True, timeout=300
        )

    assert dvc("init", "--no-scm", "-q").returncode == 0
    done = dvc("repro", "--single-item", "tune")
    assert done.returncode == 0, done.stderr[-3000:]
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["tune"]["params"]["params.yaml"]["tune"]["storage"] == (
        load_params(project / "params.yaml").tune.storage
    )

    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["tune"]["storage"] = env.pop(TUNE_STORAGE_ENV)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ConfigError, match="holds a password"):
        load_params(project / "params.yaml")
    failed = dvc("repro", "--single-item", "tune")
    assert failed.returncode != 0
    assert "tune.storage=postgresql+psycopg2://u:***@127.0.0.1:1/optuna holds a password" in (
        failed.stdout + failed.stderr
    )
    assert PG_PASSWORD not in failed.stdout + failed.stderr
    leaks = _files_holding(project, PG_PASSWORD)
    assert leaks == [str(project / "params.yaml")]  # only where the user wrote it
