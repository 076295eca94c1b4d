import dataclasses
import types
import typing
from pathlib import Path

import pytest
import yaml

from tympan import cli
from tympan.config import (
    MAX_SAMPLE_RATE,
    MIN_SAMPLE_RATE,
    ConfigError,
    Params,
    load_params,
    params_from_dict,
    to_dict,
)

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
    path = _write(tmp_path, lambda raw: raw["split"].update(val=0.5, test=0.5))
    with pytest.raises(ConfigError, match=r"params.yaml: split.val \+ split.test must be below 1"):
        load_params(path)
    path = _write(tmp_path, lambda raw: raw["features"].update(sample_rate=8000, f_max=6000.0))
    with pytest.raises(ConfigError, match=r"features.f_max=6000.0 is above the Nyquist"):
        load_params(path)
    path = _write(tmp_path, lambda raw: raw["features"].update(f_min=9000.0))
    with pytest.raises(ConfigError, match=r"features.f_min=9000.0 must be below features.f_max"):
        load_params(path)


def _set(raw: dict, dotted: str, value) -> None:
    *sections, key = dotted.split(".")
    for section in sections:
        raw = raw[section]
    raw[key] = value


def _fails_at_load(path: Path, tmp_path: Path) -> str:
    """The error of `load_params(path)`; `tympan train` on the same file exits with it before
    any work (no output folder)."""
    with pytest.raises(ConfigError) as err:
        load_params(path)
    out = tmp_path / "models"
    argv = ["--params", str(path), "train", "--features", "f", "--manifest", "m", "--out", str(out)]
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    assert str(err.value) in str(stopped.value.code)
    assert not out.exists()
    return str(err.value)


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [
        ("train.epochs", 0, "0"),
        ("train.epochs", -3, "-3"),
        ("train.lr", -0.1, "-0.1"),
        ("train.lr", float("nan"), "nan"),
        ("train.batch_size", -8, "-8"),
        ("data.max_reject_fraction", -1, "-1"),
    ],
)
def test_the_issue_cases_fail_at_load_naming_file_key_value(tmp_path, key, value, shown):
    path = _write(tmp_path, lambda raw: _set(raw, key, value))
    message = _fails_at_load(path, tmp_path)
    assert f"{path}: {key}={shown} is out of range: must be " in message


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize(
    ("key", "value", "shown", "rule"),
    [
        ("data.silence_dbfs", -INF, "=-inf", "a finite number"),
        ("data.max_duration_s", 0, "=0", "a finite number > 0"),
        ("demo.clips_per_class", 0, "=0", "an integer >= 1"),
        ("demo.sample_rate", 999, "=999", "an integer in [1000, 384000]"),
        ("demo.snr_db", [0.0, INF], "[1]=inf", "a finite number"),
        ("demo.seed", -1, "=-1", "an integer in [0, 4294967295]"),
        ("split.val", 0.0, "=0.0", "a number in (0, 1)"),
        ("split.test", 1, "=1", "a number in (0, 1)"),
        ("cv.folds", -2, "=-2", "an integer >= 0"),
        ("features.sample_rate", 400_000, "=400000", "an integer in [1000, 384000]"),
        ("features.seconds", -1.0, "=-1.0", "a finite number > 0"),
        ("features.n_fft", 0, "=0", "an integer >= 1"),
        ("features.hop_length", -256, "=-256", "an integer >= 1"),
        ("features.n_mels", 0, "=0", "an integer >= 1"),
        ("features.f_min", -20.0, "=-20.0", "a finite number >= 0"),
        ("features.top_db", 0, "=0", "a finite number > 0"),
        ("features.batch_size", 0, "=0", "an integer >= 1"),
        ("features.workers", -1, "=-1", "an integer >= 0"),
        ("features.stack.image", [224, 0], "[1]=0", "an integer >= 1"),
        ("features.stack.preemphasis", 1.5, "=1.5", "a number in [0, 1]"),
        ("segment.hop", 0, "=0", "a finite number > 0"),
        ("segment.min_last", 1.5, "=1.5", "a number in [0, 1]"),
        ("model.units", [64, 0], "[1]=0", "an integer >= 1"),
        ("model.head", [-1], "[0]=-1", "an integer >= 1"),
        ("model.kernels", [[3, 0]], "[0][1]=0", "an integer >= 1"),
        ("model.dropout", 1.0, "=1.0", "a number in [0, 1)"),
        ("model.c", 0, "=0", "a finite number > 0"),
        ("model.n_neighbors", 0, "=0", "an integer >= 1"),
        ("train.seeds", [0, -1], "[1]=-1", "an integer in [0, 4294967295]"),
        ("train.lr", INF, "=inf", "a finite number > 0"),
        ("train.weight_decay", -1e-4, "=-0.0001", "a finite number >= 0"),
        ("train.lr_factor", 1.0, "=1.0", "a number in (0, 1)"),
        ("train.momentum", 1.0, "=1.0", "a number in [0, 1)"),
        ("train.grad_clip", -1.0, "=-1.0", "a finite number >= 0"),
        ("augment.noise_p", 1.5, "=1.5", "a number in [0, 1]"),
        ("augment.mixup_alpha", NAN, "=nan", "a finite number >= 0"),
        ("tune.n_trials", 0, "=0", "an integer >= 1"),
        ("tune.timeout_s", -5, "=-5", "a finite number > 0"),
        ("tune.heartbeat_s", 0, "=0", "an integer >= 1"),
        ("tune.sampler_seed", 2**32, "=4294967296", "an integer in [0, 4294967295]"),
        (
            "tune.space",
            {"train": {"lr": {"low": NAN, "high": 0.1}}},
            ".train.lr.low=nan",
            "a finite number",
        ),
        ("evaluate.worst_k", -1, "=-1", "an integer >= 0"),
        ("register.min_delta", -0.1, "=-0.1", "a finite number >= 0"),
    ],
)
def test_every_section_checks_its_ranges_at_load(tmp_path, key, value, shown, rule):
    path = _write(tmp_path, lambda raw: _set(raw, key, value))
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert f"{path}: {key}{shown} is out of range: must be {rule}" in str(err.value)


