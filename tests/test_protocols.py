"""A study's original protocol beside the honest one: leaks only on purpose, declared, and
recorded; fixed augmented copies that honest runs cannot leak; whole-set statistics; S1's
positive-class headline; S5's clip length from the train split and waveform z-score."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from tympan.audio import decode, to_mono, zscore
from tympan.audio.augment import augmented_copy, copy_seed
from tympan.config import (
    ConfigError,
    CopiesConfig,
    CopyRecipe,
    CVConfig,
    ProtocolConfig,
    SplitConfig,
    load_params,
    params_from_dict,
)
from tympan.data.splits import (
    EXCLUDED,
    LeakageError,
    split_manifest,
    split_report,
    with_copies,
)
from tympan.evaluation.card import promotion, protocol_lines
from tympan.evaluation.metrics import classification_metrics
from tympan.evaluation.report import headline, summarise
from tympan.features import build_cache
from tympan.features.cache import clip_seconds
from tympan.features.logmel import waveform_batch, windows

from audio_helpers import tone, write
from conftest import REPO, TONE_FEATURES, run_to_evaluate

PIPELINES = REPO / "pipelines"
ORIGINALS = sorted(p.stem for p in PIPELINES.glob("*_original.yaml"))
S4 = [CopyRecipe(shift_s=0.1, noise_std=0.05)]


def _chunks(sources: int = 12, per_source: int = 4) -> pd.DataFrame:
    """S3's layout as a manifest: chunks of long recordings (the group), label per source."""
    rows = [
        {
            "path": f"{'Argentinian' if g % 2 else 'Other'}{g}_{c:02d}.wav",
            "label": "Argentinian" if g % 2 else "Other",
            "group": f"src{g}",
            "sha256": f"{g:032x}{c:032x}",
        }
        for g in range(sources)
        for c in range(per_source)
    ]
    return pd.DataFrame(rows)


def _split(manifest: pd.DataFrame, cfg: SplitConfig, cv: CVConfig | None = None) -> pd.DataFrame:
    return manifest.merge(split_manifest(manifest, cfg, cv), on="path")


# --- config: leaks only with an explicit, labelled opt-in -----------------------------------


def test_every_study_has_an_original_preset_that_extends_its_honest_one():
    studies = {name.split("_")[0] for name in ORIGINALS}
    assert studies == {"s1", "s2", "s3", "s4", "s5"}
    for name in ORIGINALS:
        raw = yaml.safe_load((PIPELINES / f"{name}.yaml").read_text())
        honest = name.removesuffix("_original")
        assert raw["extends"] == honest and raw["preset"] == name
        original, base = (
            load_params(PIPELINES / f"{name}.yaml"),
            load_params(PIPELINES / f"{honest}.yaml"),
        )
        assert original.protocol.kind == "original" and base.protocol.kind == "honest"
        assert not base.protocol.leaks
        # the same model and training: only the protocol (and what it needs) differs
        assert original.model == base.model
        assert original.register.name != base.register.name


def test_tympan_preset_writes_an_original_out_whole(tmp_path):
    """DVC reads params.yaml alone: the written file holds every key, its base's included."""
    import dataclasses

    from tympan.cli import main
    from tympan.config import Params

    target = tmp_path / "params.yaml"
    main(["--params", str(target), "preset", "s4_esc50_bigru_original", "--dir", str(PIPELINES)])
    written = yaml.safe_load(target.read_text())
    assert set(written) == {f.name for f in dataclasses.fields(Params)}
    assert load_params(target) == load_params(PIPELINES / "s4_esc50_bigru_original.yaml")
    assert target.read_text().startswith(
        "# preset s4_esc50_bigru_original: "
        + str(PIPELINES / "s4_esc50_bigru_original.yaml")
        + " over s4_esc50_bigru"
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"protocol": {"leaks": ["group_in_two_splits"]}}, "set protocol.kind: original"),
        ({"protocol": {"kind": "original", "leaks": ["peeking"]}}, "protocol.leaks[0] must be"),
        (
            {"protocol": {"kind": "original", "leaks": ["augmented_test_copies"]}},
            "there are no copies to leak",
        ),
        ({"features": {"duration_quantile": 0}}, "features.duration_quantile=0"),
        ({"copies": {"recipes": [{"pitch_semitones": 30}]}}, "copies.recipes[0].pitch_semitones"),
    ],
)
def test_leaks_need_the_original_protocol_and_new_numbers_their_ranges(raw, message):
    with pytest.raises(ConfigError) as error:
        params_from_dict(raw)
    assert message in str(error.value)


