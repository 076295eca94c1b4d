import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from tympan.config import DataConfig, DemoConfig, SplitConfig
from tympan.data import demo
from tympan.data import ingest as ingest_module
from tympan.data.adapters import AdapterError, list_recordings
from tympan.data.ingest import IngestError, ingest
from tympan.data.manifest import ManifestError
from tympan.data.splits import LeakageError, check_leakage, split_manifest, split_report

from audio_helpers import tone, truncated, write
from conftest import fsdd_subset


def _digest(folder):
    return hashlib.sha256(
        b"".join(p.read_bytes() for p in sorted(folder.rglob("*.wav")))
    ).hexdigest()


def test_demo_is_deterministic_and_has_groups(tmp_path):
    cfg = DemoConfig(clips_per_class=4, groups=2)
    meta = demo.generate(cfg, tmp_path / "a")
    demo.generate(cfg, tmp_path / "b")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert len(meta) == 4 * len(demo.CLASSES)
    assert set(meta["label"]) == set(demo.CLASSES)
    assert meta["session"].nunique() == 2
    demo.generate(replace(cfg, seed=1), tmp_path / "c")
    assert _digest(tmp_path / "c") != _digest(tmp_path / "a")


def test_fsdd_adapter_reads_the_real_metadata(fsdd_root):
    table, rejects = list_recordings("fsdd", fsdd_root, None)
    assert len(table) == 3000 and not rejects
    assert sorted(table["label"].unique()) == [str(d) for d in range(10)]
    assert table["group"].nunique() == 3000  # default group: the recording
    assert {"speaker", "accent", "gender"} <= set(table.columns)
    by_speaker, _ = list_recordings("fsdd", fsdd_root, "speaker")
    assert by_speaker["group"].nunique() == 6


def test_fsdd_adapter_parses_file_names_without_metadata(fsdd_root, tmp_path):
    root = fsdd_subset(fsdd_root, tmp_path / "fsdd", ["theo"], range(2))
    (root / "metadata.csv").unlink()
    write(root / "recordings" / "hello.wav", tone(300, 0.2, 8000), 8000)
    table, rejects = list_recordings("fsdd", root, None)
    assert len(table) == 20 and set(table["speaker"]) == {"theo"}
    assert rejects == [
        {
            "path": (root / "recordings" / "hello.wav").as_posix(),
            "reason": "file name does not match {digit}_{speaker}_{take}.wav",
        }
    ]


def test_adapter_errors_name_the_problem(tmp_path):
    with pytest.raises(AdapterError, match="not a folder"):
        list_recordings("demo", tmp_path / "absent", None)
    (tmp_path / "metadata.csv").write_text("filename,label\naudio/a.wav,tone\n")
    with pytest.raises(ManifestError, match=r"missing column.*session"):
        list_recordings("demo", tmp_path, None)
    (tmp_path / "metadata.csv").write_text("filename,label,session,snr_db\naudio/a.wav,tone,s,0\n")
    with pytest.raises(AdapterError, match="group_by='speaker'"):
        list_recordings("demo", tmp_path, "speaker")


def _bad_corpus(tmp_path):
    """A demo-layout folder: 10 good clips plus one of each kind of broken file."""
    rows = []
    for i in range(10):
        write(tmp_path / "audio" / f"good{i}.wav", tone(300 + 50 * i, 0.5, 16000), 16000)
        rows.append((f"audio/good{i}.wav", "tone"))
    stereo = np.stack([tone(440, 0.5, 96000), tone(660, 0.5, 96000)], axis=1)
    write(tmp_path / "audio" / "stereo96k.wav", stereo, 96000, subtype="PCM_24")
    write(tmp_path / "audio" / "short.wav", tone(440, 0.01, 8000), 8000, subtype="PCM_U8")
    rows += [("audio/stereo96k.wav", "tone"), ("audio/short.wav", "tone")]
    (tmp_path / "audio" / "zero.wav").write_bytes(b"")
    (tmp_path / "audio" / "text.wav").write_text("not audio")
    write(tmp_path / "audio" / "silence.wav", np.zeros(16000, np.float32), 16000)
    truncated(tmp_path / "audio" / "cut.wav")
    (tmp_path / "audio" / "copy.wav").write_bytes((tmp_path / "audio" / "good0.wav").read_bytes())
    nan = tone(440, 0.5, 16000)
    nan[100], nan[200] = np.nan, np.inf
    write(tmp_path / "audio" / "nan.wav", nan, 16000, subtype="FLOAT")
    with sf.SoundFile(
        tmp_path / "audio" / "hour.wav", "w", 8000, 1, subtype="PCM_U8"
    ) as hour:  # one hour, written a minute at a time (29 MB)
        minute = tone(440, 60.0, 8000, amp=0.3)
        for _ in range(60):
            hour.write(minute)
    names = ("zero", "text", "silence", "cut", "copy", "gone", "nan", "hour")
    rows += [(f"audio/{n}.wav", "tone") for n in names]
    pd.DataFrame(
        {
            "filename": [r[0] for r in rows],
            "label": [r[1] for r in rows],
            "session": [f"s{i % 3}" for i in range(len(rows))],
            "snr_db": 0.0,
        }
    ).to_csv(tmp_path / "metadata.csv", index=False)
    return tmp_path


