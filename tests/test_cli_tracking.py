import hashlib
import shutil

import pandas as pd
import pytest
import yaml

from tympan import tracking
from tympan.cli import main

from conftest import REPO


def test_stage_with_bad_params_exits_naming_key_and_file(tmp_path, capsys):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"]["learning_rate"] = 0.1
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit) as err:
        main(
            [
                "--params",
                str(bad),
                "split",
                "--manifest",
                "m.csv",
                "--out",
                "s.csv",
                "--report",
                "r.json",
            ]
        )
    assert "unknown key train.learning_rate" in str(err.value.code)
    assert str(bad) in str(err.value.code)


def test_missing_manifest_is_a_clear_exit(tmp_path):
    with pytest.raises(SystemExit) as err:
        main(
            [
                "--params",
                str(REPO / "params.yaml"),
                "split",
                "--manifest",
                str(tmp_path / "none.csv"),
                "--out",
                str(tmp_path / "s.csv"),
                "--report",
                str(tmp_path / "r.json"),
            ]
        )
    assert "none.csv: not found" in str(err.value.code)


def test_preset_validates_and_activates(tmp_path, capsys):
    shutil.copytree(REPO / "pipelines", tmp_path / "pipelines")
    target = tmp_path / "params.yaml"
    main(["--params", str(target), "preset", "fsdd", "--dir", str(tmp_path / "pipelines")])
    assert target.read_text() == (REPO / "pipelines" / "fsdd.yaml").read_text()
    with pytest.raises(SystemExit, match=r"no preset 'esc99'.*known: demo, esc50_ast, .*fsdd, "):
        main(["--params", str(target), "preset", "esc99", "--dir", str(tmp_path / "pipelines")])
    (tmp_path / "pipelines" / "broken.yaml").write_text("train: {epochs: many}\n")
    with pytest.raises(SystemExit, match=r"train\.epochs must be an integer"):
        main(["--params", str(target), "preset", "broken", "--dir", str(tmp_path / "pipelines")])
    assert target.read_text() == (REPO / "pipelines" / "fsdd.yaml").read_text()  # untouched


def test_dvc_hash_prefers_dvc_lock_and_falls_back_to_md5(tmp_path):
    data = tmp_path / "manifest.csv"
    data.write_text("path,label\n")
    md5 = hashlib.md5(data.read_bytes()).hexdigest()
    assert tracking.dvc_hash(data, tmp_path / "no.lock") == md5
    folder = tmp_path / "features"
    folder.mkdir()
    (folder / "a.npy").write_bytes(b"x")
    lock = tmp_path / "dvc.lock"
    lock.write_text(
        yaml.safe_dump(
            {
                "schema": "2.0",
                "stages": {"featurize": {"outs": [{"path": str(folder), "md5": "abc.dir"}]}},
            }
        )
    )
    assert tracking.dvc_hash(folder, lock) == "abc.dir"
    assert tracking.dvc_hash(data, lock) == md5
    assert tracking.dvc_hash(tmp_path / "absent", lock) == "missing"


def test_sqlite_artifacts_live_beside_the_database(tmp_path):
    location = tracking.artifact_location(f"sqlite:///{tmp_path / 'db' / 'mlruns.db'}")
    assert location == (tmp_path / "db" / "mlartifacts").as_uri()
    assert tracking.artifact_location("http://127.0.0.1:5000") is None


def test_summary_without_a_run_says_what_to_do(tmp_path):
    with pytest.raises(SystemExit, match="run `dvc repro` first"):
        main(["summary", "--registered", str(tmp_path / "r.json")])


def test_a_split_the_manifest_cannot_meet_is_a_clear_exit(tmp_path):
    pd.DataFrame(
        {
            "path": ["a.wav", "b.wav"],
            "label": ["x", "y"],
            "group": ["g1", "g2"],
            "duration_s": 1.0,
            "sample_rate": 16000,
            "channels": 1,
            "sha256": ["1" * 64, "2" * 64],
        }
    ).to_csv(tmp_path / "manifest.csv", index=False)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["split"].update(strategy="predefined", column="fold", test_values=["5"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    args = ["split", "--manifest", str(tmp_path / "manifest.csv")]
    args += ["--out", str(tmp_path / "s.csv"), "--report", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit) as err:
        main(["--params", str(tmp_path / "params.yaml"), *args])
    assert "tympan split: split.column='fold' is not a manifest column" in str(err.value.code)
    assert not (tmp_path / "s.csv").exists()