def test_extends_merges_over_its_base_and_refuses_circles_and_unnamed_files(tmp_path):
    (tmp_path / "base.yaml").write_text("preset: base\ntrain: {epochs: 3, lr: 0.01}\n")
    (tmp_path / "child.yaml").write_text("extends: base\npreset: child\ntrain: {epochs: 5}\n")
    child = load_params(tmp_path / "child.yaml")
    assert (child.preset, child.train.epochs, child.train.lr) == ("child", 5, 0.01)
    (tmp_path / "nameless.yaml").write_text("extends: base\ntrain: {epochs: 5}\n")
    with pytest.raises(ConfigError, match="must name itself"):
        load_params(tmp_path / "nameless.yaml")
    (tmp_path / "a.yaml").write_text("extends: b\npreset: a\n")
    (tmp_path / "b.yaml").write_text("extends: a\npreset: b\n")
    with pytest.raises(ConfigError, match="circle"):
        load_params(tmp_path / "a.yaml")


# --- split: honest fails on leaks; original records them -------------------------------------


def test_an_honest_random_split_over_chunks_still_fails_on_the_leak():
    table = _split(_chunks(), SplitConfig(strategy="stratified", val=0.15, test=0.25))
    with pytest.raises(LeakageError, match="group value"):
        split_report(table, SplitConfig(strategy="stratified"))
    undeclared = ProtocolConfig(kind="original", leaks=("whole_set_statistics",))
    with pytest.raises(LeakageError):  # an original run may leak only what it declares
        split_report(table, SplitConfig(strategy="stratified"), protocol=undeclared)


def test_an_original_split_records_which_groups_leaked():
    cfg = SplitConfig(strategy="stratified", val=0.15, test=0.25)
    table = _split(_chunks(), cfg)
    protocol = ProtocolConfig(kind="original", leaks=("group_in_two_splits",))
    report = split_report(table, cfg, protocol=protocol)
    (leak,) = report["protocol"]["leaks"]
    assert leak["leak"] == "group_in_two_splits"
    assert leak["groups_in_two_splits"] == report["checks"]["groups_in_two_splits"] > 0
    test_groups = set(table.loc[table["split"] == "test", "group"])
    train_groups = set(table.loc[table["split"] == "train", "group"])
    shared = table[(table["split"] == "test") & table["group"].isin(train_groups)]
    assert leak["test_recordings_with_group_in_train"] == len(shared) > 0
    assert set(leak["examples"]) <= test_groups | set(table["group"])
    lines = protocol_lines(report["protocol"])
    assert lines[0].startswith("PROTOCOL ORIGINAL") and "LEAK group_in_two_splits" in lines[1]
    honest = split_report(_split(_chunks(), SplitConfig(strategy="group")), SplitConfig())
    assert honest["protocol"] == {"kind": "honest", "leaks": []}
    assert protocol_lines(honest["protocol"]) == []


# --- fixed copies: an honest run never trains on a copy of a val or test clip ----------------


@pytest.mark.parametrize("cv", [None, CVConfig(folds=3)])
def test_honest_copies_are_of_training_clips_only(cv):
    table = _split(_chunks(), SplitConfig(strategy="group", val=0.2, test=0.2), cv)
    out = with_copies(
        table, CopiesConfig(recipes=(*S4, CopyRecipe(pitch_semitones=4))), ProtocolConfig()
    )
    copies, clips = out[out["copy"] > 0], out[out["copy"] == 0]
    assert len(clips) == len(table) and set(copies["copy"]) == {1, 2}
    columns = ["split"] + [f"split_{k}" for k in range(cv.folds if cv else 0)]
    for column in columns:
        source = dict(zip(clips["path"], clips[column], strict=True))
        for path, where in zip(copies["path"], copies[column], strict=True):
            assert where == ("train" if source[path] == "train" else EXCLUDED)
    if cv is None:  # nothing is made that no split would use
        assert (copies["split"] == "train").all()
        assert len(copies) == 2 * (table["split"] == "train").sum()


