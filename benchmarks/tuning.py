"""S5's hand search as an Optuna grid, against TPE with median pruning over the same values.

The grid searches epochs (10, 20) as S5 did; TPE with pruning may not (trials would be compared
at unequal budgets), so it runs every trial up to 20 epochs with early stopping instead.

    .venv/bin/python benchmarks/tuning.py --features data/features   # after `dvc repro`

Both run through tympan's tune stage (same objective, seeds in lockstep, same storage code)
on a cached feature set, in a temporary SQLite study and MLflow store. Printed: seed-epochs
trained, wall time, the best seed-mean validation accuracy of each, and how many seed-epochs
TPE + pruning needed to come within one seed-std of the grid's best (goal: at most 40% of
the grid's seed-epochs). A figure, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import optuna
from optuna.trial import TrialState

from tympan import stages
from tympan.config import SearchParam, load_params
from tympan.features import open_cache
from tympan.tuning.study import study_name

S5_SPACE = {
    "model": {"dropout": SearchParam("categorical", choices=(0.3, 0.5, 0.7))},
    "train": {
        "batch_size": SearchParam("categorical", choices=(16, 32)),
        "epochs": SearchParam("categorical", choices=(10, 20)),
    },
}
# With a pruner, epochs is the budget rather than a dimension (trials are compared epoch by
# epoch): TPE runs every trial up to the grid's largest, 20, with early stopping.
PRUNED_SPACE = {
    "model": S5_SPACE["model"],
    "train": {"batch_size": S5_SPACE["train"]["batch_size"]},
}
PRUNED_EPOCHS = 20


def run(params, features: Path, workdir: Path, **tune) -> tuple[optuna.Study, float]:
    params = replace(params, tune=replace(params.tune, **tune))
    start = time.perf_counter()
    stages.run_tune(
        params,
        features,
        workdir / f"{tune['study_name']}.yaml",
        workdir / f"{tune['study_name']}.csv",
        workdir / f"{tune['study_name']}.json",
    )
    elapsed = time.perf_counter() - start
    name = study_name(params, open_cache(features).meta["key"])
    return optuna.load_study(study_name=name, storage=params.tune.storage), elapsed


def epochs(trial: optuna.trial.FrozenTrial) -> int:
    return int(trial.user_attrs.get("epochs_trained", 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--features", type=Path, default=Path("data/features"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = load_params(args.params)
    with tempfile.TemporaryDirectory(prefix="tympan-bench-") as tmp:
        workdir = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlruns.db'}"
        common = {
            "enabled": True,
            "seeds": tuple(args.seeds),
            "metric": "val_accuracy",
            "storage": f"sqlite:///{workdir / 'optuna.db'}",
            "n_trials": 12,
            "sampler_seed": 0,
        }
        grid, grid_s = run(
            base,
            args.features,
            workdir,
            sampler="grid",
            pruner="none",
            study_name="grid",
            space=S5_SPACE,
            **common,
        )
        tpe, tpe_s = run(
            replace(base, train=replace(base.train, epochs=PRUNED_EPOCHS)),
            args.features,
            workdir,
            sampler="tpe",
            pruner="median",
            study_name="tpe",
            space=PRUNED_SPACE,
            **common,
        )

    grid_epochs = sum(epochs(t) for t in grid.trials)
    tpe_epochs = sum(epochs(t) for t in tpe.trials)
    best = grid.best_trial
    threshold = best.value - best.user_attrs["seed_std"]
    spent, reached = 0, None
    for trial in sorted(tpe.trials, key=lambda t: t.number):
        spent += epochs(trial)
        if trial.state == TrialState.COMPLETE and trial.value >= threshold:
            reached = spent
            break
    pruned = len(tpe.get_trials(states=(TrialState.PRUNED,)))
    print(
        f"\nS5 space (dropout x batch x epochs = 12 points; TPE: dropout x batch, up to "
        f"{PRUNED_EPOCHS} epochs with early stopping), seeds {args.seeds}, "
        f"features {args.features} ({open_cache(args.features).features.shape[0]} clips)"
    )
    print(
        f"{'search':<22}{'trials':>8}{'pruned':>8}{'seed-epochs':>13}{'wall s':>9}"
        f"{'best val acc (mean +- std)':>30}"
    )
    for name, study, seconds, n_pruned in (
        ("grid (S5, no pruning)", grid, grid_s, 0),
        ("TPE + median pruning", tpe, tpe_s, pruned),
    ):
        top = study.best_trial
        print(
            f"{name:<22}{len(study.trials):>8}{n_pruned:>8}"
            f"{sum(epochs(t) for t in study.trials):>13}{seconds:>9.0f}"
            f"{top.value:>22.4f} +- {top.user_attrs['seed_std']:.4f}"
        )
    print(f"grid best: {best.params}")
    print(f"TPE best:  {tpe.best_trial.params}")
    print(
        f"TPE / grid seed-epochs: {tpe_epochs / grid_epochs:.2f} "
        f"({tpe_epochs} / {grid_epochs}); wall time ratio {tpe_s / grid_s:.2f}"
    )
    if reached is None:
        print(f"TPE never came within one seed-std of the grid's best ({threshold:.4f})")
    else:
        print(
            f"seed-epochs for TPE to reach within one seed-std of the grid's best "
            f"(>= {threshold:.4f}): {reached} = {reached / grid_epochs:.0%} of the grid's "
            f"{grid_epochs} (goal <= 40%)"
        )


if __name__ == "__main__":
    main()
