"""The split's content check (tympan.data.similar): one sound under two names, found from the
audio, reported, merged or failed on; and no false matches between real takes (FSDD)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from tympan import stages
from tympan.audio import decode, resample, to_mono
from tympan.config import ConfigError, CVConfig, DataConfig, Params, SplitConfig, params_from_dict
from tympan.data import similar as similar_module
from tympan.data.ingest import ingest
from tympan.data.similar import (
    MIN_MATCHES,
    _resampler,
    find_similar,
    fingerprint_file,
    fingerprint_wave,
    match,
    merged_groups,
    read_mono,
)
from tympan.data.splits import LeakageError, content_check, split_manifest, split_report
from tympan.evaluation.card import split_line

RATE = 44100
STARTS = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)  # 1 s chunks of a 4 s source, half overlapping
SOURCES = 4


def _source(seed: int, seconds: float = 4.0) -> np.ndarray:
    """`(samples,)` at RATE: quiet noise and short tones, glides and bursts at random times."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    wave = rng.normal(0.0, 0.02, t.size)
    for _ in range(int(6 * seconds)):
        freq = np.exp(rng.uniform(np.log(150), np.log(3500)))
        onset, length = rng.uniform(0, seconds - 0.1), rng.uniform(0.05, 0.4)
        on = (t >= onset) & (t < onset + length)
        local = t[on] - onset
        glide = rng.uniform(-0.5, 0.5) * freq * local / length
        wave[on] += rng.uniform(0.2, 1.0) * np.sin(2 * np.pi * (freq + 0.5 * glide) * local)
    return (0.5 * wave / np.abs(wave).max()).astype(np.float32)


def _name(*key: object) -> str:
    """An unrelated-looking file name: nothing in it tells two chunks of one source apart."""
    return hashlib.sha1(repr(key).encode()).hexdigest()[:10] + ".wav"


@pytest.fixture(scope="module")
def chunks(tmp_path_factory) -> tuple[Path, pd.DataFrame, dict[str, tuple[str, float, str]]]:
    """A csv-adapter dataset of 1 s chunks under unrelated names, each its own group: SOURCES
    sources cut every 0.5 s (each chunk plain, 6 dB quieter or resampled to 16 kHz, and in a
    different `fold` from its neighbours), one source cut into adjacent chunks that share no
    audio, and six unrelated clips -> (folder, manifest, {path: (source, start, variant)})."""
    root = tmp_path_factory.mktemp("chunks")
    rows, truth = [], {}

    def add(wave: np.ndarray, rate: int, source: str, start: float, variant: str, fold: int):
        name = _name(source, start, variant)
        sf.write(root / name, wave, rate, subtype="PCM_16")
        rows.append({"file": name, "label": f"class{len(rows) % 2}", "fold": str(fold)})
        truth[(root / name).as_posix()] = (source, start, variant)

    for s in range(SOURCES):
        wave = _source(s)
        for c, start in enumerate(STARTS):
            chunk = wave[int(start * RATE) : int(start * RATE) + RATE]
            variant = ("plain", "-6 dB", "16 kHz")[c % 3]
            if variant == "-6 dB":
                add(chunk * 10 ** (-6 / 20), RATE, f"s{s}", start, variant, c % 3 + 1)
            elif variant == "16 kHz":
                down = resample(torch.from_numpy(chunk.copy()), RATE, 16000).numpy()
                add(down, 16000, f"s{s}", start, variant, c % 3 + 1)
            else:
                add(chunk, RATE, f"s{s}", start, variant, c % 3 + 1)
    adjacent = _source(100)
    for c in range(4):
        add(adjacent[c * RATE : (c + 1) * RATE], RATE, "adjacent", float(c), "plain", c % 3 + 1)
    for i in range(6):
        add(_source(200 + i, 1.0), RATE, f"other{i}", 0.0, "plain", i % 3 + 1)
    pd.DataFrame(rows).to_csv(root / "meta.csv", index=False)
    cfg = DataConfig(
        adapter="csv",
        root=str(root),
        metadata="meta.csv",
        path_column="file",
        side_columns=("fold",),
        max_reject_fraction=0.0,
    )
    work = tmp_path_factory.mktemp("work")
    manifest, _ = ingest(cfg, work / "m.csv", work / "r.csv", work / "s.json")
    return root, manifest, truth


