"""Shared fixtures: the real params shrunk for CPU, FSDD from ../shared, a tmp MLflow store."""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from tympan.compare import run_stages
from tympan.config import FeatureConfig, ModelConfig, Params, TrainConfig, load_params
from tympan.features import FeatureCache, build_cache, open_cache
from tympan.serving.bundle import save_bundle
from tympan.training import fit

from audio_helpers import tone, write

REPO = Path(__file__).resolve().parents[1]
FSDD = Path(os.environ.get("TYMPAN_FSDD", REPO.parent / "shared" / "datasets" / "fsdd"))


@pytest.fixture(autouse=True)
def _checkpoints_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train stages run in-process write their per-epoch checkpoints under the test's own
    folder, not the project's `.tympan/`."""
    monkeypatch.setenv("TYMPAN_CHECKPOINTS", str(tmp_path / "checkpoints"))


@pytest.fixture(scope="session")
def repo_params() -> Params:
    return load_params(REPO / "params.yaml")


@pytest.fixture(scope="session")
def fsdd_root() -> Path:
    if not (FSDD / "metadata.csv").exists():
        pytest.skip(f"FSDD not found at {FSDD} (set TYMPAN_FSDD)")
    return FSDD


def fsdd_subset(root: Path, out: Path, speakers: list[str], takes: range) -> Path:
    """A dataset folder in FSDD's layout holding copies of a subset of the real recordings
    (10-30 KB each; links would point outside the dataset root, which ingest refuses)."""
    meta = pd.read_csv(root / "metadata.csv")
    meta = meta[meta["speaker"].isin(speakers) & meta["take"].isin(takes)]
    (out / "recordings").mkdir(parents=True, exist_ok=True)
    for name in meta["filename"]:
        shutil.copyfile(root / name, out / name)
    meta.to_csv(out / "metadata.csv", index=False)
    return out


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite tracking store for one test."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ingest -> split -> featurize -> train -> evaluate in-process, with dvc.yaml's file names under
# a folder: the same runner `tympan compare-protocols` uses
run_to_evaluate = run_stages


def register_in(params: Params, d: Path) -> None:
    """The register stage on what `run_to_evaluate(params, d)` wrote, with dvc.yaml's file
    names (registered.json and card.md beside them), in the current tracking store."""
    from tympan import stages

    stages.run_register(
        params,
        d / "models",
        d / "metrics",
        d / "split.json",
        d / "test_set.json",
        d / "registered.json",
        d / "card.md",
    )


def register_through_stages(params: Params, d: Path) -> str:
    """ingest .. evaluate, then register, under `d` with a SQLite tracking store of its own
    (`d/mlruns.db`, the process's MLFLOW_TRACKING_URI restored after): -> the store's URI."""
    uri = f"sqlite:///{d / 'mlruns.db'}"
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        run_to_evaluate(params, d)
        register_in(params, d)
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    return uri


def copy_project(dest: Path) -> Path:
    """The files a DVC repo of tympan needs (dvc.yaml, params.yaml, src/) in `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, dest / name)
    shutil.copytree(
        REPO / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    return dest


# The demo project the DVC tests share: params shrunk to seconds of work, two seeds (so
# ensembles, per-member lines and seed spreads are real) of two epochs (so curves have a slope)
DEMO_PARAMS = {
    "demo": {"clips_per_class": 10, "groups": 5},
    "split": {"val": 0.2, "test": 0.2},
    "train": {"seeds": [0, 1], "epochs": 2, "batch_size": 16},
}


def run_tool(cwd: Path, *cmd: str) -> subprocess.CompletedProcess:
    """`cmd` as `make run` runs it: this venv's tools first on PATH, MLflow's settings left to
    the project (its SQLite store beside dvc.yaml); output through pipes; must succeed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    )
    return done


