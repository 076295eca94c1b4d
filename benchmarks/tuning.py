"""Tuning strategies against a grid, over many sampler seeds, through tympan's tune stage.

    PATH=.venv/bin:$PATH nice -n 10 python benchmarks/tuning.py --features data/features \\
        --jobs 2 --record bench-tuning.jsonl          # after `dvc repro`; --quick: a smoke run

The grids and the checking searches run through `stages.run_tune` (the same objective, seeds
in lockstep, storage and report code as `dvc repro`) on a cached feature set, each in its own
process with a temporary SQLite study and MLflow store (`--jobs` at a time, one torch thread
each). `--record` keeps every finished search (JSON lines) and reuses it when the same search
comes again; `--report-only` prints what a stopped run had finished.

1. S5's space. The grid is S5's hand search: dropout (0.3, 0.5, 0.7) x batch (16, 32) x
   epochs (10, 20), 12 points, no pruning. It is deterministic (its training seeds are fixed:
   `--seeds`, tune.seeds), so it runs once. Its best seed mean minus that trial's seed std is
   the target. A candidate strategy searches dropout x batch with epochs as the budget (every
   trial up to 20 epochs with early stopping; a pruner may not compare trials at unequal
   budgets) and stops at the target, at the grid's seed-epochs or after `--trials` trials.
   Such a trial trains exactly what the grid's 20-epoch point of the same dropout and batch
   trained, epoch by epoch, so each strategy is replayed for every `--sampler-seeds` seed from
   the grid's recorded seed means and epochs per seed, with tympan's own sampler and pruner
   (`make_sampler`, `make_pruner`) on a study of the stage's name: seconds, not hours. Two
   checks are printed: the grid's 10-epoch points against what its 20-epoch points reported
   at epoch 10 (determinism), and the `--real-seeds` searches, run through the stage, against
   their replays trial by trial. Printed per strategy: seed-epochs to the target, as a share
   of the grid's (median and min-max over sampler seeds; a seed that never got there counts
   as "never"), trials and pruned trials to it, and wall time for the searches that ran.
2. A wide space, where a grid is hopeless: lr log-uniform in [1e-4, 3e-3], dropout in
   [0.1, 0.6], batch (16, 32, 64) and epochs 1-4 (short, so that 81 trials fit a 2-core
   machine; pruner none, as epochs is a dimension; one training seed, `--wide-seeds`). The
   grid takes 3 points per axis, 81 (lr 1e-4, 5.5e-4, 3e-3; dropout 0.1, 0.35, 0.6; epochs
   1, 2, 4); TPE gets the grid's seed-epochs, once per `--wide-sampler-seeds` seed. Printed:
   the best value each found, TPE's median and min-max.

A search that stops early does so through the stage: the benchmark wraps the objective so that
a queued trial started once the search is done is pruned at once (user attr `bench.skipped`,
no epochs). A figure, not a test: nothing here asserts a time. The measured table and the
command that made it are in README.md ("Tuning (Optuna)").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

S5_GRID_EPOCHS = (10, 20)
STRATEGIES = {  # label -> tune.sampler, tune.pruner
    "tpe+median": ("tpe", "median"),
    "tpe+hyperband": ("tpe", "hyperband"),
    "tpe+sha": ("tpe", "sha"),
    "random+sha": ("random", "sha"),
    # each point once, in an order shuffled by the sampler seed (the stage's grid queue)
    "grid+none": ("grid", "none"),
    "grid+median": ("grid", "median"),
    "grid+sha": ("grid", "sha"),
    "grid+hyperband": ("grid", "hyperband"),
}
DEFAULT_STRATEGIES = (
    "tpe+median",
    "tpe+hyperband",
    "tpe+sha",
    "grid+none",
    "grid+median",
    "grid+hyperband",
)
WIDE_LR = (1e-4, 3e-3)
WIDE_DROPOUT = (0.1, 0.6)
WIDE_BATCH = (16, 32, 64)


def search_params(base, job: dict[str, Any], sampler: str, pruner: str, sampler_seed: int):
    """`base` with `job`'s training sizes and a tune section for one benchmark search."""
    return replace(
        base,
        train=replace(base.train, **job["train"]),
        tune=replace(
            base.tune,
            enabled=True,
            seeds=tuple(job["seeds"]),
            metric="val_accuracy",
            sampler=sampler,
            pruner=pruner,
            sampler_seed=sampler_seed,
            n_trials=job["n_trials"],
            space=job["space"],
            study_name="bench",
        ),
    )