def test_only_a_declared_original_puts_copies_of_test_clips_in_training():
    table = _split(_chunks(), SplitConfig(strategy="group", val=0.2, test=0.2))
    protocol = ProtocolConfig(kind="original", leaks=("augmented_test_copies",))
    out = with_copies(table, CopiesConfig(recipes=tuple(S4)), protocol)
    copies = out[out["copy"] > 0]
    assert len(copies) == len(table) and (copies["split"] == "train").all()
    assert set(copies["copy_of_split"]) == {"train", "val", "test"}
    report = split_report(table, SplitConfig(), None, protocol, CopiesConfig(recipes=tuple(S4)))
    (leak,) = report["protocol"]["leaks"]
    assert leak["copies_of_val_and_test"] == int(table["split"].isin(["val", "test"]).sum())


def test_a_pitch_copy_is_librosas_pitch_shift():
    """S3's augmentation: noise 0.005 and +4 semitones with librosa's `pitch_shift`, the
    function its notebook called."""
    import librosa

    t = np.arange(8000) / 8000
    wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
    copy = augmented_copy(torch.from_numpy(wave), CopyRecipe(pitch_semitones=4), 8000, 1)
    expected = librosa.effects.pitch_shift(wave[0], sr=8000, n_steps=4)
    np.testing.assert_allclose(copy[0].numpy(), expected, atol=1e-6)
    spectrum = np.abs(np.fft.rfft(copy[0].numpy()))
    assert abs(spectrum.argmax() - 440 * 2 ** (4 / 12)) < 3  # 1 Hz bins: 554 Hz


def test_a_copy_is_fixed_by_its_audio_and_recipe():
    wave = torch.from_numpy(np.stack([tone(440, 0.5, 8000), tone(880, 0.5, 8000)]))
    recipe = CopyRecipe(shift_s=0.05, noise_std=0.01)
    seed = copy_seed(0, "ab" * 32, 1)
    one, again = augmented_copy(wave, recipe, 8000, seed), augmented_copy(wave, recipe, 8000, seed)
    assert torch.equal(one, again) and not torch.equal(one, wave)
    assert not torch.equal(one, augmented_copy(wave, recipe, 8000, copy_seed(0, "ab" * 32, 2)))
    loud = augmented_copy(wave * 4, CopyRecipe(noise_std=0.5), 8000, seed)
    assert loud.abs().max() <= 1.0  # clipped to [-1, 1], as S4
    shifted = augmented_copy(wave, CopyRecipe(shift_s=0.05, clip=False), 8000, seed)
    moved = [int(torch.nonzero(row).min()) for row in shifted] + [
        len(row) - 1 - int(torch.nonzero(row).max()) for row in shifted
    ]
    assert max(moved) > 0 and max(moved) <= 400  # zero-filled, at most 0.05 s at 8 kHz


def _tone_table(tmp_path: Path) -> pd.DataFrame:
    rows = []
    for i in range(12):
        label = "low" if i % 2 else "high"
        freq = 300 if label == "low" else 3000
        path = write(tmp_path / f"{i}.wav", tone(freq, 0.5, 8000, amp=0.2 + 0.05 * i), 8000)
        split = ["train", "train", "train", "train", "val", "test"][i % 6]
        rows.append(
            {
                "path": str(path),
                "label": label,
                "group": str(i),
                "split": split,
                "sha256": f"{i:064x}",
                "duration_s": 0.5,
            }
        )
    return pd.DataFrame(rows)