@dataclass(frozen=True)
class DemoBuild:
    """The demo project after its first `dvc repro`, committed. `home` holds `project/` and,
    once something is pushed, this machine's default remote beside it (`make remote`).
    Tests never touch it: each module works in its own `copy_demo`."""

    home: Path
    log: str  # the first `dvc repro`'s stdout and stderr, through pipes as in CI
    status: str  # `git status --porcelain --untracked-files=all` before that run was committed


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory) -> DemoBuild:
    """Built once a session (the first `dvc repro` is most of what the DVC tests cost): the
    real dvc.yaml, .gitignore, DVC config and plot templates, DEMO_PARAMS, git + DVC."""
    home = tmp_path_factory.mktemp("demo")
    root = copy_project(home / "project")
    raw = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in DEMO_PARAMS.items():
        raw[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "t@example.com"],
        ["git", "config", "user.name", "t"],
        ["dvc", "init", "-q"],
        ["cp", str(REPO / ".dvc" / "config"), ".dvc/config"],
        ["cp", str(REPO / ".gitignore"), ".gitignore"],  # MLflow's and Optuna's stores
        ["cp", "-r", str(REPO / ".dvc" / "plots"), ".dvc/plots"],  # the plot templates
        ["make", "-s", "-f", str(REPO / "Makefile"), "remote"],  # this machine's default remote
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "init"],
    ):
        run_tool(root, *cmd)
    repro = run_tool(root, "dvc", "repro")
    status = run_tool(root, "git", "status", "--porcelain", "--untracked-files=all").stdout
    run_tool(root, "git", "add", "-A")
    run_tool(root, "git", "commit", "-qm", "first repro")
    return DemoBuild(home=home, log=repro.stdout + repro.stderr, status=status)


def copy_demo(build: DemoBuild, home: Path) -> Path:
    """A copy of the built demo project in `home/project`, its own in every way: git, DVC cache
    and remote (relative paths), MLflow store and artifacts. MLflow records absolute paths
    (artifact locations, the dataset's repo), so those are moved to the copy as a moved
    project would have them; DVC's lock and state files are left behind (paths of the
    original). Returns the copy's root."""
    old, new = str(build.home), str(home)
    shutil.copytree(
        build.home, home, symlinks=True, dirs_exist_ok=True, ignore=_dvc_tmp(build.home)
    )
    root = home / "project"
    db = sqlite3.connect(root / "mlruns.db")
    try:
        tables = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        with db:
            for (table,) in tables:
                for column in [row[1] for row in db.execute(f"PRAGMA table_info('{table}')")]:
                    db.execute(
                        f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) '
                        f'WHERE typeof("{column}") = \'text\' AND instr("{column}", ?) > 0',
                        (old, new, old),
                    )
        db.execute("VACUUM")  # no old value left in a free page
    finally:
        db.close()
    for mlmodel in (root / "mlartifacts").rglob("MLmodel"):
        mlmodel.write_text(mlmodel.read_text().replace(old, new))
    named = [p for p in home.rglob("*") if p.is_file() and old.encode() in p.read_bytes()]
    assert not named, f"the copy still names the original's folder: {named}"
    return root


def _dvc_tmp(home: Path):
    def ignore(folder: str, names: list[str]) -> list[str]:
        return ["tmp"] if Path(folder) == home / "project" / ".dvc" else []

    return ignore


TONE_FEATURES = FeatureConfig(
    sample_rate=8000, seconds=0.5, n_fft=256, hop_length=128, f_max=4000.0
)


@pytest.fixture(scope="session")
def tone_cache(tone_cache_dir) -> FeatureCache:
    return open_cache(tone_cache_dir)


