"""The pipeline stages: each reads its inputs, calls the library, writes its outputs.

`tympan <stage>` (cli.py) parses paths and calls one function here; dvc.yaml says which paths
and which params each stage gets. Stages that track (train, evaluate, register) share one
MLflow parent run per `train` invocation, whose id travels in `models/train.json`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import statistics
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from tympan import tracking
from tympan.config import ConfigError, Params, flatten, masked, to_dict
from tympan.data import demo
from tympan.data.ingest import audio_profile, describe, feature_fit, ingest
from tympan.data.manifest import read_manifest, read_table
from tympan.data.splits import (
    breakdown_values,
    content_check,
    similar_line,
    split_manifest,
    split_report,
    tuning_protocol,
    with_copies,
)
from tympan.evaluation.card import protocol_lines
from tympan.evaluation.plots import learning_curves
from tympan.features import FeatureCache, build_cache, open_cache
from tympan.features.cache import StackedFeatures
from tympan.serving.bundle import Predictor, save_bundle
from tympan.training import distributed, predict, resolve_device
from tympan.training.loop import task_for
from tympan.training.members import MemberJob, follow_member, process_count, train_members
from tympan.training.used import used_params

if TYPE_CHECKING:
    from tympan.tuning.best import Tuned

log = logging.getLogger(__name__)

BUNDLE = "bundle.pt"
TRAIN_RECORD = "train.json"
HISTORY = "history.csv"
CURVES = "learning_curves.png"


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def run_demo(params: Params, out: Path) -> None:
    demo.generate(params.demo, out)


def run_ingest(params: Params, manifest: Path, rejects: Path, summary: Path) -> None:
    table, rejected = ingest(params.data, manifest, rejects, summary)
    print(
        f"ingest: {len(table)} recordings accepted, {len(rejected)} rejected ({rejects}); "
        f"{describe(audio_profile(table))}"
    )


def run_split(
    params: Params, manifest: Path, out: Path, report: Path, fingerprints: Path | None = None
) -> None:
    table = read_manifest(manifest)
    # params the manifest cannot meet fail here, before the content check reads any audio
    splits = split_manifest(table, params.split, params.cv)
    breakdown_values(table.merge(splits, on="path"), params.evaluate.breakdown, manifest)
    table, similar = content_check(table, params.split, fingerprints)
    if similar is not None and similar.merged:
        splits = split_manifest(table, params.split, params.cv)
    table = table.merge(splits, on="path", validate="one_to_one")
    # raises LeakageError or SplitError before anything is written (unless the study's own
    # protocol declares that leak, which the report then records)
    checked = split_report(table, params.split, params.cv, params.protocol, params.copies, similar)
    checked["breakdown_values"] = breakdown_values(table, params.evaluate.breakdown, manifest)
    checked["tuning"] = tuning_protocol(params.tune.enabled, params.cv)
    out.parent.mkdir(parents=True, exist_ok=True)
    splits.to_csv(out, index=False)
    _write_json(report, checked)
    for line in protocol_lines(checked["protocol"]):
        log.warning(line)
        print(f"split: {line}")
    print(f"split: {checked['tuning']['text']}")
    if params.cv.enabled:
        print(
            f"split ({params.split.strategy}, {params.cv.folds}-fold CV): test recordings per "
            f"fold {[f['recordings']['test'] for f in checked['folds']]}; no group or file in "
            "two splits of any fold, none in two test folds"
        )
    else:
        leaked = checked["checks"]["groups_in_two_splits"]
        print(
            f"split ({params.split.strategy}): recordings {checked['recordings']}, "
            f"groups {checked['groups']}; "
            + (
                f"{leaked} group(s) in two splits ON PURPOSE (protocol.leaks), no file in two"
                if leaked
                else "no group or file in two splits"
            )
        )
    if similar is not None:
        print(f"split: {similar_line(checked['similar'], similar)}")
        section = checked["similar"]
        if any(section.get("pairs_in_two_splits_per_fold", [section["pairs_in_two_splits"]])):
            log.warning(
                "split: recordings that sound the same are in two splits (%s, similar."
                "in_two_splits); split.similar: merge keeps each pair in one group, fail stops",
                report,
            )


def run_featurize(params: Params, manifest: Path, splits: Path, out: Path) -> None:
    assignment = read_table(splits, ("path", "split"))  # with CV also cv_fold and split_<k>
    table = read_manifest(manifest).merge(assignment, on="path", how="left", validate="one_to_one")
    if table["split"].isna().any():
        missing = table.loc[table["split"].isna(), "path"].iloc[0]
        raise ValueError(f"{splits}: no split for {missing}; re-run the split stage")
    cfg = params.features
    for warning in feature_fit(table, cfg.seconds, cfg.sample_rate, params.segment.enabled):
        log.warning("featurize: %s", warning)
    table = with_copies(table, params.copies, params.protocol)
    whole_set = params.protocol.allows("whole_set_statistics")
    cache = build_cache(
        table,
        params.features,
        out,
        params.segment,
        keep_waves=params.augment.waveform,
        copies=params.copies,
        whole_set_statistics=whole_set,
    )
    if "copy" in table.columns:
        made = table[table["copy"] > 0]
        leaked = int((made["copy_of_split"] != "train").sum())
        print(
            f"featurize: {len(made)} fixed augmented copies ({len(params.copies.recipes)} "
            f"recipe(s)) join the train split"
            + (f"; LEAK: {leaked} of them copy val or test clips" if leaked else "")
        )
    if whole_set:
        print("featurize: LEAK: normalisation statistics over the whole set, test included")
    if params.features.duration_quantile is not None:
        print(
            f"featurize: clip length {cache.feature_config.seconds} s, the "
            f"{params.features.duration_quantile:g} quantile of the train split's durations"
        )
    print(
        f"featurize: {cache.features.shape} {cache.features.dtype} from {len(table)} recordings "
        f"-> {out} "
        f"(key {cache.meta['key']}, stats from {len(cache.rows('train'))} train clips)"
    )


def _tuned(
    params: Params, tuned: Path | None, folds: list[int]
) -> tuple[Params, Tuned, dict[int, Params]]:
    """Params with the tune stage's best values applied over them, each one printed with the
    params file's value it replaces (a param in tune.space is the search's). Under nested CV
    (`folds`, a best-params file per fold) the params stay as they are and each fold's own
    params come third: `{fold: params with that fold's values}`."""
    from tympan.tuning.best import Tuned, apply_tuned, read_best_params

    if tuned is None:
        return params, Tuned(), {}
    found = read_best_params(tuned)
    if found.folds or (folds and found.values):
        return params, found, _tuned_per_fold(params, found, folds, tuned)
    params, lines = apply_tuned(params, found, tuned)
    if not lines:
        print(f"train: {tuned} sets nothing (tuning off); the params file alone")
        return params, found, {}
    print(
        f"train: {len(lines)} param(s) from {tuned} ({found.describe()}) override the params "
        "file: the search owns every param in tune.space"
    )
    for line in lines:
        print(f"  {line}")
    first = sorted(found.values)[0]
    print(
        "  to train with the params file's value, take it out of the search: "
        f"dvc exp run -S '~tune.space.{first}'"
    )
    return params, found, {}


def _tuned_per_fold(
    params: Params, found: Tuned, folds: list[int], source: Path
) -> dict[int, Params]:
    """Nested CV: each fold's params with its own study's best values over them."""
    from tympan.tuning.best import apply_tuned

    if not folds:
        raise ConfigError(
            f"{source} holds tuned values per CV fold (nested CV), but the features have no CV "
            "folds; re-run the tune stage (dvc repro tune)"
        )
    if not found.folds:
        raise ConfigError(
            f"{source} holds one set of tuned values ({found.describe()}), but the features "
            f"have {len(folds)} CV folds: values tuned on one fold's split would be scored on "
            "folds whose test recordings they were tuned on; re-run the tune stage, which tunes "
            "each fold on its own (nested CV)"
        )
    if sorted(found.folds) != sorted(folds):
        raise ConfigError(
            f"{source} was tuned for CV folds {sorted(found.folds)}, the features have "
            f"{sorted(folds)}; re-run the tune stage (dvc repro tune)"
        )
    print(
        f"train: nested CV: each fold's members take their own fold's best values from "
        f"{source}, tuned without its test recordings (the search owns every param in "
        "tune.space)"
    )
    per_fold = {}
    for fold in sorted(folds):
        per_fold[fold], lines = apply_tuned(params, found.folds[fold], source)
        print(f"  fold {fold} ({found.folds[fold].describe()}):")
        for line in lines:
            print(f"    {line}")
    return per_fold


def _tuning_record(tuning: Tuned) -> dict:
    """How the values train used were tuned (`protocol`: none, val_split or nested_cv), with
    the study and trial, or each fold's study, trial and values."""
    if tuning.folds:
        return {
            "protocol": "nested_cv",
            "per_fold": {
                str(k): {"study": t.study, "trial": t.trial, "values": t.values}
                for k, t in sorted(tuning.folds.items())
            },
        }
    if tuning.values:
        return {"protocol": "val_split", "study": tuning.study, "trial": tuning.trial}
    return {"protocol": "none"}