def test_featurize_computes_copies_and_takes_statistics_where_it_is_told(tmp_path):
    table = _tone_table(tmp_path)
    copies = CopiesConfig(recipes=(CopyRecipe(noise_std=0.05),))
    with_them = with_copies(table, copies, ProtocolConfig())
    cache = build_cache(with_them, TONE_FEATURES, tmp_path / "copies", copies=copies)
    index = cache.index
    made = index[index["copy"] == "1"]
    assert len(made) == 8 and set(made["split"]) == {"train"}
    for _, row in made.iterrows():
        source = index[(index["path"] == row["path"]) & (index["copy"] == "0")]["row"].item()
        assert not np.allclose(cache.features[int(row["row"])], cache.features[int(source)])
    plain = build_cache(table, TONE_FEATURES, tmp_path / "plain")
    whole = build_cache(table, TONE_FEATURES, tmp_path / "whole", whole_set_statistics=True)
    assert plain.meta["key"] != whole.meta["key"] != cache.meta["key"]
    x = np.asarray(plain.features[np.arange(len(table))], dtype=np.float64)
    train = x[plain.rows("train")]
    assert np.allclose(plain.mean, train.mean(axis=(0, 1, 3)), atol=1e-3)
    assert np.allclose(whole.mean, x.mean(axis=(0, 1, 3)), atol=1e-3)
    assert not np.allclose(plain.mean, whole.mean, atol=1e-3)
    stats = json.loads((tmp_path / "whole" / "stats.json").read_text())
    assert stats["source"].startswith("whole set") and stats["rows"] == len(table)


# --- S5: clip length from the train split, waveform z-score ------------------------------------


def test_clip_length_is_a_quantile_of_the_train_durations_only():
    table = pd.DataFrame(
        {"split": ["train"] * 4 + ["test"] * 2, "duration_s": [1.0, 2.0, 3.0, 4.0, 60.0, 90.0]}
    )
    cfg = replace(TONE_FEATURES, duration_quantile=0.75)
    assert clip_seconds(cfg, table).seconds == 3.25  # numpy's linear quantile of 1, 2, 3, 4
    assert clip_seconds(TONE_FEATURES, table) is TONE_FEATURES


def test_waveform_zscore_is_applied_before_padding_in_featurize_and_serving(tmp_path):
    quiet = write(tmp_path / "q.wav", tone(440, 0.25, 8000, amp=0.05) + 0.01, 8000)
    cfg = replace(TONE_FEATURES, wave_norm="zscore")  # 0.5 s clips: the tone is padded
    (clip,) = waveform_batch([quiet], cfg)
    audio = clip[:2000].double()
    assert abs(audio.mean()) < 1e-4 and abs(audio.std(correction=0) - 1) < 1e-3
    assert torch.all(clip[2000:] == 0)
    data, _ = decode(quiet)  # serving's path: the recording, then its windows
    (window,) = windows(to_mono(torch.from_numpy(data)), cfg, 0.5, 0.5)
    assert torch.allclose(window, clip, atol=1e-4)
    silent = zscore(torch.zeros(100))
    assert torch.equal(silent, torch.zeros(100))


# --- S1: the positive class's metrics head the report -----------------------------------------


def test_positive_class_metrics_and_headline():
    from sklearn.metrics import f1_score, precision_score, recall_score

    targets = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    probs = np.eye(2)[[0, 1, 0, 1, 1, 0, 1, 1]].astype(float)
    predicted = probs.argmax(axis=1)
    out = classification_metrics(targets, probs, positive=0)
    assert out["positive_f1"] == pytest.approx(f1_score(targets, predicted, pos_label=0))
    assert out["positive_precision"] == pytest.approx(
        precision_score(targets, predicted, pos_label=0)
    )
    assert out["positive_recall"] == pytest.approx(recall_score(targets, predicted, pos_label=0))
    assert "positive_f1" not in classification_metrics(targets, probs)
    results = summarise({"0": out, "1": out}, out, len(targets))
    shown = headline(results, "positive_f1")
    assert list(shown) == [
        "test_positive_f1",
        "seed_mean",
        "seed_std",
        "test_positive_precision",
        "test_positive_recall",
        "test_f1_macro",
        "test_precision",
        "test_recall",
        "n_test",
    ]
    assert shown["seed_std"] == 0.0 and shown["test_positive_f1"] == out["positive_f1"]


