"""Featurize throughput: tympan's batched front end against a per-file librosa loop.

    .venv/bin/python benchmarks/featurize.py --quick                  # 300 + 200 clips, ~2 min
    .venv/bin/python benchmarks/featurize.py --json featurize.json    # 3,000 FSDD + 2,000 ESC
    .venv/bin/python benchmarks/featurize.py --device cuda            # FeatureStack on the GPU
    .venv/bin/python benchmarks/featurize.py --dvc                    # also a no-op `dvc repro`

Clips per second, decoding included, for three feature sets: log-mel, MFCC (40 coefficients)
and study S2's stack (MFCC + LPC 12 + spectral contrast + centroid + zero-crossing rate), on
two data sets:

- FSDD (`--fsdd`, 3,000 spoken digits at 8 kHz), features as in pipelines/fsdd.yaml: 8 kHz,
  1 s, n_fft 256, hop 128, 40 mels;
- an ESC-50-sized set generated once (`--esc-clips` 5 s mono 16-bit WAVs at 44.1 kHz, a few
  tones and noise, seeded; in `--workdir`, reused when already there, else a temporary
  directory removed at the end), features ESC-50 style: 44.1 kHz, 5 s, n_fft 2048, hop 512,
  128 mels. Native rate, so nothing is resampled on either path.

Two paths, timed in this process, one after the other, on the same files:

- baseline, the seeds' approach: a Python loop over files, `librosa.load(path, sr=rate)`,
  `librosa.util.fix_length` to the clip length, then `melspectrogram` + `power_to_db`
  (ref=max, top_db), or `feature.mfcc`, or for the S2 stack `feature.mfcc`, `librosa.lpc`,
  `spectral_contrast`, `spectral_centroid` and `zero_crossing_rate`, each called on the
  waveform as a script would (each computes its own STFT). LPC is per frame, not per clip as
  the seed had it, so that it has the stack's shape: centred Hann frames of n_fft samples every
  hop, one vectorised `librosa.lpc(frames, axis=0)` call per clip (Burg's method; tympan
  uses the autocorrelation method, so the coefficients differ slightly, the work is alike);
- tympan, the featurize stage's own code: `build_cache` on a table of the files into a fresh
  directory (nothing to reuse), with its defaults: one spawned process per CPU (256 clips or
  more), each decoding `--batch-size` files at a time with soundfile (downmix, resample,
  pad/crop) and running `FeatureStack` with one torch thread, the parent writing the
  memory-mapped sets, then the index and train statistics; process start-up is included.
  With `--device cuda` (when available): decode in this process and `FeatureStack` on the GPU
  per batch; the S2 stack's LPC and librosa kinds still run on the CPU there.

Each path runs once untimed on `--warmup` clips first (librosa's numba kernels compile on first
use), and every file is read once before timing so both paths find it in the page cache.
Printed per data set and feature set: clips, output (bins x frames), seconds and clips/s of
each path, the share of the baseline spent in librosa.load (and of the GPU path in decoding),
and tympan / baseline. The issue's goal:
log-mel and MFCC at least 5x the baseline on a 2-core machine, 50x on a GPU.

`--dvc` also times, in the repo root with the venv's bin on PATH, `dvc status` and then a
no-op `dvc repro`; when `dvc status` reports changes the repro timing is skipped, since it
would run stages. Then, in a throwaway DVC project on FSDD (the fsdd preset with
`kinds: [logmel, mfcc]`), `dvc repro featurize` for: the first run (ingest, split, featurize
from scratch), a no-op, a change of `n_mfcc` (only the MFCC set is computed; log-mel is copied
from DVC's cache), the change back (DVC's run-cache, nothing computed) and a change of
`n_mels` (both sets computed). A figure, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import librosa
import numpy as np
import pandas as pd
import soundfile as sf
import torch
import torchaudio

from tympan.config import FeatureConfig
from tympan.features import build_cache
from tympan.features.logmel import n_samples, waveform_batch
from tympan.features.stack import CONTRAST_BANDS, FeatureStack, StackConfig, contrast_fmin

ROOT = Path(__file__).resolve().parents[1]
SEED = 0

FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "log-mel": ("logmel",),
    "MFCC": ("mfcc",),
    "S2 stack": ("mfcc", "lpc", "contrast", "centroid", "zcr"),
}
GOAL_SETS = ("log-mel", "MFCC")
GOAL = {"cpu": 5.0, "cuda": 50.0}

FSDD_CFG = FeatureConfig(
    sample_rate=8000,
    seconds=1.0,
    crop="start",
    n_fft=256,
    hop_length=128,
    n_mels=40,
    f_min=0.0,
    f_max=4000.0,
    top_db=80.0,
)
ESC_CFG = FeatureConfig(
    sample_rate=44100,
    seconds=5.0,
    crop="start",
    n_fft=2048,
    hop_length=512,
    n_mels=128,
    f_min=0.0,
    f_max=None,
    top_db=80.0,
)


@dataclass(frozen=True)
class Dataset:
    name: str
    files: list[Path]
    cfg: FeatureConfig


@dataclass
class Timing:
    """One path over a file list: total and read/decode seconds, one output's shape."""

    seconds: float
    io_seconds: float
    shape: tuple[int, ...]


