"""`tympan serve`: MLflow's own scoring app for a model URI, behind a guard for the request.

`mlflow models serve` reads the whole body, parses its JSON and only then lets the model see
it; its own error replies quote the input. Measured on a 2-core machine: a 146 MiB request was
refused after 13-18 s and 3.7 GB, 50 MiB of junk got a 368 MB reply, and JSON nested 100,000
deep a 500. The model cannot help there: it runs after all of that. `Guard`, an ASGI
middleware around `mlflow.pyfunc.scoring_server.init(model)` (the very app `mlflow models
serve` runs, with its routes, timeout and formats), refuses before MLflow reads anything:

- a body over `TYMPAN_MAX_REQUEST_MB` (default 140 MiB: one 100 MiB item in base64 and its
  JSON): 413 from the Content-Length header alone, or as soon as a chunked body passes it;
- a JSON body that does not parse, or nests deeper than the parser allows: 400;
- any error reply longer than `MAX_ERROR_REPLY` bytes is cut to its first characters, so no
  reply quotes a request back.

Everything else, and every good request, goes to MLflow's app unchanged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MODEL_ENV = "TYMPAN_SERVE_MODEL"
MAX_REQUEST_ENV = "TYMPAN_MAX_REQUEST_MB"
DEFAULT_MAX_REQUEST_MB = 140.0
# Error replies are cut to this many bytes: enough for any message tympan writes.
MAX_ERROR_REPLY = 4096
_KEPT = 1024


def max_request_bytes() -> int:
    """`TYMPAN_MAX_REQUEST_MB` (MiB) if set, else 140 MiB."""
    raw = os.environ.get(MAX_REQUEST_ENV, "")
    try:
        mib = float(raw) if raw else DEFAULT_MAX_REQUEST_MB
    except ValueError:
        raise ValueError(f"{MAX_REQUEST_ENV}={raw!r} is not a number of MiB") from None
    if not mib > 0:
        raise ValueError(f"{MAX_REQUEST_ENV}={raw!r} must be a positive number of MiB")
    return int(mib * 2**20)


def _error(status: int, code: str, message: str) -> tuple[int, bytes]:
    return status, json.dumps({"error_code": code, "message": message}).encode()


async def _reply(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def check_json(body: bytes) -> tuple[int, bytes] | None:
    """A 400 reply for a body that is not JSON MLflow can parse, else None."""
    try:
        json.loads(body)
    except RecursionError:
        return _error(
            400,
            "INVALID_PARAMETER_VALUE",
            "request JSON is nested too deep to parse; send "
            '{"inputs": {"audio": ["<base64>", ...]}}',
        )
    except UnicodeDecodeError:
        return _error(400, "INVALID_PARAMETER_VALUE", "request body is not UTF-8 text")
    except json.JSONDecodeError as exc:
        return _error(
            400,
            "INVALID_PARAMETER_VALUE",
            f"request body is not valid JSON ({exc.msg} at line {exc.lineno} column "
            f'{exc.colno}); send {{"inputs": {{"audio": ["<base64>", ...]}}}}',
        )
    return None


def cut_reply(body: bytes) -> bytes:
    """An error reply of at most about `MAX_ERROR_REPLY` bytes: its message's start, marked."""
    if len(body) <= MAX_ERROR_REPLY:
        return body
    try:
        parsed = json.loads(body)
        code = str(parsed.get("error_code", "INVALID_PARAMETER_VALUE"))
        message = str(parsed.get("message", ""))
    except (ValueError, AttributeError):
        code, message = "INVALID_PARAMETER_VALUE", body.decode(errors="replace")
    message = f"{message[:_KEPT]}... [reply cut from {len(body)} bytes]"
    return json.dumps({"error_code": code, "message": message}).encode()


class Guard:
    """ASGI middleware: size, JSON and reply-size limits in front of MLflow's scoring app."""

    def __init__(self, app: ASGIApp, max_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_request_bytes() if max_bytes is None else max_bytes

    def _too_large(self, size: int, exact: bool) -> tuple[int, bytes]:
        told = f"{size} bytes" if exact else f"over {self.max_bytes} bytes"
        return _error(
            413,
            "REQUEST_TOO_LARGE",
            f"request body of {told} is over the {self.max_bytes / 2**20:.3g} MiB limit "
            f"({MAX_REQUEST_ENV}); send fewer or shorter items per request",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _reply(send, *self._too_large(int(declared), exact=True))
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _reply(send, *self._too_large(size, exact=False))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if content_type == b"application/json":
            refused = check_json(body)
            if refused is not None:
                await _reply(send, *refused)
                return
        await self.app(scope, _replay(body), _capped(send))


def _replay(body: bytes) -> Receive:
    """A `receive` that hands the buffered body to the app once, then waits for disconnect."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


def _capped(send: Send) -> Send:
    """A `send` that cuts error replies (status >= 400) to `MAX_ERROR_REPLY` bytes."""
    start: Message | None = None
    parts: list[bytes] = []

    async def capped(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            if message["status"] < 400:
                await send(message)
                return
            start = message
            return
        if start is None or message["type"] != "http.response.body":
            await send(message)
            return
        parts.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = cut_reply(b"".join(parts))
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return capped


def create_app() -> ASGIApp:
    """The guarded app for the model URI in `TYMPAN_SERVE_MODEL` (a uvicorn factory, so each
    worker process loads the model itself)."""
    from mlflow.pyfunc import scoring_server

    uri = os.environ.get(MODEL_ENV)
    if not uri:
        raise RuntimeError(f"{MODEL_ENV} is not set: start the server with `tympan serve -m URI`")
    return Guard(scoring_server.init(scoring_server.load_model_with_mlflow_config(uri)))


def serve(model_uri: str, host: str, port: int, workers: int) -> None:
    """Run the guarded scoring app with uvicorn (blocks until stopped)."""
    import uvicorn

    from tympan.serving.pyfunc import WORKERS_ENV

    max_request_bytes()  # a bad limit fails here, not in every worker
    os.environ[MODEL_ENV] = model_uri
    os.environ[WORKERS_ENV] = str(workers)  # each worker takes its share of the cores
    uvicorn.run(
        "tympan.serving.server:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        timeout_keep_alive=5,
    )