def test_an_original_protocol_model_is_never_champion():
    alias, reason = promotion("accuracy", 0.99, "h", None, 0.0, ("augmented_test_copies",))
    assert alias == "challenger" and "augmented_test_copies" in reason
    assert promotion("accuracy", 0.99, "h", None, 0.0)[0] == "champion"


# --- both protocols end to end ---------------------------------------------------------------


@pytest.mark.integration
def test_an_original_preset_end_to_end_records_its_leaks(tmp_path, mlflow_store):
    """S4's final model's protocol on an ESC-50 layout fixture: copies of every clip, test
    included, in training; the split report, the featurize log, MLflow and the card say so."""
    from mlflow.tracking import MlflowClient
    from test_presets import _esc50, _shrunk

    from tympan.evaluation.card import CardInputs, model_card

    _esc50(tmp_path / "esc", np.random.default_rng(0))
    params = load_params(PIPELINES / "s4_esc50_bigru_original.yaml")
    params = _shrunk(params, tmp_path / "esc", tmp_path)
    params = replace(params, features=replace(params.features, seconds=1.0))
    run_to_evaluate(params, tmp_path)
    split = json.loads((tmp_path / "split.json").read_text())
    assert [x["leak"] for x in split["protocol"]["leaks"]] == [
        "group_in_two_splits",
        "augmented_test_copies",
    ]
    index = pd.read_csv(tmp_path / "features" / "index.csv", dtype=str)
    leaked = index[(index["copy"] == "1") & (index["copy_of_split"] == "test")]
    assert len(leaked) == split["recordings"]["test"] and set(leaked["split"]) == {"train"}
    record = json.loads((tmp_path / "models" / "train.json").read_text())
    tags = MlflowClient().get_run(record["parent_run_id"]).data.tags
    assert tags["tympan.protocol"] == "original"
    assert tags["tympan.leaks"] == "group_in_two_splits,augmented_test_copies"
    results = json.loads((tmp_path / "metrics" / "test.json").read_text())
    card = model_card(
        CardInputs(
            name="x",
            version="1",
            alias="challenger",
            reason="r",
            preset=params.preset,
            metric="accuracy",
            tags={},
            split=split,
            test_set={"hash": "h", "clips": results["n_test"], "groups": 1},
            results=results,
        )
    )
    assert "**PROTOCOL ORIGINAL" in card and "augmented copies of test clips" in card


@pytest.mark.integration
def test_compare_protocols_runs_both_presets_and_tables_the_leak(tmp_path, mlflow_store, capsys):
    from mlflow.tracking import MlflowClient
    from test_presets import _accent

    from tympan.cli import main

    _accent(tmp_path / "accent", np.random.default_rng(0))
    sets = [f"data.root={tmp_path / 'accent'}", "train.seeds=[0, 1]", "train.epochs=1"]
    sets.append("features.workers=1")
    main(
        ["compare-protocols", "s3_accent_cnn", "--work", str(tmp_path / "work")]
        + ["--dir", str(PIPELINES)]
        + [arg for text in sets for arg in ("--set", text)]
    )
    rows = json.loads((tmp_path / "work" / "s3_accent_cnn" / "protocols.json").read_text())
    honest, original = rows
    assert (honest["protocol"], original["protocol"]) == ("honest", "original")
    assert honest["leaks"] == [] and original["leaks"][0]["leak"] == "group_in_two_splits"
    assert original["seeds"] == 2 and original["seed_std"] >= 0
    printed = capsys.readouterr().out
    assert "same recording (group) in train and test" in printed
    assert "none (split checked)" in printed and "accuracy 0.95" in printed
    client = MlflowClient()
    for r in rows:  # each run tracked as any run is, with its protocol
        assert client.get_run(r["mlflow_run"]).data.tags["tympan.protocol"] == r["protocol"]
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        main(["compare-protocols", "s3_accent_cnn", "--set", "train.epochs"])
