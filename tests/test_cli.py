"""`tympan --help` and every command's explain themselves; `tympan preset` writes every key,
keeps a data.root the user set, refuses to lose edits, and prints the README's command."""

from __future__ import annotations

import argparse
import json
import re
import shutil

import pytest
import yaml
from dvc.utils.hydra import apply_overrides

from tympan.cli import _parser, main
from tympan.config import load_params

from conftest import REPO


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_command_and_argument_is_explained_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    for name in _subcommands():
        assert re.search(rf"^    {name}\s+\S", top, re.M), name  # listed with its summary
    assert "dvc repro register" in top  # where to start

    for name, parser in _subcommands().items():
        assert parser.description, name
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            what = f"{name} {action.dest}"
            assert action.help, what
            shown = action.default not in (None, False, []) and not action.required
            if shown:
                assert "default" in action.help, what
        with pytest.raises(SystemExit):
            main([name, "--help"])
        assert capsys.readouterr().out.startswith(f"usage: tympan {name}")


@pytest.fixture
def presets(tmp_path):
    shutil.copytree(REPO / "pipelines", tmp_path / "pipelines")
    return tmp_path / "pipelines"


def _preset(target, presets, *args: str) -> None:
    main(["--params", str(target), "preset", *args, "--dir", str(presets)])


@pytest.mark.parametrize("name", ["demo", "fsdd", "s4_esc50_bigru"])
def test_dvc_exp_run_set_param_finds_every_key_the_preset_writes(name, tmp_path, presets):
    """`dvc exp run -S` (DVC's own override code) on keys the demo params used to lack."""
    target = tmp_path / "params.yaml"
    _preset(target, presets, name)
    apply_overrides(
        target,
        ["data.esc10=true", "split.column=fold", 'split.test_values=["5"]', "train.momentum=0.5"],
    )
    params = load_params(target)
    assert params.data.esc10 and params.split.column == "fold"
    assert params.split.test_values == ("5",) and params.train.momentum == 0.5


def test_preset_prints_the_readme_command(tmp_path, presets, capsys):
    target = tmp_path / "params.yaml"
    _preset(target, presets, "fsdd_digits")
    out = capsys.readouterr().out
    assert "Build it with:\n  dvc repro register\n" in out
    assert "tympan preset fsdd_digits && dvc repro register" in (REPO / "README.md").read_text()
    _preset(target, presets, "demo")
    assert "Build it with:\n  dvc repro\n" in capsys.readouterr().out


def test_preset_keeps_the_users_data_root_for_the_same_layout(tmp_path, presets, capsys):
    target = tmp_path / "params.yaml"
    _preset(target, presets, "s4_esc50_bigru")
    target.write_text(target.read_text().replace("root: data/esc50", "root: /data/ESC-50"))
    _preset(target, presets, "s4_esc50_final")
    assert load_params(target).data.root == "/data/ESC-50"
    assert load_params(target).model.name == "densenet_bigru_attention"
    assert "kept your data.root: /data/ESC-50" in capsys.readouterr().out
    _preset(target, presets, "fsdd_digits")  # another layout: its own root
    assert load_params(target).data.root == "../shared/datasets/fsdd"

    # a complete preset copied as written keeps its comments and takes the root too
    _preset(target, presets, "fsdd")
    target.write_text(target.read_text().replace("root: ../shared/", "root: /mnt/"))
    _preset(target, presets, "fsdd")
    assert load_params(target).data.root == "/mnt/datasets/fsdd"
    assert target.read_text().startswith("# Free Spoken Digit Dataset")


def test_preset_refuses_to_overwrite_edits_unless_forced(tmp_path, presets):
    target = tmp_path / "params.yaml"
    _preset(target, presets, "demo")
    raw = yaml.safe_load(target.read_text())
    raw["train"]["lr"] = 0.01
    target.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(SystemExit) as refused:
        _preset(target, presets, "fsdd")
    message = str(refused.value.code)
    assert "train.lr: 0.01 (preset: 0.001)" in message and "--force" in message
    assert load_params(target).train.lr == 0.01  # untouched
    _preset(target, presets, "fsdd", "--force")
    assert load_params(target).preset == "fsdd"


def test_the_committed_json_schema_is_the_loaders_and_every_preset_meets_it(tmp_path, capsys):
    jsonschema = pytest.importorskip("jsonschema")
    out = tmp_path / "params.schema.json"
    main(["schema", "--out", str(out)])
    assert out.read_text() == (REPO / "params.schema.json").read_text(), "run `tympan schema`"
    schema = json.loads(out.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    for path in [REPO / "params.yaml", *sorted((REPO / "pipelines").glob("*.yaml"))]:
        assert not list(validator.iter_errors(yaml.safe_load(path.read_text()))), path.name
    bad = yaml.safe_load((REPO / "params.yaml").read_text())
    bad["train"].update(lr=-1, learning_rate=0.1)
    bad["model"]["name"] = "vgg99"
    found = sorted(e.message for e in validator.iter_errors(bad))
    assert any("'learning_rate' was unexpected" in m for m in found)
    assert any("-1 is less than or equal to the minimum of 0" in m for m in found)
    assert any("'vgg99' is not one of" in m for m in found)
