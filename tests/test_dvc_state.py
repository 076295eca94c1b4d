"""What DVC shows is what ran, and a state seen before is not built again: the real `dvc repro`,
`dvc exp run`, `dvc push`/`pull` and MLflow store in a temporary git + DVC repo of the demo,
shrunk (conftest's DEMO_PARAMS).

- every stage of a state DVC has run before comes back from its run-cache;
- the same model (bundle and test set) is registered once, and evaluate run again on the same
  models adds no point to any metric's history;
- the tuned values are a DVC params source of train, win over params.yaml's and are printed;
  the search space is set from the command line;
- a fresh clone's `dvc pull` names the remote it lacks instead of listing missing files.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from tympan.serving.bundle import bundle_digest

from conftest import copy_demo

BIN = str(Path(sys.executable).parent)
STAGES = {"demo", "ingest", "split", "featurize", "tune", "train", "evaluate", "register"}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    return env


def _call(cwd: Path, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)


def _run(cwd: Path, *cmd: str) -> str:
    done = _call(cwd, *cmd)
    assert done.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    )
    return done.stdout + done.stderr


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", output))


def _restored(output: str) -> set[str]:
    return set(re.findall(r"Stage '(\w+)' is cached - skipping run, checking out outputs", output))


def _client(project: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns.db'}")


def _versions(project: Path) -> list[int]:
    found = _client(project).search_model_versions("name = 'tympan-demo'")
    return sorted(int(v.version) for v in found)


def _latest_train_run(project: Path):
    client = _client(project)
    experiment = client.get_experiment_by_name("tympan-demo")
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string="tags.`tympan.stage` = 'train'",
        order_by=["attributes.start_time DESC"],
    )
    return next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)


@pytest.fixture(scope="module")
def project(demo_build, tmp_path_factory) -> Path:
    """This module's copy of the demo pipeline run once (seeds 0 and 1), committed; this
    machine's remote set as `make run` sets it."""
    root = copy_demo(demo_build, tmp_path_factory.mktemp("state"))
    assert _ran(demo_build.log) == STAGES
    return root


