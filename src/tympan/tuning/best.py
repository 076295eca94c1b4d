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

Precedence: a param in `tune.space` is the search's, so its tuned value wins over
params.yaml's; every other param is params.yaml's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tympan.config import ConfigError, Params, flatten, to_dict
from tympan.tuning.space import TUNABLE, apply_overrides

PROVENANCE = "optuna"
VALUES = "tuned"


@dataclass(frozen=True)
class Tuned:
    """What a best-params file sets: `{"train.lr": 0.0006, ...}`, and where it came from."""

    values: dict[str, Any] = field(default_factory=dict)
    study: str | None = None
    trial: int | None = None

    def describe(self) -> str:
        return f"study {self.study}, trial {self.trial}" if self.study else "no study named"


def write_best_params(path: Path, values: dict[str, Any], study: str, trial: int) -> None:
    """`values` (`{"train.lr": ...}`) nested by section, under the study and trial."""
    nested: dict[str, dict[str, Any]] = {}
    for name, value in sorted(values.items()):
        section, key = name.split(".", 1)
        nested.setdefault(section, {})[key] = value
    _write(path, {PROVENANCE: {"study": study, "trial": trial}, VALUES: nested})


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
    unknown = sorted(set(values) - set(TUNABLE))
    if unknown:
        raise ConfigError(
            f"{path}: {VALUES}.{unknown[0]} is not a section the search sets "
            f"({', '.join(TUNABLE)}); re-run the tune stage"
        )
    for section, fields in values.items():
        if not isinstance(fields, dict):
            raise ConfigError(f"{path}: {VALUES}.{section} must be a mapping, got {fields!r}")
    provenance = raw.get(PROVENANCE) or {}
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
