"""Adapters on each study's exact layout: real metadata files, generated audio under their names."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tympan.config import ConfigError, DataConfig, GroupByConfig, SplitConfig, params_from_dict
from tympan.data.adapters import AdapterError, list_recordings
from tympan.data.ingest import ingest
from tympan.data.manifest import ManifestError
from tympan.data.splits import LeakageError, split_manifest, split_report

from audio_helpers import tone, write
from conftest import REPO

LAYOUTS = Path(os.environ.get("TYMPAN_LAYOUTS", REPO.parent / "shared" / "datasets" / "layouts"))


@pytest.fixture
def layouts() -> Path:
    if not (LAYOUTS / "esc50" / "meta" / "esc50.csv").exists():
        pytest.skip(f"dataset layouts not found at {LAYOUTS} (set TYMPAN_LAYOUTS)")
    return LAYOUTS


def _clip(path: Path, seed: int, rate: int, seconds: float = 0.3) -> None:
    rng = np.random.default_rng(seed)
    write(path, tone(rng.uniform(200, 3000), seconds, rate, amp=rng.uniform(0.2, 0.8)), rate)


def test_esc50_real_metadata_folds_groups_and_esc10(layouts, tmp_path):
    root = tmp_path / "ESC-50"
    shutil.copytree(layouts / "esc50" / "meta", root / "meta")
    table, rejects = list_recordings("esc50", root, None, DataConfig(adapter="esc50"))
    assert len(table) == 2000 and not rejects
    assert table["label"].nunique() == 50
    assert sorted(table["fold"].unique()) == ["1", "2", "3", "4", "5"]
    assert table["path"].iloc[0] == (root / "audio" / "1-100032-A-0.wav").as_posix()
    assert table.loc[0, "group"] == "100032" and table.loc[0, "label"] == "dog"
    # excerpts of one Freesound source share a group. The official folds keep them together
    # except for four sources filed under two related classes (clock tick/alarm, hen/rooster)
    # in two folds: a fold-based split must expect these, a group split never separates them.
    assert table["group"].nunique() < len(table)
    folds_per_source = table.groupby("group")["fold"].nunique()
    assert set(folds_per_source[folds_per_source > 1].index) == {
        "131943",
        "134049",
        "209698",
        "234879",
    }
    esc10, _ = list_recordings("esc50", root, None, DataConfig(adapter="esc50", esc10=True))
    assert len(esc10) == 400 and esc10["label"].nunique() == 10


def test_esc50_ingest_and_group_split_on_generated_audio(layouts, tmp_path):
    root = tmp_path / "ESC-50"
    meta = pd.read_csv(layouts / "esc50" / "meta" / "esc50.csv", dtype=str)
    subset = meta[meta["category"].isin(["dog", "rain", "crow"])]  # 120 rows, exact names
    (root / "meta").mkdir(parents=True)
    subset.to_csv(root / "meta" / "esc50.csv", index=False)
    for i, name in enumerate(subset["filename"]):
        _clip(root / "audio" / name, i, 44100)
    cfg = DataConfig(adapter="esc50", root=str(root), max_reject_fraction=0.0)
    manifest, rejects = ingest(cfg, tmp_path / "m.csv", tmp_path / "r.csv", tmp_path / "s.json")
    assert len(manifest) == 120 and rejects.empty
    assert {"fold", "take"} <= set(manifest.columns)
    splits = split_manifest(manifest, SplitConfig(strategy="group", val=0.2, test=0.2))
    report = split_report(manifest.merge(splits, on="path"), SplitConfig(strategy="group"))
    assert report["checks"]["groups_in_two_splits"] == 0


def test_mlend_deception_labels_any_case_and_keeps_language(layouts, tmp_path):
    root = tmp_path / "MLEnd"
    meta = pd.read_csv(layouts / "mlend_deception" / "CBU0521DD_stories_attributes.csv", dtype=str)
    assert len(meta) == 100
    subset = meta.head(12).copy()
    subset.loc[subset.index[0], "Story_type"] = "  deceptive   STORY "
    subset.loc[subset.index[1], "Story_type"] = "maybe"
    root.mkdir(parents=True)
    subset.to_csv(root / "CBU0521DD_stories_attributes.csv", index=False)
    for i, name in enumerate(subset["filename"]):
        _clip(root / "CBU0521DD_stories" / name, i, 44100, seconds=1.0)
    table, rejects = list_recordings("mlend_deception", root, None)
    assert len(table) == 11 and set(table["label"]) <= {"true", "deceptive"}
    assert table.loc[0, "label"] == "deceptive"
    assert rejects == [
        {
            "path": (root / "CBU0521DD_stories" / subset["filename"].iloc[1]).as_posix(),
            "reason": "unknown label 'maybe': expected 'True Story' or 'Deceptive Story'",
        }
    ]
    assert set(table["language"]) <= set(meta["Language"])
    assert table["group"].tolist() == [
        Path(f).stem for f in subset["filename"].drop(subset.index[1])
    ]
    real, real_rejects = list_recordings(
        "mlend_deception", layouts / "mlend_deception", None
    )  # the real file: 50 true, 50 deceptive
    assert not real_rejects and real["label"].value_counts().to_dict() == {
        "true": 50,
        "deceptive": 50,
    }


S3_PATTERN = r"(?P<group>(?P<label>Argentinian|Other)\d+)(_(?P<chunk>\d+))?\.wav"


def test_filename_pattern_reads_s3_recordings_and_chunks(tmp_path):
    for i, name in enumerate(
        ["Argentinian1.wav", "Argentinian2_01.wav", "Argentinian2_02.wav", "Other5_01.wav"]
    ):
        _clip(tmp_path / name, i, 16000)
    _clip(tmp_path / "notes.wav", 9, 16000)
    cfg = DataConfig(adapter="filename_pattern", pattern=S3_PATTERN)
    table, rejects = list_recordings("filename_pattern", tmp_path, None, cfg)
    assert table["label"].tolist() == ["Argentinian", "Argentinian", "Argentinian", "Other"]
    assert table["group"].tolist() == ["Argentinian1", "Argentinian2", "Argentinian2", "Other5"]
    assert table["chunk"].fillna("").tolist() == ["", "01", "02", "01"]
    assert rejects == [
        {
            "path": (tmp_path / "notes.wav").as_posix(),
            "reason": f"file name does not match {S3_PATTERN}",
        }
    ]
    with pytest.raises(AdapterError, match=r"no named group \(\?P<label>"):
        list_recordings("filename_pattern", tmp_path, None, replace(cfg, pattern=r"\w+\.wav"))
    with pytest.raises(AdapterError, match="not a valid regex"):
        list_recordings("filename_pattern", tmp_path, None, replace(cfg, pattern="(?P<label>"))
    with pytest.raises(AdapterError, match=r"needs data\.pattern"):
        list_recordings("filename_pattern", tmp_path, None, DataConfig())


def test_folder_per_class(tmp_path):
    _clip(tmp_path / "dog" / "a.wav", 0, 16000)
    _clip(tmp_path / "cat" / "indoor" / "b.wav", 1, 16000)
    write(tmp_path / "cat" / "c.flac", tone(500, 0.3, 16000), 16000, fmt="FLAC")
    _clip(tmp_path / "stray.wav", 2, 16000)
    table, rejects = list_recordings("folder_per_class", tmp_path, None)
    assert sorted(zip(table["label"], table["group"], strict=True)) == [
        ("cat", "b"),
        ("cat", "c"),
        ("dog", "a"),
    ]
    assert rejects == [
        {"path": (tmp_path / "stray.wav").as_posix(), "reason": "audio file outside a class folder"}
    ]


def test_group_by_takes_a_regex_over_the_file_name_or_any_column(layouts, tmp_path):
    root = tmp_path / "ESC-50"
    shutil.copytree(layouts / "esc50" / "meta", root / "meta")
    cfg = DataConfig(adapter="esc50")
    # the file name: `1-100032-A-0.wav` -> fold and Freesound id, no hand-written CSV
    by_name = GroupByConfig(pattern=r"^(?P<group>\d-\d+)-")
    table, rejects = list_recordings("esc50", root, by_name, cfg)
    assert not rejects and table.loc[0, "group"] == "1-100032"
    meta = pd.read_csv(root / "meta" / "esc50.csv", dtype=str)
    assert table["group"].tolist() == (meta["fold"] + "-" + meta["src_file"]).tolist()
    # any column, with a pattern (the first group when there is no named one) or without one
    by_take, _ = list_recordings("esc50", root, GroupByConfig(column="take", pattern="([AB])"), cfg)
    assert set(by_take["group"]) == {"A", "B"} and len(by_take) < len(table)
    assert list_recordings("esc50", root, "fold", cfg)[0]["group"].nunique() == 5
    whole, _ = list_recordings("esc50", root, GroupByConfig(column="fold", pattern=r"\d"), cfg)
    assert whole["group"].nunique() == 5  # no group in the pattern: the whole match
    with pytest.raises(AdapterError, match=r"data\.group_by\.column='speaker' is not a column"):
        list_recordings("esc50", root, GroupByConfig(column="speaker"), cfg)


def test_group_by_regex_rejects_what_it_cannot_group_and_names_the_key(tmp_path):
    for i, name in enumerate(["src1_c0.wav", "src1_c1.wav", "src2_c0.wav", "other.wav"]):
        _clip(tmp_path / "data" / "dog" / name, i, 16000)
    spec = GroupByConfig(pattern=r"^src(\d+)_")
    cfg = DataConfig(adapter="folder_per_class", root=str(tmp_path / "data"), group_by=spec)
    cfg = replace(cfg, max_reject_fraction=0.5)
    manifest, rejects = ingest(cfg, tmp_path / "m.csv", tmp_path / "r.csv", tmp_path / "s.json")
    assert manifest["group"].tolist() == ["1", "1", "2"]
    assert rejects.to_dict("records") == [
        {
            "path": (tmp_path / "data" / "dog" / "other.wav").as_posix(),
            "reason": "data.group_by.pattern '^src(\\d+)_' finds no group in its file name "
            "'other.wav'",
        }
    ]
    # the params file's forms: a column name, or a mapping checked at load
    raw = {"data": {"group_by": {"pattern": "^src(\\d+)_"}}}
    assert params_from_dict(raw).data.group_by == spec
    assert params_from_dict({"data": {"group_by": "speaker"}}).data.group_by == "speaker"
    for bad, message in [
        ({"pattern": "(src"}, r"data\.group_by\.pattern '\(src' is not a valid regex"),
        ({}, "data.group_by needs a column, a pattern or both"),
        ({"regex": "x"}, r"unknown key data\.group_by\.regex"),
    ]:
        with pytest.raises(ConfigError, match=message):
            params_from_dict({"data": {"group_by": bad}})


def _csv_root(tmp_path: Path) -> Path:
    for i in range(4):
        _clip(tmp_path / "clips" / f"{i}.wav", i, 16000)
    pd.DataFrame(
        {
            "file": [f"clips/{i}.wav" for i in range(4)],
            "valence": ["0.5", "-1.25", "abc", "2"],
            "emotion": ["happy", "sad", "sad", "happy"],
            "speaker": ["s1", "s1", "s2", "s2"],
            "language": ["en", "fr", "en", "fr"],
        }
    ).to_csv(tmp_path / "meta.csv", index=False)
    return tmp_path


def test_csv_adapter_labels_targets_groups_and_side_columns(tmp_path):
    root = _csv_root(tmp_path)
    base = DataConfig(
        adapter="csv",
        metadata="meta.csv",
        path_column="file",
        label_column="emotion",
        group_column="speaker",
        side_columns=("language",),
    )
    table, rejects = list_recordings("csv", root, None, base)
    assert table[["label", "group", "language"]].values.tolist() == [
        ["happy", "s1", "en"],
        ["sad", "s1", "fr"],
        ["sad", "s2", "en"],
        ["happy", "s2", "fr"],
    ]
    assert not rejects
    regression = replace(base, label_column=None, target_column="valence")
    table, rejects = list_recordings("csv", root, None, regression)
    assert table["target"].tolist() == [0.5, -1.25, 2.0]
    assert rejects == [
        {
            "path": (root / "clips" / "2.wav").as_posix(),
            "reason": "target 'abc' in 'valence' is not a finite number",
        }
    ]


def test_csv_adapter_errors_name_column_file_and_escape(tmp_path):
    root = _csv_root(tmp_path / "data")
    cfg = DataConfig(adapter="csv", metadata="meta.csv", path_column="file", label_column="mood")
    with pytest.raises(
        ManifestError, match=r"meta.csv: missing column\(s\) mood; expected file, mood"
    ):
        list_recordings("csv", root, None, cfg)
    with pytest.raises(ManifestError, match=r"data.metadata: path '../meta.csv' points outside"):
        list_recordings("csv", root, None, replace(cfg, metadata="../meta.csv"))
    (root.parent / "elsewhere.csv").write_text("file,mood\n")
    (root / "linked.csv").symlink_to(root.parent / "elsewhere.csv")
    with pytest.raises(ManifestError, match=r"data.metadata: symlink to .*elsewhere.csv outside"):
        list_recordings("csv", root, None, replace(cfg, metadata="linked.csv"))
    with pytest.raises(AdapterError, match="exactly one of"):
        list_recordings("csv", root, None, replace(cfg, target_column="valence"))


def _esc50_manifest(layouts: Path, root: Path) -> pd.DataFrame:
    shutil.copytree(layouts / "esc50" / "meta", root / "meta")
    table, _ = list_recordings("esc50", root, None, DataConfig(adapter="esc50"))
    return table.assign(sha256=[f"{i:064x}" for i in range(len(table))])


def test_predefined_esc50_folds_move_straddling_sources_to_test(layouts, tmp_path):
    manifest = _esc50_manifest(layouts, tmp_path)
    cfg = SplitConfig(strategy="predefined", column="fold", test_values=("5",), val_values=("4",))
    splits = split_manifest(manifest, cfg)
    table = manifest.merge(splits, on="path")
    report = split_report(table, cfg)
    # two sources sit in folds 4 and 5: they move wholly to test; 2+3 both train, no move
    assert report["moved_straddling_groups"] == ["209698", "234879"]
    assert report["checks"]["groups_in_two_splits"] == 0
    assert report["recordings"] == {"train": 1200, "val": 400 - 2, "test": 400 + 2}  # 2 clips move
    fold = table.set_index("path")["fold"]
    moved = table[table["group"].isin(["209698", "234879"])]
    assert set(moved["split"]) == {"test"} and set(fold[moved["path"]]) == {"4", "5"}
    with pytest.raises(LeakageError, match="2 group value"):
        strict = replace(cfg, move_straddling=False)
        split_report(manifest.merge(split_manifest(manifest, strict), on="path"), strict)


def test_predefined_without_val_folds_deals_val_by_group(layouts, tmp_path):
    manifest = _esc50_manifest(layouts, tmp_path)
    cfg = SplitConfig(strategy="predefined", column="fold", test_values=("1",), val=0.2)
    table = manifest.merge(split_manifest(manifest, cfg), on="path")
    report = split_report(table, cfg)
    assert report["recordings"]["test"] >= 400
    assert 350 <= report["recordings"]["val"] <= 450
    assert report["checks"]["groups_in_two_splits"] == 0
    with pytest.raises(ValueError, match=r"split.test_values: \['9'\] not found in column 'fold'"):
        split_manifest(manifest, replace(cfg, test_values=("9",)))
    with pytest.raises(ValueError, match=r"split\.column='folds' is not a manifest column"):
        split_manifest(manifest, replace(cfg, column="folds"))