def run_train(
    params: Params, features: Path, manifest: Path, out: Path, tuned: Path | None = None
) -> None:
    cache = open_cache(features)
    rank, device = distributed.start(resolve_device(params.train.device))
    try:
        _train(params, cache, features, manifest, out, tuned, device, rank)
    finally:
        distributed.stop()


def _train(
    params: Params,
    cache: FeatureCache,
    features: Path,
    manifest: Path,
    out: Path,
    tuned: Path | None,
    device: torch.device,
    rank: distributed.Rank | None,
) -> None:
    """The train stage on this process's `device`; under torchrun (`rank`) rank 0 does what
    a lone process does and the other ranks only train (see `distributed`)."""
    leader = rank is None or rank.leader
    # rank 0 alone says what tuning set
    with contextlib.nullcontext() if leader else contextlib.redirect_stdout(io.StringIO()):
        params, tuning, per_fold = _tuned(params, tuned, cache.folds)
    # the clip length featurize used (`features.duration_quantile` sets it from the data)
    params = replace(
        params, features=replace(params.features, seconds=cache.feature_config.seconds)
    )
    world = 1 if rank is None else rank.world
    checkpoints = _checkpoint_dir(
        params, cache, {k: t.values for k, t in tuning.folds.items()}, world
    )
    # without CV one member per seed, named by the seed; with CV one per fold and seed
    plan = {None: cache} if not cache.folds else {k: cache.for_fold(k) for k in cache.folds}
    if not leader:  # the other ranks train each member beside rank 0: no tags, runs, outputs
        for job in _member_jobs(params, plan, per_fold, tuning, {}, checkpoints):
            follow_member(job, plan[job.fold], device, rank)
        return
    tags = tracking.run_tags(
        "train",
        params.preset,
        {"data": Path(params.data.root), "manifest": manifest, "features": features},
    )
    tags["device"] = tracking.device_name(device)
    tags["tympan.protocol"] = params.protocol.kind
    if params.protocol.leaks:
        tags["tympan.leaks"] = ",".join(params.protocol.leaks)
    tags["tympan.tuning"] = _tuning_record(tuning)["protocol"]
    if "encoder" in cache.meta:  # embedding features: the pretrained encoder that made them
        tags["tympan.encoder"] = cache.meta["encoder"]["source"]
        tags["tympan.encoder_sha256"] = cache.meta["encoder"]["hash"]
    if params.model.name == "finetune":  # the pretrained weights fine-tuning starts from
        from tympan.features.stack import encoder_for

        start = encoder_for(params.features.stack.encoder)
        tags["tympan.encoder"] = start.source
        tags["tympan.encoder_sha256"] = start.weights_hash
        tags["tympan.encoder_finetuned"] = "true"
    if tuning.values:  # the study as the dashboard names it, and what it set
        tags.update(
            {
                "optuna.study": str(tuning.study),
                "optuna.best_trial": str(tuning.trial),
                "tympan.tuned_params": ", ".join(sorted(tuning.values)),
            }
        )
    elif tuning.folds:  # nested CV: each fold's study; its members are tagged with their own
        tags.update(
            {
                "optuna.study": ", ".join(str(t.study) for _, t in sorted(tuning.folds.items())),
                "optuna.best_trial": "; ".join(
                    f"fold {k}: {t.trial}" for k, t in sorted(tuning.folds.items())
                ),
                "tympan.tuned_params": ", ".join(tuning.names) + " (per fold)",
            }
        )
    tags["tympan.checkpoints"] = checkpoints.name
    if rank is not None:
        tags["tympan.world_size"] = str(world)
        print(
            f"train: data-parallel over {world} ranks ({distributed.backend()}), "
            f"global batch {params.train.batch_size} x {world}"
        )
    jobs = _member_jobs(params, plan, per_fold, tuning, tags, checkpoints)
    history: list[dict] = []
    record: dict = {
        "seeds": {},
        "tuned": tuning.values,
        "tuning": _tuning_record(tuning),
        "seconds": params.features.seconds,
    }
    members: dict[str, dict[str, torch.Tensor]] = {}
    task = task_for(params.train, cache.labels, params.model.classical)
    primary = "val_accuracy" if task.kind == "classification" else "val_mae"
    out.mkdir(parents=True, exist_ok=True)
    experiment_id = tracking.setup(params.tracking.experiment)
    if checkpoints.exists():  # an interrupted run of the same params: it is resumed below
        for run_id in tracking.end_stale_runs(experiment_id, tags["tympan.checkpoints"]):
            print(f"train: MLflow run {run_id} of the interrupted run marked KILLED")
    system = tracking.system_metrics(device.type == "cuda")
    inputs = tracking.datasets(
        manifest,
        read_manifest(manifest),
        features,
        tuple(cache.features.shape),
        str(cache.features.dtype),
    )
    with mlflow.start_run(
        run_name=tracking.run_name(f"train-{params.preset}"), tags=tags, log_system_metrics=system
    ) as parent:
        tracking.log_datasets(inputs)
        used = used_params(params, device.type == "cuda")
        for name in tuning.names if tuning.folds else ():  # nested CV: no one value is used
            section, key = name.split(".", 1)
            if key in used.get(section, {}):
                used[section][key] = tuning.per_fold(name)
        mlflow.log_params(flatten(used))
        mlflow.log_params(
            {
                "n_train": len(cache.rows("train")),
                "n_val": len(cache.rows("val")),
                "n_classes": len(cache.labels),
                "feature_key": cache.meta["key"],
                "cv_folds": len(cache.folds),
                "task": task.kind,
                "criterion": task.criterion,
                **({"world_size": world} if rank is not None else {}),
            }
        )
        record.update(parent_run_id=parent.info.run_id, experiment_id=parent.info.experiment_id)
        processes = process_count(params.train.processes, len(jobs), device)
        side_vocab = None
        for member in train_members(
            jobs,
            features,
            plan.__getitem__,
            device,
            processes,
            inputs,
            system,
            parent.info.experiment_id,
            parent.info.run_id,
            rank,
        ):
            best = member.best
            history += [
                {
                    "member": member.name,
                    "seed": member.seed,
                    "fold": member.fold,
                    "epoch": e.epoch,
                    **e.flat(),
                }
                for e in member.history
            ]
            members[member.name] = member.state
            side_vocab = member.side_vocab
            record["seeds"][member.name] = {
                "run_id": member.run_id,
                "seed": member.seed,
                "fold": member.fold,
                "best_epoch": member.best_epoch,
                "epochs_run": len(member.history),
                "stopped_early": member.stopped_early,
                "val_loss": best.val_loss,
                **best.val,
                **(
                    {"tuned": tuning.folds[member.fold].values}
                    if member.fold is not None and member.fold in tuning.folds
                    else {}
                ),
            }
        values = [s[primary] for s in record["seeds"].values()]
        mlflow.log_metrics(
            {
                f"{primary}_mean": statistics.fmean(values),
                f"{primary}_std": statistics.pstdev(values),
            }
        )
        save_bundle(
            out / BUNDLE,
            params.features,
            params.model,
            cache.labels,
            tuple(cache.features.shape[1:]),
            cache.mean,
            cache.std,
            members,
            params.segment,
            side_vocab,
            task.head,
            _encoder_export(params, cache),
        )
        pd.DataFrame(history).to_csv(out / HISTORY, index=False)
        learning_curves(pd.DataFrame(history), out / CURVES)
        mlflow.log_artifact(str(out / CURVES), "plots")
        mlflow.log_artifact(str(out / HISTORY), "plots")
    record.update(
        task=task.kind,
        criterion=task.criterion,
        head=task.head,
        primary=primary,
        params=used,
        world_size=world,
    )
    _write_json(out / TRAIN_RECORD, record)
    shutil.rmtree(checkpoints, ignore_errors=True)  # the bundle holds the result now
    shape = (
        f"{len(cache.folds)} folds x {len(params.train.seeds)} seeds"
        if cache.folds
        else "one per seed"
    )
    print(
        f"train: {len(members)} members ({shape}) on {device}; {primary.replace('_', ' ')} "
        f"{statistics.fmean(values):.4f} +- {statistics.pstdev(values):.4f} over the members; "
        f"MLflow run {record['parent_run_id']}"
    )


