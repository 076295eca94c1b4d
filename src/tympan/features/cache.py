"""The feature cache: one memory-mapped array per feature set plus an index table.

Layout of a cache directory:
    sets/<kind>.npy  one per kind of `features.stack.kinds`: `(rows, bins_kind, frames)`,
                     float16 or float32, np.load(mmap_mode="r")
    index.csv        one row per array row: path, label, group, split (and with CV `fold` and
                     `split_<k>` per fold), sha256, then the manifest's side attributes
                     (speaker, language, ...) for models and reports
    stats.json       per-bin mean and std of the stacked input over *train* rows only (and per
                     fold with CV)
    meta.json        feature params, label list, input shape, the cache key and each set's key

`FeatureCache.features` reads the sets as one `(rows, C, bins, frames)` input: the kinds
concatenated along bins, or resized to `stack.image` (`tympan.features.stack.assemble`, the
same function serving computes through).

A set's key is a hash of the audio (every row's sha256, in order), the params that set depends
on (`set_params`), the segmentation and the featurize code. Featurize copies a set whose key it
finds in the cache being replaced or in the version DVC last recorded for it (dvc.lock and
DVC's cache), and computes only the others: changing `n_mfcc` recomputes the MFCC set alone,
and a new split recomputes none. The whole-cache key (`meta["key"]`) hashes the sorted audio
and every feature param: the same audio and params give the same key, whichever order or
machine produced them.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch
import yaml

from tympan.audio import AudioError, decode, resample, resampled_length, to_mono
from tympan.audio.augment import augmented_copy, copy_seed
from tympan.config import (
    CopiesConfig,
    CopyRecipe,
    FeatureConfig,
    SegmentConfig,
    StackConfig,
    params_from_dict,
    to_dict,
)
from tympan.features.logmel import n_samples, waveform_batch, window_starts, windows
from tympan.features.stack import (
    WAVEFORM,
    FeatureStack,
    assemble,
    bins_per_kind,
    check_stack,
    encoder_for,
    output_shape,
    set_params,
)
from tympan.progress import progress
from tympan.workers import pool_map, worker_count

log = logging.getLogger(__name__)


# Manifest columns that describe the file rather than the recording; not kept in the index.
PROBED = ("duration_s", "sample_rate", "channels")
SETS = "sets"
# The fixed-length waveforms `(rows, samples)`, kept for waveform-domain augmentation.
WAVE = "wave"
# Rows read at once when statistics stream over the cache (at most; see `_block_rows`).
STATS_CHUNK = 512
# Bytes of float64 a statistics block may take: featurize's own memory stays flat however
# large the set (benchmarks/cache_scale.py), even for long clips with many bins.
STATS_BLOCK_BYTES = 32 * 1024 * 1024
# The splits whose rows are used; a fixed augmented copy of a clip that is not in the train
# split of a fold is `excluded` there (see `tympan.data.splits.with_copies`).
USED_SPLITS = ("train", "val", "test")


class FeatureError(RuntimeError):
    """A clip that ingest accepted but featurize could not read."""


class StackedFeatures:
    """The cached sets read as one input `(rows, C, bins, frames)`, array-like and read-only.

    `sets`: `{kind: (rows, bins_kind, frames)}` memmaps in stacking order. Indexing with an
    int, a slice or an array of rows returns a numpy array in `dtype`; only those rows are
    read from disk.
    """

    def __init__(self, sets: dict[str, np.ndarray], stack: StackConfig, dtype: str) -> None:
        self.sets, self.stack = sets, stack
        self.dtype = np.dtype(dtype)
        first = next(iter(sets.values()))
        rows, frames = first.shape[0], first.shape[2]
        if stack.image is None:
            self.shape = (rows, 1, sum(a.shape[1] for a in sets.values()), frames)
        else:
            self.shape = (rows, stack.image_channels, *stack.image)
        self.ndim = 4

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: int | slice | np.ndarray) -> np.ndarray:
        single = isinstance(rows, (int, np.integer))
        picked = [rows] if single else rows
        parts = {kind: torch.from_numpy(_owned(a[picked])) for kind, a in self.sets.items()}
        out = assemble(parts, self.stack).numpy().astype(self.dtype, copy=False)
        return out[0] if single else out


def fold_numbers(index: pd.DataFrame) -> list[int]:
    """The CV folds an index has a `split_<k>` column for (empty without CV)."""
    return sorted(int(c[6:]) for c in index.columns if re.fullmatch(r"split_\d+", c))


def _owned(x: np.ndarray) -> np.ndarray:
    """A slice of a read-only memmap is a read-only view; torch wants an array it may own."""
    return x if x.flags.writeable else np.array(x)


@dataclass(frozen=True)
class FeatureCache:
    """An opened cache: `features` reads `(clips, C, bins, frames)` from the per-set memmaps."""

    features: StackedFeatures
    index: pd.DataFrame
    labels: list[str]
    mean: np.ndarray
    std: np.ndarray
    meta: dict
    fold_stats: tuple[dict, ...] = ()
    # `(rows, samples)` fixed-length waveforms when featurize kept them (`augment.wave_*`)
    waves: np.ndarray | None = None

    @property
    def feature_config(self) -> FeatureConfig:
        """The feature params the sets were computed with (`seconds` as featurize resolved
        it, see `clip_seconds`)."""
        return params_from_dict({"features": self.meta["params"]}, source="meta.json").features

    @property
    def folds(self) -> list[int]:
        """CV folds (empty without CV); `for_fold(k)` is the cache as fold k sees it."""
        return fold_numbers(self.index)

    def for_fold(self, fold: int) -> FeatureCache:
        """This cache with fold `fold`'s split as `split` and that fold's train statistics."""
        if fold not in self.folds:
            raise FeatureError(f"no CV fold {fold} in this cache (folds: {self.folds})")
        stats = next(s for s in self.fold_stats if s["fold"] == fold)
        return replace(
            self,
            index=self.index.assign(split=self.index[f"split_{fold}"]),
            mean=np.asarray(stats["mean"], dtype=np.float32),
            std=np.asarray(stats["std"], dtype=np.float32),
        )

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


def cache_key(
    sha256s: list[str],
    cfg: FeatureConfig,
    segment: SegmentConfig | None = None,
    extra: dict | None = None,
) -> str:
    """`extra`: what else shapes the cache's rows or statistics (fixed copies, whole-set
    statistics); absent when there is none, so keys without them stay as they were."""
    params = to_dict(cfg)
    # how it was computed changes no value (beyond float rounding on a GPU)
    for how in ("batch_size", "workers", "device"):
        params.pop(how)
    if params["stack"]["encoder"]["source"] == "none":  # absent when unused: keys stay
        params["stack"].pop("encoder")
    if segment is not None and segment.enabled:  # absent when off: unsegmented keys stay
        params["segment"] = to_dict(segment)
    if extra:
        params["extra"] = extra
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for sha in sorted(sha256s):
        digest.update(sha.encode())
    return digest.hexdigest()[:16]


def code_digest() -> str:
    """Hash of the featurize code (this package and `tympan.audio`): a fix to how features are
    computed must not be hidden by a set copied from before it."""
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted([*here.glob("*.py"), *(here.parent / "audio").glob("*.py")]):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def set_keys(
    sha256s: list[str],
    cfg: FeatureConfig,
    segment: SegmentConfig | None = None,
    waves: bool = False,
    copies: CopiesConfig | None = None,
) -> dict[str, str]:
    """`{kind: key}` for every kind of `cfg.stack` (and `wave` with `waves`); `sha256s` in row
    order (one per recording; a fixed copy's is its clip's with `#copy<k>`), `copies` when
    there are copy rows."""
    rows = hashlib.sha256("\n".join(sha256s).encode()).hexdigest()
    seg = to_dict(segment) if segment is not None and segment.enabled else None
    if seg is not None:
        seg.pop("aggregate")  # how windows are combined later changes no feature
    code = code_digest()
    keys = {}
    for kind in (*cfg.stack.kinds, *((WAVE,) if waves else ())):
        params = {"set": set_params(kind, cfg, cfg.stack), "segment": seg, "code": code}
        if copies is not None:
            params["copies"] = to_dict(copies)
        digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
        digest.update(rows.encode())
        keys[kind] = digest.hexdigest()[:16]
    return keys


def _check(cfg: FeatureConfig) -> None:
    try:
        check_stack(cfg, cfg.stack)
    except ValueError as exc:
        raise FeatureError(f"features.{exc}") from None


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


def _changed_since_ingest(path: str, exc: Exception) -> FeatureError:
    return FeatureError(
        f"{path}: {exc}; it passed ingest, so the file changed since: "
        "re-run `dvc repro` to ingest it again"
    )


# --- finding sets computed before -------------------------------------------------------------


@dataclass(frozen=True)
class Reusable:
    """A set array with a known key, and where it was found (for the log)."""

    path: Path
    origin: str


def _sets_in(meta: dict, locate, origin: str) -> dict[str, Reusable]:
    found = {}
    entries = [*(meta.get("sets") or {}).values(), *([meta["waves"]] if meta.get("waves") else [])]
    for entry in entries:
        path = locate(entry["file"])
        if path is not None and path.exists():
            found[entry["key"]] = Reusable(path, origin)
    return found


def _dvc_recorded(out_dir: Path) -> tuple[dict, dict[str, Path]] | None:
    """meta.json and `{relpath: cache file}` of the version of `out_dir` that dvc.lock records,
    read from DVC's cache; None outside a DVC project or when nothing is recorded."""
    out_dir = out_dir.resolve()
    root = next((d for d in (out_dir, *out_dir.parents) if (d / ".dvc").is_dir()), None)
    if root is None or not (root / "dvc.lock").exists():
        return None
    relative = out_dir.relative_to(root).as_posix()
    lock = yaml.safe_load((root / "dvc.lock").read_text()) or {}
    md5 = None
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if Path(out.get("path", "")).as_posix() == relative:
                md5 = out.get("md5")
    if not md5 or not md5.endswith(".dir"):
        return None
    try:
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            objects = Path(repo.cache.local.path)
    except Exception as exc:  # a broken DVC setup only costs the reuse
        log.warning("DVC cache not readable (%s): computing every feature set", exc)
        return None

    def cached(oid: str) -> Path:
        return objects / oid[:2] / oid[2:]

    listing = cached(md5)
    if not listing.exists():
        return None
    files = {e["relpath"]: cached(e["md5"]) for e in json.loads(listing.read_text())}
    if "meta.json" not in files or not files["meta.json"].exists():
        return None
    return json.loads(files["meta.json"].read_text()), files