@dataclass
class Row:
    dataset: str
    features: str
    clips: int
    shape: str
    baseline_s: float
    baseline_per_s: float
    baseline_load_share: float
    tympan_s: float
    tympan_per_s: float
    tympan_decode_share: float
    ratio: float
    shapes_match: bool


# --- data -------------------------------------------------------------------------------------


def fsdd_files(folder: Path, count: int | None) -> list[Path]:
    """`count` FSDD files spread evenly over metadata.csv's order (all when None)."""
    meta = folder / "metadata.csv"
    if not meta.exists():
        raise SystemExit(f"no FSDD at {folder} (expected {meta}); pass --fsdd")
    files = [folder / name for name in pd.read_csv(meta)["filename"]]
    if count is None or count >= len(files):
        return files
    return [files[i * len(files) // count] for i in range(count)]


def esc_clip(rng: np.random.Generator, rate: int, length: int) -> np.ndarray:
    """A few tones (log-uniform 60 Hz..8 kHz, some gliding, some pulsed) in noise, peak 0.5."""
    t = np.arange(length) / rate
    clip = rng.normal(0.0, 10 ** rng.uniform(-2.5, -1.0), length)
    for _ in range(rng.integers(2, 5)):
        f0 = np.exp(rng.uniform(np.log(60.0), np.log(8000.0)))
        glide = rng.uniform(-0.3, 0.3) * f0 * t / t[-1]
        phase = 2 * np.pi * np.cumsum(f0 + glide) / rate
        envelope = (
            1.0 if rng.random() < 0.5 else 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.5, 4) * t)
        )
        clip += rng.uniform(0.1, 1.0) * envelope * np.sin(phase + rng.uniform(0, 2 * np.pi))
    return (0.5 * clip / np.abs(clip).max()).astype(np.float32)


def esc_files(workdir: Path, count: int, rate: int, seconds: float) -> tuple[list[Path], int]:
    """`count` generated clips in `workdir`, reusing those already there; -> (files, written)."""
    workdir.mkdir(parents=True, exist_ok=True)
    length = round(rate * seconds)
    files, written = [], 0
    for i in range(count):
        path = workdir / f"esc_s{SEED}_{i:05d}.wav"
        files.append(path)
        if path.exists():
            info = sf.info(path)
            if (info.samplerate, info.frames, info.channels) == (rate, length, 1):
                continue
        partial = path.with_suffix(".partial.wav")
        clip = esc_clip(np.random.default_rng([SEED, i]), rate, length)
        sf.write(partial, clip, rate, subtype="PCM_16")
        os.replace(partial, path)
        written += 1
    return files, written


def read_all(files: Sequence[Path]) -> int:
    """Read every file once (page cache), -> bytes read."""
    return sum(len(path.read_bytes()) for path in files)


# --- the two paths ----------------------------------------------------------------------------


