"""Load on the real model server (`mlflow models serve`), against in-process `predict`.

    .venv/bin/python benchmarks/serving.py                  # after `dvc repro` registered a model
    .venv/bin/python benchmarks/serving.py --workers 2 --concurrency 1 4 16 --json serving.json

First the registered model is loaded in this process with `mlflow.pyfunc.load_model` and one
clip per `predict` call is timed (after a warm-up), and so is the bare `Predictor` under it:
the baseline. Then the same model URI is served by `mlflow models serve --env-manager local` on
127.0.0.1 and, for each concurrency level, that many client threads (one `requests.Session`
each) POST one-clip requests to /invocations until the level's request count is reached.
Printed: p50/p95/p99 latency, requests/s and errors per level, the ratio of each p50 to the
in-process p50, and the server's memory (RSS summed over the server and all its descendants)
after warm-up, at its peak during the load and after the last level. Goals from the issue:
p50 at concurrency 1 within 3x of in-process predict, zero errors, memory growth under 10%.

Then the cost of refusing each hostile request the probe found (a header claiming 1,000,003 Hz,
an hour at 200 Hz in 8 bits, an hour of FLAC in 11 kB, a float clip at 1e30, a WAV whose header
claims more data than it holds, a 146 MiB body, 50 MiB of junk, JSON nested 100,000 deep):
status, reply size, median time and the server's peak memory while refusing it, beside a good
one-clip request's p50. `--server tympan` measures `tympan serve` (the same app behind its
request guard) instead of `mlflow models serve`.

The clients run on the same machine as the server and share its CPUs, so on a small machine
the high concurrency levels measure the machine as much as the server. A figure, not a test:
nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import requests
import soundfile as sf

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
ERROR_SAMPLES = 3


@dataclass
class Level:
    """One concurrency level's results; latencies in ms, over successful requests."""

    concurrency: int
    requests: int
    errors: int
    wall_s: float
    p50: float
    p95: float
    p99: float
    per_s: float
    error_samples: list[str] = field(default_factory=list)


def percentiles(latencies_s: list[float]) -> tuple[float, float, float]:
    """(p50, p95, p99) in ms; NaN when there is nothing to summarise."""
    if not latencies_s:
        return (float("nan"),) * 3
    p50, p95, p99 = np.percentile(np.asarray(latencies_s) * 1000, [50, 95, 99])
    return float(p50), float(p95), float(p99)