def reusable_sets(out_dir: Path) -> dict[str, Reusable]:
    """Sets computed before, by key: in `out_dir` itself (a cache about to be replaced) and in
    the version dvc.lock records (`dvc repro` deletes `out_dir` before featurize runs)."""
    found: dict[str, Reusable] = {}
    recorded = _dvc_recorded(out_dir)
    if recorded is not None:
        meta, files = recorded
        found.update(_sets_in(meta, files.get, "from DVC's cache, as dvc.lock records it"))
    if (out_dir / "meta.json").exists():
        meta = json.loads((out_dir / "meta.json").read_text())
        found.update(_sets_in(meta, lambda rel: out_dir / rel, f"from the previous {out_dir}"))
    return found


# --- building ---------------------------------------------------------------------------------


def build_cache(
    table: pd.DataFrame,
    cfg: FeatureConfig,
    out_dir: Path,
    segment: SegmentConfig | None = None,
    keep_waves: bool = False,
    copies: CopiesConfig | None = None,
    whole_set_statistics: bool = False,
) -> FeatureCache:
    """Compute the feature sets for every row of `table` (manifest joined with splits).

    `keep_waves` also stores the fixed-length waveforms the features were computed from (for
    waveform-domain augmentation, `augment.wave_*`) as the `wave` set. Rows with a `copy`
    column above 0 are fixed augmented copies of their clip by recipe `copies.recipes[copy -
    1]` (`tympan.data.splits.with_copies` adds them). `whole_set_statistics` (only a study's
    original protocol that declares the leak) takes the normalisation statistics from every
    row, val and test included, instead of the train split's.

    Sets whose key was computed before are copied (`reusable_sets`); the others are computed
    in batches of `cfg.batch_size`, clips decoded one by one (they may differ in rate and
    channels). With `segment.enabled`, each recording becomes its windows (the index repeats
    the recording's row with a `window` number), cut exactly as serving cuts a request. The
    cache is written beside `out_dir` and moved in place only when complete, so a failure
    leaves the previous cache as it was; worker processes end with this one, even when it is
    killed (`_die_with`), and a killed run's partial folder is removed by the next.
    """
    cfg = clip_seconds(cfg, table)
    _check(cfg)
    segmented = segment is not None and segment.enabled
    paths = table["path"].tolist()
    counts = window_counts(paths, cfg, segment) if segmented else None
    rows = sum(counts) if counts is not None else len(paths)
    made = _copy_plan(table, copies)
    ids = [
        sha if not plan else f"{sha}#copy{plan[0]}"
        for sha, plan in zip(table["sha256"], made, strict=True)
    ]
    used = copies if any(made) else None
    keys = set_keys(ids, cfg, segment, waves=keep_waves, copies=used)
    extra = {
        **({"copies": to_dict(used)} if used is not None else {}),
        **({"statistics": "whole set"} if whole_set_statistics else {}),
    }
    found = reusable_sets(out_dir)
    partial = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / SETS).mkdir(parents=True)

    try:
        _fill(partial, paths, counts, rows, keys, found, cfg, segment if segmented else None, made)
        _finish(_index(table, counts), cfg, partial, keys, segment, extra, whole_set_statistics)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # the previous cache stays as it was
        raise
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
        partial.rename(out_dir)
        shutil.rmtree(old)
    else:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        partial.rename(out_dir)
    return open_cache(out_dir)


