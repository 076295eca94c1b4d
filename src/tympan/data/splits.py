"""Train/val/test splits that never let a group (or an identical file) straddle two splits."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from tympan.config import SplitConfig

SPLITS = ("train", "val", "test")


class LeakageError(ValueError):
    """A group or an identical recording found in more than one split."""


def split_manifest(manifest: pd.DataFrame, cfg: SplitConfig) -> pd.DataFrame:
    """Assign each manifest row to train, val or test: -> table `path, split`."""
    if not 0 < cfg.val < 1 or not 0 < cfg.test < 1 or cfg.val + cfg.test >= 1:
        raise ValueError(
            f"split.val={cfg.val} and split.test={cfg.test} must be in (0, 1) and sum below 1"
        )
    split = _stratified(manifest, cfg) if cfg.strategy == "stratified" else _by_group(manifest, cfg)
    out = pd.DataFrame({"path": manifest["path"], "split": split})
    for name in SPLITS:
        if not (out["split"] == name).any():
            raise ValueError(
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
    rng = np.random.default_rng(cfg.seed)
    target = {"train": 1 - cfg.val - cfg.test, "val": cfg.val, "test": cfg.test}
    sizes = manifest.groupby("group").size()
    majority = manifest.groupby("group")["label"].agg(lambda s: s.value_counts().index[0])
    assignment: dict[str, str] = {}
    for label in sorted(majority.unique()):
        groups = majority.index[majority == label].to_numpy()
        groups = groups[rng.permutation(len(groups))]
        groups = sorted(groups, key=lambda g: -sizes[g])
        filled = dict.fromkeys(SPLITS, 0)
        total = sizes[groups].sum()
        for group in groups:
            deficit = {s: target[s] * total - filled[s] for s in SPLITS}
            chosen = max(SPLITS, key=lambda s: (deficit[s], s == "train"))
            assignment[group] = chosen
            filled[chosen] += sizes[group]
    return manifest["group"].map(assignment).to_numpy()


def check_leakage(table: pd.DataFrame) -> dict:
    """Fail if any group or sha256 appears in two splits; return what was checked.

    `table` has at least `path, group, split, sha256`.
    """
    found: dict[str, list[str]] = {}
    for key in ("group", "sha256"):
        spread = table.groupby(key)["split"].nunique()
        leaked = spread.index[spread > 1].tolist()
        if leaked:
            found[key] = leaked
    if found:
        parts = [
            f"{len(v)} {k} value(s) in more than one split, e.g. {v[:3]}" for k, v in found.items()
        ]
        raise LeakageError("leakage: " + "; ".join(parts))
    return {
        "groups_checked": int(table["group"].nunique()),
        "sha256_checked": int(table["sha256"].nunique()),
        "groups_in_two_splits": 0,
        "identical_files_in_two_splits": 0,
    }


def split_report(table: pd.DataFrame, cfg: SplitConfig) -> dict:
    """Sizes per class per split and groups per split, plus the leakage checks."""
    per_class: dict[str, dict[str, int]] = defaultdict(dict)
    for (split, label), count in table.groupby(["split", "label"]).size().items():
        per_class[split][str(label)] = int(count)
    return {
        "strategy": cfg.strategy,
        "seed": cfg.seed,
        "recordings": {s: int((table["split"] == s).sum()) for s in SPLITS},
        "groups": {s: int(table.loc[table["split"] == s, "group"].nunique()) for s in SPLITS},
        "per_class": {s: per_class.get(s, {}) for s in SPLITS},
        "checks": check_leakage(table),
    }