def test_chunks_of_one_source_are_found_under_any_name_gain_or_rate(chunks):
    _, manifest, truth = chunks
    assert manifest["group"].nunique() == len(manifest)  # every file its own group
    similar = find_similar(manifest, 0.5, None)
    found = similar.pairs
    expected = {
        tuple(sorted((a, b)))
        for a, (sa, ta, _) in truth.items()
        for b, (sb, tb, _) in truth.items()
        if a != b and sa == sb and sa.startswith("s") and abs(ta - tb) == 0.5
    }
    pairs = {tuple(sorted(p)) for p in zip(found["path_a"], found["path_b"], strict=True)}
    # every half-overlapping pair, and nothing else: not the adjacent chunks that share no
    # audio, not chunks of different sources, not the unrelated clips
    assert pairs == expected and len(expected) == SOURCES * (len(STARTS) - 1)
    variants = {frozenset((truth[a][2], truth[b][2])) for a, b in pairs}
    assert {"-6 dB", "16 kHz"} in variants and {"plain", "16 kHz"} in variants
    assert (found["similarity"] >= 0.5).all() and (found["similarity"] <= 1).all()
    assert np.allclose(found["offset_s"].abs(), 0.5, atol=0.02)
    assert np.allclose(found["overlap_s"], 0.5, atol=0.05)
    assert similar.recordings == len(manifest) and similar.too_few_landmarks == 0
    groups, merged = merged_groups(manifest["group"].to_numpy(), found)
    sources = manifest["path"].map(lambda p: truth[p][0])
    assert len(merged) == SOURCES and all(len(m) == len(STARTS) for m in merged)
    for source, members in pd.Series(groups).groupby(sources.to_numpy()):
        assert members.nunique() == 1 or source in ("adjacent",) or source.startswith("other")


def _params(mode: str, **split) -> Params:
    return replace(
        Params(),
        split=SplitConfig(strategy="group", val=0.2, test=0.2, similar=mode, **split),
    )


def test_pairs_counted_in_one_array_or_by_sorting_match_alike(chunks, monkeypatch):
    """Matching counts each pair's candidates in an n x n array for a few thousand
    recordings, by sorting beyond: both find the same pairs."""
    _, manifest, _ = chunks
    prints = [fingerprint_file(p) for p in manifest["path"]]
    groups = manifest["group"].to_numpy()
    dense = match(prints, groups, 0.1)
    monkeypatch.setattr(similar_module, "DENSE_PAIRS", 0)
    assert len(dense) >= SOURCES * (len(STARTS) - 1)
    pd.testing.assert_frame_equal(match(prints, groups, 0.1), dense)