def test_ingest_rejects_bad_files_with_reasons_and_keeps_the_rest(tmp_path):
    root = _bad_corpus(tmp_path / "corpus")
    cfg = DataConfig(adapter="demo", root=str(root), max_reject_fraction=0.5)
    out = tmp_path / "out"
    manifest, rejects = ingest(cfg, out / "manifest.csv", out / "rejects.csv", out / "summary.json")
    assert len(manifest) == 12  # 10 good + stereo 96 kHz + 10 ms 8-bit
    stereo = manifest[manifest["path"].str.endswith("stereo96k.wav")].iloc[0]
    assert (stereo["channels"], stereo["sample_rate"]) == (2, 96000)
    reasons = {
        p.rsplit("/", 1)[1]: r for p, r in zip(rejects["path"], rejects["reason"], strict=True)
    }
    assert reasons["zero.wav"].startswith("empty file")
    assert reasons["text.wav"].startswith("not decodable")
    assert reasons["silence.wav"].startswith("silent")
    assert reasons["cut.wav"].startswith("truncated")
    assert (
        reasons["copy.wav"].startswith("duplicate: identical bytes to")
        and "good0.wav" in reasons["copy.wav"]
    )
    assert reasons["gone.wav"] == "listed in the metadata but missing"
    assert reasons["nan.wav"] == "contains NaN or infinite samples"
    assert reasons["hour.wav"] == "too long: 3600.0 s > data.max_duration_s=600 s"
    written = pd.read_csv(tmp_path / "out" / "manifest.csv")
    assert list(written.columns[:7]) == [
        "path",
        "label",
        "group",
        "duration_s",
        "sample_rate",
        "channels",
        "sha256",
    ]


def test_ingest_fails_past_the_reject_fraction_but_writes_rejects_first(tmp_path):
    root = _bad_corpus(tmp_path / "corpus")
    cfg = DataConfig(adapter="demo", root=str(root), max_reject_fraction=0.1)
    out = tmp_path / "out"
    with pytest.raises(IngestError, match=r"rejected 8 of 20 .*data.max_reject_fraction"):
        ingest(cfg, out / "manifest.csv", out / "rejects.csv", out / "summary.json")
    assert len(pd.read_csv(out / "rejects.csv")) == 8
    assert json.loads((out / "summary.json").read_text())["rejected"] == 8
    assert not (out / "manifest.csv").exists()


def _manifest(n_groups=20, per_group=5, labels=("a", "b", "c")):
    rows = []
    for g in range(n_groups):
        for i in range(per_group):
            rows.append(
                {
                    "path": f"g{g}_{i}.wav",
                    "label": labels[(g + i) % len(labels)],
                    "group": f"g{g}",
                    "sha256": f"{g:032x}{i:032x}",
                }
            )
    return pd.DataFrame(rows)


@pytest.mark.parametrize("seed", range(5))
def test_group_split_never_leaks(seed):
    manifest = _manifest()
    splits = split_manifest(manifest, SplitConfig(strategy="group", seed=seed))
    table = manifest.merge(splits, on="path")
    assert (table.groupby("group")["split"].nunique() == 1).all()
    report = split_report(table, SplitConfig(strategy="group", seed=seed))
    assert sum(report["groups"].values()) == 20
    assert report["recordings"]["train"] > report["recordings"]["test"] > 0
    assert report["checks"]["groups_in_two_splits"] == 0


