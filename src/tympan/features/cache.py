"""The feature cache: one memory-mapped array per feature set plus an index table.

Layout of a cache directory:
    features.npy   (clips, channels, bins, frames), float16 or float32, np.load(mmap_mode="r"):
                   `features.stack.kinds` stacked along bins (1 channel; 1 or 3 in image mode)
    index.csv      one row per array row: path, label, group, split, sha256, then the
                   manifest's side attributes (speaker, language, ...) for models and reports
    stats.json     per-mel-bin mean and std over the *train* rows only
    meta.json      feature params, label list, shape and the cache key

The key is a hash of every clip's sha256 and the feature params: the same audio and params give
the same key, whichever order or machine produced them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from tympan.audio import AudioError
from tympan.config import FeatureConfig, to_dict
from tympan.features.logmel import waveform_batch
from tympan.features.stack import FeatureStack, check_stack, output_shape

log = logging.getLogger(__name__)


# Manifest columns that describe the file rather than the recording; not kept in the index.
PROBED = ("duration_s", "sample_rate", "channels")


class FeatureError(RuntimeError):
    """A clip that ingest accepted but featurize could not read."""


@dataclass(frozen=True)
class FeatureCache:
    """An opened cache: `features` is a read-only memmap `(clips, 1, n_mels, frames)`."""

    features: np.ndarray
    index: pd.DataFrame
    labels: list[str]
    mean: np.ndarray
    std: np.ndarray
    meta: dict

    def rows(self, split: str) -> np.ndarray:
        """Array rows of one split, in index order."""
        return np.flatnonzero(self.index["split"].to_numpy() == split)

    def side_codes(self, vocab: dict[str, list[str]]) -> np.ndarray:
        """Side attribute values as codes `(clips, len(vocab))`; 0 is a value not in `vocab`."""
        columns = []
        for name, values in vocab.items():
            if name not in self.index.columns:
                raise FeatureError(
                    f"side attribute {name!r} is not a column of the feature index "
                    f"(columns: {', '.join(self.index.columns)}); is it in the manifest?"
                )
            lookup = {value: i + 1 for i, value in enumerate(values)}
            columns.append(self.index[name].map(lookup).fillna(0).to_numpy(dtype=np.int64))
        return np.stack(columns, axis=1) if columns else np.zeros((len(self.index), 0), np.int64)

    def side_vocab(self, names: tuple[str, ...]) -> dict[str, list[str]]:
        """Each side attribute's values seen in the train split, sorted (code i + 1)."""
        train = self.index.iloc[self.rows("train")]
        missing = [n for n in names if n not in self.index.columns]
        if missing:
            raise FeatureError(
                f"side attribute(s) {', '.join(missing)} not in the feature index "
                f"(columns: {', '.join(self.index.columns)}); add them to the manifest"
            )
        return {name: sorted(train[name].unique().tolist()) for name in names}

    def targets(self) -> np.ndarray:
        """Class index per row `(clips,)`."""
        lookup = {label: i for i, label in enumerate(self.labels)}
        return self.index["label"].map(lookup).to_numpy(dtype=np.int64)


def cache_key(sha256s: list[str], cfg: FeatureConfig) -> str:
    digest = hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode())
    for sha in sorted(sha256s):
        digest.update(sha.encode())
    return digest.hexdigest()[:16]


def build_cache(table: pd.DataFrame, cfg: FeatureConfig, out_dir: Path) -> FeatureCache:
    """Compute log-mel for every row of `table` (manifest joined with splits) into `out_dir`.

    Clips are decoded one by one (they may differ in rate and channels) and the spectrograms
    are computed in batches of `cfg.batch_size`.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = sorted(table["label"].astype(str).unique())
    try:
        check_stack(cfg, cfg.stack)
    except ValueError as exc:
        raise FeatureError(f"features.{exc}") from None
    frontend = FeatureStack(cfg, cfg.stack)
    shape = (len(table), *output_shape(cfg, cfg.stack))
    array = np.lib.format.open_memmap(
        out_dir / "features.npy", mode="w+", dtype=cfg.dtype, shape=shape
    )
    paths = table["path"].tolist()
    with tqdm(total=len(paths), desc="featurize", unit="clip") as bar:
        for start in range(0, len(paths), cfg.batch_size):
            chunk = paths[start : start + cfg.batch_size]
            try:
                waves = waveform_batch(chunk, cfg)
            except AudioError:
                for path in chunk:  # find the culprit to name it
                    try:
                        waveform_batch([path], cfg)
                    except AudioError as exc:
                        raise FeatureError(
                            f"{path}: {exc}; it passed ingest, so the file changed since: "
                            "re-run `dvc repro` to ingest it again"
                        ) from None
                raise
            with torch.no_grad():
                array[start : start + len(chunk)] = frontend(waves).numpy().astype(cfg.dtype)
            bar.update(len(chunk))
    array.flush()
    del array

    core = ["path", "label", "group", "split", "sha256"]
    side = [c for c in table.columns if c not in (*core, *PROBED)]
    index = table[core + side].reset_index(drop=True)
    index.insert(0, "row", np.arange(len(index)))
    index.to_csv(out_dir / "index.csv", index=False)

    features = np.load(out_dir / "features.npy", mmap_mode="r")
    train_rows = np.flatnonzero(index["split"].to_numpy() == "train")
    if len(train_rows) == 0:
        raise FeatureError("no train rows: normalisation statistics need the train split")
    mean, std = _train_stats(features, train_rows)
    (out_dir / "stats.json").write_text(
        json.dumps(
            {
                "source": "train split",
                "rows": len(train_rows),
                "mean": mean.tolist(),
                "std": std.tolist(),
            },
            indent=1,
        )
    )
    meta = {
        "key": cache_key(index["sha256"].tolist(), cfg),
        "feature": "+".join(cfg.stack.kinds),
        "params": to_dict(cfg),
        "shape": list(shape),
        "dtype": cfg.dtype,
        "labels": labels,
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    log.info("cached %d clips as %s %s in %s", len(index), shape, cfg.dtype, out_dir)
    return open_cache(out_dir)


def _train_stats(
    features: np.ndarray, rows: np.ndarray, chunk: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Per-mel-bin mean and std over train rows and all frames, streamed in float64."""
    total = np.zeros(features.shape[2])
    squares = np.zeros(features.shape[2])
    count = 0
    for start in range(0, len(rows), chunk):
        block = np.asarray(features[rows[start : start + chunk]], dtype=np.float64)
        total += block.sum(axis=(0, 1, 3))
        squares += (block**2).sum(axis=(0, 1, 3))
        count += block.shape[0] * block.shape[1] * block.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return mean, std


def _read_index(path: Path) -> pd.DataFrame:
    """The index with every column but `row` as text (side attributes are categories)."""
    index = pd.read_csv(path, dtype=str, keep_default_na=False)
    index["row"] = index["row"].astype(np.int64)
    return index


def open_cache(out_dir: Path) -> FeatureCache:
    """Open a cache written by `build_cache` without reading the array into memory."""
    meta = json.loads((out_dir / "meta.json").read_text())
    stats = json.loads((out_dir / "stats.json").read_text())
    return FeatureCache(
        features=np.load(out_dir / "features.npy", mmap_mode="r"),
        index=_read_index(out_dir / "index.csv"),
        labels=meta["labels"],
        mean=np.asarray(stats["mean"], dtype=np.float32),
        std=np.asarray(stats["std"], dtype=np.float32),
        meta=meta,
    )
