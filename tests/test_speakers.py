"""Speaker-independence levers (issue 15): silence trimming, per-utterance normalisation, speed
perturbation, VTLP, and validation dealt from the training speakers' recordings."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import librosa
import numpy as np
import pandas as pd
import pytest
import torch

from tympan.audio import trim
from tympan.config import AugmentConfig, CVConfig, FeatureConfig, SegmentConfig, SplitConfig
from tympan.data.splits import split_manifest
from tympan.features import build_cache
from tympan.features.stack import FeatureStack, set_params, utterance_norm
from tympan.serving.bundle import Predictor
from tympan.training.augment import Augmenter, WaveAugmenter, mel_centres, vtlp_sources

from audio_helpers import tone, write

FEATURES = FeatureConfig(
    sample_rate=8000, seconds=1.0, crop="start", n_fft=256, hop_length=128, f_max=4000.0
)


def _padded_tone(rng: np.random.Generator, lead: int, tail: int, freq: float = 440.0):
    noise = lambda n: rng.normal(0, 1e-4, n).astype(np.float32)  # noqa: E731
    return np.concatenate([noise(lead), tone(freq, 0.3, 8000), noise(tail)])


# --- silence trimming -----------------------------------------------------------------------


@pytest.mark.parametrize("top_db", [20.0, 30.0, 60.0])
def test_trim_matches_librosa(top_db):
    rng = np.random.default_rng(0)
    for lead, tail in [(0, 0), (1000, 2000), (2333, 17)]:
        y = _padded_tone(rng, lead, tail)
        expected, _ = librosa.effects.trim(y, top_db=top_db, frame_length=256, hop_length=128)
        got = trim(torch.from_numpy(y), top_db, 256, 128)
        assert got.shape[-1] == len(expected)
        assert np.array_equal(got.numpy(), expected)


def test_trim_keeps_a_silent_clip_whole():
    assert trim(torch.zeros(1000), 30.0, 256, 128).shape == (1000,)


def test_serving_features_equal_cache_features_with_trim_and_cmvn(tmp_path):
    """The served model computes a clip's input exactly as featurize cached it."""
    rng = np.random.default_rng(1)
    paths = [
        write(tmp_path / f"{i}.wav", _padded_tone(rng, lead, 1500, 300.0 + 100 * i), 8000)
        for i, lead in enumerate([2500, 700, 0])
    ]
    table = pd.DataFrame(
        {
            "path": [str(p) for p in paths],
            "label": ["a", "b", "a"],
            "group": ["g0", "g1", "g2"],
            "split": ["train", "val", "test"],
            "sha256": [f"{i:064x}" for i in range(3)],
        }
    )
    cfg = replace(FEATURES, trim_db=30.0, utterance_norm="cmvn", dtype="float32")
    cache = build_cache(table, cfg, tmp_path / "cache")
    plain = build_cache(table, replace(cfg, trim_db=0.0), tmp_path / "plain")
    serving = SimpleNamespace(features=cfg, segment=SegmentConfig())
    frontend = FeatureStack(cfg, cfg.stack)
    for i, path in enumerate(paths):
        (window,) = Predictor._windows(serving, i, path)  # serving's decode -> windows
        served = frontend(window.unsqueeze(0))[0].numpy()
        assert np.allclose(served, cache.features[i], atol=1e-4)
    # trimming moved the tone to the start of the window: the first clip's input changed
    assert not np.allclose(cache.features[0], plain.features[0], atol=1e-2)


def test_new_feature_levers_join_the_set_keys_only_when_on():
    off = set_params("logmel", FEATURES, FEATURES.stack)
    assert "trim_db" not in off and "utterance_norm" not in off  # earlier caches keep theirs
    on = set_params(
        "logmel", replace(FEATURES, trim_db=30.0, utterance_norm="cmvn"), FEATURES.stack
    )
    assert on["trim_db"] == 30.0 and on["utterance_norm"] == "cmvn"
    wave = set_params("wave", replace(FEATURES, trim_db=30.0), FEATURES.stack)
    assert wave["trim_db"] == 30.0 and wave["n_fft"] == 256


# --- per-utterance normalisation ------------------------------------------------------------


