"""How much the studies' leaks inflate their figures, on the data these machines have.

    .venv/bin/python benchmarks/protocols.py            # both cases, 3 seeds, 30 epochs
    .venv/bin/python benchmarks/protocols.py --case s4-demo --seeds 0 1 --epochs 60

Each row is a preset run end to end through tympan's stages (ingest .. evaluate, tracked in
MLflow) by `tympan.compare`, the code behind `tympan compare-protocols`; every row of a case
gets the same data and the same overrides, so the rows differ in protocol only. To fit a
shared 2-core machine every row trains at most --epochs epochs (the presets: 50 for S3, 60
for S4's Bi-GRU, both with early stopping; --epochs 0 keeps them), and torch computes on
--threads threads (1: on a machine whose cores are busy, two threads spin-waiting on each
other made a Bi-GRU epoch 8x slower).

- s3-fsdd: S3 on FSDD in S3's own layout. Each speaker's 50 takes of a digit are joined into
  one long recording (6 speakers x 10 digits = 60 recordings, the label the digit) and
  chopped into 2 s chunks `<digit>_<speaker>_<NN>.wav`, as S3 chopped its 11 recordings.
  s3_accent_cnn splits by source recording; s3_accent_cnn_original splits the chunks at
  random, so a test chunk's neighbours from the same recording are in training.
- s4-demo: S4's Bi-GRU on the built-in demo (six synthetic sound classes, 30 recording
  sessions), at the demo's 16 kHz and 1 s. s4_esc50_bigru splits by session;
  s4_esc50_bigru_original splits at random and trains on an augmented copy of every clip,
  test clips included. Two more rows take the original protocol apart: its copies made of
  training clips only, and no copies at all (the random split alone).

Writes the data under --work (default .tympan/protocols-bench; FSDD is read, never copied
into the repository), prints one table with the wall time of each row, and writes it to
--work/protocols.md. A figure, not a test: nothing here asserts a value.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch

from tympan.compare import Run, compare, log_table, table
from tympan.config import DemoConfig
from tympan.data import demo

REPO = Path(__file__).resolve().parents[1]
FSDD = Path(os.environ.get("TYMPAN_FSDD", REPO.parent / "shared" / "datasets" / "fsdd"))
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CHUNK_S = 2.0


def fsdd_as_s3(fsdd: Path, out: Path) -> Path:
    """FSDD in S3's layout under `out` (see the module docstring); kept if already there."""
    if (out / "done").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    meta = pd.read_csv(fsdd / "metadata.csv")
    for (digit, speaker), takes in meta.groupby(["digit", "speaker"]):
        parts, rate = [], None
        for name in takes.sort_values("take")["filename"]:
            wave, rate = sf.read(fsdd / name, dtype="float32")
            parts.append(wave if wave.ndim == 1 else wave.mean(axis=1))
        joined = np.concatenate(parts)
        size = int(CHUNK_S * rate)
        for n in range(len(joined) // size):  # S3 kept whole chunks
            chunk = joined[n * size : (n + 1) * size]
            sf.write(out / f"{DIGITS[digit]}_{speaker}_{n:02d}.wav", chunk, rate)
    (out / "done").write_text("")
    return out


S3_PATTERN = r"(?P<group>(?P<label>[a-z]+)_(?P<speaker>[a-z]+))_\d+\.wav"


def cases(
    work: Path, seeds: list[int], clips_per_class: int, epochs: int
) -> dict[str, tuple[list, dict]]:
    """name -> (runs, overrides common to its runs); data is made on first use."""
    sizes = {"train.seeds": seeds, **({"train.epochs": epochs} if epochs else {})}

    def s3() -> tuple[list, dict]:
        root = fsdd_as_s3(FSDD, work / "data" / "fsdd_s3")
        common = {"data.root": str(root), "data.pattern": S3_PATTERN, **sizes}
        runs = [Run("honest", "s3_accent_cnn"), Run("original", "s3_accent_cnn_original")]
        return runs, common

    def s4() -> tuple[list, dict]:
        root = work / "data" / f"demo_{clips_per_class}"
        if not (root / "metadata.csv").exists():
            demo.generate(DemoConfig(clips_per_class=clips_per_class), root)
        common = {
            "data.adapter": "demo",
            "data.root": str(root),
            "features.sample_rate": 16000,
            "features.seconds": 1.0,
            "cv.folds": 0,  # the honest run: one split by session (the demo has no folds)
            "evaluate.breakdown": ["session"],
            **sizes,
        }
        original = "s4_esc50_bigru_original"
        runs = [
            Run("honest", "s4_esc50_bigru"),
            Run("original", original),
            Run(
                "original, copies of training clips only",
                original,
                {"protocol.leaks": ["group_in_two_splits"]},
            ),
            Run(
                "original, no copies",
                original,
                {"protocol.leaks": ["group_in_two_splits"], "copies.recipes": []},
            ),
        ]
        return runs, common

    return {"s3-fsdd": s3, "s4-demo": s4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--case", choices=("s3-fsdd", "s4-demo"), action="append")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30, help="at most; 0: the presets'")
    parser.add_argument("--clips-per-class", type=int, default=100, help="s4-demo's size")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--work", type=Path, default=Path(".tympan/protocols-bench"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    chosen = args.case or ["s3-fsdd", "s4-demo"]
    studies = {"s3-fsdd": "S3 on FSDD (S3 layout)", "s4-demo": "S4 Bi-GRU on the demo"}
    rows = []
    started = time.perf_counter()
    for name in chosen:
        runs, common = cases(args.work, args.seeds, args.clips_per_class, args.epochs)[name]()
        rows += compare(runs, REPO / "pipelines", args.work / name, common, studies[name])
    text = table(rows)
    (args.work / "protocols.md").write_text(text)
    run_id = log_table(rows, text, "protocols", "benchmark-protocols")
    print(f"\n{text}\nall rows: {time.perf_counter() - started:.0f} s; MLflow run {run_id}")


if __name__ == "__main__":
    main()
