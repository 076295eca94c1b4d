"""S3's layout end to end: long recordings named by accent, cut into windows, scored per
recording."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from tympan import stages
from tympan.config import (
    DataConfig,
    EvaluateConfig,
    FeatureConfig,
    SegmentConfig,
    SplitConfig,
    TrainConfig,
)

from audio_helpers import tone, write

PATTERN = r"(?P<group>(?P<label>Argentinian|Other)\d+)\.wav"


@pytest.fixture
def s3_like(tmp_path):
    """Twelve 3-second recordings: 'Argentinian' low tones, 'Other' high tones, noisy."""
    rng = np.random.default_rng(0)
    for i in range(12):
        label = "Argentinian" if i % 2 else "Other"
        freq = rng.uniform(200, 400) if i % 2 else rng.uniform(1500, 2500)
        wave = tone(freq, 3.0, 8000, amp=0.4) + rng.normal(0, 0.02, 24000).astype(np.float32)
        write(tmp_path / "audio" / f"{label}{i}.wav", wave, 8000)
    return tmp_path


def test_windows_train_and_are_scored_per_recording(s3_like, repo_params, mlflow_store):
    tmp = s3_like
    params = replace(
        repo_params,
        data=DataConfig(adapter="filename_pattern", root=str(tmp / "audio"), pattern=PATTERN),
        split=SplitConfig(strategy="group", val=0.25, test=0.25),
        features=FeatureConfig(sample_rate=8000, seconds=1.0, n_fft=256, hop_length=128),
        segment=SegmentConfig(enabled=True, hop=0.5, min_last=0.5),
        train=replace(TrainConfig(), seeds=(0,), epochs=2, batch_size=16),
        evaluate=EvaluateConfig(breakdown=("group",), worst_k=2),
    )
    stages.run_ingest(params, tmp / "manifest.csv", tmp / "rejects.csv", tmp / "ingest.json")
    stages.run_split(params, tmp / "manifest.csv", tmp / "splits.csv", tmp / "split.json")
    stages.run_featurize(params, tmp / "manifest.csv", tmp / "splits.csv", tmp / "features")
    index = pd.read_csv(tmp / "features" / "index.csv")
    assert len(index) == 12 * 5  # 3 s: windows at 0, .5, 1, 1.5, 2
    # every window of a recording sits in its recording's split
    assert (index.groupby("path")["split"].nunique() == 1).all()
    stages.run_train(params, tmp / "features", tmp / "manifest.csv", tmp / "models")
    stages.run_evaluate(
        params, tmp / "features", tmp / "models", tmp / "metrics", tmp / "plots", tmp / "t.json"
    )
    results = json.loads((tmp / "metrics" / "test.json").read_text())
    test_recordings = (pd.read_csv(tmp / "splits.csv")["split"] == "test").sum()
    assert results["n_test"] == test_recordings >= 2  # recordings, not their 5x windows
    assert json.loads((tmp / "t.json").read_text())["clips"] == test_recordings
    predictions = pd.read_csv(tmp / "plots" / "test_predictions.csv")
    assert predictions["path"].is_unique and len(predictions) == test_recordings
    # serving (torch, from the raw audio) combines the windows as evaluation (numpy) did
    from tympan.serving import Predictor

    predictor = Predictor.load(tmp / "models" / "bundle.pt")
    files = [str(tmp / "audio" / p) for p in predictions["path"]]
    served = predictor.predict(files)
    assert [s["windows"] for s in served] == [5] * len(files)
    assert [s["label"] for s in served] == predictions["predicted"].astype(str).tolist()
    confidence = [max(s["probabilities"].values()) for s in served]
    np.testing.assert_allclose(confidence, predictions["confidence"], atol=2e-4)


@pytest.fixture
def windowed_cache(s3_like):
    """The twelve recordings cut into 1 s windows every 0.5 s; every third is val."""
    from tympan.features import build_cache

    rows = []
    for path in sorted((s3_like / "audio").glob("*.wav")):
        split = ["train", "train", "val"][len(rows) % 3]
        rows.append(
            {
                "path": str(path),
                "label": "Argentinian" if "Arg" in path.name else "Other",
                "group": path.stem,
                "split": split,
                "sha256": f"{len(rows):064x}",
            }
        )
    cfg = FeatureConfig(sample_rate=8000, seconds=1.0, n_fft=256, hop_length=128)
    return build_cache(
        pd.DataFrame(rows), cfg, s3_like / "cache", SegmentConfig(enabled=True, hop=0.5)
    )


def test_validation_scores_recordings_not_windows(windowed_cache):
    """During training, the validation metrics and loss are per recording: the windows'
    probabilities combined by segment.aggregate, as evaluation and serving do."""
    import torch

    from tympan.config import ModelConfig
    from tympan.evaluation.metrics import classification_metrics
    from tympan.evaluation.report import per_recording
    from tympan.training import SeedTrainer, predict
    from tympan.training.loop import _nll

    cache = windowed_cache
    cpu = torch.device("cpu")
    model = ModelConfig(channels=4, hidden=8)
    for how in ("mean", "max"):
        trainer = SeedTrainer(cache, model, TrainConfig(batch_size=8), 0, cpu, aggregate=how)
        loss, val = trainer.validate()
        windows = predict(trainer.model, cache.features, cache.rows("val"), 8, cpu)
        first, combined = per_recording(cache.index.iloc[cache.rows("val")], {"v": windows}, how)
        targets = cache.targets()[cache.rows("val")[first]]
        assert len(targets) == 4  # recordings, each of 5 windows
        expected = classification_metrics(targets, combined["v"])
        # approx: validation and `predict` may batch differently, and a thread count another
        # test left changes float summation order
        assert val == pytest.approx({f"val_{k}": v for k, v in expected.items()}, rel=1e-5)
        assert loss == pytest.approx(_nll(combined["v"], targets, trainer.weight))


@pytest.mark.parametrize("name", ["s3_cnn", "logreg"])
def test_fit_validates_with_segment_aggregate(windowed_cache, name):
    """`fit` (the train stage's and the baselines' entry) passes `aggregate` to validation:
    the logged val metrics are those of the windows combined by mean or by max."""
    import torch

    from tympan.config import ModelConfig
    from tympan.evaluation.metrics import classification_metrics
    from tympan.evaluation.report import per_recording
    from tympan.training import fit, predict

    cache, cpu = windowed_cache, torch.device("cpu")
    model = replace(ModelConfig(name=name), channels=4, hidden=8)
    val_rows = cache.rows("val")
    logged = {}
    for how in ("mean", "max"):
        cfg = TrainConfig(epochs=1, batch_size=8)
        result = fit(cache, model, cfg, 0, cpu, progress=False, aggregate=how)
        windows = predict(result.model, cache.features, val_rows, 8, cpu)
        first, combined = per_recording(cache.index.iloc[val_rows], {"v": windows}, how)
        expected = classification_metrics(cache.targets()[val_rows[first]], combined["v"])
        assert result.history[0].val == {f"val_{k}": v for k, v in expected.items()}
        logged[how] = result.history[0].val_loss
    assert logged["mean"] != logged["max"]
