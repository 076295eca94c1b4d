"""A study's original protocol beside tympan's honest one, through the real stages.

`compare` runs each `Run` (a preset, plus the overrides that point it at the data at hand)
through ingest, split, featurize, train and evaluate in a folder of its own, tracked in MLflow
like any run, and returns one row per run: the headline metric of the seed ensemble, its mean
+- std over seeds, the test size, and the leaks the split report recorded with what leaked.
`tympan compare-protocols STUDY` runs `STUDY` and `STUDY_original`; benchmarks/protocols.py
runs the studies on the data these machines have. `tympan compare-protocols STUDY --unseen
speaker` runs one preset under two K-fold protocols on the same data, speakers heard in
training and speakers never heard (`unseen_runs`), and writes the table into both runs'
model cards (`write_cards`): the gap between them is what a speech model meets in the world.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml

from tympan import stages, tracking
from tympan.config import ConfigError, Params, load_params, params_from_dict, to_dict
from tympan.evaluation.card import leak_detail
from tympan.stages import read_optional

# What each study reported, on its own data and under its own protocol (SEEDS.md), by the
# honest preset's name: shown beside the reruns, never compared with them as if like for like.
REPORTED = {
    "s1_deception_ensemble": "accuracy 0.70; deceptive F1 0.80, P 0.75, R 0.857 (10 stories)",
    "s2_deception_resnet": "none (did not converge or overfit)",
    "s3_accent_cnn": "accuracy 0.95",
    "s3_accent_lstm": "accuracy 0.496",
    "s4_esc50_baselines": "accuracy: k-NN 0.27, linear SVM 0.3875, random forest 0.40",
    "s4_esc50_densenet": "accuracy: VGG16 0.60, ResNet50 0.77, DenseNet121 0.805",
    "s4_esc50_bigru": "accuracy 0.785",
    "s4_esc50_final": "accuracy 0.87",
    "s5_valence_parallel_cnn": "MAE 0.516 (test), 0.5532 (val)",
}
ORIGINAL = "_original"


@dataclass(frozen=True)
class Run:
    """One row of the comparison: `preset` with `overrides` (`section.key[.key]`: value)."""

    label: str
    preset: str
    overrides: dict[str, Any] = field(default_factory=dict)


def study_runs(study: str) -> list[Run]:
    """The honest preset and its `_original` variant."""
    study = study.removesuffix(ORIGINAL)
    return [Run("honest", study), Run("original", f"{study}{ORIGINAL}")]


def overridden(params: Params, overrides: dict[str, Any], source: str) -> Params:
    """`params` with dotted keys replaced (any depth: `features.stack.kinds`), re-validated."""
    raw = to_dict(params)
    for name, value in overrides.items():
        *path, key = name.split(".")
        section = raw
        for part in path:
            if not isinstance(section.get(part), dict):
                raise ConfigError(f"{source}: {name} is not a params key")
            section = section[part]
        if key not in section:
            raise ConfigError(f"{source}: {name} is not a params key")
        section[key] = value
    return params_from_dict(raw, source=source)


def parse_override(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` with VALUE read as YAML (`cv.folds=0`, `data.root=x`, `copies.recipes=[]`)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value)


def unseen_runs(study: str, params: Params, column: str, folds: int, values: int) -> list[Run]:
    """`study` under two protocols of `folds`-fold CV, the same model on the same recordings
    grouped the same way (by recording when the preset groups by `column`):

    - heard: folds dealt by group, stratified by label, so every `column` value (speaker) is
      in train and test;
    - unseen: a fold per value of `column` when `folds` equals their number `values`
      (leave-one-speaker-out; val is then drawn from the other speakers' recordings, as in
      the heard run), else folds dealt by `column`. Either way a value is in one test fold and
      never in that fold's train or val split, normalisation statistics or early stopping.

    Both report per `column` value (evaluate's breakdown), so each speaker's gap shows."""
    group = None if params.data.group_by == column else params.data.group_by
    breakdown = list(dict.fromkeys([*params.evaluate.breakdown, column]))
    common = {
        "cv.folds": folds,
        "split.strategy": "group",
        "split.column": None,
        "split.test_values": [],
        "split.val_values": [],
        "evaluate.breakdown": breakdown,
    }
    by_value = {"cv.column": column, "data.group_by": group}
    dealt = {"cv.column": None, "data.group_by": column}
    return [
        Run(f"heard {column}", study, {**common, "cv.column": None, "data.group_by": group}),
        Run(f"unseen {column}", study, {**common, **(by_value if folds == values else dealt)}),
    ]


def count_values(params: Params, column: str, folder: Path) -> int:
    """How many distinct values `column` takes in `params`' ingested manifest (ingest runs
    into `folder`; the runs' own ingest finds the same recordings)."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.csv"
    stages.run_ingest(params, manifest, folder / "rejects.csv", folder / "ingest.json")
    table = pd.read_csv(manifest, dtype=str)
    if column not in table.columns:
        raise ConfigError(
            f"--unseen {column}: not a column of the manifest (its columns: "
            f"{', '.join(table.columns)})"
        )
    return int(table[column].dropna().nunique())


def compare(
    runs: list[Run],
    pipelines: Path,
    work: Path,
    common: dict[str, Any] | None = None,
    study: str | None = None,
) -> list[dict[str, Any]]:
    """Run each of `runs` end to end (`common` overrides first, then the run's own) under
    `work/<label>/`; -> one row per run (see `row`), also written to `work/protocols.json`."""
    rows = []
    folders = []
    for run in runs:
        source = f"{pipelines / run.preset}.yaml"
        params = load_params(source)
        params = overridden(params, {**(common or {}), **run.overrides}, f"{source} + overrides")
        folder = work / _slug(run.label)
        print(f"\n== {run.label}: preset {run.preset} in {folder}")
        started = time.perf_counter()
        run_stages(params, folder)
        rows.append(row(run, params, folder, time.perf_counter() - started, study))
        folders.append(folder)
    for r, folder in zip(rows, folders, strict=True):
        r["folder"] = str(folder)
    work.mkdir(parents=True, exist_ok=True)
    (work / "protocols.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def run_stages(params: Params, d: Path) -> None:
    """ingest -> split -> featurize -> train -> evaluate with dvc.yaml's file names under `d`."""
    d.mkdir(parents=True, exist_ok=True)
    stages.run_ingest(params, d / "manifest.csv", d / "rejects.csv", d / "ingest.json")
    stages.run_split(params, d / "manifest.csv", d / "splits.csv", d / "split.json")
    stages.run_featurize(params, d / "manifest.csv", d / "splits.csv", d / "features")
    stages.run_train(params, d / "features", d / "manifest.csv", d / "models", None)
    stages.run_evaluate(
        params, d / "features", d / "models", d / "metrics", d / "plots", d / "test_set.json"
    )


def row(run: Run, params: Params, d: Path, seconds: float, study: str | None) -> dict[str, Any]:
    """What the table shows of one finished run, read from the files its stages wrote."""
    results = json.loads((d / "metrics" / "test.json").read_text())
    split = json.loads((d / "split.json").read_text())
    train = json.loads((d / "models" / "train.json").read_text())
    metric = params.register.metric
    protocol = split.get("protocol", {"kind": "honest", "leaks": []})
    base = params.preset.removesuffix(ORIGINAL)
    return {
        "study": study or base,
        "run": run.label,
        "preset": params.preset,
        "protocol": protocol["kind"],
        "metric": metric,
        "ensemble": results["ensemble"][metric],
        "seed_mean": results["seed_mean"][metric],
        "seed_std": results["seed_std"][metric],
        "seeds": len(results["seeds"]),
        "n_test": results["n_test"],
        "leaks": [
            {"leak": leak["leak"], "what": leak["what"], "detail": leak_detail(leak)}
            for leak in protocol["leaks"]
        ],
        "reported": REPORTED.get(base, ""),
        "by": {
            column: {value: {"n": v["n"], metric: v[metric]} for value, v in values.items()}
            for column, values in read_optional(d / "metrics" / "breakdown.json").items()
        },
        "mlflow_run": train["parent_run_id"],
        "wall_s": round(seconds, 1),
    }


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as one markdown table."""
    lines = [
        "| study | protocol | metric | ensemble | seeds mean +- std | test | leak (what leaked) "
        "| wall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        leaks = "; ".join(f"{x['what']}: {x['detail']}" for x in r["leaks"]) or (
            "none known" if r["protocol"] == "original" else "none (split checked)"
        )
        protocol = (
            r["run"] if r["run"].startswith(r["protocol"]) else f"{r['protocol']}: {r['run']}"
        )
        lines.append(
            f"| {r['study']} | {protocol} | {r['metric']} | {r['ensemble']:.3f} | "
            f"{r['seed_mean']:.3f} +- {r['seed_std']:.3f} ({r['seeds']}) | {r['n_test']} | "
            f"{leaks} | {r['wall_s']:.0f} s |"
        )
    reported = {r["study"]: r["reported"] for r in rows if r["reported"]}
    if reported:
        lines.append("")
        lines += [
            f"{study} reported, on its own data and protocol: {text}"
            for study, text in reported.items()
        ]
    return "\n".join(lines) + "\n"


def by_value(rows: list[dict[str, Any]], column: str) -> str:
    """Each value of `column` (speaker) under every row's protocol, and the gap first to last,
    as a markdown table."""
    values = sorted({v for r in rows for v in r["by"].get(column, {})})
    metric = rows[0]["metric"]
    head = [column, "clips", *(r["run"] for r in rows)]
    gap = len(rows) == 2
    lines = [
        "| " + " | ".join([*head, *(["gap"] if gap else [])]) + " |",
        "|" + "---|" * (len(head) + gap),
    ]
    for value in values:
        cells = [r["by"].get(column, {}).get(value) for r in rows]
        scores = [f"{c[metric]:.3f}" if c else "-" for c in cells]
        clips = next((c["n"] for c in cells if c), "-")
        diff = [f"{cells[1][metric] - cells[0][metric]:+.3f}" if all(cells) else "-"] if gap else []
        lines.append(f"| {value} | {clips} | " + " | ".join([*scores, *diff]) + " |")
    return "\n".join(lines) + "\n"


def write_cards(
    rows: list[dict[str, Any]],
    runs: list[Run],
    pipelines: Path,
    text: str,
    common: dict[str, Any] | None = None,
) -> None:
    """A model card for each compared run (not registered: a comparison is not a release) with
    `text`, the side-by-side table, as its own section: written to `<folder>/model_card.md`
    and logged on the run's MLflow parent run beside `protocols.md`."""
    from mlflow.tracking import MlflowClient

    from tympan.evaluation.card import CardInputs, model_card

    tracking.connect()
    client = MlflowClient()
    for r, run in zip(rows, runs, strict=True):
        d = Path(r["folder"])
        source = f"{pipelines / run.preset}.yaml"
        overrides = {**(common or {}), **run.overrides}
        params = overridden(load_params(source), overrides, f"{source} + overrides")
        record = read_optional(d / "models" / "train.json")
        tags = client.get_run(r["mlflow_run"]).data.tags
        card = model_card(
            CardInputs(
                name=params.register.name,
                version="",
                alias="",
                reason=f"none: a `compare-protocols` run ({r['run']}), never registered",
                preset=params.preset,
                metric=r["metric"],
                tags=tags,
                split=read_optional(d / "split.json"),
                test_set=read_optional(d / "test_set.json"),
                results=read_optional(d / "metrics" / "test.json"),
                classes=read_optional(d / "metrics" / "classes.json"),
                breakdown=read_optional(d / "metrics" / "breakdown.json"),
                params=record.get("params", {}),
                tuning=record.get("tuning", {}),
                comparison=text,
            )
        )
        (d / "model_card.md").write_text(card)
        client.log_text(r["mlflow_run"], card, "model_card.md")
        client.log_text(r["mlflow_run"], text, "protocols.md")
        client.set_tag(r["mlflow_run"], "tympan.compared_as", r["run"])


def log_table(rows: list[dict[str, Any]], text: str, experiment: str, name: str) -> str:
    """The table as an MLflow run of its own (artifacts protocols.md and .json, tagged with
    every compared run's id); -> its run id."""
    tracking.setup(experiment)
    tags = {
        "tympan.stage": "compare-protocols",
        "git.commit": tracking.git_commit(),
        **{f"tympan.compared.{i}": r["mlflow_run"] for i, r in enumerate(rows)},
    }
    with mlflow.start_run(run_name=name, tags=tags) as run:
        for r in rows:
            key = _slug(f"{r['study']}_{r['run']}")
            mlflow.log_metrics({f"{key}.ensemble": r["ensemble"], f"{key}.seed_std": r["seed_std"]})
        mlflow.log_text(text, "protocols.md")
        mlflow.log_text(json.dumps(rows, indent=2), "protocols.json")
        return run.info.run_id


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text).strip("_")
