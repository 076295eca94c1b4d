"""The split's content check (`split.similar`) against featurize, on the same ESC-sized clips.

    .venv/bin/python benchmarks/fingerprint.py                  # 2,000 clips (~5 min on 2 cores)
    .venv/bin/python benchmarks/fingerprint.py --quick          # 300 clips
    .venv/bin/python benchmarks/fingerprint.py --workdir /tmp/esc --json fingerprint.json

`--clips` 5 s mono 16-bit WAVs at 44.1 kHz (ESC-50's size), written once into `--workdir`
(reused when there, else a temporary folder removed at the end): benchmarks/featurize.py's
generated clips (a few tones, glides and pulses in noise), of which the last 5% are planted
leaks of earlier ones under new names: a copy 6 dB quieter, a copy resampled to 16 kHz, or the
second half of one clip followed by the first half of the next (an excerpt overlapping both).
Every file is its own group, as chunks filed under their own source names are.

Timed in this process, one after the other, on the same files (read once first, so that all
find them in the page cache):

- featurize: the featurize stage's own `build_cache` (as benchmarks/featurize.py runs it),
  ESC-50 style log-mel (44.1 kHz, 5 s, n_fft 2048, hop 512, 128 mels), its defaults: one
  process per CPU;
- the content check cold: `find_similar` with an empty fingerprint cache (decode, resample to
  8 kHz and fingerprint every clip, in one process per CPU as featurize, then match them all
  in this process), and its fingerprinting and matching parts on their own;
- the content check warm: `find_similar` again, the fingerprints read from the cache (what a
  re-run of the split stage pays when the audio did not change).

Printed: wall seconds and clips per second of each, CPU seconds (worker processes included:
on a shared machine the steadier figure), each as a multiple of featurize's, and what the
check found: the pairs that share audio found of those planted, and any other pair (a false
match). A figure, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from featurize import ESC_CFG, esc_files, read_all, run_featurize

from tympan.audio import resample
from tympan.config import SplitConfig
from tympan.data import similar
from tympan.workers import process_map, worker_count

RATE = 44100
SECONDS = 5.0
PLANTED_SHARE = 0.05
KINDS = ("quieter", "resampled", "overlapping")
THRESHOLD = SplitConfig().similar_threshold


def plant(files: list[Path], workdir: Path, count: int) -> tuple[list[Path], set[frozenset]]:
    """`count` leaks of the first clips in `files`, written into `workdir` -> (their files,
    every pair of file names that share audio: a leak with its sources, and two leaks of one
    source, such as a quieter copy of clip 7 and the excerpt that begins with clip 7's first
    half)."""
    made = []
    halves = {f.name: {(i, 0), (i, 1)} for i, f in enumerate(files)}  # what each file holds
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        path = workdir / f"leak_{i:04d}_{kind}.wav"
        made.append(path)
        halves[path.name] = {(i, 1), (i + 1, 0)} if kind == "overlapping" else halves[files[i].name]
        if path.exists():
            continue
        wave, rate = sf.read(files[i], dtype="float32")
        if kind == "quieter":
            sf.write(path, wave * 10 ** (-6 / 20), rate, subtype="PCM_16")
        elif kind == "resampled":
            down = resample(torch.from_numpy(wave), rate, 16000).numpy()
            sf.write(path, down, 16000, subtype="PCM_16")
        else:
            after, _ = sf.read(files[i + 1], dtype="float32")
            half = wave.size // 2
            sf.write(path, np.concatenate([wave[half:], after[:half]]), rate, subtype="PCM_16")
    touched = [f.name for f in files[: count + 1]] + [f.name for f in made]
    pairs = {
        frozenset((a, b))
        for k, a in enumerate(touched)
        for b in touched[k + 1 :]
        if halves[a] & halves[b]
    }
    return made, pairs


def manifest_of(files: list[Path]) -> pd.DataFrame:
    """What the split stage reads: every file its own group, a sha256 per file (its name
    here: the cache key only needs to be unique)."""
    return pd.DataFrame(
        {
            "path": [str(f) for f in files],
            "group": [f.stem for f in files],
            "sha256": [f.name for f in files],
        }
    )


class Clock:
    """Wall and CPU seconds of a block, worker processes' CPU included."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), _cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, _cpu() - self.cpu


