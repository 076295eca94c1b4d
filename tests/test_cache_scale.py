"""Featurize's own memory stays flat as the set grows (benchmarks/cache_scale.py): the cache is
written to a memmap chunk by chunk and its statistics stream in bounded blocks, so a set larger
than RAM only costs disk."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tympan.features.cache import STATS_BLOCK_BYTES, _block_rows

from conftest import REPO

pytestmark = pytest.mark.integration


def test_statistics_blocks_are_bounded_in_bytes():
    assert _block_rows((1, 40, 63)) == 512  # small rows: STATS_CHUNK rows at a time
    rows = _block_rows((1, 128, 401))  # 4 s at 128 mels: 410 KB a row in float64
    assert rows * 8 * 128 * 401 <= STATS_BLOCK_BYTES < (rows + 1) * 8 * 128 * 401
    assert _block_rows((1, 4096, 100_000)) == 1


def test_featurize_memory_does_not_grow_with_the_set(tmp_path):
    out = tmp_path / "scale.json"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "cache_scale.py"),
            "--base",
            "32",
            "--factors",
            "4",
            "16",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(done.stdout)
    small, large = json.loads(out.read_text())
    assert (small["clips"], large["clips"]) == (128, 512)
    cache_grew = large["cache_bytes"] - small["cache_bytes"]
    assert cache_grew > 70 * 2**20  # 4x the clips: 75 MB more features on disk
    # what the process holds grows by a fraction of that (allocator slack); a cache held in
    # memory, or statistics read whole, would grow by the cache or more
    assert large["anon_peak"] - small["anon_peak"] < 0.4 * cache_grew, done.stdout