def _fill(
    partial: Path,
    paths: list[str],
    counts: list[int] | None,
    rows: int,
    keys: dict[str, str],
    found: dict[str, Reusable],
    cfg: FeatureConfig,
    segment: SegmentConfig | None,
    made: list[tuple[int, int, CopyRecipe] | None] | None = None,
) -> None:
    """Copy the reusable sets into `partial/sets` and compute the others (`made`: per
    recording, the copy it is, see `_copy_plan`)."""
    frames = output_shape(cfg, replace(cfg.stack, image=None))[2]
    shapes = {kind: (rows, bins, frames) for kind, bins in bins_per_kind(cfg, cfg.stack).items()}
    if WAVE in keys:
        shapes[WAVE] = (rows, n_samples(cfg))
    files = _RowFiles(paths, counts)
    todo: list[str] = []
    for kind, shape in shapes.items():
        target = partial / SETS / f"{kind}.npy"
        hit = found.get(keys[kind])
        if hit is not None and _fits(hit.path, shape, _dtype(kind, cfg)):
            shutil.copyfile(hit.path, target)
            files.check(
                kind,
                np.load(target, mmap_mode="r"),
                0,
                f"The set reused {hit.origin} is damaged: delete that copy to compute it again",
            )
            log.info("feature set %s: reused %s", kind, hit.origin)
            print(f"featurize: {kind} reused {hit.origin}")
        else:
            todo.append(kind)
            np.lib.format.open_memmap(target, mode="w+", dtype=_dtype(kind, cfg), shape=shape)
    if todo:
        device = feature_device(cfg)
        # on a GPU the torch kinds run batched in this process; on CPUs, one process per core
        workers = 1 if device == "cuda" else _workers(cfg, len(paths))
        print(
            f"featurize: computing {', '.join(todo)} for {len(paths)} recordings"
            + (f" in {workers} processes" if workers > 1 else "")
            + (" (torch kinds on the GPU)" if device == "cuda" else "")
        )
        arrays = {k: np.load(partial / SETS / f"{k}.npy", mmap_mode="r+") for k in todo}
        # several chunks per process, so the last ones finish together
        size = min(cfg.batch_size, max(1, -(-len(paths) // (4 * workers)))) if workers > 1 else 0
        jobs = _jobs(paths, counts, size or cfg.batch_size, made)
        job = _Job(cfg, segment, tuple(todo), device)
        written = 0
        unit = "recording" if segment is not None else "clip"
        with progress(len(paths), "featurize", unit) as bar:
            for (chunk, *_), parts in zip(jobs, _run_jobs(job, jobs, workers), strict=True):
                end = written + len(next(iter(parts.values())))
                for kind, part in parts.items():
                    files.check(kind, part, written, CHANGED_SINCE_INGEST)
                    arrays[kind][written:end] = part
                written = end
                bar.update(len(chunk))
                _give_back_memory()
        for array in arrays.values():
            array.flush()
        del arrays
        if written != rows:
            raise FeatureError(f"featurize wrote {written} rows, expected {rows}")


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The process's C library, if it has glibc's malloc_trim (looked up on first use: no
    search at import)."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def _give_back_memory() -> None:
    """Hand the memory a chunk freed back to the system (glibc's `malloc_trim`): glibc keeps
    freed blocks of the chunk-sized arrays and lets the heap creep chunk after chunk, which
    made featurize's memory grow with the set though it holds one chunk at a time. A no-op
    where the C library has no malloc_trim."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


CHANGED_SINCE_INGEST = (
    "These files passed ingest, so they changed since (or hold audio beyond its checks): "
    "re-run `dvc repro` to ingest them again"
)


class _RowFiles:
    """Which recording each cache row comes from, to name the files behind bad rows."""

    def __init__(self, paths: list[str], counts: list[int] | None) -> None:
        self.paths = paths
        self.row_owner = (
            np.arange(len(paths)) if counts is None else np.repeat(np.arange(len(paths)), counts)
        )

    def check(self, kind: str, rows: np.ndarray, first: int, advice: str) -> None:
        """Refuse NaN or infinity in `rows` (cache rows `first...` of set `kind`): they would
        make every train statistic NaN. The error names each recording responsible."""
        bad = []
        for start in range(0, len(rows), STATS_CHUNK):
            block = np.asarray(rows[start : start + STATS_CHUNK])
            finite = np.isfinite(block.reshape(len(block), -1)).all(axis=1)
            bad.extend(first + start + np.flatnonzero(~finite))
        if not bad:
            return
        culprits: dict[str, list[int]] = {}
        for row in bad:
            culprits.setdefault(self.paths[self.row_owner[row]], []).append(int(row))
        named = "; ".join(
            f"{path} (row {', '.join(map(str, rows_[:4]))}{', ...' if len(rows_) > 4 else ''})"
            for path, rows_ in list(culprits.items())[:10]
        )
        raise FeatureError(
            f"feature set {kind}: NaN or infinite values in {len(bad)} row(s) from "
            f"{len(culprits)} recording(s): {named}; featurize writes only finite features "
            f"(train statistics would be NaN). {advice}"
        )


def _dtype(kind: str, cfg: FeatureConfig) -> str:
    """Storage type: `features.dtype`, but waveforms stay float32 (in float16 the quiet parts
    of a clip would give features far from the cached ones)."""
    return "float32" if kind in (WAVE, WAVEFORM) else cfg.dtype


def _fits(path: Path, shape: tuple[int, ...], dtype: str) -> bool:
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return array.shape == shape and array.dtype == np.dtype(dtype)


def feature_device(cfg: FeatureConfig) -> str:
    """`features.device`: auto is CUDA when there is one; cuda without one is an error."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise FeatureError("features.device=cuda but no CUDA device is visible; use auto or cpu")
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def _workers(cfg: FeatureConfig, recordings: int) -> int:
    """`features.workers`, or one process per CPU from `tympan.workers.PARALLEL_MIN`
    recordings (starting processes costs seconds)."""
    if cfg.workers > 0:
        return min(cfg.workers, max(1, recordings))
    return worker_count(recordings)


Chunk = tuple[list[str], list[int] | None, list | None]


def _jobs(
    paths: list[str], counts: list[int] | None, batch_size: int, made: list | None = None
) -> list[Chunk]:
    """Chunks of recordings, about `batch_size` clips or windows each, in order: paths, window
    counts (None unsegmented), and the copy each recording is (None when there are no copies;
    see `_copy_plan`)."""
    jobs, start = [], 0
    while start < len(paths):
        if counts is None:
            end = min(len(paths), start + batch_size)
        else:
            end, windows = start, 0
            while end < len(paths) and (end == start or windows + counts[end] <= batch_size):
                windows += counts[end]
                end += 1
        jobs.append(
            (
                paths[start:end],
                None if counts is None else counts[start:end],
                None if made is None or not any(made) else made[start:end],
            )
        )
        start = end
    return jobs


@dataclass(frozen=True)
class _Job:
    """What every chunk computes: the kinds to store (and `wave`), framing and segmentation."""

    cfg: FeatureConfig
    segment: SegmentConfig | None
    kinds: tuple[str, ...]
    device: str = "cpu"

    def frontend(self) -> FeatureStack | None:
        kinds = tuple(k for k in self.kinds if k != WAVE)
        if not kinds:
            return None
        return FeatureStack(self.cfg, replace(self.cfg.stack, kinds=kinds)).to(self.device)

    def __call__(self, chunk: Chunk, frontend: FeatureStack | None) -> dict[str, np.ndarray]:
        paths, counts, made = chunk
        waves = _chunk_waves(paths, counts, self.cfg, self.segment)
        if made is not None:
            waves = _with_copies(waves, counts, made, self.cfg.sample_rate)
        out = {WAVE: waves.numpy()} if WAVE in self.kinds else {}
        if frontend is not None:
            with torch.no_grad():
                parts = frontend.parts(waves.to(self.device))
            out.update(
                {
                    kind: part.cpu().numpy().astype(_dtype(kind, self.cfg))
                    for kind, part in parts.items()
                }
            )
        return out


def clip_seconds(cfg: FeatureConfig, table: pd.DataFrame) -> FeatureConfig:
    """`cfg` with `seconds` set from the recordings when `duration_quantile` asks for it: that
    quantile of the train split's durations (`duration_s`; copies aside; with CV the `split`
    column's, fold 0), to the millisecond. Only train rows count: how long the test
    recordings are must not shape the model."""
    if cfg.duration_quantile is None:
        return cfg
    if "duration_s" not in table.columns:
        raise FeatureError("features.duration_quantile needs the manifest's duration_s column")
    train = table["split"].to_numpy() == "train"
    if "copy" in table.columns:
        train &= table["copy"].astype(int).to_numpy() == 0
    durations = table.loc[train, "duration_s"].astype(float).to_numpy()
    if len(durations) == 0:
        raise FeatureError("features.duration_quantile needs train rows to take durations from")
    seconds = round(float(np.quantile(durations, cfg.duration_quantile)), 3)
    if seconds <= 0:
        raise FeatureError(
            f"features.duration_quantile={cfg.duration_quantile} of the train durations is "
            f"{seconds} s: choose a higher quantile"
        )
    log.info(
        "clip length %.3f s: the %g quantile of %d train durations",
        seconds,
        cfg.duration_quantile,
        len(durations),
    )
    return replace(cfg, seconds=seconds)


def _copy_plan(
    table: pd.DataFrame, copies: CopiesConfig | None
) -> list[tuple[int, int, CopyRecipe] | None]:
    """Per row of `table`: None for a recording itself, or `(k, seed, recipe)` for its fixed
    copy by recipe k (1-based, the `copy` column), seeded by `copies.seed` and its audio."""
    numbers = table["copy"].astype(int).tolist() if "copy" in table.columns else []
    if not any(numbers):
        return [None] * len(table)
    recipes = copies.recipes if copies is not None else ()
    if max(numbers) > len(recipes):
        raise FeatureError(
            f"copy rows up to recipe {max(numbers)}, but {len(recipes)} recipe(s) given"
        )
    seed = copies.seed if copies is not None else 0
    return [
        None if k == 0 else (k, copy_seed(seed, sha, k), recipes[k - 1])
        for k, sha in zip(numbers, table["sha256"], strict=True)
    ]


def _with_copies(
    waves: torch.Tensor, counts: list[int] | None, made: list, sample_rate: int
) -> torch.Tensor:
    """`waves` `(clips or windows, samples)` with each copy's rows replaced by its augmented
    copy (a recording's windows together)."""
    out = waves.clone()
    sizes = counts if counts is not None else [1] * len(made)
    start = 0
    for size, plan in zip(sizes, made, strict=True):
        if plan is not None:
            _, seed, recipe = plan
            out[start : start + size] = augmented_copy(
                waves[start : start + size], recipe, sample_rate, seed
            )
        start += size
    return out


def _chunk_waves(
    paths: list[str], counts: list[int] | None, cfg: FeatureConfig, segment: SegmentConfig | None
) -> torch.Tensor:
    """`(clips or windows, samples)` for a chunk of recordings; errors name the file."""
    if counts is None:
        try:
            return waveform_batch(paths, cfg)
        except AudioError:
            for path in paths:  # find the culprit to name it
                try:
                    waveform_batch([path], cfg)
                except AudioError as exc:
                    raise _changed_since_ingest(path, exc) from None
            raise
    cut = []
    for path, expected in zip(paths, counts, strict=True):
        try:
            windows_ = _recording_windows(path, cfg, segment)
        except AudioError as exc:
            raise _changed_since_ingest(path, exc) from None
        if len(windows_) != expected:
            raise FeatureError(
                f"{path}: {len(windows_)} windows decoded, {expected} expected from its header"
            )
        cut.append(windows_)
    return torch.cat(cut)


_WORKER: dict = {}


def _worker_init(job: _Job) -> None:
    _WORKER["job"], _WORKER["frontend"] = job, job.frontend()


def _worker_run(chunk: Chunk) -> dict[str, np.ndarray]:
    return _WORKER["job"](chunk, _WORKER["frontend"])


def _run_jobs(job: _Job, jobs: list[Chunk], workers: int) -> Iterator[dict[str, np.ndarray]]:
    """Each chunk's arrays, in order: in this process, or in `workers` processes that end
    with featurize however it ends (`tympan.workers.pool_map`), each holding one front end."""
    if workers <= 1:
        frontend = job.frontend()
        for chunk in jobs:
            yield job(chunk, frontend)
        return
    yield from pool_map(_worker_run, jobs, workers, init=_worker_init, initargs=(job,))


def _index(table: pd.DataFrame, repeats: list[int] | None = None) -> pd.DataFrame:
    core = ["path", "label", "group", "split", "sha256"]
    side = [c for c in table.columns if c not in (*core, *PROBED)]
    index = table[core + side].reset_index(drop=True)
    if repeats is not None:
        index = index.loc[index.index.repeat(repeats)].reset_index(drop=True)
        index.insert(1, "window", np.concatenate([np.arange(n) for n in repeats]))
    index.insert(0, "row", np.arange(len(index)))
    return index


def _finish(
    index: pd.DataFrame,
    cfg: FeatureConfig,
    out_dir: Path,
    keys: dict[str, str],
    segment: SegmentConfig | None = None,
    extra: dict | None = None,
    whole_set_statistics: bool = False,
) -> None:
    """Write the index, train-split statistics (every used row's with `whole_set_statistics`)
    and meta beside the sets."""
    labels = sorted(index["label"].astype(str).unique())
    index.to_csv(out_dir / "index.csv", index=False)
    features = _open_sets(out_dir, [k for k in keys if k != WAVE], cfg)

    def stats_rows(split: np.ndarray) -> np.ndarray:
        if whole_set_statistics:  # a study's leak, reproduced on purpose
            return np.flatnonzero(np.isin(split, USED_SPLITS))
        return np.flatnonzero(split == "train")

    train_rows = stats_rows(index["split"].to_numpy())
    if len(train_rows) == 0:
        raise FeatureError("no train rows: normalisation statistics need the train split")
    mean, std = train_stats(features, train_rows)
    source = "whole set (val and test included)" if whole_set_statistics else "train split"
    stats = {"source": source, "rows": len(train_rows), "mean": mean, "std": std}
    folds = fold_numbers(index)
    if folds:
        stats["folds"] = []
        for k, fold in enumerate(folds, start=1):
            fold_rows = stats_rows(index[f"split_{fold}"].to_numpy())
            print(
                f"featurize: CV fold {fold} ({k} of {len(folds)}): normalisation statistics "
                f"from its {len(fold_rows)} rows"
            )
            fold_mean, fold_std = train_stats(features, fold_rows)
            stats["folds"].append(
                {"fold": fold, "rows": len(fold_rows), "mean": fold_mean, "std": fold_std}
            )
    (out_dir / "stats.json").write_text(json.dumps(_listed(stats), indent=1))
    segmented = segment is not None and segment.enabled
    meta = {
        "key": cache_key(index["sha256"].unique().tolist(), cfg, segment, extra),
        **(extra or {}),
        "feature": "+".join(cfg.stack.kinds),
        "params": to_dict(cfg),
        **({"segment": to_dict(segment)} if segmented else {}),
        "shape": list(features.shape),
        "dtype": cfg.dtype,
        "labels": labels,
        "sets": {
            kind: {"key": keys[kind], "file": f"{SETS}/{kind}.npy", "shape": list(a.shape)}
            for kind, a in features.sets.items()
        },
    }
    if "embedding" in cfg.stack.kinds:  # which weights made the set (train checks them)
        encoder = encoder_for(cfg.stack.encoder)
        meta["encoder"] = {"hash": encoder.weights_hash, "source": encoder.source}
    if WAVE in keys:
        meta["waves"] = {
            "key": keys[WAVE],
            "file": f"{SETS}/{WAVE}.npy",
            "shape": [len(index), n_samples(cfg)],
        }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    log.info("cached %d rows as %s %s in %s", len(index), features.shape, cfg.dtype, out_dir)


def _listed(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _listed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_listed(v) for v in value]
    return value


def _block_rows(row_shape: tuple[int, ...]) -> int:
    """Rows per statistics block: STATS_CHUNK, fewer when that many rows of this shape would
    take more than STATS_BLOCK_BYTES in float64."""
    row_bytes = 8 * int(np.prod(row_shape))
    return max(1, min(STATS_CHUNK, STATS_BLOCK_BYTES // max(row_bytes, 1)))


def train_stats(features: StackedFeatures, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-bin mean and std `(bins,)` over `rows` and all frames (and channels), streamed in
    float64. Callers pass train rows only: validation and test never shape the scaling."""
    total = np.zeros(features.shape[2])
    squares = np.zeros(features.shape[2])
    count = 0
    step = _block_rows(features.shape[1:])
    for start in range(0, len(rows), step):
        block = np.asarray(features[rows[start : start + step]], dtype=np.float64)
        total += block.sum(axis=(0, 1, 3))
        squares += np.square(block, out=block).sum(axis=(0, 1, 3))
        count += block.shape[0] * block.shape[1] * block.shape[3]
        del block
        _give_back_memory()
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


def _open_sets(out_dir: Path, kinds, cfg: FeatureConfig) -> StackedFeatures:
    sets = {kind: np.load(out_dir / SETS / f"{kind}.npy", mmap_mode="r") for kind in kinds}
    # read back as stored (`_dtype`: features.dtype, the waveform kind float32)
    return StackedFeatures(sets, cfg.stack, np.result_type(*(a.dtype for a in sets.values())))


def open_cache(out_dir: Path) -> FeatureCache:
    """Open a cache written by `build_cache` without reading the arrays into memory."""
    meta = json.loads((out_dir / "meta.json").read_text())
    stats = json.loads((out_dir / "stats.json").read_text())
    cfg = params_from_dict({"features": meta["params"]}, source=str(out_dir / "meta.json"))
    return FeatureCache(
        features=_open_sets(out_dir, meta["sets"], cfg.features),
        index=_read_index(out_dir / "index.csv"),
        labels=meta["labels"],
        mean=np.asarray(stats["mean"], dtype=np.float32),
        std=np.asarray(stats["std"], dtype=np.float32),
        meta=meta,
        fold_stats=tuple(stats.get("folds", ())),
        waves=(
            np.load(out_dir / meta["waves"]["file"], mmap_mode="r") if meta.get("waves") else None
        ),
    )
