"""Featurize's memory as the set grows (issue 17, item 3): the feature cache is a memmap written
chunk by chunk, so the process's own memory must stay flat while the cache grows 1x/4x/16x.

    python benchmarks/cache_scale.py                 # 1x = 150 clips of 4 s (16x: 2,400, 0.5 GB)
    python benchmarks/cache_scale.py --quick         # 1x = 48 clips, 1x and 8x (the test's)
    python benchmarks/cache_scale.py --json out.json

Each size runs `build_cache` (one process, `features.workers: 1`, so every feature is computed
where it is measured; batches of 16 clips, so every size computes full batches) in a fresh
subprocess that samples /proc/self/status every 10 ms:

- anon: resident anonymous memory (RssAnon), what the process itself holds: arrays, buffers,
  Python objects. It cannot be given back without swap: this is what must stay flat.
- rss: all resident memory (VmHWM, the kernel's peak), which also counts pages of the memory
  mapped cache file in the page cache: the kernel writes those back and drops them under
  memory pressure (a cgroup limit), so they grow with the set without making a larger set fail.

Printed: per size the cache's bytes, peak anon and rss, and each against the 1x run in the same
invocation (ratios; absolute figures beside them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SECONDS, RATE = 4.0, 16000


def _status() -> dict[str, int]:
    """This process's memory figures from /proc/self/status, in bytes."""
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            found[key] = int(value.split()[0]) * 1024
    return found


def measure(folder: str, clips: int) -> dict:
    """In this (fresh) process: write `clips` clips, build their cache, sampling memory."""
    import pandas as pd
    import soundfile as sf

    from tympan.config import FeatureConfig
    from tympan.features import build_cache

    folder_path = Path(folder)
    rng = np.random.default_rng(clips)
    rows = []
    t = np.arange(int(SECONDS * RATE)) / RATE
    for i in range(clips):
        label = ("low", "high")[i % 2]
        freq = rng.uniform(200, 400) if label == "low" else rng.uniform(2500, 3500)
        wave = 0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.size)
        path = folder_path / "audio" / f"{i:05d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, wave.astype(np.float32), RATE, subtype="PCM_16")
        split = ("train", "train", "train", "val", "test")[i % 5]
        rows.append(
            {
                "path": str(path),
                "label": label,
                "group": str(i),
                "split": split,
                "sha256": f"{i:064x}",
            }
        )
    table = pd.DataFrame(rows)
    cfg = FeatureConfig(
        sample_rate=RATE,
        seconds=SECONDS,
        n_fft=400,
        hop_length=160,
        n_mels=128,
        dtype="float32",
        workers=1,
    )
    before = _status()
    peak = {"RssAnon": before["RssAnon"]}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak["RssAnon"] = max(peak["RssAnon"], _status()["RssAnon"])
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    build_cache(table, cfg, folder_path / "cache")
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    after = _status()
    cache_bytes = sum(p.stat().st_size for p in (folder_path / "cache").rglob("*.npy"))
    return {
        "clips": clips,
        "cache_bytes": cache_bytes,
        "anon_before": before["RssAnon"],
        "anon_peak": max(peak["RssAnon"], after["RssAnon"]),
        "rss_peak": after["VmHWM"],
        "seconds": seconds,
    }


def run(base: int, factors: list[int]) -> list[dict]:
    rows = []
    for factor in factors:
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run(
                [sys.executable, __file__, "--measure", tmp, str(base * factor)],
                capture_output=True,
                text=True,
                check=False,
                env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
            )
            if done.returncode != 0:
                raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
            row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append({"factor": factor, **row})
    return rows


def report(rows: list[dict]) -> None:
    one = rows[0]
    mb = 1024 * 1024
    base = one["clips"] // one["factor"]
    print(f"featurize memory, 1x = {base} clips of {SECONDS:g} s (128 mels, float32)")
    first = f"x {one['factor']}x"
    print(f"size  clips  cache MB  anon peak MB ({first})  anon grew MB  rss peak MB ({first})  s")
    for r in rows:
        print(
            f"{r['factor']:>3}x {r['clips']:>6} {r['cache_bytes'] / mb:9.1f} "
            f"{r['anon_peak'] / mb:10.1f} ({r['anon_peak'] / one['anon_peak']:.2f}x) "
            f"{(r['anon_peak'] - r['anon_before']) / mb:12.1f} "
            f"{r['rss_peak'] / mb:10.1f} ({r['rss_peak'] / one['rss_peak']:.2f}x) "
            f"{r['seconds']:6.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1x = 48 clips; 1x and 8x")
    parser.add_argument("--base", type=int, help="clips at 1x (default 150, --quick 48)")
    parser.add_argument("--factors", type=int, nargs="+", help="default 1 4 16 (--quick 1 8)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], int(args.measure[1]))))
        return
    base = args.base or (48 if args.quick else 150)
    rows = run(base, args.factors or ([1, 8] if args.quick else [1, 4, 16]))
    report(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