def test_cmvn_is_per_clip_and_bin_and_batch_safe():
    x = torch.randn(3, 40, 63) * 7 + torch.linspace(-80, 0, 40).view(1, 40, 1)
    out = utterance_norm(x, "cmvn")
    assert torch.allclose(out.mean(dim=-1), torch.zeros(3, 40), atol=1e-4)
    assert torch.allclose(out.std(dim=-1, correction=0), torch.ones(3, 40), atol=1e-4)
    assert torch.allclose(utterance_norm(x[1:2], "cmvn"), out[1:2])
    assert torch.allclose(utterance_norm(x, "cmn").mean(dim=-1), torch.zeros(3, 40), atol=1e-4)
    assert torch.equal(utterance_norm(x, "none"), x)
    silent = utterance_norm(torch.full((1, 40, 63), -80.0), "cmvn")
    assert torch.all(torch.isfinite(silent)) and torch.all(silent == 0)


# --- speed perturbation and VTLP ------------------------------------------------------------


def _peak_hz(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[spectrum.argmax()])


def test_speed_perturbation_plays_faster_and_higher_length_kept():
    wave = torch.zeros(2, 8000)
    wave[:, :4000] = torch.from_numpy(tone(500, 0.5, 8000))
    fast = WaveAugmenter(AugmentConfig(wave_speed=(1.2, 1.2), wave_p=1.0), 8000, 0)(wave)
    assert fast.shape == wave.shape
    assert abs(_peak_hz(fast[0, :3000].numpy(), 8000) - 600) < 5
    sounding = np.flatnonzero(np.abs(fast[0].numpy()) > 0.05)
    assert abs(sounding[-1] - 4000 / 1.2) < 30  # 0.5 s of tone now lasts 0.5 / 1.2 s
    slow = WaveAugmenter(AugmentConfig(wave_speed=(0.9, 0.9), wave_p=1.0), 8000, 0)(wave)
    assert abs(_peak_hz(slow[0, :4000].numpy(), 8000) - 450) < 5
    off = WaveAugmenter(AugmentConfig(wave_speed=(0.8, 1.2), wave_p=0.0), 8000, 0)(wave)
    assert torch.equal(off, wave)


def test_wave_speed_must_be_an_ordered_pair():
    with pytest.raises(ValueError, match="wave_speed"):
        AugmentConfig(wave_speed=(1.1, 0.9))
    assert AugmentConfig(wave_speed=[0.9, 1.1]).waveform


def test_vtlp_warp_is_identity_at_one_and_moves_energy_with_alpha():
    centres = mel_centres(FEATURES)
    assert len(centres) == FEATURES.n_mels and np.all(np.diff(centres) > 0)
    n = len(centres)
    assert np.allclose(vtlp_sources(centres, 1.0), np.arange(n))
    up, down = vtlp_sources(centres, 1.1), vtlp_sources(centres, 0.9)
    for source in (up, down):
        assert np.all(np.diff(source) > 0) and source[-1] == pytest.approx(n - 1)
    # alpha > 1 (a shorter vocal tract): output bin k reads from below k, formants move up
    assert np.all(up[1:-1] < np.arange(n)[1:-1]) and np.all(down[1:-1] > np.arange(n)[1:-1])


def test_vtlp_augmenter_warps_each_clip_and_keeps_shape():
    centres = mel_centres(FEATURES)
    x = torch.zeros(8, 1, 40, 10)
    x[:, :, 20] = 1.0  # one loud bin
    out, _ = Augmenter(AugmentConfig(vtlp=0.2), 10, 0, 1.0, centres)(x, torch.zeros(8).long())
    assert out.shape == x.shape
    peaks = out[:, 0, :, 0].argmax(dim=1)
    assert len(set(peaks.tolist())) > 1  # each clip its own factor
    with pytest.raises(ValueError, match="bin_hz"):
        Augmenter(AugmentConfig(vtlp=0.1), 10, 0, 1.0)


# --- validation from the training speakers --------------------------------------------------