@pytest.mark.integration
def test_every_stage_of_a_state_seen_before_comes_back_from_the_run_cache(project):
    """No stage has an uncached plain output (those keep DVC from saving a run), and no params
    file is empty (DVC cannot hash it): with dvc.lock gone, every stage is restored."""
    lock = (project / "dvc.lock").read_text()
    (project / "dvc.lock").unlink()
    output = _run(project, "dvc", "repro")
    assert _ran(output) == set()
    assert _restored(output) == STAGES
    assert (project / "dvc.lock").read_text() == lock
    assert _run(project, "git", "status", "--porcelain", "--untracked-files=no") == ""

    # a param changed and set back: the stage it concerns runs once, then is restored
    def evaluate_with(worst_k: int) -> str:
        raw = yaml.safe_load((project / "params.yaml").read_text())
        raw["evaluate"]["worst_k"] = worst_k
        (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        return _run(project, "dvc", "repro")

    assert _ran(evaluate_with(3)) == {"evaluate"}  # register's inputs did not change
    back = evaluate_with(10)
    assert _ran(back) == set() and _restored(back) == {"evaluate"}
    _run(project, "git", "checkout", "params.yaml")
    assert "up to date" in _run(project, "dvc", "status")


@pytest.mark.slow  # over 20 s; run with -m slow (the 20-minute default run)
@pytest.mark.integration
def test_the_same_model_is_registered_once(project):
    """evaluate and register run again on the same models (what the run-cache now spares,
    but `dvc repro -f` or a lost cache still does): no metric point twice, no second logged
    model, no new version. A retrained model with the same weights is not registered either."""
    assert _versions(project) == [1]
    record = json.loads((project / "models" / "train.json").read_text())
    run_id = record["parent_run_id"]
    _run(project, "dvc", "repro", "-f", "--single-item", "evaluate")
    output = _run(project, "dvc", "repro", "-f", "--single-item", "register")
    assert re.search(
        r"register: tympan-demo v1 \(@champion\) already holds this model \(bundle sha256 "
        r"[0-9a-f]{12}\) tested on the same test set \([0-9a-f]{12}\); no new version",
        output,
    ), output
    assert _versions(project) == [1]
    client = _client(project)
    assert len(client.get_metric_history(run_id, "test_accuracy")) == 1
    assert sorted(record["seeds"]) == ["0", "1"]
    for seed in record["seeds"].values():  # and no member's run either
        assert len(client.get_metric_history(seed["run_id"], "test_accuracy")) == 1
    experiment = client.get_run(run_id).info.experiment_id
    logged = client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'")
    assert len(logged) == 1
    registered = json.loads((project / "reports" / "registered.json").read_text())
    assert (registered["version"], registered["alias"], registered["new_version"]) == (
        1,
        "champion",
        False,
    )
    version = client.get_model_version("tympan-demo", "1")
    assert version.tags["tympan.bundle"] == bundle_digest(project / "models" / "bundle.pt")
    assert (project / "reports" / "model_card.md").read_text() == version.description

    # retrained: a new train run, the same weights on this machine (see README), so no version
    _run(project, "dvc", "repro", "-f", "--single-item", "train")
    output = _run(project, "dvc", "repro")
    assert _ran(output) == {"evaluate", "register"}
    assert "no new version" in output and _versions(project) == [1]
    _run(project, "git", "add", "-A")
    _run(project, "git", "commit", "-qm", "retrained")


@pytest.mark.slow  # over 20 s; run with -m slow (the 20-minute default run)
@pytest.mark.integration
def test_tuned_values_are_dvc_params_that_win_over_params_yaml(project):
    """With tuning on, `dvc params diff`/`dvc exp show` list what train used; a searched
    param set in params.yaml is overridden and printed with its value; `-S` on tune.space
    removes, adds and replaces dimensions, and taking a param out of the space pins it."""
    output = _run(
        project,
        "dvc",
        "exp",
        "run",
        "-n",
        "tuned",
        "-S",
        "tune.enabled=true",
        "-S",
        "tune.n_trials=2",
        "-S",
        "tune.seeds=[0]",
        "-S",
        "tune.sampler=grid",
        "-S",
        "tune.pruner=none",
        "-S",
        "~tune.space.model",
        "-S",
        "~tune.space.train.batch_size",
        "-S",
        "~tune.space.train.lr",
        "-S",
        "+tune.space.train.lr={type: categorical, choices: [0.002, 0.004]}",
        "-S",
        "train.lr=0.5",
        "train",
    )
    best = yaml.safe_load((project / "tuning" / "best_params.yaml").read_text())
    lr, study = best["tuned"]["train"]["lr"], best["optuna"]["study"]
    assert lr in (0.002, 0.004) and set(best["tuned"]) == {"train"}
    assert f"train.lr  {lr!r}  (params.yaml: 0.5)" in output
    assert "override the params file" in output and "-S '~tune.space.train.lr'" in output
    assert re.fullmatch(r"tympan-demo-[0-9a-f]{8}", study)

    diff = json.loads(_run(project, "dvc", "params", "diff", "--json"))
    changed = {
        (path, name): (change["old"], change["new"])
        for path, params in diff.items()
        for name, change in params.items()
    }
    assert changed[("tuning/best_params.yaml", "tuned.train.lr")] == (None, lr)
    assert changed[("tuning/best_params.yaml", "optuna.study")] == (None, study)
    assert changed[("params.yaml", "train.lr")] == (0.001, 0.5)
    shown = json.loads(_run(project, "dvc", "exp", "show", "--json"))
    experiment = next(
        e for rev in shown for e in rev.get("experiments") or [] if e.get("name") == "tuned"
    )
    files = experiment["revs"][0]["data"]["params"]
    assert files["tuning/best_params.yaml"]["data"]["tuned"]["train"]["lr"] == lr
    assert files["params.yaml"]["data"]["train"]["lr"] == 0.5

    run = _latest_train_run(project)  # MLflow records the same values and the same study
    assert run.data.params["train.lr"] == str(lr)
    assert run.data.tags["optuna.study"] == study
    assert run.data.tags["tympan.tuned_params"] == "train.lr"
    storage = f"sqlite:///{project / 'optuna.db'}"
    assert optuna.load_study(study_name=study, storage=storage).metric_names == ["val_accuracy"]

    # pinned: train.lr out of the search keeps params.yaml's 0.5; dropout is searched instead
    output = _run(
        project,
        "dvc",
        "exp",
        "run",
        "-S",
        "~tune.space.train.lr",
        "-S",
        "+tune.space.model.dropout={type: categorical, choices: [0.1, 0.3]}",
        "train",
    )
    best = yaml.safe_load((project / "tuning" / "best_params.yaml").read_text())
    assert set(best["tuned"]) == {"model"}
    assert f"model.dropout  {best['tuned']['model']['dropout']!r}  (params.yaml: 0.2)" in output
    run = _latest_train_run(project)
    assert run.data.params["train.lr"] == "0.5"
    assert run.data.params["model.dropout"] == str(best["tuned"]["model"]["dropout"])


@pytest.mark.integration
def test_a_fresh_clone_without_a_reachable_remote_is_told_the_fix(project, tmp_path):
    """The committed config names the default remote `local` without a URL (this machine's
    is in .dvc/config.local), so a clone's `dvc pull` fails saying that remote does not exist
    instead of listing missing files; given its URL, it pulls everything."""
    _run(project, "git", "checkout", "-f", "HEAD")  # the committed state, without the exps
    _run(project, "dvc", "checkout", "-f")
    _run(project, "dvc", "push")
    remote = Path(_run(project, "dvc", "remote", "list").split()[1])
    assert remote == (project.parent / "tympan-dvc-remote").resolve() and remote.is_dir()

    clone = tmp_path / "elsewhere" / "clone"
    _run(tmp_path, "git", "clone", "-q", str(project), str(clone))
    failed = _call(clone, "dvc", "pull")
    assert failed.returncode != 0
    message = failed.stdout + failed.stderr
    assert "config file error: remote 'local' doesn't exist" in message, message
    assert "Is your cache up to date?" not in message

    _run(clone, "dvc", "remote", "add", "--local", "local", str(remote))
    _run(clone, "dvc", "pull")
    assert "up to date" in _run(clone, "dvc", "status")
    assert (clone / "data" / "features" / "sets" / "logmel.npy").exists()
    assert (clone / "models" / "bundle.pt").read_bytes() == (
        project / "models" / "bundle.pt"
    ).read_bytes()


def test_the_bundle_digest_names_the_content_not_the_file(tone_bundle, tmp_path):
    """torch.save writes different bytes for the same tensors; register compares models by
    what they hold."""
    again = tmp_path / "again.pt"
    torch.save(torch.load(tone_bundle, weights_only=True), again)
    assert again.read_bytes() != tone_bundle.read_bytes()
    assert bundle_digest(again) == bundle_digest(tone_bundle)
    changed = torch.load(tone_bundle, weights_only=True)
    member = next(iter(changed["members"].values()))
    weight = next(k for k, v in member.items() if v.is_floating_point())
    member[weight] = member[weight] + 1e-6
    torch.save(changed, again)
    assert bundle_digest(again) != bundle_digest(tone_bundle)
