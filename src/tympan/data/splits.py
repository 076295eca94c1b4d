"""Train/val/test splits that never let a group (or an identical file) straddle two splits."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from tympan.config import LEAKS, CopiesConfig, CVConfig, ProtocolConfig, SplitConfig

SPLITS = ("train", "val", "test")
# A fixed augmented copy's split where its clip is not in the train split: it is not used.
EXCLUDED = "excluded"


class SplitError(ValueError):
    """Split params that cannot be met by this manifest; the message names the param."""


class LeakageError(ValueError):
    """A group or an identical recording found in more than one split."""


def split_manifest(
    manifest: pd.DataFrame, cfg: SplitConfig, cv: CVConfig | None = None
) -> pd.DataFrame:
    """Assign each manifest row to train, val or test: -> table `path, split`.

    With `cv.enabled`: -> `path, cv_fold, split_0 .. split_{k-1}, split`, where `split_<k>` is the
    assignment when fold k is the test split and `split` repeats `split_0` (what the stages
    that use one split, such as tune, read).
    """
    if cv is not None and cv.enabled:
        return cv_folds(manifest, cfg, cv)
    if cfg.strategy == "predefined":
        split, _ = predefined(manifest, cfg)
    else:
        if not 0 < cfg.val < 1 or not 0 < cfg.test < 1 or cfg.val + cfg.test >= 1:
            raise SplitError(
                f"split.val={cfg.val} and split.test={cfg.test} must be in (0, 1) and sum below 1"
            )
        if cfg.strategy == "stratified":
            split = _stratified(manifest, cfg)
        else:
            split = _by_group(manifest, cfg)
    out = pd.DataFrame({"path": manifest["path"], "split": split})
    for name in SPLITS:
        if not (out["split"] == name).any():
            raise SplitError(
                f"split {name!r} is empty: {len(manifest)} recordings in "
                f"{manifest['group'].nunique()} groups are too few for "
                f"val={cfg.val}, test={cfg.test}"
            )
    return out


def _stratified(manifest: pd.DataFrame, cfg: SplitConfig) -> np.ndarray:
    labels = manifest["label"].to_numpy()
    idx = np.arange(len(manifest))
    counts = pd.Series(labels).value_counts()
    stratify = labels if counts.min() >= 3 else None
    rest, test = train_test_split(idx, test_size=cfg.test, random_state=cfg.seed, stratify=stratify)
    rest_labels = labels[rest] if stratify is not None else None
    train, val = train_test_split(
        rest, test_size=cfg.val / (1 - cfg.test), random_state=cfg.seed, stratify=rest_labels
    )
    split = np.empty(len(manifest), dtype=object)
    split[train], split[val], split[test] = "train", "val", "test"
    return split


def _by_group(manifest: pd.DataFrame, cfg: SplitConfig) -> np.ndarray:
    """Whole groups go to one split; groups are dealt per majority label to keep classes balanced.

    Within each label stratum, groups (shuffled by `cfg.seed`, larger first) go one at a time to
    the split furthest below its target share of that stratum's recordings.
    """
    target = {"train": 1 - cfg.val - cfg.test, "val": cfg.val, "test": cfg.test}
    return _deal_groups(manifest, target, cfg.seed)


def _deal_groups(manifest: pd.DataFrame, target: dict[str, float], seed: int) -> np.ndarray:
    """Deal whole groups to the splits in `target` (share of recordings per split)."""
    rng = np.random.default_rng(seed)
    names = [s for s in SPLITS if target.get(s, 0) > 0]
    sizes = manifest.groupby("group").size()
    majority = manifest.groupby("group")["label"].agg(lambda s: s.value_counts().index[0])
    assignment: dict[str, str] = {}
    for label in sorted(majority.unique()):
        groups = majority.index[majority == label].to_numpy()
        groups = groups[rng.permutation(len(groups))]
        groups = sorted(groups, key=lambda g: -sizes[g])
        filled = dict.fromkeys(names, 0)
        total = sizes[groups].sum()
        for group in groups:
            deficit = {s: target[s] * total - filled[s] for s in names}
            chosen = max(names, key=lambda s: (deficit[s], s == "train"))
            assignment[group] = chosen
            filled[chosen] += sizes[group]
    return manifest["group"].map(assignment).to_numpy()


def predefined(manifest: pd.DataFrame, cfg: SplitConfig) -> tuple[np.ndarray, list[str]]:
    """Splits from a fold column (ESC-50's official folds) -> (split per row, moved groups).

    Rows whose `cfg.column` value is in `test_values` are test, in `val_values` val, the rest
    train; without `val_values`, val is dealt by group from the train rows (share `cfg.val`).
    Groups spread over two splits by the folds move wholly to the most held-out of them.
    """
    if not cfg.column or not cfg.test_values:
        raise SplitError("split.strategy=predefined needs split.column and split.test_values")
    if cfg.column not in manifest.columns:
        raise SplitError(
            f"split.column={cfg.column!r} is not a manifest column "
            f"(available: {', '.join(manifest.columns)})"
        )
    values = manifest[cfg.column].astype(str).str.strip()
    known = set(values)
    for key in ("test_values", "val_values"):
        missing = [v for v in getattr(cfg, key) if v not in known]
        if missing:
            raise SplitError(
                f"split.{key}: {missing} not found in column {cfg.column!r} "
                f"(values: {', '.join(sorted(known))})"
            )
    split = np.full(len(manifest), "train", dtype=object)
    split[values.isin(cfg.test_values).to_numpy()] = "test"
    split[values.isin(cfg.val_values).to_numpy()] = "val"
    rank = {"train": 0, "val": 1, "test": 2}
    table = pd.DataFrame({"group": manifest["group"].to_numpy(), "split": split})
    spread = table.groupby("group")["split"].nunique()
    straddling = sorted(spread.index[spread > 1].tolist())
    if straddling and cfg.move_straddling:
        most_held_out = table.groupby("group")["split"].agg(lambda s: max(s, key=rank.get))
        split = table["group"].map(most_held_out).to_numpy().astype(object)
    if not cfg.val_values:
        rest = np.flatnonzero(split == "train")
        share = cfg.val / max(1e-9, len(rest) / len(manifest))
        if not 0 < share < 1:
            raise SplitError(f"split.val={cfg.val} leaves no train rows beside the folds")
        dealt = _deal_groups(manifest.iloc[rest], {"train": 1 - share, "val": share}, cfg.seed)
        split[rest] = dealt
    return split, straddling if cfg.move_straddling else []


def cv_folds(manifest: pd.DataFrame, cfg: SplitConfig, cv: CVConfig) -> pd.DataFrame:
    """k-fold assignment (see `split_manifest`): whole groups per fold, val dealt by group from
    each fold's training part."""
    if not 0 < cfg.val < 1 - 1 / cv.folds:
        raise SplitError(
            f"split.val={cfg.val} must be in (0, {1 - 1 / cv.folds:.3g}) with cv.folds={cv.folds}"
        )
    if cv.column is not None:
        fold = _column_folds(manifest, cv)
    else:
        groups = (
            manifest["path"] if cfg.strategy == "stratified" else manifest["group"]
        ).to_numpy()
        if len(set(groups)) < cv.folds:
            raise SplitError(
                f"cv.folds={cv.folds} needs at least {cv.folds} groups, "
                f"the manifest has {len(set(groups))}"
            )
        splitter = StratifiedGroupKFold(n_splits=cv.folds, shuffle=True, random_state=cfg.seed)
        fold = np.zeros(len(manifest), dtype=np.int64)
        labels = manifest["label"].to_numpy()
        for k, (_, test) in enumerate(splitter.split(np.zeros(len(groups)), labels, groups)):
            fold[test] = k
    out = pd.DataFrame({"path": manifest["path"].to_numpy(), "cv_fold": fold})
    for k in range(cv.folds):
        rest = np.flatnonzero(fold != k)
        share = cfg.val / (len(rest) / len(manifest))
        split = np.full(len(manifest), "test", dtype=object)
        split[rest] = _deal_groups(
            manifest.iloc[rest], {"train": 1 - share, "val": share}, cfg.seed + k
        )
        for name in SPLITS:
            if not (split == name).any():
                raise SplitError(
                    f"fold {k}: split {name!r} is empty; {manifest['group'].nunique()} groups "
                    f"are too few for cv.folds={cv.folds} and split.val={cfg.val}"
                )
        out[f"split_{k}"] = split
    out["split"] = out["split_0"]
    return out


def _column_folds(manifest: pd.DataFrame, cv: CVConfig) -> np.ndarray:
    """Fold numbers 0..k-1 from the values of `cv.column` (sorted, numerically when they are
    numbers); a group spread over folds moves wholly to the fold holding most of it."""
    if cv.column not in manifest.columns:
        raise SplitError(
            f"cv.column={cv.column!r} is not a manifest column "
            f"(available: {', '.join(manifest.columns)})"
        )
    values = manifest[cv.column].astype(str).str.strip()
    distinct = sorted(values.unique(), key=lambda v: (not _is_number(v), _number(v), v))
    if len(distinct) != cv.folds:
        raise SplitError(
            f"cv.folds={cv.folds} but column {cv.column!r} has {len(distinct)} values "
            f"({', '.join(distinct)})"
        )
    fold = values.map({v: k for k, v in enumerate(distinct)}).to_numpy()
    table = pd.DataFrame({"group": manifest["group"].to_numpy(), "fold": fold})
    home = table.groupby("group")["fold"].agg(lambda f: f.value_counts().sort_index().idxmax())
    return table["group"].map(home).to_numpy().astype(np.int64)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _number(text: str) -> float:
    return float(text) if _is_number(text) else 0.0


def split_columns(table: pd.DataFrame) -> list[str]:
    """`split` and, with CV, every fold's `split_<k>`."""
    return [c for c in table.columns if c == "split" or re.fullmatch(r"split_\d+", c)]


def with_copies(
    table: pd.DataFrame, copies: CopiesConfig, protocol: ProtocolConfig
) -> pd.DataFrame:
    """`table` (manifest joined with its splits) plus one row per clip and copy recipe: the
    clip's row with `copy` = k (1-based; the recordings themselves get 0) and `copy_of_split`
    = the clip's own split. Without recipes, `table` as it is.

    A copy is in the train split wherever its clip is, and nowhere else: a copy of a val or
    test clip is `excluded` (never used), so it cannot join training. Only a study's original
    protocol that declares `augmented_test_copies` puts every copy in training (S4 augmented
    the whole set before splitting it); `ProtocolConfig` refuses that leak in any other run.
    """
    if not copies.recipes:
        return table
    table = table.assign(copy=0)
    leak = protocol.allows("augmented_test_copies")
    columns = split_columns(table)
    frames = [table]
    for k in range(1, len(copies.recipes) + 1):
        made = table.assign(copy=k, copy_of_split=table["split"])
        for column in columns:
            source = made[column].to_numpy()
            made[column] = np.where((source == "train") | leak, "train", EXCLUDED)
        used = (made[columns] != EXCLUDED).any(axis=1)
        frames.append(made[used])
    out = pd.concat(frames, ignore_index=True)
    out["copy_of_split"] = out["copy_of_split"].fillna("")
    return out


def check_leakage(table: pd.DataFrame, allow_groups: bool = False) -> dict:
    """Fail if any group or sha256 appears in two splits; return what was checked.

    `table` has at least `path, group, split, sha256`. `allow_groups` (a study's original
    protocol declaring `group_in_two_splits`) counts the groups in two splits instead of
    failing on them; identical files in two splits fail always.
    """
    found: dict[str, list[str]] = {}
    for key in ("group", "sha256"):
        spread = table.groupby(key)["split"].nunique()
        leaked = spread.index[spread > 1].tolist()
        if leaked:
            found[key] = leaked
    if "sha256" in found or ("group" in found and not allow_groups):
        parts = [
            f"{len(v)} {k} value(s) in more than one split, e.g. {v[:3]}" for k, v in found.items()
        ]
        raise LeakageError("leakage: " + "; ".join(parts))
    return {
        "groups_checked": int(table["group"].nunique()),
        "sha256_checked": int(table["sha256"].nunique()),
        "groups_in_two_splits": len(found.get("group", [])),
        "identical_files_in_two_splits": 0,
    }


def group_leak(table: pd.DataFrame) -> dict:
    """How far groups straddle splits in `table` (`group, split`): the groups in two splits
    (with examples) and the val and test recordings whose group is also in train."""
    spread = table.groupby("group")["split"].nunique()
    leaked = spread.index[spread > 1].tolist()
    in_train = set(table.loc[table["split"] == "train", "group"])
    shared = {
        name: int(((table["split"] == name) & table["group"].isin(in_train)).sum())
        for name in ("val", "test")
    }
    return {
        "groups_in_two_splits": len(leaked),
        "groups": int(table["group"].nunique()),
        "examples": [str(g) for g in leaked[:5]],
        "val_recordings_with_group_in_train": shared["val"],
        "test_recordings_with_group_in_train": shared["test"],
        "test_recordings": int((table["split"] == "test").sum()),
    }


def protocol_report(
    table: pd.DataFrame,
    protocol: ProtocolConfig,
    copies: CopiesConfig,
    cv: CVConfig | None = None,
) -> dict:
    """`{kind, leaks}`: each leak the protocol reproduces on purpose, with what leaked in this
    split (`table`: `group, split`, and with CV `split_<k>`; counts for fold 0 with CV, whose
    split the top level of the report describes)."""
    leaks = []
    held_out = int(table["split"].isin(("val", "test")).sum())
    for name in protocol.leaks:
        entry: dict = {"leak": name, "what": LEAKS[name]}
        if name == "group_in_two_splits":
            entry.update(group_leak(table))
            if cv is not None and cv.enabled:
                entry["per_fold"] = [
                    group_leak(table.assign(split=table[f"split_{k}"]))["groups_in_two_splits"]
                    for k in range(cv.folds)
                ]
        elif name == "augmented_test_copies":
            entry.update(
                copies_of_val_and_test=held_out * len(copies.recipes),
                val_and_test_recordings=held_out,
                recipes=len(copies.recipes),
            )
        elif name == "whole_set_statistics":
            entry.update(val_and_test_recordings_in_statistics=held_out)
        leaks.append(entry)
    return {"kind": protocol.kind, "leaks": leaks}


def tuning_protocol(tuned: bool, cv: CVConfig | None = None) -> dict:
    """How the params behind the headline were chosen, given `tune.enabled` and `cv`:
    `{kind, text}` with kind `none` (the params file's values), `val_split` (tuned on the
    val split; the test split never reaches a trial) or `nested_cv` (one study per outer fold
    on that fold's own train/val split; no trial of a fold sees that fold's test recordings).
    """
    if not tuned:
        return {"kind": "none", "text": "no tuning: every param is the params file's value"}
    if cv is None or not cv.enabled:
        return {
            "kind": "val_split",
            "text": "tuned on the val split: trials train on the train split and are scored "
            "on the val split; the test split never reaches a trial",
        }
    return {
        "kind": "nested_cv",
        "outer_folds": cv.folds,
        "text": f"nested CV: {cv.folds} outer folds, each tuned by its own study on its own "
        "train/val split (dealt from the other folds); no trial of a fold trains or is scored "
        "on that fold's test recordings, and each fold's members train with its own best values",
    }


def split_report(
    table: pd.DataFrame,
    cfg: SplitConfig,
    cv: CVConfig | None = None,
    protocol: ProtocolConfig | None = None,
    copies: CopiesConfig | None = None,
) -> dict:
    """Sizes per class per split and groups per split, plus the leakage checks (and the same
    for every fold with CV, the top level then describing fold 0), and `protocol`: the leaks
    a study's original protocol reproduces on purpose, with what leaked (none when honest)."""
    protocol = protocol or ProtocolConfig()
    allow_groups = protocol.allows("group_in_two_splits")
    leaks = {"protocol": protocol_report(table, protocol, copies or CopiesConfig(), cv)}
    if cv is not None and cv.enabled:
        folds = []
        for k in range(cv.folds):
            one = _one_report(table.assign(split=table[f"split_{k}"]), cfg, allow_groups)
            folds.append({"fold": k, **one})
        spread = table.groupby("group")["cv_fold"].nunique()
        if (spread > 1).any() and not allow_groups:
            raise LeakageError(
                f"leakage: {int((spread > 1).sum())} group(s) in more than one test fold, "
                f"e.g. {spread.index[spread > 1][:3].tolist()}"
            )
        return {
            **folds[0],
            "cv": {"folds": cv.folds, "column": cv.column},
            "folds": folds,
            **leaks,
        }
    return {**_one_report(table, cfg, allow_groups), **leaks}


def _one_report(table: pd.DataFrame, cfg: SplitConfig, allow_groups: bool = False) -> dict:
    per_class: dict[str, dict[str, int]] = defaultdict(dict)
    for (split, label), count in table.groupby(["split", "label"]).size().items():
        per_class[split][str(label)] = int(count)
    report: dict = {"strategy": cfg.strategy, "seed": cfg.seed}
    if cfg.strategy == "predefined" and "cv_fold" not in table.columns:
        _, moved = predefined(table, cfg)
        report.update(
            column=cfg.column,
            test_values=list(cfg.test_values),
            val_values=list(cfg.val_values),
            moved_straddling_groups=moved,
        )
    return {
        **report,
        "recordings": {s: int((table["split"] == s).sum()) for s in SPLITS},
        "groups": {s: int(table.loc[table["split"] == s, "group"].nunique()) for s in SPLITS},
        "per_class": {s: per_class.get(s, {}) for s in SPLITS},
        "checks": check_leakage(table, allow_groups),
    }


def breakdown_values(table: pd.DataFrame, columns: tuple[str, ...], manifest: Path) -> dict:
    """For each `evaluate.breakdown` column, its distinct values per split (a value absent from
    test is never scored); a column the manifest lacks is a SplitError naming the fix, raised
    here so that evaluate cannot fail on it after training."""
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise SplitError(
            f"evaluate.breakdown names {', '.join(missing)}, not a column of {manifest} "
            f"(its columns: {', '.join(table.columns)}); remove it from evaluate.breakdown or "
            "pick one of those (the adapter's side attributes, e.g. fold, speaker, language)"
        )
    return {
        c: {s: int(table.loc[table["split"] == s, c].nunique()) for s in SPLITS} for c in columns
    }