def random_tones(folder: Path, n: int, split_of, seed: int) -> list[dict]:
    """`n` manifest rows of 0.5-s tones at 8 kHz written to `folder`: high (2.5-3.5 kHz) and
    low (200-400 Hz) in turn, each at a random level; `split_of(i)` names clip i's split."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = "low" if i % 2 else "high"
        freq = rng.uniform(200, 400) if label == "low" else rng.uniform(2500, 3500)
        path = write(folder / f"{i}.wav", tone(freq, 0.5, 8000, amp=rng.uniform(0.1, 0.9)), 8000)
        rows.append(
            {
                "path": str(path),
                "label": label,
                "group": str(i),
                "split": split_of(i),
                "sha256": f"{i:064x}",
            }
        )
    return rows


@pytest.fixture(scope="session")
def tone_cache_dir(tmp_path_factory) -> Path:
    """Low tones vs high tones, 48 clips: any working training loop separates them."""
    tmp = tmp_path_factory.mktemp("tones")
    rows = random_tones(
        tmp, 48, lambda i: ["train", "train", "train", "train", "val", "test"][i % 6], 0
    )
    for i, row in enumerate(rows):
        row["mic"] = ["a", "b"][(i // 2) % 2]  # a side attribute, both mics in each class
    build_cache(pd.DataFrame(rows), TONE_FEATURES, tmp / "cache")
    return tmp / "cache"


@pytest.fixture(scope="session")
def tone_bundle(tone_cache, tmp_path_factory) -> Path:
    """A two-member ensemble bundle trained on the tone cache."""
    model_cfg = ModelConfig(channels=8, hidden=16)
    cfg = TrainConfig(epochs=6, batch_size=8)
    members = {
        seed: fit(tone_cache, model_cfg, cfg, seed, torch.device("cpu")).model.state_dict()
        for seed in (0, 1)
    }
    return _tone_bundle(tone_cache, model_cfg, members, tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="session")
def tone_side_bundle(tone_cache, tmp_path_factory) -> Path:
    """A one-member bundle whose model also takes the side attribute `mic` (values a, b)."""
    model_cfg = ModelConfig(channels=8, hidden=16, side_attributes=("mic",))
    model = fit(tone_cache, model_cfg, TrainConfig(epochs=4, batch_size=8), 0, torch.device("cpu"))
    members = {0: model.model.state_dict()}
    folder = tmp_path_factory.mktemp("side_bundle")
    return _tone_bundle(tone_cache, model_cfg, members, folder, model.model.side_vocab)


def _tone_bundle(
    cache: FeatureCache,
    model_cfg: ModelConfig,
    members: dict,
    folder: Path,
    side_vocab: dict[str, list[str]] | None = None,
) -> Path:
    """Save `members` trained on the tone cache as a bundle in `folder`."""
    path = folder / "bundle.pt"
    shape = tuple(cache.features.shape[1:])
    save_bundle(
        path,
        TONE_FEATURES,
        model_cfg,
        cache.labels,
        shape,
        cache.mean,
        cache.std,
        members,
        side_vocab=side_vocab,
    )
    return path


def assert_served_as_in_process(model: str, uri: str, d: Path, root: Path) -> None:
    """`mlflow models serve -m models:/<model>@champion` from the store `uri` answers four
    FSDD recordings under `root`, and their concatenation (several windows), with the labels
    and probabilities of the in-process predictor of `d/models/bundle.pt`."""
    import base64
    import sys

    import numpy as np
    import requests
    import soundfile as sf
    from test_serving import _start, _stop

    from tympan.serving import Predictor

    from audio_helpers import encode

    url, server = _start(
        [
            *(str(Path(sys.executable).parent / "mlflow"), "models", "serve"),
            *("-m", f"models:/{model}@champion", "--env-manager", "local", "-h", "127.0.0.1"),
        ],
        {"MLFLOW_TRACKING_URI": uri},
        d / "server.log",
    )
    try:
        files = sorted(root.rglob("*.wav"))[:4]
        clips = [f.read_bytes() for f in files]
        waves = [sf.read(f, dtype="float32")[0] for f in files]
        clips.append(encode(np.concatenate(waves), 8000))  # several seconds: windows
        expected = Predictor.load(d / "models" / "bundle.pt").predict(clips)
        body = {"inputs": {"audio": [base64.b64encode(c).decode() for c in clips]}}
        response = requests.post(f"{url}/invocations", json=body, timeout=120)
        assert response.status_code == 200, response.text
        got = response.json()["predictions"]
        assert got[-1]["windows"] == expected[-1]["windows"] > 1
        for g, e in zip(got, expected, strict=True):
            assert g["label"] == e["label"]
            assert g["probabilities"] == pytest.approx(e["probabilities"], rel=1e-4, abs=1e-6)
    finally:
        _stop(server)