def s5_spaces(grid_epochs: tuple[int, int]) -> tuple[dict, dict]:
    """S5's grid (epochs a dimension) and the candidates' space (epochs the budget)."""
    from tympan.config import SearchParam

    pruned = {
        "model": {"dropout": SearchParam("categorical", choices=(0.3, 0.5, 0.7))},
        "train": {"batch_size": SearchParam("categorical", choices=(16, 32))},
    }
    grid = {
        "model": pruned["model"],
        "train": {
            **pruned["train"],
            "epochs": SearchParam("categorical", choices=grid_epochs),
        },
    }
    return grid, pruned


def wide_spaces(epochs: tuple[int, ...], points: int) -> tuple[dict, dict]:
    """The wide space (continuous lr and dropout, batch, epochs) and its grid, `points` per
    axis: the ends and evenly between (lr on a log scale)."""
    from tympan.config import SearchParam

    def even(low: float, high: float, log: bool = False) -> tuple[float, ...]:
        if log:
            ratio = (high / low) ** (1 / (points - 1))
            return tuple(float(f"{low * ratio**i:.3g}") for i in range(points))
        return tuple(round(low + (high - low) * i / (points - 1), 4) for i in range(points))

    batches = WIDE_BATCH if points == 3 else WIDE_BATCH[:: len(WIDE_BATCH) - 1][:points]
    space = {
        "model": {"dropout": SearchParam("float", *WIDE_DROPOUT)},
        "train": {
            "lr": SearchParam("float", *WIDE_LR, log=True),
            "batch_size": SearchParam("categorical", choices=WIDE_BATCH),
            "epochs": SearchParam("int", min(epochs), max(epochs)),
        },
    }
    grid = {
        "model": {"dropout": SearchParam("categorical", choices=even(*WIDE_DROPOUT))},
        "train": {
            "lr": SearchParam("categorical", choices=even(*WIDE_LR, log=True)),
            "batch_size": SearchParam("categorical", choices=batches),
            "epochs": SearchParam("categorical", choices=tuple(epochs)),
        },
    }
    return space, grid


# ---------------------------------------------------------------------------- one search


@contextmanager
def stop_when_done(goal: dict[str, Any]) -> Iterator[None]:
    """Wrap the tune stage's objective: once the study has reached `goal["target"]` (a complete
    trial at least that good) or spent `goal["budget"]` seed-epochs, every further queued trial
    is pruned before it trains (user attr `bench.skipped`)."""
    import optuna
    from optuna.trial import TrialState

    from tympan.tuning import study as study_module

    real = study_module.make_objective
    target, budget = goal.get("target"), goal.get("budget")

    def done(study: optuna.Study) -> bool:
        finished = study.get_trials(
            deepcopy=False,
            states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED),
        )
        spent = sum(int(t.user_attrs.get("epochs_trained", 0)) for t in finished)
        if budget is not None and spent >= budget:
            return True
        complete = (t for t in finished if t.state == TrialState.COMPLETE)
        return target is not None and any(t.value >= target for t in complete)

    def make_objective(*args: Any, **kwargs: Any):
        objective = real(*args, **kwargs)

        def wrapped(trial: optuna.Trial) -> float:
            if done(trial.study):
                trial.set_user_attr("bench.skipped", True)
                trial.set_user_attr("epochs_trained", 0)
                raise optuna.TrialPruned("benchmark: the search is done")
            return objective(trial)

        return wrapped

    study_module.make_objective = make_objective
    try:
        yield
    finally:
        study_module.make_objective = real