def _member_jobs(
    params: Params,
    plan: dict[int | None, FeatureCache],
    per_fold: dict[int, Params],
    tuning: Tuned,
    tags: dict[str, str],
    checkpoints: Path,
) -> list[MemberJob]:
    """The train stage's members, in plan order: without CV one per seed, named by the seed;
    with CV one per fold and seed (nested CV: each fold with its own tuned values)."""
    jobs: list[MemberJob] = []
    n_members = len(plan) * len(params.train.seeds)
    for fold, fold_cache in plan.items():
        for seed in params.train.seeds:
            name = str(seed) if fold is None else f"fold{fold}-seed{seed}"
            which = f"seed {seed}" if fold is None else f"fold {fold}, seed {seed}"
            member_tags = {**tags, "tympan.seed": str(seed)}
            if fold is not None:
                member_tags["tympan.fold"] = str(fold)
            # nested CV: the fold's own tuned values, from its own study
            fold_tuned = tuning.folds.get(fold) if fold is not None else None
            if fold_tuned is not None:
                member_tags.update(
                    {
                        "optuna.study": str(fold_tuned.study),
                        "optuna.best_trial": str(fold_tuned.trial),
                    }
                )
            logged = {
                "seed": seed,
                "n_train": len(fold_cache.rows("train")),
                "n_val": len(fold_cache.rows("val")),
                **({"fold": fold} if fold is not None else {}),
                **(fold_tuned.values if fold_tuned is not None else {}),
            }
            jobs.append(
                MemberJob(
                    name=name,
                    seed=seed,
                    fold=fold,
                    params=per_fold.get(fold, params) if fold is not None else params,
                    tags=member_tags,
                    logged_params=logged,
                    checkpoint=checkpoints / f"{name}.pt",
                    desc=f"train member {len(jobs) + 1} of {n_members} ({which})",
                    aggregate=params.segment.aggregate,
                )
            )
    return jobs


