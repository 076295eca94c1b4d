"""Shared fixtures: the real params shrunk for CPU, FSDD from ../shared, a tmp MLflow store."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

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


def copy_project(dest: Path) -> Path:
    """The files a DVC repo of tympan needs (dvc.yaml, params.yaml, src/) in `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, dest / name)
    shutil.copytree(
        REPO / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    return dest


TONE_FEATURES = FeatureConfig(
    sample_rate=8000, seconds=0.5, n_fft=256, hop_length=128, f_max=4000.0
)


@pytest.fixture(scope="session")
def tone_cache(tone_cache_dir) -> FeatureCache:
    return open_cache(tone_cache_dir)


@pytest.fixture(scope="session")
def tone_cache_dir(tmp_path_factory) -> Path:
    """Low tones vs high tones, 48 clips: any working training loop separates them."""
    tmp = tmp_path_factory.mktemp("tones")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(48):
        label = "low" if i % 2 else "high"
        freq = rng.uniform(200, 400) if label == "low" else rng.uniform(2500, 3500)
        path = write(tmp / f"{i}.wav", tone(freq, 0.5, 8000, amp=rng.uniform(0.1, 0.9)), 8000)
        rows.append(
            {
                "path": str(path),
                "label": label,
                "group": str(i),
                "split": ["train", "train", "train", "train", "val", "test"][i % 6],
                "sha256": f"{i:064x}",
                "mic": ["a", "b"][(i // 2) % 2],  # a side attribute, both mics in each class
            }
        )
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
