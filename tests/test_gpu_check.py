"""benchmarks/gpu_check.sh on a machine without CUDA (as CI): it runs, every GPU check says it
skipped and why, and the summary comes (issue 17, item 4; the GPU run itself is in the notes)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from conftest import REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the checks run for real")
def test_the_gpu_check_skips_each_cuda_part_with_a_line_and_summarises(tmp_path):
    done = subprocess.run(
        [str(REPO / "benchmarks" / "gpu_check.sh"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no CUDA device: the GPU checks skip" in done.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    checks = ["amp_train", "served_cuda", "finetune_amp", "featurize", "embeddings", "ddp_nccl"]
    assert [r["check"] for r in summary] == checks
    assert all(r["status"] == "SKIP" and r["detail"] == "no CUDA device" for r in summary)
    tail = done.stdout[done.stdout.index("gpu_check summary") :]
    assert all(f"{name}" in tail for name in checks)