def _cpu() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def check(manifest: pd.DataFrame, cache: Path, cold: bool) -> dict[str, Clock]:
    """`find_similar` over `manifest`; cold: also time its two parts on their own."""
    out: dict[str, Clock] = {}
    if cold:
        paths = manifest["path"].tolist()
        with Clock() as out["fingerprint"]:
            prints = process_map(similar.fingerprint_file, paths, worker_count(len(paths)))
        with Clock() as out["match"]:
            similar.match(prints, manifest["group"].to_numpy(), THRESHOLD)
    with Clock() as out["check"]:
        out["found"] = similar.find_similar(manifest, THRESHOLD, cache)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clips", type=int, help="default 2,000 (--quick: 300)")
    parser.add_argument("--workdir", type=Path, help="keep the generated clips here")
    parser.add_argument("--quick", action="store_true", help="300 clips")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    clips = args.clips or (300 if args.quick else 2000)
    planted = max(3, round(PLANTED_SHARE * clips))
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        start = time.perf_counter()
        originals, _ = esc_files(workdir, clips - planted, RATE, SECONDS)
        leaks, truth = plant(originals, workdir, planted)
        files = originals + leaks
        print(
            f"{len(files)} clips ({planted} planted leaks) in {workdir}: "
            f"{time.perf_counter() - start:.0f} s to write or find"
        )
        read_all(files)
        run_featurize(files[:8], ESC_CFG, ("logmel",), 64)  # warm-up, untimed
        with Clock() as featurize:
            run_featurize(files, ESC_CFG, ("logmel",), 64)
        manifest = manifest_of(files)
        cache = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "fingerprints"
        with contextlib.redirect_stdout(io.StringIO()):
            cold = check(manifest, cache, cold=True)  # fills the cache
            warm = check(manifest, cache, cold=False)
    found = cold["found"].pairs
    pairs = {
        frozenset((Path(a).name, Path(b).name))
        for a, b in zip(found["path_a"], found["path_b"], strict=True)
    }
    workers = worker_count(len(files))
    rows = {
        "featurize": (f"featurize, log-mel ({workers} processes)", featurize),
        "check": (f"content check, cold ({workers} processes)", cold["check"]),
        "fingerprint": ("  fingerprinting (decode, resample, landmarks)", cold["fingerprint"]),
        "match": ("  matching every pair (this process)", cold["match"]),
        "check_warm": ("content check, warm (fingerprints cached)", warm["check"]),
    }
    n = len(files)
    print(f"{'':48} {'wall s':>7} {'clips/s':>8} {'x feat.':>8} {'CPU s':>7} {'x feat.':>8}")
    for name, clock in rows.values():
        wall, cpu = clock.wall / featurize.wall, clock.cpu / featurize.cpu
        print(
            f"{name:48} {clock.wall:7.1f} {n / clock.wall:8.1f} {wall:8.2f} "
            f"{clock.cpu:7.1f} {cpu:8.2f}"
        )
    result = {
        "clips": n,
        "workers": workers,
        "pairs_sharing_audio": len(truth),
        "found_of_them": len(pairs & truth),
        "other_pairs_found": len(pairs - truth),
        "lowest_similarity_found": float(found["similarity"].min()) if len(found) else None,
        "too_few_landmarks": cold["found"].too_few_landmarks,
        **{f"{key}_wall_s": clock.wall for key, (_, clock) in rows.items()},
        **{f"{key}_cpu_s": clock.cpu for key, (_, clock) in rows.items()},
        "machine": platform.processor() or platform.machine(),
        "load_average_1min": os.getloadavg()[0],
    }
    print(
        f"found {result['found_of_them']} of the {result['pairs_sharing_audio']} pairs that "
        f"share audio and {result['other_pairs_found']} other pair(s); lowest similarity "
        f"{result['lowest_similarity_found']}; {result['too_few_landmarks']} clip(s) with too "
        f"few landmarks to match; load average {result['load_average_1min']:.1f} on "
        f"{os.cpu_count()} CPUs"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
