"""The best trial's values as a params file: what tune writes and train applies over params.yaml.

`tuning/best_params.yaml` is a DVC params file of the train stage, so `dvc exp show` and
`dvc params diff` show what was trained: `tuned.train.lr` beside params.yaml's `train.lr`, and
the study (as the dashboard names it) and trial the values came from:

    optuna: {study: tympan-demo-3f2a1b7c, trial: 7}
    tuned:
      model: {dropout: 0.319}
      train: {lr: 0.000604}

The values sit under `tuned` rather than at params.yaml's own keys so that DVC's columns stay
short (`tuned.train.lr`; a key in two params files is shown with its file's path). With tuning
off the file holds `optuna: {study: null, trial: null}` and no values: never an empty file,
whose params DVC cannot hash, which would keep train out of DVC's run-cache.

Under cross-validation the search is nested (one study per outer fold, see
`tympan.tuning.study`), so each fold has its own best values, under `fold_<k>` keys:

    optuna:
      fold_0: {study: tympan-demo-3f2a1b7c-fold-0, trial: 7}
      fold_1: {study: tympan-demo-3f2a1b7c-fold-1, trial: 2}
    tuned:
      fold_0: {train: {lr: 0.000604}}
      fold_1: {train: {lr: 0.00131}}

and train applies fold k's values to fold k's members only (`dvc params diff` lists
`tuned.fold_0.train.lr`, ...). One set of values for all folds would have been chosen on
recordings that some fold tests on.

Precedence: a param in `tune.space` is the search's, so its tuned value wins over
params.yaml's; every other param is params.yaml's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tympan.config import ConfigError, Params, flatten, to_dict
from tympan.tuning.space import TUNABLE, apply_overrides

PROVENANCE = "optuna"
VALUES = "tuned"
FOLD_KEY = re.compile(r"fold_(\d+)")


@dataclass(frozen=True)
class Tuned:
    """What a best-params file sets: `{"train.lr": 0.0006, ...}`, and where it came from."""

    values: dict[str, Any] = field(default_factory=dict)
    study: str | None = None
    trial: int | None = None
    # nested CV: each outer fold's own best values and study (`values` is then empty)
    folds: dict[int, Tuned] = field(default_factory=dict)

    def describe(self) -> str:
        return f"study {self.study}, trial {self.trial}" if self.study else "no study named"

    @property
    def names(self) -> list[str]:
        """Every param the search set, over all folds: `["train.lr", ...]`."""
        found = set(self.values)
        for tuned in self.folds.values():
            found |= set(tuned.values)
        return sorted(found)

    def per_fold(self, name: str) -> str:
        """One param's value in every fold: `fold 0: 0.001; fold 1: 0.003`."""
        return "; ".join(
            f"fold {k}: {self.folds[k].values.get(name)!r}" for k in sorted(self.folds)
        )


def _nested(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`{"train.lr": ...}` -> `{"train": {"lr": ...}}`."""
    nested: dict[str, dict[str, Any]] = {}
    for name, value in sorted(values.items()):
        section, key = name.split(".", 1)
        nested.setdefault(section, {})[key] = value
    return nested


def write_best_params(path: Path, values: dict[str, Any], study: str, trial: int) -> None:
    """`values` (`{"train.lr": ...}`) nested by section, under the study and trial."""
    _write(path, {PROVENANCE: {"study": study, "trial": trial}, VALUES: _nested(values)})


def write_best_params_per_fold(path: Path, folds: dict[int, Tuned]) -> None:
    """Nested CV: each outer fold's best values, study and trial under `fold_<k>`."""
    order = sorted(folds)
    _write(
        path,
        {
            PROVENANCE: {
                f"fold_{k}": {"study": folds[k].study, "trial": folds[k].trial} for k in order
            },
            VALUES: {f"fold_{k}": _nested(folds[k].values) for k in order},
        },
    )


def write_untuned(path: Path) -> None:
    """`tune.enabled: false`: nothing to apply, train reads params.yaml alone."""
    _write(path, {PROVENANCE: {"study": None, "trial": None}})


def _write(path: Path, content: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(content, sort_keys=False))


def read_best_params(path: Path) -> Tuned:
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict) or set(raw) - {PROVENANCE, VALUES}:
        raise ConfigError(
            f"{path}: expected the keys {PROVENANCE} and {VALUES} the tune stage writes; "
            "re-run it (dvc repro tune)"
        )
    values = raw.get(VALUES) or {}
    provenance = raw.get(PROVENANCE) or {}
    folds = [key for key in values if FOLD_KEY.fullmatch(str(key))]
    if not folds:
        return _read_values(path, values, provenance, VALUES)
    if len(folds) != len(values) or set(provenance) != set(folds):
        raise ConfigError(
            f"{path}: {VALUES} and {PROVENANCE} must both hold only fold_<k> keys (nested CV) "
            "or neither; re-run the tune stage (dvc repro tune)"
        )
    return Tuned(
        folds={
            int(FOLD_KEY.fullmatch(key).group(1)): _read_values(
                path, values[key] or {}, provenance[key] or {}, f"{VALUES}.{key}"
            )
            for key in folds
        }
    )


def _read_values(path: Path, values: Any, provenance: dict, where: str) -> Tuned:
    """One set of tuned values (`{section: {field: value}}`) and the study it came from."""
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: {where} must be a mapping, got {values!r}")
    unknown = sorted(set(values) - set(TUNABLE))
    if unknown:
        raise ConfigError(
            f"{path}: {where}.{unknown[0]} is not a section the search sets "
            f"({', '.join(TUNABLE)}); re-run the tune stage"
        )
    for section, fields in values.items():
        if not isinstance(fields, dict):
            raise ConfigError(f"{path}: {where}.{section} must be a mapping, got {fields!r}")
    return Tuned(flatten(values), provenance.get("study"), provenance.get("trial"))


def apply_tuned(params: Params, tuned: Tuned, source: Path) -> tuple[Params, list[str]]:
    """`params` with the tuned values over it, and one line per value it replaced:
    `train.lr  0.000604  (params.yaml: 0.001)`."""
    if not tuned.values:
        return params, []
    base = flatten({section: to_dict(getattr(params, section)) for section in TUNABLE})
    width = max(len(name) for name in tuned.values)
    shown = {name: repr(value) for name, value in tuned.values.items()}
    value_width = max(len(text) for text in shown.values())
    lines = [
        f"{name:<{width}}  {shown[name]:<{value_width}}  (params.yaml: {base.get(name)!r})"
        for name in sorted(tuned.values)
    ]
    return apply_overrides(params, tuned.values, source=str(source)), lines
