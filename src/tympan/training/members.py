"""The train stage's members (one per seed, or per CV fold and seed), one at a time in this
process or `train.processes` at a time in worker processes.

Members are independent: each has its own seed, fold, checkpoint and MLflow child run, so they
spread over processes with nothing to average (data-parallel training of one member is
torchrun's job). A worker is a spawned process (not forked: the parent holds an MLflow run,
a database connection and torch's thread pools) with `cpu_count // processes` torch threads;
it opens the feature cache itself, logs its member's child run under the parent run, and sends
back the weights and history. Results come back in plan order, so the bundle, `train.json` and
`history.csv` list members as a one-process run does; a member's numbers can differ from a
one-process run's in the last float digits only (another torch thread count, another
summation order).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import torch
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from tympan import tracking
from tympan.config import Params
from tympan.features import FeatureCache, open_cache
from tympan.training.distributed import Rank
from tympan.training.loop import EpochLog, SeedResult, fit


@dataclass
class MemberJob:
    """What one member trains on and where it logs: `fold` None without CV."""

    name: str
    seed: int
    fold: int | None
    params: Params  # the fold's own params (nested CV: its tuned values applied)
    tags: dict[str, str]
    logged_params: dict
    checkpoint: Path
    desc: str
    aggregate: str


@dataclass
class Member:
    """A trained member: its weights (on CPU), history and MLflow child run."""

    name: str
    seed: int
    fold: int | None
    run_id: str
    state: dict[str, torch.Tensor]
    history: list[EpochLog] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    resumed_at: int = 0
    side_vocab: tuple[str, ...] | None = None

    @property
    def best(self) -> EpochLog:
        return self.history[self.best_epoch - 1]


def train_member(
    job: MemberJob,
    cache: FeatureCache,
    device: torch.device,
    inputs: list,
    system: bool | None,
    experiment_id: str,
    parent_run_id: str,
    rank: Rank | None = None,
) -> Member:
    """Fit one member in a child run of `parent_run_id`: params, per-epoch metrics (the epochs
    restored from its checkpoint included), its best epoch's scores. `rank`: rank 0 under
    torchrun (the other ranks train the member through `follow_member`)."""
    with mlflow.start_run(
        experiment_id=experiment_id,
        run_name=job.name if job.fold is not None else f"seed-{job.seed}",
        nested=True,
        tags={**job.tags, MLFLOW_PARENT_RUN_ID: parent_run_id},
        log_system_metrics=system,
    ) as child:
        tracking.log_datasets(inputs)
        mlflow.log_params(job.logged_params)
        result = _fit(
            job,
            cache,
            device,
            rank,
            on_epoch=lambda e: mlflow.log_metrics(tracking.finite(e.flat()), step=e.epoch),
            desc=job.desc,
        )
        if result.resumed_at:
            mlflow.set_tag("tympan.resumed_at_epoch", str(result.resumed_at))
            print(f"train: {job.name} resumed from its epoch-{result.resumed_at} checkpoint")
        best = result.history[result.best_epoch - 1]
        mlflow.log_metrics(
            tracking.finite(
                {
                    "best_epoch": result.best_epoch,
                    "best_val_loss": best.val_loss,
                    **{f"best_{k}": v for k, v in best.val.items()},
                }
            )
        )
        return Member(
            name=job.name,
            seed=job.seed,
            fold=job.fold,
            run_id=child.info.run_id,
            state={k: v.detach().cpu() for k, v in result.model.state_dict().items()},
            history=result.history,
            best_epoch=result.best_epoch,
            stopped_early=result.stopped_early,
            resumed_at=result.resumed_at,
            side_vocab=result.model.side_vocab,
        )


def follow_member(job: MemberJob, cache: FeatureCache, device: torch.device, rank: Rank) -> None:
    """Train `job` as a rank other than 0 under torchrun: its share of every batch, no
    MLflow run, no output (rank 0 logs and keeps the member)."""
    _fit(job, cache, device, rank, progress=False)


def _fit(
    job: MemberJob, cache: FeatureCache, device: torch.device, rank: Rank | None, **shown
) -> SeedResult:
    """`fit` with the job's params, seed, checkpoint and aggregation; `shown`: on_epoch,
    desc, progress."""
    return fit(
        cache,
        job.params.model,
        job.params.train,
        job.seed,
        device,
        augment=job.params.augment,
        checkpoint=job.checkpoint,
        fingerprint=job.name,
        aggregate=job.aggregate,
        rank=rank,
        **shown,
    )


def process_count(processes: int, members: int, device: torch.device) -> int:
    """Worker processes for `members`: `train.processes` (0: one per CPU), at most one per
    member; 1 (this process) on CUDA, where one process already keeps the device busy."""
    if device.type == "cuda":
        return 1
    wanted = processes or (os.cpu_count() or 1)
    return max(1, min(wanted, members))


def train_members(
    jobs: list[MemberJob],
    features: Path,
    cache_for: Callable[[int | None], FeatureCache],
    device: torch.device,
    processes: int,
    inputs: list,
    system: bool | None,
    experiment_id: str,
    parent_run_id: str,
    rank: Rank | None = None,
) -> Iterator[Member]:
    """Train `jobs` and yield their members in plan order: in this process when `processes`
    is 1, else in that many spawned workers, each with its share of the CPU's threads.

    A failed member ends the run with its error (members still running finish; none not
    started starts); every finished epoch is in its checkpoint, so a re-run resumes. Under
    torchrun (`rank`: rank 0) members train one after the other, each over every rank."""
    if processes <= 1 or rank is not None:
        for job in jobs:
            yield train_member(
                job,
                cache_for(job.fold),
                device,
                inputs,
                system,
                experiment_id,
                parent_run_id,
                rank,
            )
        return
    threads = max(1, (os.cpu_count() or 1) // processes)
    print(f"train: {len(jobs)} members, {processes} at a time ({threads} torch thread(s) each)")
    with ProcessPoolExecutor(
        processes,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(str(features), threads, tracking.tracking_uri()),
    ) as pool:
        futures: list[Future[Member]] = [
            pool.submit(_worker_member, job, device, inputs, system, experiment_id, parent_run_id)
            for job in jobs
        ]
        try:
            for future in futures:
                yield future.result()
        finally:
            for future in futures:
                future.cancel()


_worker_cache: FeatureCache | None = None


def _start_worker(features: str, threads: int, uri: str) -> None:
    global _worker_cache
    torch.set_num_threads(threads)
    os.environ.pop("MLFLOW_RUN_ID", None)  # members are children of the parent run, not it
    mlflow.set_tracking_uri(uri)
    _worker_cache = open_cache(Path(features))


def _worker_member(
    job: MemberJob,
    device: torch.device,
    inputs: list,
    system: bool | None,
    experiment_id: str,
    parent_run_id: str,
) -> Member:
    assert _worker_cache is not None
    cache = _worker_cache if job.fold is None else _worker_cache.for_fold(job.fold)
    return train_member(job, cache, device, inputs, system, experiment_id, parent_run_id)