def frame_lpc(y: np.ndarray, n_fft: int, hop_length: int, order: int) -> np.ndarray:
    """`(samples,)` -> `(order, frames)`: librosa.lpc on centred Hann frames, one call a clip."""
    pad = n_fft // 2
    frames = librosa.util.frame(np.pad(y, pad), frame_length=n_fft, hop_length=hop_length)
    frames = frames * librosa.filters.get_window("hann", n_fft, fftbins=True)[:, None]
    return librosa.lpc(frames, order=order, axis=0)[1:]


def baseline_features(
    y: np.ndarray, sr: int, cfg: FeatureConfig, kinds: tuple[str, ...], stack: StackConfig
) -> np.ndarray:
    """One clip the seeds' way: `(bins, frames)`, the kinds stacked in order."""
    y = librosa.util.fix_length(y, size=n_samples(cfg))
    stft = {"sr": sr, "n_fft": cfg.n_fft, "hop_length": cfg.hop_length}
    mel = {"n_mels": cfg.n_mels, "fmin": cfg.f_min, "fmax": cfg.f_max}
    parts = []
    for kind in kinds:
        if kind == "logmel":
            power = librosa.feature.melspectrogram(y=y, power=2.0, **stft, **mel)
            parts.append(librosa.power_to_db(power, ref=np.max, top_db=cfg.top_db))
        elif kind == "mfcc":
            parts.append(librosa.feature.mfcc(y=y, n_mfcc=stack.n_mfcc, **stft, **mel))
        elif kind == "lpc":
            parts.append(frame_lpc(y, cfg.n_fft, cfg.hop_length, stack.lpc_order))
        elif kind == "contrast":
            parts.append(
                librosa.feature.spectral_contrast(
                    y=y, fmin=contrast_fmin(sr), n_bands=CONTRAST_BANDS, **stft
                )
            )
        elif kind == "centroid":
            parts.append(librosa.feature.spectral_centroid(y=y, **stft))
        elif kind == "zcr":
            parts.append(
                librosa.feature.zero_crossing_rate(
                    y, frame_length=cfg.n_fft, hop_length=cfg.hop_length
                )
            )
        else:  # pragma: no cover - FEATURE_SETS only names the kinds above
            raise ValueError(kind)
    return np.concatenate(parts, axis=0)


def run_baseline(files: Sequence[Path], cfg: FeatureConfig, kinds: tuple[str, ...]) -> Timing:
    stack = StackConfig(kinds=kinds)
    load_s, shape = 0.0, ()
    start = time.perf_counter()
    for path in files:
        t0 = time.perf_counter()
        y, sr = librosa.load(path, sr=cfg.sample_rate)
        load_s += time.perf_counter() - t0
        shape = baseline_features(y, sr, cfg, kinds, stack).shape
    return Timing(time.perf_counter() - start, load_s, shape)


def run_featurize(
    files: Sequence[Path], cfg: FeatureConfig, kinds: tuple[str, ...], batch_size: int
) -> Timing:
    """The featurize stage's own code, `build_cache`, into a fresh directory (nothing to
    reuse): its processes, the memory-mapped sets, the index and the train statistics."""
    table = pd.DataFrame(
        {
            "path": [str(f) for f in files],
            "label": "x",
            "group": [str(f) for f in files],
            "split": "train",
            "sha256": [f"{i:064x}" for i in range(len(files))],
        }
    )
    run_cfg = replace(cfg, stack=StackConfig(kinds=kinds), batch_size=batch_size)
    with tempfile.TemporaryDirectory(prefix="tympan-cache-") as out:
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            cache = build_cache(table, run_cfg, Path(out) / "features")
        seconds = time.perf_counter() - start
        shape = tuple(cache.features.shape[1:])
    return Timing(seconds, float("nan"), shape)


