"""The search space from params.yaml: checked before any trial, sampled into a Params copy."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import optuna

from tympan.config import (
    AugmentConfig,
    ConfigError,
    ModelConfig,
    Params,
    SearchParam,
    TrainConfig,
    params_from_dict,
    to_dict,
)

TUNABLE = {"model": ModelConfig, "train": TrainConfig, "augment": AugmentConfig}
NOT_TUNABLE = {
    "model.name",
    "model.side_attributes",
    "model.weights",
    "train.seeds",
    "train.device",
    "train.task",
}


def apply_overrides(params: Params, overrides: dict[str, Any], source: str) -> Params:
    """A copy of `params` with `section.field` values replaced and the result re-validated."""
    raw = to_dict(params)
    for name, value in overrides.items():
        section, key = name.split(".", 1)
        raw[section][key] = value
    return params_from_dict(raw, source=source)


def _check_one(name: str, spec: SearchParam, where: str) -> None:
    section, _, key = name.partition(".")
    if section not in TUNABLE:
        raise ConfigError(
            f"{where}: tune.space.{section} is not a section the search can set "
            f"(tune.space.<section>.<field>, sections: {', '.join(TUNABLE)})"
        )
    fields = {f.name for f in dataclasses.fields(TUNABLE[section])}
    if key not in fields or name in NOT_TUNABLE:
        tunable = sorted(f"{section}.{f}" for f in fields if f"{section}.{f}" not in NOT_TUNABLE)
        raise ConfigError(
            f"{where}: tune.space.{name} is not a tunable param (known: {', '.join(tunable)})"
        )
    _check_kind(name, spec, where)
    if spec.type == "categorical":
        if not spec.choices or len(set(spec.choices)) < 2:
            raise ConfigError(
                f"{where}: tune.space.{name} is categorical with fewer than two distinct "
                f"choices ({spec.choices}); fix the value in params.yaml instead of tuning it"
            )
        return
    if spec.low is None or spec.high is None:
        raise ConfigError(f"{where}: tune.space.{name} ({spec.type}) needs low and high")
    if not spec.low < spec.high:
        raise ConfigError(
            f"{where}: tune.space.{name} has an empty or inverted range "
            f"(low={spec.low:g}, high={spec.high:g})"
        )
    if spec.log and spec.low <= 0:
        raise ConfigError(f"{where}: tune.space.{name} is log-scaled, so low must be > 0")
    if spec.step is not None and (spec.step <= 0 or spec.step > spec.high - spec.low):
        raise ConfigError(f"{where}: tune.space.{name} step {spec.step:g} does not fit the range")
    if spec.log and spec.step is not None:
        raise ConfigError(f"{where}: tune.space.{name} cannot have both log and step")
    if spec.type == "int" and not all(
        float(v).is_integer() for v in (spec.low, spec.high, spec.step or 1)
    ):
        raise ConfigError(f"{where}: tune.space.{name} is int, so low/high/step must be integers")


def _check_kind(name: str, spec: SearchParam, where: str) -> None:
    """A categorical dimension has only choices; a float or int one only low/high/step/log.

    A stray key is what `dvc exp run -S tune.space.X={type: categorical, ...}` leaves when X was
    a range (Hydra merges mappings), so the message shows the form that replaces a dimension.
    """
    if spec.type == "categorical":
        stray = [k for k in ("low", "high", "step") if getattr(spec, k) is not None]
        stray += ["log"] if spec.log else []
    else:
        stray = ["choices"] if spec.choices is not None else []
    if stray:
        raise ConfigError(
            f"{where}: tune.space.{name} is {spec.type} but also has {', '.join(stray)}; "
            f"to replace a dimension from the command line, drop it first: dvc exp run "
            f"-S '~tune.space.{name}' -S '+tune.space.{name}={{type: ..., ...}}'"
        )


def _corners(spec: SearchParam) -> dict[str, Any]:
    """The extreme values a trial can sample, by the space key that sets them."""
    if spec.type == "categorical":
        return {f"choices[{i}]": choice for i, choice in enumerate(spec.choices or ())}
    if spec.type == "int":
        return {"low": int(spec.low), "high": int(spec.high)}
    return {"low": float(spec.low), "high": float(spec.high)}  # suggest_float returns floats


def validate_space(params: Params, where: str = "params.yaml") -> None:
    """Every problem is a ConfigError naming the key, before any trial runs.

    The extremes of each dimension are loaded into the target field, so they must fit its type
    and declared range (e.g. `train.lr: {low: -1}` fails as train.lr=-1.0 would).
    """
    space = params.tune.dimensions
    if not space:
        raise ConfigError(f"{where}: tune.space is empty; list at least one param to search")
    for name, spec in space.items():
        _check_one(name, spec, where)
        for corner, value in _corners(spec).items():
            apply_overrides(params, {name: value}, source=f"{where}: tune.space.{name}.{corner}")
    if "train.epochs" in space and params.tune.pruner != "none":
        raise ConfigError(
            f"{where}: tune.space.train.epochs with tune.pruner={params.tune.pruner}: the pruner "
            "compares trials epoch by epoch, and a trial given fewer epochs would be judged "
            "against longer ones at unequal budgets. train.epochs is the budget: every trial "
            "runs up to it and early stopping (train.patience) keeps its best epoch. Drop the "
            "dimension (dvc exp run -S '~tune.space.train.epochs'), or set tune.pruner: none "
            "to search epochs as a plain parameter (S5's grid)"
        )
    if params.tune.sampler == "grid":
        grid_values(params)


# Model params that leave every weight's name and shape as they are. Nested CV tunes each
# fold on its own, so folds may pick different values; the served bundle builds all members
# from one model config, which holds for these and for no other model param.
PER_FOLD_MODEL = ("model.dropout", "model.dropout_conv", "model.head_dropout", "model.init")


def validate_nested_space(params: Params, folds: int, where: str = "params.yaml") -> None:
    """Nested CV (`folds` outer folds): only params that change no weight shape may differ
    between folds; a ConfigError naming the first other model param, before any trial."""
    shaping = [n for n in params.tune.dimensions if n.startswith("model.")]
    shaping = [n for n in shaping if n not in PER_FOLD_MODEL]
    if shaping:
        name = shaping[0]
        raise ConfigError(
            f"{where}: tune.space.{name} under {folds}-fold CV: tuning is nested (each fold "
            f"picks its own values), so folds could pick different {name}, and the served "
            "model builds every fold's members with one network shape. Fix it in the params "
            f"file (dvc exp run -S '~tune.space.{name}' -S {name}=...) and search train.*, "
            f"augment.* or {', '.join(PER_FOLD_MODEL)} per fold"
        )


def grid_values(params: Params) -> dict[str, list[Any]]:
    """The grid for GridSampler: categorical choices, or low..high by step."""
    grid: dict[str, list[Any]] = {}
    for name, spec in params.tune.dimensions.items():
        if spec.type == "categorical":
            grid[name] = list(spec.choices or ())
        elif spec.step is not None:
            count = math.floor((spec.high - spec.low) / spec.step + 1e-9) + 1
            values = [spec.low + i * spec.step for i in range(count)]
            grid[name] = [int(v) for v in values] if spec.type == "int" else values
        else:
            raise ConfigError(
                f"tune.sampler=grid needs a finite grid: give tune.space.{name} choices or a step"
            )
    return grid


def sample(trial: optuna.Trial, params: Params) -> dict[str, Any]:
    """Ask the trial for every dimension of the space; -> `{"train.lr": 0.001, ...}`."""
    values: dict[str, Any] = {}
    for name, spec in params.tune.dimensions.items():
        if spec.type == "categorical":
            values[name] = trial.suggest_categorical(name, list(spec.choices or ()))
        elif spec.type == "int":
            values[name] = trial.suggest_int(
                name, int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.log
            )
        else:
            values[name] = trial.suggest_float(
                name, spec.low, spec.high, step=spec.step, log=spec.log
            )
    return values
