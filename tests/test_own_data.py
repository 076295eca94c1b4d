"""A user's own data in a preset's layout: ESC-50's real metadata over 1-s 16 kHz clips, run
with the ESC-50 preset (5-s 44.1 kHz features). Ingest reports how the clips are, featurize
warns that they do not fit, and a breakdown column the manifest lacks fails at split."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from tympan import stages
from tympan.config import load_params
from tympan.data.splits import SplitError

from conftest import REPO

LAYOUTS = REPO.parent / "shared" / "datasets" / "layouts"


@pytest.fixture
def esc50_short(tmp_path) -> Path:
    """audio/ + meta/esc50.csv: the real rows of two categories (two per fold), as 1 s at
    16 kHz instead of ESC-50's 5 s at 44.1 kHz."""
    meta = pd.read_csv(LAYOUTS / "esc50" / "meta" / "esc50.csv")
    rows = pd.concat(
        meta[meta["category"] == c].groupby("fold").head(2)
        for c in sorted(meta["category"].unique())[:2]
    )
    root = tmp_path / "esc50"
    (root / "audio").mkdir(parents=True)
    (root / "meta").mkdir()
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    for i, row in enumerate(rows.itertuples()):
        wave = 0.3 * np.sin(2 * np.pi * (300 + 40 * i) * t) + 0.01 * rng.standard_normal(16000)
        sf.write(root / "audio" / row.filename, wave.astype(np.float32), 16000)
    rows.to_csv(root / "meta" / "esc50.csv", index=False)
    return root


def _params(root: Path, **evaluate):
    preset = load_params(REPO / "pipelines" / "s4_esc50_baselines.yaml")
    return replace(
        preset,
        data=replace(preset.data, root=str(root)),
        features=replace(preset.features, workers=1),
        evaluate=replace(preset.evaluate, **evaluate),
    )


def test_clips_that_do_not_fit_the_features_are_reported_and_warned(esc50_short, tmp_path, caplog):
    params = _params(esc50_short)
    assert (params.features.seconds, params.features.sample_rate) == (5.0, 44100)
    d = tmp_path
    stages.run_ingest(params, d / "manifest.csv", d / "rejects.csv", d / "ingest.json")
    audio = json.loads((d / "ingest.json").read_text())["audio"]
    assert audio["duration_s"]["median"] == 1.0 and audio["sample_rate"] == {"16000": 20}
    assert audio["channels"] == {"1": 20}

    stages.run_split(params, d / "manifest.csv", d / "splits.csv", d / "split.json")
    with caplog.at_level(logging.WARNING, logger="tympan.stages"):
        stages.run_featurize(params, d / "manifest.csv", d / "splits.csv", d / "features")
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "20 of 20 recordings are shorter than features.seconds=5" in warned
    assert "padded with silence to 5 s; features.seconds: 1 fits them" in warned
    assert "below features.sample_rate=44100 (most are 16000 Hz): they are upsampled" in warned


def test_a_breakdown_column_the_manifest_lacks_fails_at_split(esc50_short, tmp_path):
    d = tmp_path
    good = _params(esc50_short, breakdown=("fold",))
    stages.run_ingest(good, d / "manifest.csv", d / "rejects.csv", d / "ingest.json")
    stages.run_split(good, d / "manifest.csv", d / "splits.csv", d / "split.json")
    values = json.loads((d / "split.json").read_text())["breakdown_values"]
    assert values["fold"]["test"] == 1  # fold 0's test split is one official fold

    bad = _params(esc50_short, breakdown=("fold", "speaker"))
    with pytest.raises(SplitError, match=r"evaluate\.breakdown names speaker, not a column"):
        stages.run_split(bad, d / "manifest.csv", d / "s2.csv", d / "s2.json")
    assert not (d / "s2.csv").exists()  # nothing written, nothing trained
