from pathlib import Path

import pytest
import yaml

from tympan.config import ConfigError, load_params, params_from_dict, to_dict

from conftest import REPO


def test_repo_params_and_presets_load():
    params = load_params(REPO / "params.yaml")
    assert params.preset == "demo"
    assert params.train.seeds == (0, 1, 2)
    presets = {p.stem: load_params(p) for p in (REPO / "pipelines").glob("*.yaml")}
    assert {"demo", "fsdd"} <= set(presets)
    assert presets["fsdd"].data.adapter == "fsdd"


def test_default_params_are_the_demo_preset():
    assert (REPO / "params.yaml").read_text() == (REPO / "pipelines" / "demo.yaml").read_text()


def test_round_trip_through_dict(repo_params):
    assert params_from_dict(to_dict(repo_params)) == repo_params


def _write(tmp_path: Path, change) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    change(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r["train"].update(lrr=0.1), "unknown key train.lrr"),
        (lambda r: r.update(trian={}), "unknown key trian"),
        (lambda r: r["train"].update(lr="fast"), "train.lr must be a number"),
        (lambda r: r["train"].update(epochs=2.5), "train.epochs must be an integer"),
        (lambda r: r["train"].update(seeds=[]), "train.seeds must be a non-empty list"),
        (
            lambda r: r["train"].update(class_weights="yes"),
            "train.class_weights must be true or false",
        ),
        (lambda r: r["split"].update(strategy="random"), "split.strategy must be one of"),
        (lambda r: r["data"].update(adapter="esc51"), "data.adapter must be one of"),
        (lambda r: r.update(model=[1, 2]), "model must be a mapping"),
    ],
)
def test_bad_params_name_key_and_file(tmp_path, change, message):
    path = _write(tmp_path, change)
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(tmp_path / "bad.yaml")


def test_cross_field_errors_name_the_file_and_key(tmp_path):
    path = _write(tmp_path, lambda raw: raw["augment"].update(time_masks=2, time_mask_width=0))
    with pytest.raises(ConfigError, match=r"params.yaml: augment.time_masks=2 needs augment"):
        load_params(path)
    path = _write(tmp_path, lambda raw: raw["augment"].update(noise_p=1.5))
    with pytest.raises(ConfigError, match=r"augment.noise_p is a probability"):
        load_params(path)
