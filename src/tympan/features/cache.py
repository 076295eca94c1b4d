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
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch
from tqdm import tqdm

from tympan.audio import AudioError, decode, resample, to_mono
from tympan.config import FeatureConfig, SegmentConfig, to_dict
from tympan.features.logmel import n_samples, waveform_batch, window_starts, windows
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


def cache_key(sha256s: list[str], cfg: FeatureConfig, segment: SegmentConfig | None = None) -> str:
    params = to_dict(cfg)
    if segment is not None and segment.enabled:  # absent when off: unsegmented keys stay
        params["segment"] = to_dict(segment)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for sha in sorted(sha256s):
        digest.update(sha.encode())
    return digest.hexdigest()[:16]


def _check(cfg: FeatureConfig) -> None:
    try:
        check_stack(cfg, cfg.stack)
    except ValueError as exc:
        raise FeatureError(f"features.{exc}") from None


def resampled_length(frames: int, orig_rate: int, new_rate: int) -> int:
    """Samples after `tympan.audio.resample` (torchaudio rounds the length up)."""
    if orig_rate == new_rate:
        return frames
    gcd = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // gcd, new_rate // gcd
    return -(-new * frames // orig)


def window_counts(paths: list[str], cfg: FeatureConfig, segment: SegmentConfig) -> list[int]:
    """Windows per recording, read from the file headers (see `tympan.features.windows`)."""
    window = n_samples(cfg)
    hop = max(1, round(segment.hop * cfg.sample_rate))
    counts = []
    for path in paths:
        info = sf.info(path)
        length = resampled_length(info.frames, info.samplerate, cfg.sample_rate)
        counts.append(len(window_starts(length, window, hop, segment.min_last)))
    return counts


def _recording_windows(path: str, cfg: FeatureConfig, segment: SegmentConfig) -> torch.Tensor:
    data, rate = decode(path)
    wave = resample(to_mono(torch.from_numpy(data)), rate, cfg.sample_rate)
    return windows(wave, cfg, segment.hop, segment.min_last)


def build_cache(
    table: pd.DataFrame,
    cfg: FeatureConfig,
    out_dir: Path,
    segment: SegmentConfig | None = None,
) -> FeatureCache:
    """Compute the feature stack for every row of `table` (manifest joined with splits).

    Clips are decoded one by one (they may differ in rate and channels) and the features are
    computed in batches of `cfg.batch_size`. With `segment.enabled`, each recording becomes
    its windows (the index repeats the recording's row with a `window` number), cut exactly as
    serving cuts a request.
    """
    if segment is not None and segment.enabled:
        return _build_segmented(table, cfg, out_dir, segment)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check(cfg)
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
    index = _index(table)
    return _finish(index, cfg, out_dir, shape)


def _index(table: pd.DataFrame, repeats: list[int] | None = None) -> pd.DataFrame:
    core = ["path", "label", "group", "split", "sha256"]
    side = [c for c in table.columns if c not in (*core, *PROBED)]
    index = table[core + side].reset_index(drop=True)
    if repeats is not None:
        index = index.loc[index.index.repeat(repeats)].reset_index(drop=True)
        index.insert(1, "window", np.concatenate([np.arange(n) for n in repeats]))
    index.insert(0, "row", np.arange(len(index)))
    return index


def _build_segmented(
    table: pd.DataFrame, cfg: FeatureConfig, out_dir: Path, segment: SegmentConfig
) -> FeatureCache:
    """`build_cache` for windowed recordings: one array row per window."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _check(cfg)
    frontend = FeatureStack(cfg, cfg.stack)
    paths = table["path"].tolist()
    counts = window_counts(paths, cfg, segment)
    shape = (sum(counts), *output_shape(cfg, cfg.stack))
    array = np.lib.format.open_memmap(
        out_dir / "features.npy", mode="w+", dtype=cfg.dtype, shape=shape
    )
    pending: list[torch.Tensor] = []
    written, queued = 0, 0

    with tqdm(total=len(paths), desc="featurize", unit="recording") as bar:
        for path, expected in zip(paths, counts, strict=True):
            try:
                cut = _recording_windows(path, cfg, segment)
            except AudioError as exc:
                raise FeatureError(
                    f"{path}: {exc}; it passed ingest, so the file changed since: "
                    "re-run `dvc repro` to ingest it again"
                ) from None
            if len(cut) != expected:
                raise FeatureError(
                    f"{path}: {len(cut)} windows decoded, {expected} expected from its header"
                )
            pending.append(cut)
            queued += len(cut)
            if queued >= cfg.batch_size:
                written = _write(array, written, frontend, pending, cfg)
                pending, queued = [], 0
            bar.update(1)
    written = _write(array, written, frontend, pending, cfg)
    array.flush()
    del array
    return _finish(_index(table, counts), cfg, out_dir, shape, segment)


def _write(
    array: np.ndarray,
    start: int,
    frontend: FeatureStack,
    pending: list[torch.Tensor],
    cfg: FeatureConfig,
) -> int:
    """Featurize the pending windows into `array[start:]`; -> the next free row."""
    if not pending:
        return start
    waves = torch.cat(pending)
    with torch.no_grad():
        array[start : start + len(waves)] = frontend(waves).numpy().astype(cfg.dtype)
    return start + len(waves)


def _finish(
    index: pd.DataFrame,
    cfg: FeatureConfig,
    out_dir: Path,
    shape: tuple[int, ...],
    segment: SegmentConfig | None = None,
) -> FeatureCache:
    """Write the index, train-split statistics and meta beside `features.npy`."""
    labels = sorted(index["label"].astype(str).unique())
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
        "key": cache_key(index["sha256"].unique().tolist(), cfg, segment),
        "feature": "+".join(cfg.stack.kinds),
        "params": to_dict(cfg),
        **({"segment": to_dict(segment)} if segment is not None and segment.enabled else {}),
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
    """The index with every column but `row` and `window` as text (side attributes are
    categories)."""
    index = pd.read_csv(path, dtype=str, keep_default_na=False)
    for column in ("row", "window"):
        if column in index.columns:
            index[column] = index[column].astype(np.int64)
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