def test_group_split_keeps_label_pure_groups_stratified():
    manifest = _manifest(n_groups=30, per_group=4, labels=("x",))
    manifest.loc[manifest["group"].isin([f"g{i}" for i in range(15)]), "label"] = "y"
    table = manifest.merge(
        split_manifest(manifest, SplitConfig(strategy="group", val=0.2, test=0.2)), on="path"
    )
    counts = table.groupby(["split", "label"]).size().unstack()
    assert (counts["x"] == counts["y"]).all()  # each label split 9/3/3 groups


def test_stratified_split_proportions():
    manifest = _manifest(n_groups=100, per_group=1)
    splits = split_manifest(manifest, SplitConfig(strategy="stratified", val=0.1, test=0.2))
    assert splits["split"].value_counts().to_dict() == {"train": 70, "test": 20, "val": 10}


def test_leak_check_catches_groups_and_identical_files():
    table = _manifest(n_groups=3, per_group=2)
    table["split"] = ["train", "train", "val", "val", "test", "test"]
    assert check_leakage(table)["groups_checked"] == 3
    leaked = table.copy()
    leaked.loc[1, "split"] = "test"
    with pytest.raises(LeakageError, match="1 group value"):
        check_leakage(leaked)
    copied = table.copy()
    copied.loc[5, "sha256"] = copied.loc[0, "sha256"]
    with pytest.raises(LeakageError, match="1 sha256 value"):
        check_leakage(copied)


def test_too_few_groups_is_a_clear_error():
    with pytest.raises(ValueError, match="is empty"):
        split_manifest(_manifest(n_groups=2), SplitConfig(strategy="group"))


def _ingest(cfg, out):
    return ingest(cfg, out / "manifest.csv", out / "rejects.csv", out / "summary.json")


@pytest.fixture
def probed(monkeypatch):
    """The paths ingest opens (every read of a file goes through `probe`)."""
    opened = []
    real = ingest_module.probe

    def spy(path, *args):
        opened.append(Path(path).resolve())
        return real(path, *args)

    monkeypatch.setattr(ingest_module, "probe", spy)
    return opened


def test_extreme_float_amplitude_is_a_reject_and_a_loud_float_file_is_not(tmp_path):
    """A float WAV at 1e20 (+400 dBFS) gives inf features and NaN statistics downstream; a
    float file a little over full scale (+6 dBFS) is a real recording."""
    names = ["quiet", "loud", "extreme"]
    for name, amp in zip(names, [0.5, 2.0, 1e20], strict=True):
        write(tmp_path / "audio" / f"{name}.wav", tone(440, 0.5, 16000, amp), 16000, "FLOAT")
    rows = [f"audio/{n}.wav" for n in names]
    pd.DataFrame({"filename": rows, "label": "tone", "session": "s", "snr_db": 0}).to_csv(
        tmp_path / "metadata.csv", index=False
    )
    cfg = DataConfig(adapter="demo", root=str(tmp_path), max_reject_fraction=0.5)
    manifest, rejects = _ingest(cfg, tmp_path / "out")
    assert [Path(p).stem for p in manifest["path"]] == ["quiet", "loud"]
    assert rejects.to_dict("records") == [
        {
            "path": (tmp_path / "audio" / "extreme.wav").as_posix(),
            "reason": "extreme amplitude: peak +400.0 dBFS is above +40 dBFS "
            "(over 100 times full scale)",
        }
    ]


# Where each adapter keeps its audio, and for those with a metadata table: the table, the
# folder its paths are relative to, and one row of it for a file name.
AUDIO_DIRS = {
    "demo": "audio",
    "csv": "audio",
    "esc50": "audio",
    "mlend_deception": "CBU0521DD_stories",
    "fsdd": "recordings",
    "fsdd_names": "recordings",
    "filename_pattern": "audio",
    "folder_per_class": "dog",
}
TABLES = {
    "demo": (
        "metadata.csv",
        "audio/",
        lambda name: {"filename": name, "label": "1", "session": "s", "snr_db": "0"},
    ),
    "csv": ("meta.csv", "audio/", lambda name: {"path": name, "label": "1"}),
    "esc50": (
        "meta/esc50.csv",
        "",
        lambda name: {
            "filename": name,
            "fold": "1",
            "target": "1",
            "category": "1",
            "esc10": "False",
            "src_file": name,
            "take": "A",
        },
    ),
    "mlend_deception": (
        "CBU0521DD_stories_attributes.csv",
        "",
        lambda name: {"filename": name, "Language": "English", "Story_type": "True Story"},
    ),
    "fsdd": (
        "metadata.csv",
        "recordings/",
        lambda name: {"filename": name, "digit": "1", "speaker": "ann", "take": "0"},
    ),
}


