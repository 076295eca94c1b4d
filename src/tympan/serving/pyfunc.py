"""The MLflow pyfunc wrapper around `Predictor`, and how it is logged.

Request: a DataFrame (from `inputs` or `dataframe_split`) with an `audio` column of base64 WAV,
FLAC or OGG bytes, any sample rate or channel count, plus one column per side attribute the
model declares (e.g. `language`). Response: one row per item with `label`, `probabilities`
(label -> probability) and `windows` (how many windows a long recording was cut into; 1 for a
clip of training length). Bad items raise `RequestRefused`, which the scoring server returns
as HTTP 400 with a message naming the item and the problem, never the payload.

The model is logged as code (`model_code.py`, MLflow's models-from-code), not pickled: loading
it imports tympan's shipped code and reads the bundle with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import base64
import io
import itertools
import os
import socket
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import soundfile as sf
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModelContext
from mlflow.types.schema import ColSpec, Map, Schema

import tympan
from tympan.serving.bundle import PayloadError, Predictor, decode_items

INPUT_COLUMN = "audio"
MODEL_CODE = Path(__file__).with_name("model_code.py")


class RequestRefused(MlflowException):
    """HTTP 400 whose reply is this message alone.

    MLflow's scoring server rewrites the message of an MlflowException raised by `predict`
    into `Failed to predict data '<the request>'. Error: ...`: a refused 150 MB request got a
    153 MB reply. This exception keeps the message it was raised with, so the reply names the
    item and the problem in a few hundred bytes.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_message"):  # set once, by MlflowException.__init__
            self._message = value


# `tympan serve --workers N` says N here; `mlflow models serve --workers N` passes it on the
# uvicorn command line of the worker's parent process, read from /proc where there is one
WORKERS_ENV = "TYMPAN_SERVE_WORKERS"
THREADS_ENV = "TYMPAN_SERVE_THREADS"


def server_workers() -> int:
    """How many worker processes the serving process belongs to: $TYMPAN_SERVE_WORKERS, else
    the `--workers N` of the parent's command line (uvicorn's supervisor), else 1."""
    if os.environ.get(WORKERS_ENV):
        return max(1, int(os.environ[WORKERS_ENV]))
    try:
        args = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return 1
    for flag, value in itertools.pairwise(args):
        if flag == b"--workers" and value.isdigit():
            return max(1, int(value))
        if flag.startswith(b"--workers=") and flag[10:].isdigit():
            return max(1, int(flag[10:]))
    return 1


def worker_threads() -> int:
    """torch threads for one serving worker: $TYMPAN_SERVE_THREADS, else $OMP_NUM_THREADS (the
    OpenMP convention torch follows), else the usable cores shared out between the workers (2
    workers on 2 cores: 1 thread each, where each would otherwise take both)."""
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        if os.environ.get(name, "").isdigit() and int(os.environ[name]) > 0:
            return int(os.environ[name])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // server_workers())


def no_delay_on_listeners() -> int:
    """Set TCP_NODELAY on this process's bound, unconnected TCP sockets (a server's listening
    socket, or the one uvicorn bound for it to listen on) -> how many.

    uvicorn with `--workers N` binds its socket before starting the workers, with protocol 0
    (`socket.socket(family)`); asyncio sets TCP_NODELAY on accepted connections only when the
    socket's protocol says TCP, so each worker answered with Nagle's algorithm on: the head
    and the body of a reply went out as two small writes, the second waiting for the client's
    delayed ACK, about 40 ms on every request. On Linux an accepted connection inherits
    TCP_NODELAY from its listening socket, so setting it there (once, in each worker, when the
    model loads, before the worker listens) gives every connection what a single-worker server
    gives it.
    """
    fds = Path("/proc/self/fd")
    done = 0
    for entry in fds.iterdir() if fds.is_dir() else ():
        try:
            if not os.readlink(entry).startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(int(entry.name)))
        except (OSError, ValueError):
            continue
        with sock:
            try:
                if (
                    sock.family in (socket.AF_INET, socket.AF_INET6)
                    and sock.type == socket.SOCK_STREAM
                    and sock.getsockname()[1] != 0
                    and not _connected(sock)
                ):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    done += 1
            except OSError:
                continue
    return done


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


