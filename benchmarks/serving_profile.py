"""Where a one-clip request's time goes in the scoring path (issue 17, item 5), in process.

    .venv/bin/python benchmarks/serving_profile.py          # after `dvc repro` registered a model
    .venv/bin/python benchmarks/serving_profile.py --calls 500 --json profile.json

The registered model is loaded as `mlflow models serve` loads it, and each step a request
passes through in MLflow's scoring server (`mlflow.pyfunc.scoring_server.invocations`, the
function its /invocations route runs in a thread) is timed alone on the same one-clip bodies,
then the whole of `invocations`:

    MLflow's:  json.loads of the body, the inputs taken from it (`infer_and_parse_data`),
               schema enforcement, which builds the DataFrame (`_enforce_schema`), the
               response's JSON (`predictions_to_json`)
    tympan's:  base64 decoding of the item, audio decoding + features + the ensemble's forward
               pass (`Predictor.predict`), the output DataFrame

Printed: median microseconds per step and its share of the whole `invocations` call. What is
left between `invocations` and the HTTP round trip (`benchmarks/serving.py` at concurrency 1)
is uvicorn, FastAPI, the thread hop and the client. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import load_clips, registered


def median_us(fn: Callable[[int], object], calls: int, warmup: int) -> float:
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(calls):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registered", type=Path, default=Path("reports/registered.json"))
    parser.add_argument("--model-uri", help="default: models:/<registered name>@champion")
    parser.add_argument("--clips", type=Path, default=Path("data/demo/audio"))
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    info = registered(args.registered)
    uri = args.model_uri or f"models:/{info['name']}@champion"
    os.environ.setdefault("MLFLOW_TRACKING_URI", info.get("tracking_uri") or "sqlite:///mlruns.db")

    import mlflow
    import pandas as pd
    from mlflow.models.utils import _enforce_schema
    from mlflow.pyfunc import scoring_server

    from tympan.serving.bundle import decode_items

    model = mlflow.pyfunc.load_model(uri)
    schema = model.metadata.get_input_schema()
    python_model = model.unwrap_python_model()
    predictor = python_model.predictor
    clips = load_clips(args.clips, 50)
    encoded = [base64.b64encode(c).decode() for c in clips]
    bodies = [json.dumps({"inputs": {"audio": [b]}}).encode() for b in encoded]
    n = len(bodies)
    parsed = [json.loads(b) for b in bodies]
    inputs = [scoring_server.infer_and_parse_data(p, schema) for p in parsed]
    frames = [_enforce_schema(i, schema) for i in inputs]
    items = [decode_items(f["audio"].tolist(), predictor.limits.item_bytes) for f in frames]
    outputs = [python_model.predict(None, f) for f in frames]
    columns = list(outputs[0].columns)
    rows = [predictor.predict(i) for i in items]

    def to_json(i: int) -> None:
        scoring_server.predictions_to_json(outputs[i % n], io.StringIO())

    steps: dict[str, tuple[str, Callable[[int], object]]] = {
        "json.loads": ("MLflow", lambda i: json.loads(bodies[i % n])),
        "inputs from JSON": (
            "MLflow",
            lambda i: scoring_server.infer_and_parse_data(parsed[i % n], schema),
        ),
        "schema enforcement -> DataFrame": (
            "MLflow",
            lambda i: _enforce_schema(inputs[i % n], schema),
        ),
        "base64 decode": (
            "tympan",
            lambda i: decode_items(frames[i % n]["audio"].tolist(), predictor.limits.item_bytes),
        ),
        "decode + features + forward": ("tympan", lambda i: predictor.predict(items[i % n])),
        "output DataFrame": ("tympan", lambda i: pd.DataFrame(rows[i % n], columns=columns)),
        "response JSON": ("MLflow", to_json),
    }
    pyfunc_us = median_us(lambda i: model.predict(inputs[i % n]), args.calls, args.warmup)
    whole = median_us(
        lambda i: scoring_server.invocations(bodies[i % n], "application/json", model, schema),
        args.calls,
        args.warmup,
    )
    results = {
        name: (owner, median_us(fn, args.calls, args.warmup)) for name, (owner, fn) in steps.items()
    }
    print(f"one-clip request, median of {args.calls} calls ({uri})")
    print(f"{'step':<30} {'owner':<7} {'us':>9} {'share':>7}")
    for name, (owner, us) in results.items():
        print(f"{name:<30} {owner:<7} {us:9.0f} {us / whole:7.1%}")
    accounted = sum(us for _, us in results.values())
    print(f"{'sum of the steps':<30} {'':<7} {accounted:9.0f} {accounted / whole:7.1%}")
    inside = sum(
        results[k][1]
        for k in (
            "schema enforcement -> DataFrame",
            "base64 decode",
            "decode + features + forward",
            "output DataFrame",
        )
    )
    print(
        f"{'PyFuncModel.predict whole':<30} {'MLflow':<7} {pyfunc_us:9.0f} {pyfunc_us / whole:7.1%}"
    )
    print(
        f"{'  of which its own wrapping':<30} {'MLflow':<7} {pyfunc_us - inside:9.0f} "
        f"{(pyfunc_us - inside) / whole:7.1%}"
    )
    print(f"{'invocations() whole':<30} {'MLflow':<7} {whole:9.0f} {1:7.1%}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "invocations_us": whole,
                    "steps": {k: {"owner": o, "us": u} for k, (o, u) in results.items()},
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