def _dataset(adapter: str, root: Path, rows: list[str], good: int = 8) -> DataConfig:
    """`good` clips named `1_ann_<i>.wav` in `adapter`'s audio folder under `root`; adapters
    with a metadata table list them, then `rows` as they are."""
    for i in range(good):
        clip = tone(300 + 40 * i, 0.3, 8000)
        write(root / AUDIO_DIRS[adapter] / f"1_ann_{i}.wav", clip, 8000)
    if adapter in TABLES:
        table, prefix, row = TABLES[adapter]
        names = [f"{prefix}1_ann_{i}.wav" for i in range(good)] + rows
        (root / table).parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame([row(name) for name in names]).to_csv(root / table, index=False)
    return DataConfig(
        adapter="fsdd" if adapter == "fsdd_names" else adapter,
        root=str(root),
        metadata="meta.csv" if adapter == "csv" else None,
        pattern=r"(?P<label>\d)_.*\.wav",
        max_reject_fraction=0.5,
    )


@pytest.mark.parametrize("adapter", list(TABLES))
def test_metadata_rows_outside_the_root_are_rejects_never_opened(adapter, tmp_path, probed):
    """An absolute or `..` path in a metadata table is one reject with its reason, like any bad
    row: the rest is ingested, the file is never opened, the reject fraction still counts."""
    root = tmp_path / "data"
    write(tmp_path / "outside.wav", tone(500, 0.3, 8000), 8000)
    escapes = ["../../../etc/passwd", "/etc/passwd", "../../outside.wav"]
    cfg = _dataset(adapter, root, escapes)
    manifest, rejects = _ingest(cfg, tmp_path / "out")
    assert len(manifest) == 8
    assert rejects["reason"].tolist() == [
        f"path {e!r} points outside data.root {root.resolve()}: "
        "paths in the metadata must be relative and stay inside it"
        for e in escapes
    ]
    assert len(probed) == 8 and all(p.is_relative_to(root.resolve()) for p in probed)
    assert (
        pd.read_csv(tmp_path / "out" / "rejects.csv")["reason"].tolist()
        == rejects["reason"].tolist()
    )
    with pytest.raises(IngestError, match=r"rejected 3 of 11"):
        _ingest(replace(cfg, max_reject_fraction=0.2), tmp_path / "strict")
    assert len(pd.read_csv(tmp_path / "strict" / "rejects.csv")) == 3


@pytest.mark.parametrize("adapter", list(AUDIO_DIRS))
def test_symlinks_leading_outside_the_root_are_rejects_never_opened(adapter, tmp_path, probed):
    """A symlinked file or folder whose real path is outside data.root is a reject naming where
    it leads, whether a metadata row names it or a folder walk meets it; it is never opened."""
    root, outside = tmp_path / "data", tmp_path / "elsewhere"
    write(outside / "1_bob_0.wav", tone(3500, 0.3, 8000), 8000)
    write(outside / "secret" / "1_bob_1.wav", tone(3700, 0.3, 8000), 8000)
    folder = root / AUDIO_DIRS[adapter]
    links = {
        folder / "1_ann_90.wav": outside / "1_bob_0.wav",
        folder / "1_ann_91.wav": Path("/etc/passwd"),
        folder / "deep": outside / "secret",
    }
    prefix = TABLES[adapter][1] if adapter in TABLES else ""
    cfg = _dataset(
        adapter,
        root,
        [f"{prefix}1_ann_90.wav", f"{prefix}1_ann_91.wav", f"{prefix}deep/1_bob_1.wav"],
    )
    for link, target in links.items():
        link.symlink_to(target)
    expected = {link: target for link, target in links.items() if link.name != "deep"}
    if adapter in TABLES:
        expected[folder / "deep" / "1_bob_1.wav"] = outside / "secret" / "1_bob_1.wav"
    elif adapter != "fsdd_names":  # the fsdd names layout is one folder: subfolders are not read
        expected[folder / "deep"] = outside / "secret"
    if adapter == "folder_per_class":
        (root / "cat").symlink_to(outside / "secret")
        expected[root / "cat"] = outside / "secret"
    manifest, rejects = _ingest(cfg, tmp_path / "out")
    assert len(manifest) == 8
    real = root.resolve()
    assert sorted(zip(rejects["path"], rejects["reason"], strict=True)) == sorted(
        (link.as_posix(), f"symlink to {target.resolve()} outside data.root {real}")
        for link, target in expected.items()
    )
    assert len(probed) == 8 and all(p.is_relative_to(real) for p in probed)