def search(job: dict[str, Any]) -> dict[str, Any]:
    """One search through `stages.run_tune` in a temporary store; -> its trials and wall time."""
    import optuna
    import torch

    from tympan import stages
    from tympan.config import load_params
    from tympan.features import open_cache
    from tympan.tuning.study import study_name

    torch.set_num_threads(job["threads"])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = load_params(Path(job["params"]))
    params = search_params(base, job, job["sampler"], job["pruner"], job["sampler_seed"])
    with tempfile.TemporaryDirectory(prefix="tympan-bench-") as tmp:
        workdir = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlruns.db'}"
        params = replace(params, tune=replace(params.tune, storage=f"sqlite:///{workdir / 'o.db'}"))
        features = Path(job["features"])
        start = time.perf_counter()
        with stop_when_done(job["goal"]):
            stages.run_tune(
                params, features, workdir / "best.yaml", workdir / "t.csv", workdir / "s.json"
            )
        wall = time.perf_counter() - start
        name = study_name(params, open_cache(features).meta["key"])
        study = optuna.load_study(study_name=name, storage=params.tune.storage)
        lengths = seed_epochs()
        trials = [
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "value": t.value,
                "seed_std": t.user_attrs.get("seed_std"),
                "epochs": int(t.user_attrs.get("epochs_trained", 0)),
                "skipped": bool(t.user_attrs.get("bench.skipped")),
                "params": t.params,
                # the seed mean reported at each epoch, and how many epochs each seed trained
                "reported": {str(k): v for k, v in sorted(t.intermediate_values.items())},
                "seed_epochs": lengths.get(t.number, []),
                "start": t.datetime_start.timestamp() if t.datetime_start else None,
                "end": t.datetime_complete.timestamp() if t.datetime_complete else None,
            }
            for t in sorted(study.trials, key=lambda t: t.number)
        ]
    return {"key": job["key"], "label": job["label"], "wall_s": wall, "trials": trials}