def test_val_from_recordings_never_holds_the_test_speaker():
    """`data.group_by: null` under `cv.column: speaker`: the test fold is one speaker, val a
    label-stratified sample of the other speakers' recordings (all five voices in train)."""
    speakers = ["george", "jackson", "lucas", "nicolas", "theo", "yweweler"]
    rows = [
        {"path": f"{d}_{s}_{t}.wav", "label": str(d), "speaker": s, "sha256": f"{d}{s}{t}"}
        for s in speakers
        for d in range(10)
        for t in range(10)
    ]
    manifest = pd.DataFrame(rows).assign(group=lambda t: t["path"])  # the recording itself
    table = split_manifest(
        manifest, SplitConfig(strategy="group", val=0.17), CVConfig(6, "speaker")
    )
    for k, speaker in enumerate(sorted(speakers)):
        split = table[f"split_{k}"].to_numpy()
        held = manifest["speaker"].to_numpy() == speaker
        assert np.all(split[held] == "test") and np.all(split[~held] != "test")
        for name in ("train", "val"):
            assert set(manifest["speaker"][split == name]) == set(speakers) - {speaker}
        val_per_label = manifest["label"][split == "val"].value_counts()
        assert val_per_label.max() - val_per_label.min() <= 1  # stratified by label


# --- heard vs unseen speakers, side by side ---------------------------------------------------


def test_compare_unseen_speakers_runs_both_protocols_into_one_table_and_both_cards(
    tmp_path, mlflow_store, capsys
):
    """`compare-protocols fsdd_digits --unseen speaker` on real FSDD recordings (3 speakers):
    the same model under 3-fold CV twice. Heard: every fold's test speakers are also in its
    training data. Unseen: no test speaker of any fold is in that fold's train or val rows.
    The table (with each speaker under both) is printed, in MLflow, and in both cards."""
    from mlflow.tracking import MlflowClient
    from test_protocols import PIPELINES

    from tympan.cli import main

    from conftest import FSDD, fsdd_subset

    if not (FSDD / "metadata.csv").exists():
        pytest.skip(f"FSDD not found at {FSDD}")
    root = fsdd_subset(FSDD, tmp_path / "fsdd", ["george", "jackson", "lucas"], range(0, 6))
    sets = [f"data.root={root}", "train.seeds=[0]", "train.epochs=1", "features.workers=1"]
    sets += ["model.name=s3_cnn", "model.hidden=16", "model.channels=8"]
    main(
        ["compare-protocols", "fsdd_digits", "--unseen", "speaker"]
        + ["--work", str(tmp_path / "work"), "--dir", str(PIPELINES)]
        + [arg for text in sets for arg in ("--set", text)]
    )
    work = tmp_path / "work" / "fsdd_digits-unseen-speaker"
    heard, unseen = json.loads((work / "protocols.json").read_text())
    assert (heard["run"], unseen["run"]) == ("heard speaker", "unseen speaker")
    assert heard["n_test"] == unseen["n_test"] == 3 * 10 * 6  # out of fold: every clip once
    manifest = pd.read_csv(work / "values" / "manifest.csv", dtype=str)
    speaker = dict(zip(manifest["path"], manifest["speaker"], strict=True))
    for r, held_out in ((heard, False), (unseen, True)):
        splits = pd.read_csv(Path(r["folder"]) / "splits.csv", dtype=str)
        splits["speaker"] = splits["path"].map(speaker)
        assert splits["cv_fold"].nunique() == 3  # one fold per speaker: the count ingested
        for fold in range(3):
            split = splits[f"split_{fold}"]
            test = set(splits.loc[split == "test", "speaker"])
            trained = set(splits.loc[split != "test", "speaker"])
            assert bool(test & trained) is not held_out, (r["run"], fold, test, trained)
    printed = capsys.readouterr().out
    assert "By speaker, out of fold (accuracy)" in printed
    for name in ("george", "jackson", "lucas"):
        assert f"| {name} | 60 |" in printed
    client = MlflowClient()
    for r in (heard, unseen):
        card = (Path(r["folder"]) / "model_card.md").read_text()
        assert card.startswith("# Model card: tympan-fsdd-digits (not registered)")
        assert "## Protocols side by side" in card and "| lucas | 60 |" in card
        artifacts = {a.path for a in client.list_artifacts(r["mlflow_run"])}
        assert {"model_card.md", "protocols.md"} <= artifacts
