"""Leaks the metadata does not show: one sound under two names, or overlapping excerpts of
one recording, found from the audio itself before a split is accepted.

Each recording gets a landmark fingerprint (Wang 2003, the Shazam constellation): at a fixed
8 kHz, the onset peaks of its log-power STFT, each paired with a few later peaks nearby, each
pair hashed as (frequency, frequency step, time step) with the anchor's time. A gain change
moves every peak alike and resampling keeps the band below 4 kHz, so the hashes survive both;
an excerpt keeps the hashes of the stretch it holds, shifted in time. The STFT runs at three
offsets of its frame grid (audfprint's `--shifts`), so an excerpt cut anywhere lines up within
2.5 ms with one of them. Two recordings share a sound when many distinct hashes agree on ONE
time offset between them; their similarity is that count over the distinct hashes lying
wholly inside their overlap at that offset (in the one with fewer), in [0, 1].

Hashes that many recordings hold (a hum, a click train) tell nothing and are dropped; each
distinct hash votes once, and peaks are onsets, not arbitrary frames of a steady tone, so
unrelated recordings of one steady tone do not match. Measured: takes of one digit by one
speaker (all 3,000 FSDD recordings) score at most 0.21, the demo set's synthetic clips at most
0.42; copies and overlapping excerpts 0.5 to 1, hence `split.similar_threshold: 0.5` (see
tests/test_similar.py and benchmarks/fingerprint.py).

What it cannot see: excerpts of one recording that share no audio (adjacent, non-overlapping
chunks) match only where the sound repeats itself; name such sources with `data.group_by`.
A recording with fewer than `MIN_MATCHES` distinct hashes (silence, a short blip, a pure
steady tone) cannot be matched; the split report counts them.

Cost (benchmarks/fingerprint.py, 2,000 ESC-sized clips, 2 cores): the first run about half of
featurize's log-mel front end (0.44-0.49 x wall, 0.49-0.51 x CPU), matching every pair under a
tenth of it; a re-run reads the cached fingerprints and only matches (0.06-0.08 x).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch

from tympan.audio import AudioError, resample_ratio
from tympan.audio.io import RESAMPLE_FILTER, check_peak, open_audio
from tympan.data.manifest import ManifestError
from tympan.workers import process_map, worker_count

log = logging.getLogger(__name__)

# The analysis every recording gets, whatever its own rate: 8 kHz, 32 ms Hann frames every
# 15 ms, at PHASES offsets of that grid (a frame every TICK samples, 5 ms).
RATE = 8000
N_FFT = 256
HOP = 120
PHASES = 3
TICK = HOP // PHASES
TICK_S = TICK / RATE
# A peak is the largest bin within +-PEAK_BINS (+-220 Hz) of its frame, RISE_DB above that
# neighbourhood in each of the PEAK_FRAMES frames before it and no more than HOLD_DB below it
# in the PEAK_FRAMES frames after: the onset of a sound, where a steady tone has no
# well-placed maximum. It lies within FLOOR_DB of the recording's strongest bin (only
# silence and dither lie lower: a quiet stretch must keep its peaks beside a loud one), and
# is among the PEAKS_PER_S strongest of its phase within half a second either side.
PEAK_BINS = 7
PEAK_FRAMES = 4
RISE_DB = 1.5
HOLD_DB = 1.0
FLOOR_DB = 80.0
PEAKS_PER_S = 30
# Each peak (anchor) pairs with its next FAN_OUT peaks 1..MAX_DT frames later and within
# MAX_DF bins; a hash packs (anchor bin: 9 bits, bin step + 64: 7 bits, frame step: 6 bits).
FAN_OUT = 3
MAX_DT = 63
MAX_DF = 63
DT_BITS = 6
HASH_BITS = 9 + 7 + DT_BITS
# Two recordings match when at least MIN_MATCHES distinct hashes agree on one offset (within
# a frame). A hash found more than COMMON_MIN times, and in more than about COMMON_SHARE of
# the recordings, tells nothing (a hum, a click train) and is dropped: a sound copied into
# more than COMMON_MIN recordings is not found through it.
MIN_MATCHES = 8
COMMON_SHARE = 0.01
COMMON_MIN = 64
# The fingerprint cache's key: any change to the constants above makes a new one.
_SETTINGS = (RATE, N_FFT, HOP, PHASES, PEAK_BINS, PEAK_FRAMES, RISE_DB, HOLD_DB, FLOOR_DB)
_SETTINGS += (PEAKS_PER_S, FAN_OUT, MAX_DT, MAX_DF, DT_BITS)
# and the computation's own version: 2 decodes 16-bit PCM as integers and resamples through
# `_Resampler` (the same filter; float rounding moves a few landmarks of some clips)
_SETTINGS += ("v2",)
KEY = "landmarks-" + hashlib.sha256(repr(_SETTINGS).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Fingerprint:
    """One recording's landmarks: `hashes` (n,) uint32 and their anchors' times `times` (n,)
    in ticks of `TICK_S`, sorted by time; the recording lasts `ticks`."""

    hashes: np.ndarray
    times: np.ndarray
    ticks: int

    @property
    def distinct(self) -> int:
        return int(np.unique(self.hashes).size)

    @property
    def matchable(self) -> bool:
        """At least `MIN_MATCHES` distinct hashes (the first few usually settle it)."""
        return (
            np.unique(self.hashes[: 8 * MIN_MATCHES]).size >= MIN_MATCHES
            or self.distinct >= MIN_MATCHES
        )

    def within(self, first: int, end: int) -> int:
        """Distinct hashes of the landmarks lying wholly (anchor and target) in `[first, end)`
        ticks."""
        dt = (self.hashes & ((1 << DT_BITS) - 1)).astype(np.int64) * PHASES
        inside = (self.times >= first) & (self.times + dt < end)
        return int(np.unique(self.hashes[inside]).size)


_WINDOW = torch.hann_window(N_FFT, periodic=False)  # built once: 10% of a 5 s clip's STFT


def log_spectrogram(wave: torch.Tensor | np.ndarray) -> torch.Tensor:
    """`(samples,)` at `RATE` -> `(frames, N_FFT // 2 + 1)` power in dB of Hann frames every
    `TICK` samples: frame k of phase p is row `k * PHASES + p`."""
    wave = torch.as_tensor(wave).to(torch.float32)
    if wave.numel() < N_FFT:
        wave = torch.nn.functional.pad(wave, (0, N_FFT - wave.numel()))
    spec = torch.stft(wave, N_FFT, TICK, window=_WINDOW, center=False, return_complex=True)
    return (10.0 * torch.log10(spec.real**2 + spec.imag**2 + 1e-18)).T.contiguous()


def peaks(log_spec: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Onset peaks of `(frames, bins)` dB from `log_spectrogram` -> `(phase, frame, bin)`,
    each `(k,)`, the frame counted within its phase; sorted by phase, frame, bin."""
    n_frames = log_spec.shape[0]
    near = torch.nn.functional.max_pool1d(log_spec[:, None, :], 2 * PEAK_BINS + 1, 1, PEAK_BINS)
    near = near[:, 0]
    top = float(log_spec.max())
    # candidates and the same bin PHASES, 2 PHASES, ... rows earlier and later, as flat indices
    spec, near = log_spec.numpy().ravel(), near.numpy().ravel()
    at = np.flatnonzero(spec == near)
    value = spec[at]
    loud = value >= top - FLOOR_DB  # on the candidates: a pass less over the spectrogram
    at, value = at[loud], value[loud]
    width = log_spec.shape[1]
    t, b = np.divmod(at, width)
    before = np.full(t.size, -np.inf, dtype=spec.dtype)
    after = before.copy()
    for step in range(PHASES, PHASES * PEAK_FRAMES + 1, PHASES):  # frames of the same phase
        shift = step * width
        np.maximum(before, near.take(at - shift, mode="clip"), out=before, where=t >= step)
        np.maximum(after, near.take(at + shift, mode="clip"), out=after, where=t + step < n_frames)
    onset = (value > before + RISE_DB) & (value >= after - HOLD_DB)
    t, b, value = t[onset], b[onset], value[onset]
    phase = t % PHASES
    by_phase = np.argsort(phase, kind="stable")  # then by row and bin, as found
    t, b, value, phase = t[by_phase], b[by_phase], value[by_phase], phase[by_phase]
    keep = _strongest_near(phase * (n_frames + RATE // TICK) + t, value)  # phases 1 s apart
    return phase[keep], t[keep] // PHASES, b[keep]


def _strongest_near(t: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Which of `(k,)` peaks (`t`: rows, each phase's a second past the last's, sorted) are
    among the `PEAKS_PER_S` strongest of their phase within half a second either side: a
    limit each stretch of audio sets for itself, so that a loud part of a recording does not
    crowd out the peaks of a quiet one."""
    half = round(0.5 * RATE / TICK)  # rows in half a second
    lo = np.searchsorted(t, t - half)  # rows of one phase: other phases lie further off
    hi = np.searchsorted(t, t + half, side="right")
    width = int((hi - lo).max(initial=0))
    if width <= PEAKS_PER_S:  # no second holds more peaks than the limit
        return np.ones(t.size, dtype=bool)
    near = lo[:, None] + np.arange(width)  # (k, width) candidates around each peak
    inside = near < hi[:, None]
    stronger = inside & (value[np.minimum(near, t.size - 1)] > value[:, None])
    return stronger.sum(axis=1) < PEAKS_PER_S


def landmarks(
    frames: np.ndarray, bins: np.ndarray, phases: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Pair each of `(k,)` peaks (sorted by phase, then frame) with its next `FAN_OUT` peaks
    of its phase 1..`MAX_DT` frames later within `MAX_DF` bins -> `(hashes, anchor index)`,
    each `(m,)`, the anchor an index into the peaks."""
    n = frames.size
    if n < 2:
        return np.zeros(0, np.uint32), np.zeros(0, np.int64)
    search = 4 * FAN_OUT
    anchor = np.repeat(np.arange(n), search)
    target = anchor + np.tile(np.arange(1, search + 1), n)
    inside = target < n
    target = np.where(inside, target, 0)
    dt = frames[target] - frames[anchor]
    df = bins[target] - bins[anchor]
    ok = inside & (dt >= 1) & (dt <= MAX_DT) & (np.abs(df) <= MAX_DF)
    if phases is not None:
        ok &= phases[target] == phases[anchor]
    ok = ok.reshape(n, search)
    ok = (ok & (np.cumsum(ok, axis=1) <= FAN_OUT)).ravel()
    anchor, dt, df = anchor[ok], dt[ok], df[ok]
    hashes = bins[anchor].astype(np.uint32) << (7 + DT_BITS)
    hashes |= (df + 64).astype(np.uint32) << DT_BITS
    return hashes | dt.astype(np.uint32), anchor


def fingerprint_wave(wave: torch.Tensor | np.ndarray) -> Fingerprint:
    """`(samples,)` float at `RATE` -> its landmarks over every phase of the frame grid."""
    wave = torch.as_tensor(wave)
    phase, frame, bins = peaks(log_spectrogram(wave))
    hashes, anchor = landmarks(frame, bins, phase)
    times = frame[anchor].astype(np.int64) * PHASES + phase[anchor]
    packed = np.unique(times << 32 | hashes)  # sorted by time, each (time, hash) once
    return Fingerprint(
        (packed & 0xFFFFFFFF).astype(np.uint32),
        (packed >> 32).astype(np.int32),
        wave.numel() // TICK,
    )


def fingerprint_file(path: str | Path) -> Fingerprint:
    """Decode and downmix, resample to `RATE` (tympan.audio.resample's filter), then
    `fingerprint_wave`."""
    samples, scale, rate = _samples(path)
    if rate != RATE:  # scaled as it is copied into the resampler's buffer
        return fingerprint_wave(_resampler(rate)(samples, scale))
    return fingerprint_wave(samples * scale if scale != 1 else samples)


def read_mono(path: str | Path) -> tuple[np.ndarray, int]:
    """`(frames,)` float32 (the channels' mean) and the rate: what tympan.audio's `decode` and
    `to_mono` give, sample for sample, with the same errors for a file that is not audio any
    more."""
    samples, scale, rate = _samples(path)
    return (samples * scale if scale != 1 else samples), rate


def _samples(path: str | Path) -> tuple[np.ndarray, np.float32, int]:
    """`(frames,)` samples (the channels' mean), the scale that makes them `read_mono`'s
    float32 and the rate. 16-bit PCM stays integers until scaled (exactly: libsndfile divides
    by 32768 too), as its own conversion to float costs three times the read."""
    with open_audio(path) as handle:
        pcm16 = handle.subtype == "PCM_16"
        try:
            data = handle.read(dtype="int16" if pcm16 else "float32", always_2d=True)
        except sf.LibsndfileError as exc:
            raise AudioError(f"truncated or corrupt ({exc})") from None
        rate = handle.samplerate
    if data.size == 0:
        raise AudioError("no audio frames")
    if pcm16:
        mono = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)
        return mono, np.float32(1 / 32768), rate
    check_peak(float(np.abs(data).max()))  # NaN, infinity or an extreme peak: as decode
    return (data[:, 0].copy() if data.shape[1] == 1 else data.mean(axis=1)), np.float32(1), rate


class _Resampler:
    """tympan.audio.resample (torchaudio's Kaiser-windowed sinc at `resample_ratio`) from one
    rate to `RATE`, its kernel built once and applied as a polyphase filter: per output
    phase only the taps inside the filter's support, where torchaudio's strided convolution
    multiplies every phase by a kernel `orig` taps longer than its support (at 44.1 kHz ->
    8 kHz, 629 taps of which 187 are not zero). Output phases run in groups of `GROUP`, each
    one matrix product over the input blocks."""

    GROUP = 8

    def __init__(self, rate: int) -> None:
        orig, new = resample_ratio(rate, RATE)
        width_taps, rolloff, beta = (
            RESAMPLE_FILTER["lowpass_filter_width"],
            RESAMPLE_FILTER["rolloff"],
            RESAMPLE_FILTER["beta"],
        )
        base = min(orig, new) * rolloff
        self.orig, self.new = orig, new
        self.width = math.ceil(width_taps * orig / base)
        # torchaudio's _get_sinc_resample_kernel, in float64: phase j, tap k
        idx = np.arange(-self.width, self.width + orig, dtype=np.float64) / orig
        t = (np.arange(0, -new, -1)[:, None] / new + idx[None, :]) * base
        support = np.abs(t) < width_taps
        t = np.clip(t, -width_taps, width_taps)
        window = np.i0(beta * np.sqrt(1 - (t / width_taps) ** 2)) / np.i0(beta)
        t *= np.pi
        safe = np.where(t == 0, 1.0, t)
        kernel = np.where(t == 0, 1.0, np.sin(safe) / safe) * window * (base / orig)
        self.groups = []
        for first in range(0, new, self.GROUP):
            last = min(new, first + self.GROUP)
            taps = np.flatnonzero(support[first:last].any(axis=0))
            lo, hi = int(taps[0]), int(taps[-1]) + 1
            part = kernel[first:last, lo:hi].T.astype(np.float32)
            self.groups.append((first, last, lo, hi, np.ascontiguousarray(part)))

    def __call__(self, wave: np.ndarray, scale: float = 1.0) -> np.ndarray:
        """`(frames,)` samples times `scale` -> `(ceil(frames * new / orig),)` float32."""
        frames = wave.shape[-1]
        padded = np.zeros(frames + 2 * self.width + self.orig, dtype=np.float32)
        np.multiply(wave, np.float32(scale), out=padded[self.width : self.width + frames])
        span = 2 * self.width + self.orig
        blocks = (padded.size - span) // self.orig + 1
        item = padded.itemsize
        rows = np.lib.stride_tricks.as_strided(
            padded, (blocks, span), (self.orig * item, item), writeable=False
        )
        out = np.empty((blocks, self.new), dtype=np.float32)
        for first, last, lo, hi, part in self.groups:
            np.matmul(rows[:, lo:hi], part, out=out[:, first:last])
        return out.reshape(-1)[: -(-self.new * frames // self.orig)]


@functools.lru_cache(maxsize=8)
def _resampler(rate: int) -> _Resampler:
    """`_Resampler` from `rate` to `RATE`, built once per rate (a test keeps it equal to
    tympan.audio.resample)."""
    return _Resampler(rate)


def _fingerprint_checked(path: str) -> Fingerprint:
    try:
        return fingerprint_file(path)
    except (AudioError, OSError) as exc:
        raise ManifestError(
            f"{path}: cannot be read for the split's content check ({exc}); it changed since "
            "ingest: re-run ingest (`dvc repro split`)"
        ) from None


class FingerprintCache:
    """Fingerprints by sha256, in one file per `KEY` under `folder` (never a file per clip):
    `get` computes what it lacks, `save` writes everything it holds, atomically. A cache that
    cannot be read is ignored (and overwritten): it only ever saves time."""

    def __init__(self, folder: Path | None) -> None:
        self.path = None if folder is None else folder / f"{KEY}.npz"
        self.prints: dict[str, Fingerprint] = {}
        self.reused = 0
        self.computed = 0
        if self.path is None or not self.path.exists():
            return
        try:
            with np.load(self.path) as stored:
                shas, start, ticks = stored["sha256"], stored["start"], stored["ticks"]
                hashes, times = stored["hashes"], stored["times"]
        except (OSError, ValueError, KeyError) as exc:
            log.warning("split: ignoring the unreadable fingerprint cache %s (%s)", self.path, exc)
            return
        for i, sha in enumerate(shas):
            span = slice(int(start[i]), int(start[i + 1]))
            self.prints[str(sha)] = Fingerprint(hashes[span], times[span], int(ticks[i]))

    def get(self, paths: list[str], shas: list[str]) -> list[Fingerprint]:
        """Each file's fingerprint, computing those it lacks (in one process per CPU when
        there are many); a file that cannot be decoded any more is a ManifestError (it
        changed since ingest probed it)."""
        missing = {sha: path for path, sha in zip(paths, shas, strict=True)}
        missing = {sha: path for sha, path in missing.items() if sha not in self.prints}
        computed = process_map(
            _fingerprint_checked, list(missing.values()), worker_count(len(missing))
        )
        self.prints.update(zip(missing, computed, strict=True))
        self.computed += len(missing)
        self.reused += len(paths) - len(missing)
        return [self.prints[sha] for sha in shas]

    def save(self) -> None:
        if self.path is None or not self.computed:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        shas = sorted(self.prints)
        prints = [self.prints[s] for s in shas]
        sizes = np.array([p.hashes.size for p in prints], dtype=np.int64)
        partial = self.path.with_name(f".{self.path.stem}.{os.getpid()}.partial.npz")
        np.savez(
            partial,
            sha256=np.array(shas, dtype=str),
            start=np.concatenate([[0], np.cumsum(sizes)]),
            ticks=np.array([p.ticks for p in prints], dtype=np.int64),
            hashes=np.concatenate([p.hashes for p in prints]),
            times=np.concatenate([p.times for p in prints]),
        )
        os.replace(partial, self.path)


PAIR_COLUMNS = ("a", "b", "matches", "similarity", "offset_s", "overlap_s")


def match(prints: list[Fingerprint], groups: np.ndarray, threshold: float) -> pd.DataFrame:
    """Pairs of recordings in different `groups` that share a sound -> table `a, b` (indices
    into `prints`, a < b), `matches` (distinct hashes agreeing on one offset, within a frame),
    `offset_s` (a's time t is b's time t + offset_s), `overlap_s` (how long the two overlap at
    that offset) and `similarity`: matches over the distinct hashes lying wholly inside the
    overlap, in the recording with fewer there (1: the overlap sounds the same in both).
    Every pair with `MIN_MATCHES` or more and `similarity >= threshold`, most similar first.
    """
    empty = pd.DataFrame({c: pd.Series(dtype=float) for c in PAIR_COLUMNS})
    n = len(prints)
    found = _candidates(prints, np.asarray(groups, dtype=str)) if n > 1 else None
    if found is None:
        return empty
    pair, off, hashed = found
    # a pair with fewer candidates than MIN_MATCHES cannot match: drop its candidates first
    enough = _candidate_counts(pair, n) >= MIN_MATCHES
    pair, off, hashed = pair[enough], off[enough], hashed[enough]
    if not pair.size:
        return empty
    best: dict[int, tuple[int, int]] = {}  # pair -> (votes, offset in ticks)
    for stagger in (0, PHASES // 2):  # offset bins one frame wide, twice, half a frame apart
        cell = np.floor_divide(off + stagger, PHASES)
        low = int(cell.min(initial=0))
        width = int(cell.max(initial=0)) - low + 1
        cells = _distinct_votes(pair * width + (cell - low), hashed)
        starts = np.flatnonzero(np.r_[True, cells[1:] != cells[:-1]])
        votes = np.diff(np.r_[starts, cells.size])
        for c, v in zip(
            cells[starts[votes >= MIN_MATCHES]], votes[votes >= MIN_MATCHES], strict=True
        ):
            key = int(c // width)
            center = (int(c % width) + low) * PHASES - stagger + PHASES // 2
            if v > best.get(key, (0, 0))[0]:
                best[key] = (int(v), center)
    rows = []
    for key, (votes, offset) in sorted(best.items()):
        first_print, second_print = prints[key // n], prints[key % n]
        start = max(0, -offset)
        end = min(first_print.ticks, second_print.ticks - offset)
        inside = min(
            first_print.within(start, end), second_print.within(start + offset, end + offset)
        )
        rows.append(
            {
                "a": key // n,
                "b": key % n,
                "matches": votes,
                "similarity": round(min(1.0, votes / max(1, inside)), 3),
                "offset_s": round(offset * TICK_S, 3),
                "overlap_s": round(max(0, end - start) * TICK_S, 3),
            }
        )
    out = pd.DataFrame(rows, columns=list(PAIR_COLUMNS)) if rows else empty
    out = out[out["similarity"] >= threshold]
    return out.sort_values(["similarity", "a", "b"], ascending=[False, True, True]).reset_index(
        drop=True
    )


# Up to this many pairs of recordings (2,896 recordings), candidates are counted per pair in
# one array of n * n counts (64 MiB at most); beyond, by sorting the pair keys.
DENSE_PAIRS = 1 << 23


def _candidate_counts(pair: np.ndarray, n: int) -> np.ndarray:
    """How many candidates the pair of each of `(p,)` candidates has (`pair`: a * n + b)."""
    if n * n <= DENSE_PAIRS:
        return np.bincount(pair, minlength=n * n)[pair]
    keys = np.sort(pair)
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    counts = np.diff(np.r_[starts, keys.size])
    return counts[np.searchsorted(keys[starts], pair)]


def _distinct_votes(cells: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """`(p,)` cells and hashes -> the cell of each distinct (cell, hash), sorted: one vote per
    distinct hash in a cell. One int64 sort when both fit in 63 bits, else a lexsort."""
    if cells.size and int(cells.max()) < 1 << (63 - HASH_BITS):
        packed = np.sort(cells << HASH_BITS | hashes)  # (np.unique hashes: slower here)
        return packed[np.r_[True, packed[1:] != packed[:-1]]] >> HASH_BITS
    order = np.lexsort((hashes, cells))
    cells, hashes = cells[order], hashes[order]
    first = np.r_[True, (cells[1:] != cells[:-1]) | (hashes[1:] != hashes[:-1])]
    return cells[first]


def _candidates(
    prints: list[Fingerprint], groups: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Every pair of landmarks with one hash in recordings of different groups, from an
    inverted index (all hashes sorted together; each run of equal hashes gives its pairs) ->
    `(pair, offset in ticks, hash)`, each `(p,)` int64, the pair of recordings a < b as
    `a * len(prints) + b`; None when there are none."""
    n = len(prints)
    hashes = np.concatenate([p.hashes for p in prints]).astype(np.int64)
    times = np.concatenate([p.times for p in prints]).astype(np.int64)
    rec = np.repeat(np.arange(n), [p.hashes.size for p in prints])
    _, group_code = np.unique(groups, return_inverse=True)
    # by hash, then recording and time: the prints come in recording order, each sorted by
    # time, so one sort of (hash, position) packed in an int64 is that lexsort's order
    order = np.sort(hashes << 40 | np.arange(hashes.size)) & ((1 << 40) - 1)
    hashes, times, rec = hashes[order], times[order], rec[order]
    # one landmark seen at neighbouring phases of a recording: its first sighting only
    again = (hashes[1:] == hashes[:-1]) & (rec[1:] == rec[:-1]) & (times[1:] - times[:-1] < PHASES)
    keep = np.r_[True, ~again]
    hashes, times, rec = hashes[keep], times[keep], rec[keep]
    group = group_code[rec]
    starts = np.flatnonzero(np.r_[True, hashes[1:] != hashes[:-1]])
    lengths = np.diff(np.r_[starts, hashes.size])
    run_end = np.repeat(starts + lengths, lengths)
    common = lengths > max(COMMON_MIN, COMMON_SHARE * n)
    active = np.flatnonzero(np.repeat((lengths > 1) & ~common, lengths))
    found: list[tuple[np.ndarray, ...]] = []
    k = 1
    while active.size:  # entry i with the entry k later in its run, for every k
        active = active[active + k < run_end[active]]
        # a run lists its recordings in order, so rec[i] <= rec[j]: equal only in one group
        i = active[group[active] != group[active + k]]
        j = i + k
        found.append((rec[i] * n + rec[j], times[j] - times[i], hashes[i]))
        k += 1
    if not any(f[0].size for f in found):
        return None
    pair, off, hashed = (np.concatenate(column) for column in zip(*found, strict=True))
    return pair, off, hashed


def merged_groups(groups: np.ndarray, pairs: pd.DataFrame) -> tuple[np.ndarray, list[list[str]]]:
    """Union-find over `groups` (one per recording; `pairs` holds `group_a, group_b`): the
    groups of each pair become one, named by its first group in sorted order -> (the new
    group per recording, each merged set of two or more groups, sorted)."""
    names = np.asarray(groups, dtype=str)
    parent = {g: g for g in set(names)}

    def root(g: str) -> str:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    for a, b in zip(pairs["group_a"], pairs["group_b"], strict=True):
        ra, rb = root(str(a)), root(str(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    sets: dict[str, list[str]] = {}
    for g in sorted(parent):
        sets.setdefault(root(g), []).append(g)
    merged = sorted(s for s in sets.values() if len(s) > 1)
    return np.array([root(g) for g in names], dtype=object), merged


@dataclass
class Similar:
    """What the content check found in a manifest: `pairs` of recordings in different groups
    that sound the same (`path_a, path_b, group_a, group_b` and `match`'s columns), with how
    many recordings were checked, how many had too few landmarks to be matched, and the cost."""

    pairs: pd.DataFrame
    threshold: float
    recordings: int
    too_few_landmarks: int
    reused: int
    seconds: float
    merged: list[list[str]] = field(default_factory=list)

    def across(self, table: pd.DataFrame, column: str = "split") -> pd.DataFrame:
        """The pairs whose recordings have different values of `column` in `table` (`path`
        and `column`: a split, or `cv_fold`), with both values as `<column>_a, <column>_b`."""
        where = dict(zip(table["path"], table[column], strict=True))
        out = self.pairs.assign(
            **{
                f"{column}_a": self.pairs["path_a"].map(where),
                f"{column}_b": self.pairs["path_b"].map(where),
            }
        )
        return out[out[f"{column}_a"] != out[f"{column}_b"]]


def find_similar(manifest: pd.DataFrame, threshold: float, cache: Path | None) -> Similar:
    """Fingerprint every recording of `manifest` (`path, group, sha256`; reusing the
    fingerprints cached in the folder `cache`, and adding the new ones) and `match` them."""
    started = time.perf_counter()
    store = FingerprintCache(cache)
    prints = store.get(manifest["path"].tolist(), manifest["sha256"].tolist())
    store.save()
    groups = manifest["group"].astype(str).to_numpy()
    found = match(prints, groups, threshold)
    paths = manifest["path"].to_numpy()
    pairs = pd.DataFrame(
        {
            "path_a": paths[found["a"].astype(int)],
            "path_b": paths[found["b"].astype(int)],
            "group_a": groups[found["a"].astype(int)],
            "group_b": groups[found["b"].astype(int)],
            **{c: found[c].to_numpy() for c in PAIR_COLUMNS[2:]},
        }
    )
    return Similar(
        pairs=pairs,
        threshold=threshold,
        recordings=len(prints),
        too_few_landmarks=sum(not p.matchable for p in prints),
        reused=store.reused,
        seconds=time.perf_counter() - started,
    )