def run_tympan(
    files: Sequence[Path],
    cfg: FeatureConfig,
    kinds: tuple[str, ...],
    batch_size: int,
    device: torch.device,
) -> Timing:
    """CPU: `run_featurize`. CUDA: decode here and run `FeatureStack` on the GPU."""
    if device.type == "cpu":
        return run_featurize(files, cfg, kinds, batch_size)
    module = FeatureStack(cfg, StackConfig(kinds=kinds)).to(device)
    decode_s, shape = 0.0, ()
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, len(files), batch_size):
            t0 = time.perf_counter()
            waves = waveform_batch(files[first : first + batch_size], cfg)
            decode_s += time.perf_counter() - t0
            out = module(waves.to(device)).cpu()  # .cpu() waits for the GPU
            shape = tuple(out.shape[1:])
    return Timing(time.perf_counter() - start, decode_s, shape)


def measure(
    data: Dataset,
    name: str,
    kinds: tuple[str, ...],
    batch_size: int,
    device: torch.device,
    warmup: int,
) -> Row:
    runs: dict[str, Callable[[Sequence[Path]], Timing]] = {
        "baseline": lambda files: run_baseline(files, data.cfg, kinds),
        "tympan": lambda files: run_tympan(files, data.cfg, kinds, batch_size, device),
    }
    for run in runs.values():
        run(data.files[:warmup])
    base = runs["baseline"](data.files)
    ours = runs["tympan"](data.files)
    clips = len(data.files)
    bins, frames = ours.shape[-2:]
    return Row(
        dataset=data.name,
        features=name,
        clips=clips,
        shape=f"{bins} x {frames}",
        baseline_s=base.seconds,
        baseline_per_s=clips / base.seconds,
        baseline_load_share=base.io_seconds / base.seconds,
        tympan_s=ours.seconds,
        tympan_per_s=clips / ours.seconds,
        tympan_decode_share=ours.io_seconds / ours.seconds,
        ratio=base.seconds / ours.seconds,
        shapes_match=tuple(base.shape) == (bins, frames),
    )


def _share(value: float) -> str:
    return "-" if value != value else f"{value:.0%}"  # NaN: not measured (worker processes)


# --- dvc --------------------------------------------------------------------------------------