def _encoder_export(params: Params, cache: FeatureCache) -> dict | None:
    """Embedding features: the encoder that made them, for the bundle (a served model computes
    what featurize computed with its own copy of the weights). It must be the one featurize
    used: the weights hash in the cache's metadata. A fine-tuned encoder: its architecture
    and extractor settings only (the members' state dicts hold the trained weights)."""
    from tympan.features.stack import encoder_for

    if params.model.name == "finetune":
        return encoder_for(params.features.stack.encoder).export(weights=False)
    if "embedding" not in params.features.stack.kinds:
        return None
    encoder = encoder_for(params.features.stack.encoder)
    made = cache.meta.get("encoder", {})
    if encoder.weights_hash != made.get("hash"):
        raise ConfigError(
            f"the encoder {encoder.source} hashes to {encoder.weights_hash[:16]}, but the "
            f"features were computed with {made.get('source')} ({str(made.get('hash'))[:16]}): "
            "its weights changed since featurize; re-run featurize (dvc repro)"
        )
    return encoder.export()


def _checkpoint_dir(
    params: Params, cache: FeatureCache, per_fold: dict[int, dict] | None = None, world: int = 1
) -> Path:
    """Where this run's per-epoch checkpoints live: outside the stage's DVC outputs (which
    `dvc repro` deletes before running it), keyed by everything that shapes the run, so a
    killed run's checkpoints are picked up by the same run only. `per_fold`: nested CV's
    tuned values per fold; `world`: ranks under torchrun (a rank's batch is another size)."""
    identity = {
        "features": cache.meta["key"],
        "folds": cache.folds,
        "splits": hashlib.sha256(
            cache.index[[c for c in cache.index.columns if c.startswith("split")]]
            .to_csv(index=False)
            .encode()
        ).hexdigest(),
        "model": to_dict(params.model),
        # how many members train at a time changes no member: a run killed under one count
        # resumes under another
        "train": {k: v for k, v in to_dict(params.train).items() if k != "processes"},
        "augment": to_dict(params.augment),
    }
    if per_fold:
        identity["tuned_per_fold"] = {str(k): v for k, v in per_fold.items()}
    if world > 1:
        identity["world_size"] = world
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    return (
        Path(os.environ.get("TYMPAN_CHECKPOINTS", ".tympan/checkpoints")) / digest.hexdigest()[:16]
    )