def test_a_data_root_that_is_a_symlink_and_links_inside_it_are_followed(tmp_path):
    """The root is resolved first, so data.root may be a link to the dataset; links that stay
    inside are read like the files they lead to, a loop is not followed. Paths keep the root
    as given."""
    dataset = tmp_path / "datasets" / "study"
    for i in range(4):
        write(dataset / "dog" / f"1_ann_{i}.wav", tone(300 + 40 * i, 0.3, 8000), 8000)
    write(dataset / "store" / "1_ann_9.wav", tone(900, 0.3, 8000), 8000)
    (dataset / "dog" / "1_ann_8.wav").symlink_to(Path("..") / "store" / "1_ann_9.wav")
    (dataset / "dog" / "more").symlink_to(dataset / "store")
    (dataset / "dog" / "loop").symlink_to(dataset)
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "study").symlink_to(dataset)
    root = tmp_path / "project" / "study"
    cfg = DataConfig(
        adapter="filename_pattern",
        root=str(root),
        pattern=r"(?P<label>\d)_.*\.wav",
        max_reject_fraction=0.5,
    )
    manifest, rejects = _ingest(cfg, tmp_path / "out")
    first = (root / "dog" / "1_ann_8.wav").as_posix()
    assert manifest["path"].tolist() == [
        *((root / "dog" / f"1_ann_{i}.wav").as_posix() for i in range(4)),
        first,
    ]
    assert rejects.to_dict("records") == [
        {"path": p.as_posix(), "reason": f"duplicate: identical bytes to {first}"}
        for p in (root / "dog" / "more" / "1_ann_9.wav", root / "store" / "1_ann_9.wav")
    ]


@pytest.mark.parametrize("adapter", ["demo", "filename_pattern", "folder_per_class"])
def test_duplicates_keep_the_first_listed_and_reject_every_later_copy(adapter, tmp_path):
    """Identical files: the first in the listing is kept, each later one rejected naming it.
    A metadata table lists the original first, with copies named to sort before and after it;
    an adapter that walks folders lists by path, so the first by path is the one kept, also
    when a copy sits in a subfolder named like the file (`rec/…` sorts after `rec.wav` and
    `rec 1.wav`, `/` being after ` ` and `.`)."""
    root = tmp_path / "data"
    folder = root / AUDIO_DIRS[adapter]
    copies = ["1_rec 1.wav", "1_rec/1_copy.wav", "1_zz.wav"]  # before, after, after
    rows = [f"audio/{name}" for name in ["1_rec.wav", *copies]]
    cfg = _dataset(adapter, root, rows)
    write(folder / "1_rec.wav", tone(2000, 0.3, 8000), 8000)
    for name in copies:
        (folder / name).parent.mkdir(exist_ok=True)
        shutil.copyfile(folder / "1_rec.wav", folder / name)
    manifest, rejects = _ingest(cfg, tmp_path / "out")
    if adapter == "demo":
        first, later = "1_rec.wav", copies
    else:
        first, later = "1_rec 1.wav", ["1_rec.wav", "1_rec/1_copy.wav", "1_zz.wav"]
        assert manifest["path"].tolist() == sorted(manifest["path"])
    kept = (folder / first).as_posix()
    assert kept in manifest["path"].tolist()
    assert not set(manifest["path"]) & {(folder / n).as_posix() for n in later}
    assert rejects.to_dict("records") == [
        {"path": (folder / n).as_posix(), "reason": f"duplicate: identical bytes to {kept}"}
        for n in later
    ]


@pytest.mark.parametrize("adapter", sorted(TABLES))
def test_a_metadata_table_linked_from_outside_the_root_is_refused(adapter, tmp_path):
    """The adapter's own table (metadata.csv, meta/esc50.csv, ...) is a file of the dataset: a
    symlink to a table elsewhere is refused, naming where it leads, before it is read."""
    root = tmp_path / "data"
    cfg = _dataset(adapter, root, [])
    table = root / TABLES[adapter][0]
    moved = tmp_path / "elsewhere.csv"
    table.rename(moved)
    table.symlink_to(moved)
    with pytest.raises(
        (AdapterError, ManifestError), match=f"symlink to {moved} outside data.root"
    ):
        list_recordings(cfg.adapter, root, None, cfg)
