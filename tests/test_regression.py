"""Regression end to end (S5's task): a csv manifest with a numeric target, trained with L1,
evaluated with MAE/RMSE/R^2, registered and served as a value per recording."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from tympan.config import DataConfig, ModelConfig, RegisterConfig, SplitConfig

from audio_helpers import tone, write
from conftest import register_in, run_to_evaluate

pytestmark = pytest.mark.integration


def _valence_set(root, n: int = 60):
    """Tones whose pitch rises with a 1-5 'valence'; the csv layout of the csv adapter."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        value = round(float(rng.uniform(1, 5)), 2)
        wave = tone(200 * value, 0.5, 8000) + rng.normal(0, 0.01, 4000).astype(np.float32)
        path = write(root / "clips" / f"clip{i:03d}.wav", wave, 8000)
        rows.append({"file": f"clips/{path.name}", "valence": value, "speaker": f"s{i % 4}"})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)


def test_regression_pipeline(tmp_path, mlflow_store, repo_params):
    from mlflow.tracking import MlflowClient

    from tympan.serving import Predictor

    _valence_set(tmp_path / "data")
    base = repo_params
    params = replace(
        base,
        data=DataConfig(
            adapter="csv",
            root=str(tmp_path / "data"),
            metadata="labels.csv",
            path_column="file",
            label_column=None,
            target_column="valence",
            side_columns=("speaker",),
            max_duration_s=10.0,
        ),
        split=SplitConfig(strategy="stratified", val=0.2, test=0.2),
        features=replace(
            base.features, sample_rate=8000, seconds=0.5, n_fft=256, hop_length=128, n_mels=32
        ),
        model=replace(ModelConfig(), channels=8, hidden=16, pool=4),
        train=replace(
            base.train, task="regression", loss="l1", seeds=(0, 1), epochs=6, batch_size=8
        ),
        evaluate=replace(base.evaluate, breakdown=("speaker",), worst_k=4),
        register=RegisterConfig(name="tympan-valence", metric="mae"),
    )
    d = tmp_path
    run_to_evaluate(params, d)
    results = json.loads((d / "metrics" / "test.json").read_text())
    assert set(results["ensemble"]) == {"mae", "rmse", "r2"}
    assert all(np.isfinite(v) for v in results["ensemble"].values())
    assert list(results["seeds"]) == ["0", "1"]
    headline = json.loads((d / "metrics" / "headline.json").read_text())
    assert headline["test_mae"] == results["ensemble"]["mae"]
    speakers = json.loads((d / "metrics" / "breakdown.json").read_text())["speaker"]
    test_speakers = set(
        pd.read_csv(d / "plots" / "test_predictions.csv").merge(
            pd.read_csv(d / "manifest.csv"), on="path"
        )["speaker"]
    )
    assert set(speakers) == test_speakers and len(speakers) >= 2
    assert len(pd.read_csv(d / "plots" / "worst.csv")) == 4

    register_in(params, d)
    registered = json.loads((d / "registered.json").read_text())
    assert registered["alias"] == "champion" and registered["metric"] == "mae"
    card = (d / "card.md").read_text()
    assert "## Per level (true value rounded)" in card and "Regression on" in card
    version = MlflowClient().get_model_version("tympan-valence", "1")
    assert float(version.tags["test_mae"]) == results["ensemble"]["mae"]

    predictor = Predictor.load(d / "models" / "bundle.pt")
    assert predictor.regression
    manifest = pd.read_csv(d / "manifest.csv")
    answer = predictor.predict(
        [manifest["path"].iloc[0]], {"speaker": [manifest["speaker"].iloc[0]]}
    )
    assert set(answer[0]) == {"value", "windows"} and np.isfinite(answer[0]["value"])