def run_tune(
    params: Params,
    features: Path,
    out: Path | None,
    trials: Path | None,
    summary: Path | None = None,
    worker: bool = False,
    wait_s: float = 0.0,
) -> None:
    """The tune stage (writes `out`, `trials` and `summary`) or a worker on a shared study
    (writes nothing). Under CV the search is nested: one study per outer fold, each on its
    fold's own train/val split (`tympan.tuning.study`); a worker works every fold's queue."""
    from tympan.tuning.report import write_disabled, write_outputs
    from tympan.tuning.space import validate_nested_space, validate_space
    from tympan.tuning.study import (
        TuneError,
        fold_rows,
        fold_study_name,
        make_objective,
        open_storage,
        open_study,
        parent_run,
        splits_digest,
        storage_source,
        storage_url,
        study_name,
        top_up,
        wait_for_queue,
        wait_for_study,
        work,
    )

    if not params.tune.enabled:
        if worker:
            raise TuneError(
                "tune.enabled is false in the params file: there is no study to work on"
            )
        write_disabled(out, trials, summary)
        print(f"tune: disabled (tune.enabled: false); train uses the params file as it is ({out})")
        return
    validate_space(params)
    if params.model.classical:
        raise TuneError(
            f"model.name={params.model.name} is a scikit-learn baseline: tune searches the "
            "epoch-by-epoch training of the neural families (set tune.enabled: false)"
        )
    cache = open_cache(features)
    if cache.folds:
        validate_nested_space(params, len(cache.folds))
        name = study_name(params, cache.meta["key"], splits_digest(cache))
        plan = [(k, cache.for_fold(k), fold_study_name(name, k)) for k in cache.folds]
    else:
        plan = [(None, cache, study_name(params, cache.meta["key"]))]
    storage = open_storage(params, worker=worker)
    studies = {fold: open_study(params, storage, name) for fold, _, name in plan}
    device = resolve_device(params.train.device)
    if cache.folds and not worker:
        runs = len(plan) * params.tune.n_trials * len(params.tune.seeds)
        print(
            f"tune: nested CV over {len(plan)} outer folds: one study per fold, whose trials "
            f"train on that fold's train rows and are scored on its val rows; its test fold "
            f"never reaches a trial. Cost: {len(plan)} x {params.tune.n_trials} trials x "
            f"{len(params.tune.seeds)} seed(s) = {runs} seed runs, {len(plan)} times the "
            "search without CV"
        )
    objectives = {}
    for fold, fold_cache, _ in plan:
        study = studies[fold]
        if worker:
            wait_for_queue(study, wait_s)
        else:
            added = top_up(study, params)
            print(
                f"tune: study {study.study_name} in {masked(storage_url(params.tune))} (from "
                f"{storage_source(params.tune)}), {added} trial(s) queued, "
                f"{params.tune.n_trials} in all; searching {', '.join(params.tune.dimensions)} "
                "(train takes their values from the best trial, not from the params file)"
                + (
                    f"; fold {fold}: trains on {len(fold_cache.rows('train'))} rows, validates "
                    f"on {len(fold_cache.rows('val'))}, never sees its "
                    f"{len(fold_cache.rows('test'))} test rows"
                    if fold is not None
                    else ""
                )
            )
        rows = fold_rows(fold_cache, fold) if fold is not None else None
        parent = parent_run(study, params, rows)
        objectives[fold] = make_objective(params, fold_cache, device, parent, fold)
        if worker:
            work(study, objectives[fold], params.tune.timeout_s)
            print(f"tune worker: queue of {study.study_name} is empty")
    if worker:
        return
    for fold, study in studies.items():
        wait_for_study(
            study,
            objectives[fold],
            params.tune.timeout_s,
            poll_s=max(1.0, params.tune.heartbeat_s / 4),
        )
    best = write_outputs(studies, params, out, trials, summary)
    if not cache.folds:
        print(
            f"tune: best trial {best['best_trial']} {best['metric']} {best['value']:.4f} "
            f"+- {best['seed_std']:.4f} with {best['params']}; {best['trials']}, "
            f"{best['epochs_trained']} seed-epochs -> {out}"
        )
        return
    for fold, one in best["folds"].items():
        print(
            f"tune: fold {fold}: best trial {one['best_trial']} {best['metric']} "
            f"{one['value']:.4f} +- {one['seed_std']:.4f} with {one['params']}"
        )
    print(
        f"tune: nested CV, {len(best['folds'])} folds: best {best['metric']} "
        f"{best['value']:.4f} +- {best['fold_std']:.4f} over folds; {best['trials']}, "
        f"{best['epochs_trained']} seed-epochs -> {out} (each fold's own values)"
    )