def time_dvc(root: Path) -> dict[str, Any]:
    """`dvc status --json`, then a timed no-op `dvc repro` when nothing changed."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    dvc = str(bin_dir / "dvc") if (bin_dir / "dvc").exists() else "dvc"

    def call(*args: str) -> tuple[subprocess.CompletedProcess, float]:
        start = time.perf_counter()
        done = subprocess.run(
            [dvc, *args], cwd=root, env=env, capture_output=True, text=True, check=False
        )
        return done, time.perf_counter() - start

    status, status_s = call("status", "--json")
    result: dict[str, Any] = {"status_s": status_s, "repro_s": None}
    if status.returncode != 0:
        result["skipped"] = f"`dvc status` failed ({status.returncode}): {status.stderr[-500:]}"
        return result
    try:
        changed = json.loads(status.stdout or "{}")
    except json.JSONDecodeError:
        result["skipped"] = f"`dvc status --json` gave no JSON: {status.stdout[-500:]!r}"
        return result
    if changed:
        result["changed"] = sorted(changed)
        result["skipped"] = (
            f"pipeline not up to date ({', '.join(sorted(changed))} changed): no-op "
            "`dvc repro` timing skipped, it would run stages"
        )
        return result
    repro, repro_s = call("repro")
    result.update(repro_s=repro_s, repro_rc=repro.returncode)
    output = repro.stdout + repro.stderr
    if repro.returncode != 0:
        result["skipped"] = f"`dvc repro` failed ({repro.returncode}): {output[-500:]}"
    elif "Running stage" in output:
        result["warning"] = "`dvc repro` ran stages after all: not a no-op timing"
    return result


def time_feature_changes(fsdd: Path, workdir: Path) -> list[dict[str, Any]]:
    """`dvc repro featurize` timings in a new DVC project on FSDD (see the module docstring)."""
    import shutil

    import yaml

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    project = workdir / "dvc-project"
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    shutil.copy(ROOT / "dvc.yaml", project / "dvc.yaml")
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / "pipelines" / "fsdd.yaml").read_text())
    params["data"]["root"] = str(fsdd.resolve())
    params["features"]["stack"]["kinds"] = ["logmel", "mfcc"]

    def write(n_mels: int, n_mfcc: int) -> None:
        params["features"]["n_mels"] = n_mels
        params["features"]["stack"]["n_mfcc"] = n_mfcc
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def run(*args: str) -> tuple[str, float]:
        start = time.perf_counter()
        done = subprocess.run(
            args, cwd=project, env=env, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {(done.stdout + done.stderr)[-800:]}")
        return done.stdout + done.stderr, time.perf_counter() - start

    run("git", "init", "-q")
    run(str(bin_dir / "dvc"), "init", "-q")
    steps = [
        ("first run: ingest, split, featurize from scratch", 40, 40),
        ("no-op", 40, 40),
        ("n_mfcc 40 -> 20: MFCC set only", 40, 20),
        ("n_mfcc back to 40: DVC run-cache", 40, 40),
        ("n_mels 40 -> 64: both sets", 64, 40),
    ]
    results = []
    for label, n_mels, n_mfcc in steps:
        write(n_mels, n_mfcc)
        output, seconds = run(str(bin_dir / "dvc"), "repro", "featurize")
        computed = [
            line.split("computing ", 1)[1]
            for line in output.splitlines()
            if "featurize: computing" in line
        ]
        results.append(
            {
                "step": label,
                "seconds": seconds,
                "stages_run": sorted(set(re.findall(r"Running stage '(\w+)'", output))),
                "computed": computed,
                "reused": [
                    line.split("featurize: ", 1)[1]
                    for line in output.splitlines()
                    if line.startswith("featurize: ") and " reused " in line
                ],
            }
        )
    shutil.rmtree(project, ignore_errors=True)
    return results


# --- main -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fsdd", type=Path, default=ROOT / ".." / "shared" / "datasets" / "fsdd")
    parser.add_argument("--fsdd-clips", type=int, help="default all 3,000 (--quick: 300)")
    parser.add_argument("--esc-clips", type=int, help="default 2,000 (--quick: 200)")
    parser.add_argument(
        "--workdir", type=Path, help="keep generated clips here and reuse them (default: temp)"
    )
    parser.add_argument("--datasets", nargs="+", choices=("fsdd", "esc"), default=["fsdd", "esc"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=8, help="clips per path, untimed")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="300 FSDD and 200 ESC clips")
    parser.add_argument("--dvc", action="store_true", help="also time a no-op `dvc repro`")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    fsdd_clips = args.fsdd_clips or (300 if args.quick else None)
    esc_clips = args.esc_clips or (200 if args.quick else 2000)

    device_note = ""
    if args.device == "cuda" and not torch.cuda.is_available():
        device_note = " (--device cuda asked, but CUDA is not available: ran on CPU)"
        args.device = "cpu"
    device = torch.device(args.device)
    goal = GOAL[device.type]

    cpus = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    threads = torch.get_num_threads()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    print(
        f"machine: {cpus} CPUs ({usable} usable), {platform.processor() or platform.machine()}; "
        f"torch {torch.__version__} ({threads} threads), torchaudio {torchaudio.__version__}, "
        f"librosa {librosa.__version__}; FeatureStack on {gpu or device.type}{device_note}; "
        f"batch {args.batch_size}"
    )

    rows: list[Row] = []
    generated: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tympan-featurize-") as tmp:
        datasets = []
        if "fsdd" in args.datasets:
            datasets.append(Dataset("FSDD", fsdd_files(args.fsdd.resolve(), fsdd_clips), FSDD_CFG))
        if "esc" in args.datasets:
            workdir = args.workdir or Path(tmp)
            start = time.perf_counter()
            files, written = esc_files(workdir, esc_clips, ESC_CFG.sample_rate, ESC_CFG.seconds)
            generated = {
                "workdir": str(workdir),
                "written": written,
                "reused": len(files) - written,
                "seconds": time.perf_counter() - start,
            }
            print(
                f"ESC-sized set: {len(files)} clips of {ESC_CFG.seconds:g} s at "
                f"{ESC_CFG.sample_rate} Hz in {workdir} ({written} written, "
                f"{len(files) - written} reused, {generated['seconds']:.1f} s)"
            )
            datasets.append(Dataset("ESC-sized", files, ESC_CFG))

        for data in datasets:
            size = read_all(data.files)
            print(f"{data.name}: {len(data.files)} clips, {size / 2**20:.0f} MiB read once")
            for name, kinds in FEATURE_SETS.items():
                row = measure(data, name, kinds, args.batch_size, device, args.warmup)
                rows.append(row)
                print(
                    f"  {name:<9} baseline {row.baseline_per_s:8.1f} clips/s, "
                    f"tympan {row.tympan_per_s:8.1f} clips/s: {row.ratio:.2f}x",
                    flush=True,
                )

    print(
        f"\n{'dataset':<10}{'features':<10}{'clips':>6}{'bins x frames':>15}"
        f"{'baseline s':>12}{'clips/s':>9}{'load':>6}"
        f"{'tympan s':>10}{'clips/s':>9}{'decode':>8}{'tympan/baseline':>17}"
    )
    for row in rows:
        mark = "" if row.shapes_match else "  (baseline shape differs)"
        print(
            f"{row.dataset:<10}{row.features:<10}{row.clips:>6}{row.shape:>15}"
            f"{row.baseline_s:>12.2f}{row.baseline_per_s:>9.1f}{row.baseline_load_share:>6.0%}"
            f"{row.tympan_s:>10.2f}{row.tympan_per_s:>9.1f}"
            f"{_share(row.tympan_decode_share):>8}"
            f"{row.ratio:>16.2f}x{mark}"
        )
    print(
        "load / decode: share of each path's time spent in librosa.load / waveform_batch; "
        "both include it in clips/s"
    )
    goal_rows = [row for row in rows if row.features in GOAL_SETS]
    if goal_rows:
        worst = min(goal_rows, key=lambda row: row.ratio)
        met = "met" if worst.ratio >= goal else "not met"
        print(
            f"goal ({' and '.join(GOAL_SETS)} >= {goal:g}x the baseline on {device.type}): "
            f"{met}; lowest {worst.ratio:.2f}x ({worst.dataset} {worst.features})"
        )

    dvc = None
    if args.dvc:
        dvc = time_dvc(ROOT)
        print(f"\ndvc status: {dvc['status_s']:.1f} s (in {ROOT})")
        if dvc["repro_s"] is not None:
            print(f"no-op dvc repro: {dvc['repro_s']:.1f} s (exit {dvc['repro_rc']})")
        for key in ("skipped", "warning"):
            if key in dvc:
                print(f"dvc: {dvc[key]}")
        with tempfile.TemporaryDirectory(prefix="tympan-dvc-") as tmp:
            dvc["feature_changes"] = time_feature_changes(args.fsdd, Path(tmp))
        print("\n`dvc repro featurize` on FSDD (logmel + mfcc), a throwaway DVC project:")
        for step in dvc["feature_changes"]:
            what = (
                f"computed {'; '.join(step['computed'])}"
                if step["computed"]
                else "computed nothing"
            )
            print(
                f"  {step['step']:<50} {step['seconds']:6.1f} s  stages run: "
                f"{', '.join(step['stages_run']) or 'none'}; {what}"
            )

    if args.json:
        result = {
            "cpus": cpus,
            "usable_cpus": usable,
            "torch_threads": threads,
            "device": device.type,
            "gpu": gpu,
            "batch_size": args.batch_size,
            "warmup": args.warmup,
            "versions": {
                "torch": torch.__version__,
                "torchaudio": torchaudio.__version__,
                "librosa": librosa.__version__,
                "numpy": np.__version__,
            },
            "configs": {"FSDD": asdict(FSDD_CFG), "ESC-sized": asdict(ESC_CFG)},
            "feature_sets": {name: list(kinds) for name, kinds in FEATURE_SETS.items()},
            "generated": generated,
            "goal": {"features": list(GOAL_SETS), "ratio": goal},
            "rows": [asdict(row) for row in rows],
            "dvc": dvc,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