class AudioModel(mlflow.pyfunc.PythonModel):
    """pyfunc model: raw audio in, ensemble label and probabilities out.

    `predict`'s type hints are a DataFrame in and out: MLflow reads them when the model is
    logged and loaded, infers no schema from a DataFrame (the logged `signature` stays the
    contract) and adds no conversion, and without hints it warns at every logging and load.
    """

    def load_context(self, context: PythonModelContext) -> None:
        torch.set_num_threads(worker_threads())  # workers share the cores, not fight over them
        if server_workers() > 1:  # uvicorn's pre-bound socket: see `no_delay_on_listeners`
            no_delay_on_listeners()
        self.predictor = Predictor.load(context.artifacts["bundle"])

    def predict(
        self,
        context: PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame) or INPUT_COLUMN not in model_input.columns:
            raise RequestRefused(
                f"expected a table with an '{INPUT_COLUMN}' column of base64 audio, e.g. "
                f'{{"inputs": {{"{INPUT_COLUMN}": ["<base64 wav>"]}}}}'
            )
        try:
            items = decode_items(
                model_input[INPUT_COLUMN].tolist(), self.predictor.limits.item_bytes
            )
            side = {
                name: model_input[name].tolist()
                for name in self.predictor.side_vocab
                if name in model_input.columns
            }
            columns = ["value", "windows"] if self.predictor.regression else CLASS_COLUMNS
            return pd.DataFrame(self.predictor.predict(items, side), columns=columns)
        except PayloadError as exc:
            raise RequestRefused(str(exc)) from None


CLASS_COLUMNS = ["label", "probabilities", "windows"]


def signature(side: tuple[str, ...] = (), regression: bool = False) -> ModelSignature:
    """Audio plus side-attribute columns in; label, probabilities and window count out (a
    regression model: value and window count).

    Side columns are optional in the schema so that a missing one reaches the model, which
    answers with a message naming the attribute instead of a schema error.
    """
    return ModelSignature(
        inputs=Schema(
            [ColSpec("string", INPUT_COLUMN)]
            + [ColSpec("string", name, required=False) for name in side]
        ),
        outputs=Schema(
            [ColSpec("double", "value"), ColSpec("long", "windows")]
            if regression
            else [
                ColSpec("string", "label"),
                ColSpec(Map("double"), "probabilities"),
                ColSpec("long", "windows"),
            ]
        ),
    )


def example_input(sample_rate: int, side_vocab: dict[str, list[str]] | None = None) -> pd.DataFrame:
    """Two short clips (a tone and a sweep) as base64 WAV, the logged input example, with each
    side attribute's first known value."""
    t = np.arange(int(0.25 * sample_rate)) / sample_rate
    clips = [0.5 * np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * (300 + 1200 * t) * t)]
    encoded = []
    for clip in clips:
        buffer = io.BytesIO()
        sf.write(buffer, clip.astype(np.float32), sample_rate, format="WAV", subtype="PCM_16")
        encoded.append(base64.b64encode(buffer.getvalue()).decode())
    side = {name: [values[0]] * len(encoded) for name, values in (side_vocab or {}).items()}
    return pd.DataFrame({INPUT_COLUMN: encoded, **side})


# The distributions the served code imports (tympan.serving and what it imports: features,
# models, audio, config), each pinned to the version that trained the model. Their own
# dependencies come with them; `tests/test_deploy.py` loads and serves the model in a process
# that can import nothing else.
SERVED_IMPORTS = (
    "mlflow",
    "torch",
    "torchaudio",
    "torchvision",
    "numpy",
    "pandas",
    "soundfile",
    "librosa",
    "scikit-learn",
    "skops",
    "pyyaml",
    "tqdm",
)


def requirements(encoder: dict | None = None) -> list[str]:
    """Pinned to what trained the model, so a served model runs the same numerics; with an
    encoder (embedding features), the packages that rebuild it too."""
    from tympan.encoders import packages_for

    extra = packages_for(encoder["kind"]) if encoder is not None else ()
    return [f"{name}=={version(name)}" for name in (*SERVED_IMPORTS, *extra)]


def model_spec(bundle: Path, sample_rate: int) -> dict[str, Any]:
    """What the model package is made of, for `mlflow.pyfunc.log_model` or `save_model`: the
    model as code, the bundle, tympan's own code, signature, input example, requirements."""
    stored = torch.load(bundle, map_location="cpu", weights_only=True)
    side_vocab = stored["side_vocab"]
    return {
        "python_model": str(MODEL_CODE),
        "artifacts": {"bundle": str(bundle)},
        "code_paths": [str(Path(tympan.__file__).parent)],
        "signature": signature(tuple(side_vocab), regression=stored["head"] == "identity"),
        "input_example": example_input(sample_rate, side_vocab),
        "pip_requirements": requirements(stored.get("encoder")),
    }


def log_audio_model(bundle: Path, sample_rate: int):
    """Log the pyfunc in the active run; -> ModelInfo (register its `model_uri`)."""
    return mlflow.pyfunc.log_model(name="model", **model_spec(bundle, sample_rate))