def run_evaluate(
    params: Params, features: Path, models: Path, metrics: Path, plots: Path, test_set: Path
) -> None:
    """Score the test split with every seed and the ensemble; write `metrics/` and `plots/`,
    and the test set's fingerprint (what register compares before promoting)."""
    from tympan.evaluation.card import fingerprint
    from tympan.evaluation.report import (
        HeldOut,
        classification_report,
        per_recording,
        regression_report,
    )
    from tympan.training.loop import regression_targets

    cache = open_cache(features)
    record = json.loads((models / TRAIN_RECORD).read_text())
    predictor = Predictor.load(models / BUNDLE)
    head = predictor.head
    device = torch.device("cpu")
    side = cache.side_codes(predictor.side_vocab) if predictor.side_vocab else None
    members = dict(zip(record["seeds"], predictor.members, strict=True))
    aggregate = params.segment.aggregate
    regression = head == "identity"
    positive = None if regression else params.evaluate.positive_class
    if cache.folds:
        rows, per_seed_probs, per_member, cv = _score_folds(
            cache, record, members, side, aggregate, head, positive
        )
    else:
        rows = cache.rows("test")
        per_seed_probs = {
            name: predict(member, cache.features, rows, 256, device, side, head)
            for name, member in members.items()
        }
        if "window" in cache.index.columns:  # segmented: score recordings, not windows
            first, per_seed_probs = per_recording(
                cache.index.iloc[rows], per_seed_probs, aggregate, head != "identity"
            )
            rows = rows[first]
        per_member, cv = None, None
    test = HeldOut(
        index=cache.index.iloc[rows].reset_index(drop=True),
        targets=(regression_targets(cache) if regression else cache.targets())[rows],
        labels=cache.labels,
        features=RowsOf(cache.features, rows),  # read only for the worst-k spectrograms
        hop_s=params.features.hop_length / params.features.sample_rate,
    )
    report = regression_report if regression else classification_report
    outputs = {k: v[:, 0] for k, v in per_seed_probs.items()} if regression else per_seed_probs
    results = report(
        test,
        outputs,
        params.register.metric,
        params.evaluate.breakdown,
        params.evaluate.worst_k,
        metrics,
        plots,
        members=per_member,
        extra=cv,
        **({} if regression else {"positive": positive}),
    )
    shutil.copyfile(models / CURVES, plots / CURVES)  # drawn by train from the same history
    held_out = fingerprint(test.index)
    _write_json(test_set, held_out)
    ensemble, mean, std = results["ensemble"], results["seed_mean"], results["seed_std"]

    # run again on the same models (DVC without its run-cache, `dvc repro -f`), evaluate
    # logs nothing twice: each metric's history gains a point only when its value changed
    tracking.connect()
    for seed, values in results["seeds"].items():
        run_id = record["seeds"][seed]["run_id"]
        tracking.log_metrics_once(run_id, {f"test_{k}": v for k, v in values.items()})
    tracking.log_metrics_once(
        record["parent_run_id"],
        {
            **{f"test_{k}": v for k, v in ensemble.items()},
            **{f"test_seed_mean_{k}": v for k, v in mean.items()},
            **{f"test_seed_std_{k}": v for k, v in std.items()},
        },
    )
    with mlflow.start_run(run_id=record["parent_run_id"]):
        mlflow.log_artifacts(str(metrics), "metrics")
        mlflow.log_artifacts(str(plots), "plots")
        mlflow.log_artifact(str(test_set), "metrics")
        mlflow.set_tag("tympan.test_set", held_out["hash"])
    shown = "mae" if regression else "accuracy"
    if cache.folds:
        ensemble_of = (
            f"out-of-fold ensemble of {len(members)} members "
            f"({len(cache.folds)} folds x {len(members) // len(cache.folds)} seeds)"
        )
        spread_over = "per member (fold x seed)"
    else:
        ensemble_of, spread_over = f"ensemble of {len(members)} seeds", "per seed"
    print(
        f"evaluate: test {shown} {ensemble[shown]:.4f} ({ensemble_of}), {spread_over} "
        f"{mean[shown]:.4f} +- {std[shown]:.4f}, on {len(rows)} clips; "
        f"worst {params.evaluate.worst_k} in {plots / 'worst.csv'}"
    )


class RowsOf:
    """`features[rows[i]]` on demand: the scored clips' inputs without reading them all."""

    def __init__(self, features: StackedFeatures, rows: np.ndarray) -> None:
        self.features, self.rows = features, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.features[int(self.rows[i])]