def _config_classes(cls: type, seen: dict[str, type]) -> dict[str, type]:
    """Every config dataclass reachable from `cls` through its fields' types."""
    seen[cls.__name__] = cls
    for hint in typing.get_type_hints(cls).values():
        for inner in _leaves(hint):
            if dataclasses.is_dataclass(inner) and inner.__name__ not in seen:
                _config_classes(inner, seen)
    return seen


def _leaves(hint) -> list:
    """The element types of a hint: `tuple[int, ...] | None` -> [int]."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType, tuple, dict):
        return [leaf for arg in typing.get_args(hint) for leaf in _leaves(arg)]
    return [] if hint in (Ellipsis, type(None)) else [hint]


def _numbers(value) -> list:
    return [n for v in value for n in _numbers(v)] if isinstance(value, tuple) else [value]


def test_every_number_declares_its_range_and_its_default_is_in_it():
    classes = _config_classes(Params, {})
    assert {"TrainConfig", "StackConfig", "SearchParam", "TuneConfig"} <= set(classes)
    undeclared, outside = [], []
    for cls in classes.values():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            leaves = set(_leaves(hints[f.name]))
            integer = int in leaves
            if not leaves & {int, float}:
                continue
            declared = f.metadata.get("range") or f.metadata.get("choices")
            if declared is None:
                undeclared.append(f"{cls.__name__}.{f.name}")
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            for value in _numbers(default) if default is not None else []:
                if value not in declared or (integer and not isinstance(value, int)):
                    outside.append(f"{cls.__name__}.{f.name}={value!r}")
    assert undeclared == [], "numeric fields without _range(...) or _choices(...)"
    assert outside == [], "defaults outside their own declared range"


def _loads(key: str, value) -> bool:
    section, name = key.split(".", 1)
    try:
        params_from_dict({section: {name: value}})
    except ConfigError:
        return False
    return True


def test_ranges_are_exact_at_their_ends():
    assert _loads("model.dropout", 0.0) and not _loads("model.dropout", 1.0)
    assert _loads("data.max_reject_fraction", 0) and _loads("data.max_reject_fraction", 1.0)
    assert _loads("features.workers", 0) and not _loads("features.workers", -1)
    assert _loads("train.seeds", [2**32 - 1]) and not _loads("train.seeds", [2**32])
    assert _loads("demo.sample_rate", MIN_SAMPLE_RATE) and _loads(
        "demo.sample_rate", MAX_SAMPLE_RATE
    )
    assert not _loads("train.lr", 0.0) and _loads("train.lr", 1e-12)
    assert _loads("features.stack", {"image_channels": 3}) and _loads("tune.timeout_s", None)


def test_sample_rate_bounds_agree_with_the_audio_reader():
    from tympan import audio

    assert (MIN_SAMPLE_RATE, MAX_SAMPLE_RATE) == (audio.MIN_SAMPLE_RATE, audio.MAX_SAMPLE_RATE)


@pytest.mark.parametrize(
    ("storage", "secret", "shown"),
    [
        ("postgresql+psycopg2://u:hunter2@db:5432/optuna", "hunter2", "u:***@db:5432/optuna"),
        ("postgresql://u:hun%40ter2@db/optuna", "hun%40ter2", "u:***@db/optuna"),
        # an unescaped @: SQLAlchemy takes `ter2@db` for the host, masked hides it too
        ("postgresql://u:hun@ter2@db/optuna", "ter2", "u:***@db/optuna"),
        ("mysql://u:p/w1@db/optuna", "p/w1", "u:***@db/optuna"),
    ],
)
def test_a_password_in_tune_storage_is_refused_unshown(tmp_path, storage, secret, shown):
    path = _write(tmp_path, lambda raw: raw["tune"].update(storage=storage))
    message = _fails_at_load(path, tmp_path)
    assert f"{path}: tune.storage=" in message and "holds a password" in message
    assert shown in message and secret not in message
    for fix in ("TYMPAN_TUNE_STORAGE", "PGPASSWORD", "~/.pgpass"):
        assert fix in message


def test_storage_without_a_password_loads_and_garbage_is_not_echoed(tmp_path):
    for storage in ("sqlite:///optuna.db", "postgresql+psycopg2://user@db:5432/optuna"):
        assert load_params(_write(tmp_path, lambda r, s=storage: r["tune"].update(storage=s)))
    path = _write(tmp_path, lambda raw: raw["tune"].update(storage="u:hunter2@db"))
    with pytest.raises(ConfigError, match=r"tune\.storage is not a database URL") as err:
        load_params(path)
    assert "hunter2" not in str(err.value)