def seed_epochs() -> dict[int, list[int]]:
    """Trial number -> epochs trained by each of its seeds (in seed order), from the MLflow
    store: every seed's run logs val_loss once an epoch."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    ids = [e.experiment_id for e in client.search_experiments()]
    found: dict[int, dict[int, int]] = {}
    for run in client.search_runs(ids, "tags.`tympan.seed` != ''", max_results=50000):
        tags = run.data.tags
        history = client.get_metric_history(run.info.run_id, "val_loss")
        found.setdefault(int(tags["optuna.trial"]), {})[int(tags["tympan.seed"])] = len(history)
    return {trial: [n for _, n in sorted(seeds.items())] for trial, seeds in found.items()}


# ---------------------------------------------------------------------------- replay


def replay(
    grid: dict[str, Any], label: str, sampler_seed: int, job: dict[str, Any]
) -> dict[str, Any]:
    """Strategy `label` with `sampler_seed` on S5's space, its trials' training replayed from
    the grid's longest-epochs trials instead of run again.

    A candidate trial (dropout, batch, up to the grid's largest epochs, early stopping) trains
    exactly what the grid's point (dropout, batch, largest epochs) trained, same seeds, epoch
    by epoch (training is deterministic on the CPU; the run checks it on the grid's shorter
    points and on the real-stage searches). So the seed means it reports, where the pruner
    stops it and the seed-epochs it costs are read off that grid trial. The sampler and pruner
    are tympan's own (`make_sampler`, `make_pruner`), on a study of the stage's name, fed
    queued trials in the stage's order; only the training is skipped.
    """
    import optuna
    from optuna.trial import TrialState

    from tympan.config import load_params
    from tympan.features import open_cache
    from tympan.tuning.study import make_pruner, make_sampler, study_name, top_up

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = load_params(Path(job["params"]))
    sampler, pruner = STRATEGIES[label]
    params = search_params(base, job, sampler, pruner, sampler_seed)
    longest = max(t["params"]["train.epochs"] for t in grid["trials"])
    curves = {
        (t["params"]["model.dropout"], t["params"]["train.batch_size"]): t
        for t in grid["trials"]
        if t["params"]["train.epochs"] == longest
    }
    study = optuna.create_study(
        study_name=study_name(params, open_cache(Path(job["features"])).meta["key"]),
        sampler=make_sampler(params),
        pruner=make_pruner(params),
        direction="maximize",
    )
    queued = top_up(study, params)  # the stage's queue: n_trials, or the grid's points
    target, budget = job["goal"]["target"], job["goal"]["budget"]
    trials, used = [], 0
    for _ in range(queued):
        if used >= budget or any(t["state"] == "complete" and t["value"] >= target for t in trials):
            break
        trial = study.ask()
        point = (
            trial.suggest_categorical("model.dropout", [0.3, 0.5, 0.7]),
            trial.suggest_categorical("train.batch_size", [16, 32]),
        )
        source = curves[point]
        state, value, epochs = "complete", source["value"], sum(source["seed_epochs"])
        for step, mean in sorted((int(k), v) for k, v in source["reported"].items()):
            trial.report(mean, step)
            if trial.should_prune():
                state, value = "pruned", None
                epochs = sum(min(step, n) for n in source["seed_epochs"])
                break
        if state == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, value)
        used += epochs
        trials.append(
            {
                "number": trial.number,
                "state": state,
                "value": value,
                "seed_std": source["seed_std"] if state == "complete" else None,
                "epochs": epochs,
                "skipped": False,
                "params": dict(zip(("model.dropout", "train.batch_size"), point, strict=True)),
                "start": 0.0,
                "end": 0.0,
            }
        )
    return {"label": f"replay {label} {sampler_seed}", "wall_s": 0.0, "trials": trials}


def same_search(real: dict[str, Any], replayed: dict[str, Any]) -> bool:
    """The real stage's search and its replay tried the same points with the same outcome."""

    def steps(record: dict[str, Any]) -> list[tuple]:
        return [
            (
                t["params"],
                t["state"],
                t["epochs"],
                None if t["value"] is None else round(t["value"], 6),
            )
            for t in ran(record)
        ]

    return steps(real) == steps(replayed)


# ---------------------------------------------------------------------------- figures


def ran(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for t in record["trials"] if not t["skipped"]]


def spent(record: dict[str, Any]) -> int:
    return sum(t["epochs"] for t in record["trials"])


def best(record: dict[str, Any]) -> dict[str, Any]:
    return max((t for t in record["trials"] if t["state"] == "complete"), key=lambda t: t["value"])


def reach(record: dict[str, Any], target: float) -> dict[str, Any] | None:
    """Seed-epochs, trials, pruned trials and seconds until the first complete trial at least
    `target` (trials in the order they ran); None if none was."""
    trials = ran(record)
    used = 0
    for i, trial in enumerate(trials):
        used += trial["epochs"]
        if trial["state"] == "complete" and trial["value"] >= target:
            return {
                "epochs": used,
                "trials": i + 1,
                "pruned": sum(t["state"] == "pruned" for t in trials[: i + 1]),
                "seconds": trial["end"] - trials[0]["start"],
            }
    return None


def spread(values: list[float], fmt: str) -> str:
    """Median [min-max]; infinity (a search that never reached the target) reads "never"."""
    if not values:
        return "-"

    def show(value: float) -> str:
        return "never" if value == float("inf") else format(value, fmt)

    return f"{show(statistics.median(values))} [{show(min(values))}-{show(max(values))}]"


def show_params(params: dict[str, Any]) -> str:
    return ", ".join(
        f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
        for k, v in params.items()
    )


# ---------------------------------------------------------------------------- the run


def job_key(job: dict[str, Any]) -> str:
    """What decides a search's result (its record is reused under `--record` when equal)."""
    fields = {k: v for k, v in job.items() if k not in ("key", "label", "threads")}
    text = json.dumps(fields, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Runner:
    """Runs searches in a process pool, `jobs` at a time, lowest priority number first; a
    search whose key is in `--record` is not run again: its record is reused."""

    def __init__(self, jobs: int, record: Path | None, report_only: bool = False) -> None:
        self.jobs, self.report_only = jobs, report_only
        self.pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
        self.record = record
        self.known: dict[str, dict[str, Any]] = {}
        if record is not None and record.exists():
            for line in record.read_text().splitlines():
                if line.strip():
                    entry = json.loads(line)
                    self.known[entry["key"]] = entry
        self.ready: list[tuple[int, int, dict[str, Any], Any]] = []
        self.running: dict[Future, Any] = {}

    def add(self, job: dict[str, Any], which: Any, priority: int) -> None:
        job["key"] = job_key(job)
        self.ready.append((priority, len(self.ready), job, which))
        self.ready.sort(key=lambda entry: entry[:2])

    def results(self) -> Iterator[tuple[Any, dict[str, Any]]]:
        """(which, record) as searches finish; `add` may be called in between."""
        while self.ready or self.running:
            while self.ready and (
                len(self.running) < self.jobs or self.ready[0][2]["key"] in self.known
            ):
                _, _, job, which = self.ready.pop(0)
                if job["key"] in self.known:
                    result = {**self.known[job["key"]], "reused": True}
                    self.keep(result)
                    yield which, result
                    continue
                if self.report_only:
                    print(f"  not in the record, not run: {job['label']}", flush=True)
                    continue
                self.running[self.pool.submit(search, job)] = which
            if not self.running:
                continue
            finished, _ = wait(list(self.running), return_when=FIRST_COMPLETED)
            for future in finished:
                which = self.running.pop(future)
                try:
                    result = future.result()
                except Exception as exc:  # one failed search must not lose the others' records
                    print(f"  FAILED: {which}: {exc!r}", flush=True)
                    continue
                self.keep(result)
                yield which, result
        self.pool.shutdown()

    def keep(self, result: dict[str, Any]) -> None:
        if self.record is not None and not result.get("reused"):
            with self.record.open("a") as out:
                out.write(json.dumps(result) + "\n")
        status = "reused" if result.get("reused") else f"{result['wall_s']:.0f} s"
        print(
            f"  done: {result['label']} ({len(ran(result))} trials, {spent(result)} "
            f"seed-epochs, {status})",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--features", type=Path, default=Path("data/features"))
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (tune.seeds)"
    )
    parser.add_argument(
        "--sampler-seeds",
        type=int,
        nargs="+",
        default=list(range(20)),
        help="S5's space: the sampler seeds replayed from the grid",
    )
    parser.add_argument(
        "--real-seeds",
        type=int,
        nargs="*",
        default=[0],
        help="S5's space: the sampler seeds also searched through the stage (checks the replay)",
    )
    parser.add_argument(
        "--strategies", nargs="+", choices=sorted(STRATEGIES), default=list(DEFAULT_STRATEGIES)
    )
    parser.add_argument(
        "--trials", type=int, default=24, help="at most this many trials per candidate search"
    )
    parser.add_argument(
        "--wide-seeds", type=int, nargs="+", default=[0], help="the wide space's training seeds"
    )
    parser.add_argument("--wide-sampler-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--no-wide", action="store_true", help="S5's space only")
    parser.add_argument("--no-s5", action="store_true", help="the wide space only")
    parser.add_argument("--jobs", type=int, default=1, help="searches at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per search")
    parser.add_argument(
        "--record", type=Path, help="JSON lines of finished searches: appended, and reused"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: report the searches found in --record (a stopped run's)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: one training seed, sampler seeds 0 1, S5 epochs (2, 4), wide space "
        "2 points per axis with epochs 1-2",
    )
    args = parser.parse_args()
    grid_epochs, wide_epochs, points = S5_GRID_EPOCHS, (1, 2, 4), 3
    if args.quick:
        args.seeds, args.sampler_seeds, args.wide_seeds = [0], [0, 1, 2, 3, 4], [0]
        args.wide_sampler_seeds = [0, 1]
        grid_epochs, wide_epochs, points = (2, 4), (1, 2), 2
    features, params = str(args.features.resolve()), str(args.params.resolve())
    common = {"features": features, "params": params, "threads": args.threads}
    s5_grid_space, s5_space = s5_spaces(grid_epochs)
    wide_space, wide_grid_space = wide_spaces(wide_epochs, points)
    n_grid = 3 * 2 * 2
    n_wide = points**4
    runner = Runner(args.jobs, args.record, args.report_only)
    wall_start = time.perf_counter()

    # S5's searches first (priority 0), the wide space's after (1)
    if not args.no_s5:
        runner.add(
            {
                **common,
                "label": "S5 grid",
                "seeds": args.seeds,
                "sampler": "grid",
                "pruner": "none",
                "sampler_seed": 0,
                "n_trials": n_grid,
                "space": s5_grid_space,
                "train": {},
                "goal": {},
            },
            ("s5-grid", None),
            0,
        )
    if not args.no_wide:
        runner.add(
            {
                **common,
                "label": "wide grid",
                "seeds": args.wide_seeds,
                "sampler": "grid",
                "pruner": "none",
                "sampler_seed": 0,
                "n_trials": n_wide,
                "space": wide_grid_space,
                "train": {},
                "goal": {},
            },
            ("wide-grid", None),
            1,
        )
    results: dict[tuple[str, Any], dict[str, Any]] = {}
    print(f"searches: {args.jobs} at a time, {args.threads} torch thread(s) each", flush=True)
    for which, result in runner.results():
        results[which] = result
        if which[0] == "s5-grid":
            top = best(result)
            goal = {"target": top["value"] - top["seed_std"], "budget": spent(result)}
            # every sampler seed replayed from the grid's curves (seconds), the --real-seeds
            # also through the stage, which checks the replay
            for seed in args.sampler_seeds:
                for label in args.strategies:
                    sampler, pruner = STRATEGIES[label]
                    job = {
                        **common,
                        "label": f"S5 {label} sampler seed {seed}",
                        "seeds": args.seeds,
                        "sampler": sampler,
                        "pruner": pruner,
                        "sampler_seed": seed,
                        "n_trials": args.trials,
                        "space": s5_space,
                        "train": {"epochs": max(grid_epochs)},
                        "goal": goal,
                    }
                    results[("replay", (label, seed))] = replay(result, label, seed, job)
                    if seed in args.real_seeds:
                        runner.add(job, ("s5", (label, seed)), 0)
        elif which[0] == "wide-grid":
            goal = {"budget": spent(result)}
            for seed in args.wide_sampler_seeds:
                job = {
                    **common,
                    "label": f"wide tpe sampler seed {seed}",
                    "seeds": args.wide_seeds,
                    "sampler": "tpe",
                    "pruner": "none",
                    "sampler_seed": seed,
                    # at least one seed-epoch a trial: the budget bounds the trials
                    "n_trials": spent(result) // len(args.wide_seeds) + 1,
                    "space": wide_space,
                    "train": {},
                    "goal": goal,
                }
                runner.add(job, ("wide", seed), 1)
    total = time.perf_counter() - wall_start
    report(args, results, grid_epochs, wide_epochs, points, total)


def report(args, results, grid_epochs, wide_epochs, points, total: float) -> None:
    from tympan.features import open_cache

    clips = open_cache(args.features).features.shape[0]
    print(
        f"\n{' '.join(sys.argv)}\nfeatures {args.features} ({clips} clips), training seeds "
        f"{args.seeds} (tune.seeds), sampler seeds {args.sampler_seeds}; wall {total:.0f} s "
        f"with {args.jobs} search(es) at a time"
    )
    if ("s5-grid", None) in results:
        report_s5(args, results, grid_epochs)
    if ("wide-grid", None) in results:
        report_wide(args, results, wide_epochs, points)


def report_s5(args, results, grid_epochs) -> None:
    grid = results[("s5-grid", None)]
    top = best(grid)
    target = top["value"] - top["seed_std"]
    budget = spent(grid)
    print(
        f"\n== S5's space: grid = dropout (0.3, 0.5, 0.7) x batch (16, 32) x epochs "
        f"{grid_epochs}, {len(ran(grid))} points, once (deterministic: its training seeds are "
        f"tune.seeds); candidates search dropout x batch, every trial up to "
        f"{max(grid_epochs)} epochs (early stopping), at most {args.trials} trials, stopped at "
        f"the target or at the grid's {budget} seed-epochs"
    )
    print(
        f"grid: {budget} seed-epochs, {grid['wall_s']:.0f} s; best {top['value']:.4f} +- "
        f"{top['seed_std']:.4f} ({show_params(top['params'])}); target (best - one seed-std) "
        f">= {target:.4f}"
    )
    longest = max(grid_epochs)
    curves = {
        (t["params"]["model.dropout"], t["params"]["train.batch_size"]): t
        for t in grid["trials"]
        if t["params"]["train.epochs"] == longest
    }
    gaps = [
        abs(
            t["value"]
            - curves[(t["params"]["model.dropout"], t["params"]["train.batch_size"])]["reported"][
                str(t["params"]["train.epochs"])
            ]
        )
        for t in grid["trials"]
        if t["params"]["train.epochs"] != longest
    ]
    print(
        f"determinism: the grid's {min(grid_epochs)}-epoch points vs the seed means its "
        f"{longest}-epoch points reported at epoch {min(grid_epochs)}: largest difference "
        f"{max(gaps):.2g}"
    )
    head = (
        f"{'strategy':<28}{'reached':>8}  {'seed-epochs to target':<24}{'% of grid':<18}"
        f"{'trials':<12}{'pruned':<12}{'wall s to target':<16}"
    )
    print(head)
    print("-" * len(head))
    per_seed = []

    def row(name: str, records: list[dict[str, Any]], wall: bool) -> None:
        hits = [reach(r, target) for r in records]
        got = [h for h in hits if h is not None]
        never = float("inf")
        epochs = [never if h is None else h["epochs"] for h in hits]
        seconds = [never if h is None else h["seconds"] for h in hits]
        print(
            f"{name:<28}{f'{len(got)}/{len(hits)}':>8}  "
            f"{spread(epochs, '.0f'):<24}"
            f"{spread([100 * e / budget for e in epochs], '.0f'):<18}"
            f"{spread([h['trials'] for h in got], '.0f'):<12}"
            f"{spread([h['pruned'] for h in got], '.0f'):<12}"
            f"{spread(seconds, '.0f') if wall else '(replayed)':<16}"
        )

    checks = []
    for label in args.strategies:
        records = [results[("replay", (label, seed))] for seed in args.sampler_seeds]
        row(f"{label} (seeds {args.sampler_seeds[0]}-{args.sampler_seeds[-1]})", records, False)
        real = [
            (seed, results[("s5", (label, seed))])
            for seed in args.real_seeds
            if ("s5", (label, seed)) in results
        ]
        if real:
            row(f"  through the stage: {[s for s, _ in real]}", [r for _, r in real], True)
        for seed, record in real:
            same = same_search(record, results[("replay", (label, seed))])
            checks.append(f"{label} seed {seed}: {'same' if same else 'DIFFERENT'}")
        hits = [reach(r, target) for r in records]
        per_seed.append(
            f"  {label:<15}"
            + ", ".join(
                f"{s}: {100 * h['epochs'] / budget:.0f}%" if h else f"{s}: never"
                for s, h in zip(args.sampler_seeds, hits, strict=True)
            )
        )
    print(
        "seed-epochs, % and wall: median [min-max] over all sampler seeds, a seed that never "
        "reached the target counting as 'never' (it spent the grid's seed-epochs or its trials);"
        " trials and pruned: over the seeds that reached it"
    )
    if checks:
        print("real stage vs replay, trial by trial: " + "; ".join(checks))
    print("share of the grid's seed-epochs to the target, by sampler seed:")
    print("\n".join(per_seed))


def report_wide(args, results, wide_epochs, points) -> None:
    wide = results[("wide-grid", None)]
    wtop = best(wide)
    _, wide_grid_space = wide_spaces(wide_epochs, points)
    axes = "; ".join(
        f"{name} {spec.choices}"
        for section in wide_grid_space.values()
        for name, spec in section.items()
    )
    print(
        f"\n== Wide space: lr log-uniform {WIDE_LR}, dropout {WIDE_DROPOUT}, batch "
        f"{WIDE_BATCH}, epochs {min(wide_epochs)}-{max(wide_epochs)}; training seeds "
        f"{args.wide_seeds}, no pruning (epochs is a dimension)\ngrid, {points} points per "
        f"axis ({axes}): {len(ran(wide))} trials\nTPE: the grid's seed-epochs, once per "
        "sampler seed"
    )
    head = f"{'search':<22}{'best val acc':<26}{'seed-epochs':<20}{'trials':<16}{'wall s':<16}"
    print(head)
    print("-" * len(head))
    print(
        f"{'grid':<22}{wtop['value']:<26.4f}{spent(wide):<20}{len(ran(wide)):<16}"
        f"{wide['wall_s']:<16.0f}"
    )
    args.wide_sampler_seeds = [s for s in args.wide_sampler_seeds if ("wide", s) in results]
    tpe = [results[("wide", seed)] for seed in args.wide_sampler_seeds]
    print(
        f"{'TPE (median [range])':<22}{spread([best(r)['value'] for r in tpe], '.4f'):<26}"
        f"{spread([spent(r) for r in tpe], '.0f'):<20}"
        f"{spread([len(ran(r)) for r in tpe], '.0f'):<16}"
        f"{spread([r['wall_s'] for r in tpe], '.0f'):<16}"
    )
    better = sum(best(r)["value"] > wtop["value"] for r in tpe)
    print(
        f"TPE beat the grid's best for {better} of {len(tpe)} sampler seeds\n"
        f"grid best: {show_params(wtop['params'])}"
    )
    for seed, r in zip(args.wide_sampler_seeds, tpe, strict=True):
        print(f"TPE seed {seed} best {best(r)['value']:.4f}: {show_params(best(r)['params'])}")


if __name__ == "__main__":
    main()