def test_the_split_reports_merges_or_fails_on_pairs_in_two_splits(chunks, tmp_path):
    _, manifest, truth = chunks
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    cache = tmp_path / "fingerprints"

    def run(params: Params, name: str) -> dict:
        out, report = tmp_path / f"{name}.csv", tmp_path / f"{name}.json"
        stages.run_split(params, tmp_path / "manifest.csv", out, report, cache)
        return json.loads(report.read_text())

    reported = run(_params("report"), "report")
    report = reported["similar"]
    assert report["mode"] == "report" and report["pairs_in_different_groups"] == 24
    assert report["pairs_in_two_splits"] == len(report["in_two_splits"]) > 0
    first = report["in_two_splits"][0]
    assert (
        first["split_a"] != first["split_b"]
        and truth[first["path_a"]][0] == truth[first["path_b"]][0]
    )
    assert {"similarity", "offset_s", "overlap_s", "matches", "group_a", "group_b"} <= set(first)
    assert not set(report) & {"seconds", "fingerprints_reused"}  # the same on every run

    cached = sorted(cache.iterdir())
    merged = run(_params("merge"), "merge")
    assert sorted(cache.iterdir()) == cached and len(cached) == 1  # one file, reused
    assert merged["similar"]["merged_group_count"] == SOURCES
    assert merged["similar"]["pairs_in_two_splits"] == 0
    assert merged["checks"]["similar_in_two_splits"] == 0
    assert "sound the same; their groups were merged (4) before splitting." in split_line(merged)
    assert f"; {report['pairs_in_two_splits']} of them sit in two splits" in split_line(reported)
    splits = pd.read_csv(tmp_path / "merge.csv").merge(manifest, on="path")
    per_source = splits.groupby(splits["path"].map(lambda p: truth[p][0]))["split"].nunique()
    assert (per_source[[f"s{s}" for s in range(SOURCES)]] == 1).all()

    with pytest.raises(LeakageError, match=r"pair\(s\) of recordings in different groups sound"):
        run(_params("fail"), "fail")
    assert not (tmp_path / "fail.json").exists()  # nothing written
    assert "similar" not in run(_params("none"), "none")


def test_merge_under_cross_validation_and_official_folds(chunks):
    _, manifest, truth = chunks
    sources = manifest["path"].map(lambda p: truth[p][0])
    cfg = SplitConfig(strategy="group", val=0.2, similar="merge")
    table, similar = content_check(manifest, cfg)
    assert table["group"].nunique() == len(manifest) - SOURCES * (len(STARTS) - 1)
    cv = CVConfig(folds=3)
    splits = split_manifest(table, cfg, cv)
    report = split_report(table.merge(splits, on="path"), cfg, cv, similar=similar)
    assert [f["checks"]["similar_in_two_splits"] for f in report["folds"]] == [0, 0, 0]
    fold_of = splits.set_index("path")["cv_fold"]
    for s in range(SOURCES):
        assert fold_of[manifest["path"][sources == f"s{s}"]].nunique() == 1
    # official folds: the fold column put each source's chunks in every fold; a merged group
    # moves wholly to its most held-out split (as any group the folds split), or, when
    # move_straddling is false, the split fails: folds it may not change cannot be regrouped
    official = replace(cfg, strategy="predefined", column="fold", test_values=("3",))
    official = replace(official, val_values=("2",))
    table, similar = content_check(manifest, official)
    moved = split_report(
        table.merge(split_manifest(table, official), on="path"), official, similar=similar
    )
    assert len(moved["moved_straddling_groups"]) == SOURCES
    assert moved["similar"]["pairs_in_two_splits"] == 0
    strict = replace(official, move_straddling=False)
    with pytest.raises(LeakageError, match="group value"):
        split_report(table.merge(split_manifest(table, strict), on="path"), strict)


def test_what_cannot_be_matched_is_counted_and_the_params_are_checked():
    silence = fingerprint_wave(np.zeros(8000, dtype=np.float32))
    assert silence.hashes.size == 0 and silence.distinct < MIN_MATCHES
    # unrelated sounds: a few chance collisions at most, never enough for a pair
    clips = [
        fingerprint_wave(resample(torch.from_numpy(_source(i, 1.0)), RATE, 8000)) for i in range(3)
    ]
    found = match([silence, *clips], np.array(["a", "b", "c", "d"]), 0.01)
    assert found.empty and list(found.columns) == [
        "a",
        "b",
        "matches",
        "similarity",
        "offset_s",
        "overlap_s",
    ]
    groups, merged = merged_groups(
        np.array(["c", "b", "a", "d"]),
        pd.DataFrame({"group_a": ["c", "b"], "group_b": ["b", "a"]}),
    )
    assert groups.tolist() == ["a", "a", "a", "d"] and merged == [["a", "b", "c"]]
    with pytest.raises(ConfigError, match="strategy: stratified deals recordings one by one"):
        params_from_dict({"split": {"strategy": "stratified", "similar": "merge"}})
    with pytest.raises(ConfigError, match=r"split\.similar_threshold=0 is out of range"):
        params_from_dict({"split": {"similar_threshold": 0}})
    with pytest.raises(ConfigError, match=r"split\.similar must be one of none, report, merge"):
        params_from_dict({"split": {"similar": "off"}})


