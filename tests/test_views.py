"""What a user sees: `dvc repro`'s log outside a terminal, `dvc metrics show`, `dvc exp show`,
`dvc plots show`, what git is left to commit, and whether a re-run repeats bit for bit.

One tiny demo project (git + DVC, the real dvc.yaml, params shrunk) is built with `dvc repro`,
its output captured through pipes as in CI or `make run > log`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import yaml

from conftest import REPO, copy_demo, free_port

pytestmark = pytest.mark.integration

BIN = str(Path(sys.executable).parent)
# Library noise that must not reach a log: MLflow's INFO lines, its registration prints and
# download bars, the pyfunc type-hint warning, any Python warning, and redrawn progress bars.
NOISE = (
    " INFO mlflow",
    "Downloading artifacts",
    "Successfully registered model",
    "Created version",
    "type hints",
    "Warning: ",
    "\r",
)


def _run(cwd: Path, *cmd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`cmd` with stdout and stderr through pipes (not a terminal); must succeed."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    base["PATH"] = f"{BIN}{os.pathsep}{base['PATH']}"
    done = subprocess.run(
        cmd, cwd=cwd, env={**base, **(env or {})}, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"{shlex.join(cmd)} failed:\n{done.stdout[-4000:]}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def project(demo_build, tmp_path_factory) -> SimpleNamespace:
    """The demo project with two seeds of two epochs, after `dvc repro`: -> root (this
    module's copy), the repro's output, and `git status` before the results were committed."""
    root = copy_demo(demo_build, tmp_path_factory.mktemp("views"))
    return SimpleNamespace(root=root, log=demo_build.log, status=demo_build.status)


def test_the_log_is_whole_lines_without_library_noise(project):
    for noise in NOISE:
        assert noise not in project.log, f"{noise!r} in the repro log"
    assert not re.search(r"\w+Warning\b", project.log)
    # each member of how many, in lines of their own, the last with its epoch's figures
    for k, seed in ((1, 0), (2, 1)):
        member = f"train member {k} of 2 (seed {seed}): "
        shown = [line for line in project.log.splitlines() if line.startswith(member)]
        assert 1 <= len(shown) <= 5 and shown[-1].startswith(f"{member}2/2 epochs (100%), ")
        assert "v_accuracy=" in shown[-1]
    for loop in ("ingest", "featurize"):  # a line per 10% at most, and the last
        shown = [line for line in project.log.splitlines() if re.match(rf"{loop}: \d+/60 ", line)]
        assert 1 <= len(shown) <= 11 and "60/60" in shown[-1]
    assert "train: 2 members (one per seed)" in project.log
    assert "(ensemble of 2 seeds), per seed " in project.log


def test_dvc_metrics_are_the_headline_and_fit_100_columns(project):
    shown = json.loads(_run(project.root, "dvc", "metrics", "show", "--json").stdout)
    metrics = shown[""]["data"]["metrics/headline.json"]["data"]
    assert list(metrics) == ["test_accuracy", "seed_mean", "seed_std", "test_f1_macro", "n_test"]
    table = _run(project.root, "dvc", "metrics", "show", env={"COLUMNS": "1000"}).stdout
    assert max(len(line) for line in table.splitlines()) <= 100, table
    # dvc exp show: every column is a param, a dependency or one of those five
    header = _run(project.root, "dvc", "exp", "show", "--csv").stdout.splitlines()[0].split(",")
    sections = set(yaml.safe_load((project.root / "params.yaml").read_text()))
    sections |= set(yaml.safe_load((project.root / "tuning/best_params.yaml").read_text()))
    others = [
        c for c in header if c.split(".")[0] not in sections and not (project.root / c).exists()
    ]
    meta = {"Experiment", "rev", "typ", "Created", "parent", "State", "Executor"}
    assert sorted(set(others) - meta) == sorted(metrics)


def test_one_plot_per_curve_with_every_class_and_member(project):
    plots = json.loads(_run(project.root, "dvc", "plots", "show", "--json").stdout)["data"]
    labels = set(json.loads((project.root / "metrics/classes.json").read_text()))
    assert not [p for p in plots if p.startswith(("plots/roc/", "plots/pr/"))]
    for plot, x in (("plots/roc.csv", "fpr"), ("plots/pr.csv", "recall")):
        (shown,) = plots[plot]  # one chart, every class in it, coloured by class
        assert shown["content"]["encoding"]["color"]["field"] == "class"
        assert shown["content"]["encoding"]["x"]["field"] == x
        assert {row["class"] for row in shown["content"]["data"]["values"]} == labels
    for plot, fields in (
        ("loss per epoch", {"train_loss", "val_loss"}),
        ("validation metric per epoch", {"val_accuracy"}),
    ):
        (shown,) = plots[plot]  # the learning curves from train's history, a line per member
        values = shown["content"]["data"]["values"]
        assert {(row["member"], row["epoch"]) for row in values} == {
            (m, e) for m in ("0", "1") for e in ("1", "2")
        }
        assert {row["field"] for row in values} == fields
    for plot in ("plots/confusion.csv", "plots/classes.csv", "plots/breakdown.csv"):
        assert plots[plot][0]["type"] == "vega"
    assert sum(p.startswith("plots/worst/") for p in plots) == 10


def test_git_holds_the_headline_and_dvc_the_rest(project):
    """After a run, git has the headline metrics and the lock; the data reports, tuning's
    output, the test set's fingerprint, the model, detailed metrics, plots and the registry's
    answer are DVC outputs (ignored), so the run-cache can restore every stage."""
    changed = {line[3:] for line in project.status.splitlines()}
    assert changed - {p for p in changed if p.endswith(".gitignore")} == {
        "dvc.lock",
        "metrics/headline.json",
        "tuning/summary.json",
    }
    for path in (
        "data/rejects.csv",
        "reports/ingest.json",
        "reports/split.json",
        "reports/test_set.json",
        "tuning/best_params.yaml",
        "models",
        "metrics/test.json",
        "metrics/classes.json",
        "plots/roc.csv",
        "plots/learning_curves.png",
        "plots/worst",
        "reports/registered.json",
        "reports/model_card.md",
    ):
        assert (project.root / path).exists()
        _run(project.root, "git", "check-ignore", "-q", path)


@pytest.mark.slow  # over 20 s; run with -m slow (the 20-minute default run)
def test_a_second_run_on_this_machine_is_bit_identical(project, tmp_path):
    """Train and evaluate again in new processes: the same weights, history and metrics,
    byte for byte, as `dvc repro` wrote."""
    root, again = project.root, tmp_path / "again"
    _run(
        root,
        "tympan",
        "train",
        "--features",
        "data/features",
        "--manifest",
        "data/manifest.csv",
        "--tuned",
        "tuning/best_params.yaml",
        "--out",
        str(again / "models"),
    )
    _run(
        root,
        "tympan",
        "evaluate",
        "--features",
        "data/features",
        "--models",
        str(again / "models"),
        "--metrics",
        str(again / "metrics"),
        "--plots",
        str(again / "plots"),
        "--test-set",
        str(again / "test_set.json"),
    )
    for name in (
        "models/bundle.pt",
        "models/history.csv",
        "metrics/test.json",
        "metrics/headline.json",
        "plots/roc.csv",
        "plots/test_predictions.csv",
    ):
        assert (again / name).read_bytes() == (root / name).read_bytes(), name


@pytest.mark.slow  # over 20 s: two model loads in new processes; -m slow runs it
def test_predict_and_serve_load_the_model_quietly(project, tmp_path):
    root = project.root
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlruns.db'}"}
    done = _run(
        root,
        "tympan",
        "predict",
        "data/demo/audio",
        "--model",
        "models:/tympan-demo@champion",
        "--out",
        str(tmp_path / "p.csv"),
        env=env,
    )
    assert done.stdout.startswith("predict: 60 of 60 files scored")
    progress = done.stderr.splitlines()  # a line per 10% at most, then the last
    assert 1 <= len(progress) <= 11 and progress[-1].startswith("predict: 60/60 files (100%)")
    said = done.stdout + done.stderr
    for noise in NOISE:
        assert noise not in said

    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as handle:
        server = subprocess.Popen(
            [f"{BIN}/tympan", "serve", "-m", "models:/tympan-demo@champion", "-p", str(port)],
            cwd=root,
            env={**os.environ, **env},
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 240
            while True:
                assert server.poll() is None, log.read_text()
                try:
                    if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).ok:
                        break
                except requests.ConnectionError:
                    pass
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(1)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    for noise in NOISE:
        assert noise not in log.read_text(), log.read_text()


# 35 s, under -m slow to keep the default run under 20 min: `dvc exp run` itself runs in the
# default run (test_dvc_state); this checks the README command's width
@pytest.mark.slow
def test_the_readme_exp_show_command_fits_100_columns(project):
    """Run an experiment, then the README's `dvc exp show` command, as wide as it likes."""
    root = project.root
    # an experiment that reruns evaluate and register only (a train.lr one costs a retraining
    # and makes the row no wider: the columns are the same)
    _run(root, "dvc", "exp", "run", "-n", "worst-3", "-S", "evaluate.worst_k=3")
    (command,) = re.findall(
        r"^ *(dvc exp show --drop .*?)  +#", (REPO / "README.md").read_text(), re.M
    )
    assert command in _run(root, "tympan", "summary").stdout  # summary prints the same
    table = _run(root, *shlex.split(command), env={"COLUMNS": "1000"}).stdout
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= 100, table
    header = next(line for line in lines if "Experiment" in line).split()
    assert {"test_accuracy", "seed_mean", "seed_std", "train.epochs", "train.lr"} <= set(header)
    assert any("worst-3" in line for line in lines)
    # and the two revisions side by side in one chart per curve
    plots = json.loads(_run(root, "dvc", "plots", "diff", "HEAD", "--json").stdout)["data"]
    for plot in ("plots/roc.csv", "loss per epoch"):
        (shown,) = plots[plot]
        assert len(shown["revisions"]) == 2