def registered(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_clips(folder: Path, count: int) -> list[bytes]:
    """`count` one-second clips spread evenly over the folder's sorted audio files."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
    one_second = [p for p in files if abs(sf.info(p).duration - 1.0) < 0.05]
    if not one_second:
        raise SystemExit(f"no 1-second audio clips in {folder}")
    step = max(1, len(one_second) // count)
    return [p.read_bytes() for p in one_second[::step][:count]]


def time_calls(fn: Callable[[int], None], calls: int, warmup: int) -> tuple[list[float], float]:
    """Per-call seconds of `fn(i)` for i in range(calls), after `warmup` untimed calls."""
    for i in range(warmup):
        fn(i)
    latencies = []
    start = time.perf_counter()
    for i in range(calls):
        t0 = time.perf_counter()
        fn(i)
        latencies.append(time.perf_counter() - t0)
    return latencies, time.perf_counter() - start


def server_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants (psutil if present, else /proc)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += proc.memory_info().rss
        return total
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        ppid = int(text[text.rindex(")") + 2 :].split()[1])  # after "pid (comm) state"
        children.setdefault(ppid, []).append(int(stat.parent.name))
    total, todo, page = 0, [pid], os.sysconf("SC_PAGE_SIZE")
    while todo:
        current = todo.pop()
        todo.extend(children.get(current, []))
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int(Path(f"/proc/{current}/statm").read_text().split()[1]) * page
    return total


class PeakRss:
    """Samples `server_rss` in a background thread; `.peak` is the largest sample."""

    def __init__(self, pid: int, interval_s: float = 0.5) -> None:
        self.pid, self.interval_s, self.peak = pid, interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, server_rss(self.pid))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def start_server(
    model_uri: str,
    tracking_uri: str,
    port: int,
    workers: int,
    log: Path,
    threads: int | None = None,
    kind: str = "mlflow",
) -> subprocess.Popen:
    """`mlflow models serve` (or `tympan serve`) on 127.0.0.1 in its own session, with the
    venv's bin on PATH.

    `threads`: torch/OpenMP threads per worker (OMP_NUM_THREADS); default: torch's own choice.
    """
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if kind == "tympan":
        command = [str(bin_dir / "tympan"), "serve", "-m", model_uri]
    else:
        command = [str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri]
        command += ["--env-manager", "local"]
    command += ["--host", "127.0.0.1", "-p", str(port), "--workers", str(workers)]
    with log.open("w") as out:
        return subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_ready(server: subprocess.Popen, url: str, log: Path, timeout_s: float) -> float:
    """Seconds until GET /ping answers 200; exits with the log's tail if it never does."""
    start = time.monotonic()
    while True:
        if server.poll() is not None:
            raise SystemExit(
                f"mlflow models serve exited {server.returncode}:\n{log.read_text()[-3000:]}"
            )
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return time.monotonic() - start
        except requests.RequestException:
            pass
        if time.monotonic() - start > timeout_s:
            raise SystemExit(
                f"server not ready after {timeout_s:.0f} s:\n{log.read_text()[-3000:]}"
            )
        time.sleep(0.5)


def stop_server(server: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM to the server's process group, SIGKILL if it is still there after `timeout_s`."""
    if server.poll() is not None:
        return
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=timeout_s)
    except ProcessLookupError:
        pass


def load(url: str, bodies: list[bytes], total: int, concurrency: int, timeout_s: float) -> Level:
    """`total` one-clip POSTs from `concurrency` threads, each with its own session."""
    lock = threading.Lock()
    issued = 0
    latencies: list[float] = []
    errors: list[str] = []

    def worker() -> None:
        nonlocal issued
        with requests.Session() as session:
            session.headers["Content-Type"] = "application/json"
            while True:
                with lock:
                    if issued >= total:
                        return
                    index = issued
                    issued += 1
                body = bodies[index % len(bodies)]
                t0 = time.perf_counter()
                problem = None
                try:
                    response = session.post(url, data=body, timeout=timeout_s)
                    elapsed = time.perf_counter() - t0
                    if response.status_code != 200:
                        problem = f"HTTP {response.status_code}: {response.text[:200]}"
                    else:
                        predictions = response.json().get("predictions")
                        if not isinstance(predictions, list) or len(predictions) != 1:
                            problem = f"not one prediction: {response.text[:200]}"
                except (requests.RequestException, ValueError) as exc:
                    elapsed = time.perf_counter() - t0
                    problem = f"{type(exc).__name__}: {exc}"
                with lock:
                    if problem is None:
                        latencies.append(elapsed)
                    else:
                        errors.append(problem)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return Level(
        concurrency,
        total,
        len(errors),
        wall,
        *percentiles(latencies),
        total / wall,
        errors[:ERROR_SAMPLES],
    )


def _wav(wave: np.ndarray, rate: int, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, wave, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def hostile_bodies() -> dict[str, tuple[bytes, int]]:
    """Each probe finding as a request body and how many times to send it."""
    second = _wav(np.sin(np.arange(16000) / 3).astype(np.float32) * 0.5, 16000)
    claims = second[:24] + (1_000_003).to_bytes(4, "little") + (2_000_006).to_bytes(4, "little")
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, 3600 * 200).astype(np.float32)
    items = {
        "1,000,003 Hz header (244 B)": claims + second[32:244],
        "8-bit 200 Hz hour (0.69 MiB)": _wav(noise, 200, "PCM_U8"),
        "FLAC hour (11 kB)": _wav(np.full(3_600_000, 0.3, np.float32), 1000, fmt="FLAC"),
        "float clip at 1e30": _wav(np.full(16000, 1e30, np.float32), 16000, "FLOAT"),
        "WAV header claims 3x its data": second[: len(second) // 3],
        "16,001 Hz header (served)": second[:24]
        + (16001).to_bytes(4, "little")
        + (32002).to_bytes(4, "little")
        + second[32:],
    }
    bodies = {
        name: (json.dumps({"inputs": {"audio": [base64.b64encode(data).decode()]}}).encode(), 5)
        for name, data in items.items()
    }
    big = base64.b64encode(b"\0" * (110 * 2**20)).decode()  # a 146 MiB body
    bodies["146 MiB body"] = (json.dumps({"inputs": {"audio": [big]}}).encode(), 1)
    bodies["50 MiB of junk"] = (b"{" + b"junk " * (10 * 2**20), 1)
    bodies["JSON nested 100,000 deep"] = (
        b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        3,
    )
    return bodies


@dataclass
class Refusal:
    """One hostile case: the status and reply size seen, median seconds, server peak RSS."""

    case: str
    status: int
    reply_bytes: int
    median_s: float
    peak_rss: int


def refusals(url: str, pid: int, bodies: dict[str, tuple[bytes, int]], timeout_s: float) -> list:
    """Send every hostile body `repeat` times, sampling the server's memory meanwhile."""
    out = []
    for case, (body, repeat) in bodies.items():
        times, status, size = [], 0, 0
        with PeakRss(pid, interval_s=0.1) as peak:
            for _ in range(repeat):
                t0 = time.perf_counter()
                try:
                    response = requests.post(
                        url,
                        data=body,
                        headers={"Content-Type": "application/json"},
                        timeout=timeout_s,
                    )
                    status, size = response.status_code, len(response.content)
                except requests.RequestException as exc:
                    status, size = -1, len(str(exc))
                times.append(time.perf_counter() - t0)
        out.append(Refusal(case, status, size, float(np.median(times)), peak.peak))
    return out


def in_process(
    model_uri: str, clips: list[bytes], encoded: list[str], calls: int, warmup: int
) -> dict[str, tuple[float, float, float, float]]:
    """(p50 ms, p95 ms, p99 ms, calls/s) of pyfunc `predict` and of its `Predictor`, one clip."""
    import mlflow

    model = mlflow.pyfunc.load_model(model_uri)
    frames = [pd.DataFrame({"audio": [b64]}) for b64 in encoded]
    pyfunc_lat, pyfunc_wall = time_calls(
        lambda i: model.predict(frames[i % len(frames)]), calls, warmup
    )
    predictor = model.unwrap_python_model().predictor
    direct_lat, direct_wall = time_calls(
        lambda i: predictor.predict([clips[i % len(clips)]]), calls, warmup
    )
    return {
        "pyfunc": (*percentiles(pyfunc_lat), calls / pyfunc_wall),
        "Predictor": (*percentiles(direct_lat), calls / direct_wall),
    }


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--registered", type=Path, default=Path("reports/registered.json"))
    parser.add_argument("--model-uri", help="default: models:/<registered name>@champion")
    parser.add_argument(
        "--tracking-uri",
        help="default: $MLFLOW_TRACKING_URI, else the registered.json tracking_uri, "
        "else sqlite:///mlruns.db",
    )
    parser.add_argument("--clips", type=Path, default=Path("data/demo/audio"))
    parser.add_argument("--n-clips", type=int, default=200, help="distinct clips, cycled")
    parser.add_argument("--requests", type=int, default=2000, help="per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--workers", type=int, default=1, help="server processes (--workers)")
    parser.add_argument(
        "--server",
        choices=["mlflow", "tympan"],
        default="mlflow",
        help="mlflow models serve, or tympan serve (the same app behind the request guard)",
    )
    parser.add_argument("--no-hostile", action="store_true", help="skip the refusal costs")
    parser.add_argument("--server-threads", type=int, help="OMP_NUM_THREADS for each server worker")
    parser.add_argument("--port", type=int, help="default: a free port")
    parser.add_argument("--baseline-calls", type=int, default=1000, help="in-process, timed")
    parser.add_argument("--warmup", type=int, default=300, help="in-process, untimed")
    parser.add_argument("--server-warmup", type=int, default=50, help="requests, untimed")
    parser.add_argument("--startup-timeout", type=float, default=120)
    parser.add_argument("--request-timeout", type=float, default=60)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    info = registered(args.registered)
    if args.model_uri is None:
        if "name" not in info:
            raise SystemExit(f"no --model-uri and no registered model name in {args.registered}")
        args.model_uri = f"models:/{info['name']}@champion"
    if args.tracking_uri is None:
        args.tracking_uri = (
            os.environ.get("MLFLOW_TRACKING_URI")
            or info.get("tracking_uri")
            or "sqlite:///mlruns.db"
        )
    os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri

    import mlflow
    import torch

    clips = load_clips(args.clips, args.n_clips)
    encoded = [base64.b64encode(clip).decode() for clip in clips]
    bodies = [json.dumps({"inputs": {"audio": [b64]}}).encode() for b64 in encoded]

    mlflow.set_tracking_uri(args.tracking_uri)
    baseline = in_process(args.model_uri, clips, encoded, args.baseline_calls, args.warmup)
    torch_threads = torch.get_num_threads()

    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    levels: list[Level] = []
    with tempfile.TemporaryDirectory(prefix="tympan-serve-bench-") as tmp:
        log = Path(tmp) / "server.log"
        server = start_server(
            args.model_uri,
            args.tracking_uri,
            port,
            args.workers,
            log,
            args.server_threads,
            args.server,
        )
        try:
            ready_s = wait_ready(server, url, log, args.startup_timeout)
            warm = load(
                f"{url}/invocations",
                bodies,
                args.server_warmup,
                max(1, args.workers),
                args.request_timeout,
            )
            rss_before = server_rss(server.pid)
            with PeakRss(server.pid) as peak:
                for concurrency in args.concurrency:
                    levels.append(
                        load(
                            f"{url}/invocations",
                            bodies,
                            args.requests,
                            concurrency,
                            args.request_timeout,
                        )
                    )
            rss_after = server_rss(server.pid)
            hostile = (
                []
                if args.no_hostile
                else refusals(
                    f"{url}/invocations",
                    server.pid,
                    hostile_bodies(),
                    max(args.request_timeout, 120),
                )
            )
            good_after = load(f"{url}/invocations", bodies, 20, 1, args.request_timeout)
        finally:
            stop_server(server)

    cpus = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    print(
        f"\nmodel {args.model_uri} (tracking {args.tracking_uri}); {len(clips)} one-second clips "
        f"from {args.clips}, cycled"
    )
    print(
        f"machine: {cpus} CPUs ({usable} usable); server: --workers {args.workers}, "
        f"OMP_NUM_THREADS {args.server_threads or 'default'}, up in "
        f"{ready_s:.1f} s; in-process torch threads {torch_threads}; clients share the machine"
    )
    if warm.errors:
        print(f"server warm-up: {warm.errors} of {warm.requests} failed: {warm.error_samples}")
    p50_ref = baseline["pyfunc"][0]
    print(
        f"\n{'in-process (one clip a call)':<30}{'calls':>7}{'p50 ms':>9}{'p95 ms':>9}"
        f"{'p99 ms':>9}{'calls/s':>10}"
    )
    for name, (p50, p95, p99, per_s) in baseline.items():
        label = f"{name}.predict" if name == "Predictor" else "pyfunc model.predict"
        print(f"{label:<30}{args.baseline_calls:>7}{p50:>9.2f}{p95:>9.2f}{p99:>9.2f}{per_s:>10.1f}")
    print(
        f"\n{'concurrency':>11}{'requests':>10}{'errors':>8}{'p50 ms':>9}{'p95 ms':>9}"
        f"{'p99 ms':>9}{'req/s':>9}{'p50 / in-process':>18}"
    )
    for level in levels:
        print(
            f"{level.concurrency:>11}{level.requests:>10}{level.errors:>8}{level.p50:>9.2f}"
            f"{level.p95:>9.2f}{level.p99:>9.2f}{level.per_s:>9.1f}"
            f"{level.p50 / p50_ref:>17.2f}x"
        )
        for sample in level.error_samples:
            print(f"{'':>11}error: {sample}")
    growth = (rss_after - rss_before) / rss_before if rss_before else float("nan")
    print(
        f"\nserver memory (RSS, server + descendants): {mib(rss_before)} after warm-up, "
        f"peak {mib(peak.peak)} under load, {mib(rss_after)} after the last level: "
        f"{growth:+.1%} (goal < 10%)"
    )
    total_errors = sum(level.errors for level in levels)
    print(f"errors: {total_errors} of {sum(level.requests for level in levels)} (goal 0)")
    first = next((level for level in levels if level.concurrency == 1), None)
    if first is not None:
        print(
            f"p50 at concurrency 1: {first.p50:.2f} ms vs in-process {p50_ref:.2f} ms = "
            f"{first.p50 / p50_ref:.2f}x (goal <= 3x)"
        )

    if hostile:
        print(
            f"\n{'hostile request (' + args.server + ' serve)':<34}{'status':>7}{'reply B':>10}"
            f"{'median ms':>11}{'x good p50':>11}{'peak RSS':>10}"
        )
        good_p50 = first.p50 if first is not None else levels[0].p50
        for r in hostile:
            print(
                f"{r.case:<34}{r.status:>7}{r.reply_bytes:>10}{r.median_s * 1000:>11.1f}"
                f"{r.median_s * 1000 / good_p50:>10.1f}x{mib(r.peak_rss):>10}"
            )
        print(
            f"good requests after the hostile ones: {good_after.requests - good_after.errors} "
            f"of {good_after.requests} answered 200 (p50 {good_after.p50:.2f} ms)"
        )

    if args.json:
        result = {
            "server": args.server,
            "hostile": [asdict(r) for r in hostile],
            "model_uri": args.model_uri,
            "tracking_uri": args.tracking_uri,
            "clips": len(clips),
            "workers": args.workers,
            "server_threads": args.server_threads,
            "cpus": cpus,
            "usable_cpus": usable,
            "torch_threads": torch_threads,
            "server_ready_s": ready_s,
            "baseline": {
                name: dict(zip(("p50_ms", "p95_ms", "p99_ms", "per_s"), values, strict=True))
                | {"calls": args.baseline_calls}
                for name, values in baseline.items()
            },
            "levels": [asdict(level) for level in levels],
            "rss_bytes": {"before": rss_before, "peak": peak.peak, "after": rss_after},
            "rss_growth": growth,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