@pytest.mark.parametrize("rate", [44100, 48000, 22050, 16000, 11025])
def test_the_fingerprints_resample_as_tympan_audio_does(rate):
    """The fingerprint keeps one polyphase resampler per rate (its kernel built once, only the
    taps inside the filter's support applied); it must be tympan.audio.resample's filter."""
    wave = np.random.default_rng(rate).normal(0, 0.1, rate + 37).astype(np.float32)
    ours = torch.from_numpy(_resampler(rate)(wave))
    assert torch.allclose(ours, resample(torch.from_numpy(wave), rate, 8000), atol=1e-5)


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "FLOAT"])
@pytest.mark.parametrize("channels", [1, 2])
def test_the_fingerprints_decode_as_tympan_audio_does(tmp_path, subtype, channels):
    """16-bit PCM is read as integers and scaled by the check itself: sample for sample what
    tympan.audio's decode and to_mono give, as every other format is."""
    wave = np.random.default_rng(channels).uniform(-0.9, 0.9, (4000, channels))
    path = tmp_path / f"{subtype}_{channels}.wav"
    sf.write(path, wave.astype(np.float32), 22050, subtype=subtype)
    data, rate = decode(path)
    ours, our_rate = read_mono(path)
    assert our_rate == rate and ours.dtype == np.float32
    assert np.array_equal(ours, to_mono(torch.from_numpy(data)).numpy())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fsdd_takes_never_match_and_copies_of_them_always_do(fsdd_root, tmp_path):
    """300 real recordings: three speakers saying every digit ten times. Takes of one digit by
    one speaker are alike, but none is the same sound; a copy 6 dB quieter or resampled to
    16 kHz, under another name, is."""
    meta = pd.read_csv(fsdd_root / "metadata.csv", dtype=str)
    meta = meta[
        meta["speaker"].isin(["jackson", "theo", "george"]) & (meta["take"].astype(int) < 10)
    ]
    assert len(meta) == 300
    paths = [fsdd_root / f for f in meta["filename"]]
    copies = []
    for i, path in enumerate(paths[::50]):
        wave, rate = sf.read(path, dtype="float32")
        quiet = tmp_path / f"copy{i}a.wav"
        sf.write(quiet, wave * 0.5, rate, subtype="PCM_16")
        up = tmp_path / f"copy{i}b.wav"
        sf.write(up, resample(torch.from_numpy(wave), rate, 16000).numpy(), 16000)
        copies.append((path, quiet, up))
    every = paths + [c for _, *made in copies for c in made]
    manifest = pd.DataFrame(
        {
            "path": [p.as_posix() for p in every],
            "group": [p.stem for p in every],
            "sha256": [_sha(p) for p in every],
        }
    )
    similar = find_similar(manifest, 0.5, None)
    found = {
        frozenset(p) for p in zip(similar.pairs["path_a"], similar.pairs["path_b"], strict=True)
    }
    made = {frozenset((o.as_posix(), c.as_posix())) for o, *cs in copies for c in cs}
    made |= {frozenset((a.as_posix(), b.as_posix())) for _, a, b in copies}
    # every copy with its original and with the other copy, and no two takes, whoever says
    # whichever digit
    assert found == made
    assert (similar.pairs["similarity"] >= 0.6).all()  # well above split.similar_threshold