def _score_folds(
    cache: FeatureCache,
    record: dict,
    members: dict[str, torch.nn.Module],
    side: np.ndarray | None,
    aggregate: str,
    head: str = "softmax",
    positive: str | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, dict], dict]:
    """Score each fold's test split with that fold's members (windows combined per
    recording when segmented). -> the scored rows (every recording once, in index order),
    out-of-fold probabilities per seed `(recordings, n_classes)` (each recording scored by its
    own fold's member of that seed), metrics per member on its fold's test split, and the
    per-fold ensemble metrics."""
    from tympan.evaluation.metrics import classification_metrics, regression_metrics
    from tympan.evaluation.report import per_recording, positive_index
    from tympan.training.loop import regression_targets

    device = torch.device("cpu")
    regression = head == "identity"
    targets = regression_targets(cache) if regression else cache.targets()
    n_classes = 1 if regression else len(cache.labels)
    pos = None if regression else positive_index(cache.labels, positive)

    def score(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
        if regression:
            return regression_metrics(y, p[:, 0])
        return classification_metrics(y, p, pos)

    oof: dict[str, dict[int, np.ndarray]] = {}
    per_member: dict[str, dict] = {}
    per_fold: dict[str, dict] = {}
    for fold in cache.folds:
        rows = cache.for_fold(fold).rows("test")
        names = [n for n, info in record["seeds"].items() if info["fold"] == fold]
        if not names:
            raise ValueError(f"no trained member for CV fold {fold}: re-run the train stage")
        probs = {n: predict(members[n], cache.features, rows, 256, device, side) for n in names}
        if "window" in cache.index.columns:
            first, probs = per_recording(cache.index.iloc[rows], probs, aggregate)
            rows = rows[first]
        for name, p in probs.items():
            per_member[name] = classification_metrics(targets[rows], p, pos)
            seed = str(record["seeds"][name]["seed"])
            oof.setdefault(seed, {}).update(zip(rows.tolist(), p, strict=True))
        per_fold[str(fold)] = score(targets[rows], np.mean(list(probs.values()), axis=0))
    scored = np.array(sorted(next(iter(oof.values()))), dtype=np.int64)
    per_seed = {}
    for seed, by_row in oof.items():
        if sorted(by_row) != scored.tolist():
            raise ValueError(f"seed {seed} did not score every fold: re-run the train stage")
        per_seed[seed] = np.stack([by_row[r] for r in scored]).reshape(-1, n_classes)
    cv = {"cv": {"folds": len(cache.folds), "scoring": "out of fold", "per_fold": per_fold}}
    return scored, per_seed, per_member, cv


def run_register(
    params: Params,
    models: Path,
    metrics: Path,
    split: Path,
    test_set: Path,
    out: Path,
    card: Path,
) -> None:
    """Log and register the pyfunc; `@champion` on evidence (same test set, better by more than
    `register.min_delta`), else `@challenger`; tags, reason and model card on the version.

    Idempotent: a model already registered under `register.name` with the same bundle (weights,
    statistics, labels, params) and the same test set is not logged or registered again."""
    from mlflow.models import validate_serving_input
    from mlflow.models.utils import load_serving_example

    from tympan.evaluation.card import CardInputs, model_card, promotion
    from tympan.serving.bundle import bundle_digest
    from tympan.serving.pyfunc import log_audio_model
    from tympan.tuning.space import apply_overrides

    cfg = params.register
    record = json.loads((models / TRAIN_RECORD).read_text())
    results = json.loads((metrics / "test.json").read_text())
    held_out = json.loads(test_set.read_text())
    if cfg.metric not in results["ensemble"]:
        raise ConfigError(
            f"register.metric={cfg.metric!r} is not among the test metrics "
            f"({', '.join(results['ensemble'])}) in {metrics / 'test.json'}"
        )
    if record.get("tuned"):  # the card shows what was trained: the tuned values included
        params = apply_overrides(params, record["tuned"], source=str(models / TRAIN_RECORD))
    value = results["ensemble"][cfg.metric]
    spread = results["seed_std"][cfg.metric]
    tracking.connect()
    client = MlflowClient()
    digest = bundle_digest(models / BUNDLE)
    existing = _registered(client, cfg.name, digest, held_out["hash"])
    if existing is not None:
        _keep_registered(client, existing, digest, held_out, out, card)
        return
    with mlflow.start_run(run_id=record["parent_run_id"]) as run:
        info = log_audio_model(models / BUNDLE, params.features.sample_rate)
        tags = dict(run.data.tags)
    # The example logged with the model must go through the scoring path as a server gets it.
    with warnings.catch_warnings():
        # Deprecated in MLflow 3.13 in favour of mlflow.models.predict, which needs a fresh
        # environment; this check stays in-process on purpose.
        warnings.simplefilter("ignore", FutureWarning)
        validate_serving_input(info.model_uri, load_serving_example(info.model_uri))

    version = tracking.register_model(info.model_uri, cfg.name)
    version_tags = {
        "git.commit": tags.get("git.commit", "unknown"),
        "dvc.data": tags.get("dvc.data", "unknown"),
        "dvc.manifest": tags.get("dvc.manifest", "unknown"),
        "dvc.features": tags.get("dvc.features", "unknown"),
        "tympan.preset": params.preset,
        "tympan.bundle": digest,
        "tympan.test_set": held_out["hash"],
        "tympan.metric": cfg.metric,
        f"test_{cfg.metric}": repr(value),  # exact: the next version is compared against it
        f"test_{cfg.metric}_seed_mean": repr(results["seed_mean"][cfg.metric]),
        f"test_{cfg.metric}_seed_std": repr(spread),
        "tympan.protocol": params.protocol.kind,
        **({"tympan.leaks": ",".join(params.protocol.leaks)} if params.protocol.leaks else {}),
        "tympan.tuning": record.get("tuning", {}).get(
            "protocol", "val_split" if record.get("tuned") else "none"
        ),
        # embedding features: the registry names the encoder the model carries
        **{
            k: tags[k]
            for k in ("tympan.encoder", "tympan.encoder_sha256", "tympan.encoder_finetuned")
            if k in tags
        },
    }
    for key, tag in version_tags.items():
        client.set_model_version_tag(cfg.name, version, key, tag)

    original = params.protocol.leaks if params.protocol.kind == "original" else None

    def beats(one: dict[str, str], other: dict[str, str]) -> bool:
        """Does version `one` (its tags) take @champion from `other` by the promotion rule?"""
        mine = float(one.get(f"test_{cfg.metric}", "nan"))
        test = one.get("tympan.test_set", "")
        return promotion(cfg.metric, mine, test, other, cfg.min_delta)[0] == "champion"

    alias, reason = tracking.promote(
        client,
        cfg.name,
        version,
        lambda champion: promotion(
            cfg.metric, value, held_out["hash"], champion, cfg.min_delta, original
        ),
        beats,
    )
    client.set_model_version_tag(cfg.name, version, "tympan.promotion", reason)

    metric_files = {name: metrics / f"{name}.json" for name in ("classes", "breakdown")}
    text = model_card(
        CardInputs(
            name=cfg.name,
            version=version,
            alias=alias,
            reason=reason,
            preset=params.preset,
            metric=cfg.metric,
            tags=version_tags,
            split=json.loads(split.read_text()),
            test_set=held_out,
            results=results,
            classes=read_optional(metric_files["classes"]),
            breakdown=read_optional(metric_files["breakdown"]),
            params=record["params"],  # what trained the model, tuned values included
            tuning=record.get("tuning", {}),
        )
    )
    card.parent.mkdir(parents=True, exist_ok=True)
    card.write_text(text)
    client.log_text(record["parent_run_id"], text, "model_card.md")
    client.update_model_version(cfg.name, version, description=text)
    log.info("model card: %s (also the description of %s v%s)", card, cfg.name, version)
    result = {
        "name": cfg.name,
        "version": int(version),
        "alias": alias,
        "reason": reason,
        "metric": cfg.metric,
        "value": value,
        "seed_std": spread,
        "test_set": held_out["hash"],
        "model_uri": f"models:/{cfg.name}/{version}",
        "run_id": record["parent_run_id"],
        "experiment_id": record["experiment_id"],
        "tracking_uri": tracking.tracking_uri(),
        "new_version": True,
    }
    _write_json(out, result)
    print(f"register: {cfg.name} v{version} -> @{alias} ({reason})")


def _registered(client: MlflowClient, name: str, bundle: str, test_set: str) -> ModelVersion | None:
    """The first version of `name` holding this bundle, tested on this test set; else None."""
    found = client.search_model_versions(f"name = '{name}' and tags.`tympan.bundle` = '{bundle}'")
    same = [v for v in found if v.tags.get("tympan.test_set") == test_set]
    if not same:
        return None
    first = min(same, key=lambda v: int(v.version))
    return client.get_model_version(name, first.version)  # search results carry no aliases


def _keep_registered(
    client: MlflowClient,
    version: ModelVersion,
    bundle: str,
    held_out: dict,
    out: Path,
    card: Path,
) -> None:
    """The register stage's outputs for a model that is already a version: its card and
    record, and a line that says no version was added."""
    aliases = sorted(version.aliases)
    metric = version.tags.get("tympan.metric", "")
    card.parent.mkdir(parents=True, exist_ok=True)
    card.write_text(version.description or "")
    result = {
        "name": version.name,
        "version": int(version.version),
        "alias": aliases[0] if aliases else None,
        "reason": version.tags.get("tympan.promotion", ""),
        "metric": metric,
        "value": float(version.tags.get(f"test_{metric}", "nan")),
        "seed_std": float(version.tags.get(f"test_{metric}_seed_std", "nan")),
        "test_set": held_out["hash"],
        "model_uri": f"models:/{version.name}/{version.version}",
        "run_id": version.run_id,
        "tracking_uri": tracking.tracking_uri(),
        "new_version": False,
    }
    _write_json(out, result)
    held = ", ".join(f"@{a}" for a in aliases) or "no alias"
    print(
        f"register: {version.name} v{version.version} ({held}) already holds this model "
        f"(bundle sha256 {bundle[:12]}) tested on the same test set "
        f"({held_out['hash'][:12]}); no new version, aliases unchanged"
    )


def read_optional(path: Path) -> dict:
    """A pipeline output's JSON, {} when the stage did not write it."""
    return json.loads(path.read_text()) if path.exists() else {}
