"""Send audio files to a served tympan model: `python -m tympan.serving.client a.wav b.flac`.

Models that declare side attributes need them: `--side language=english` (same for every file).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path


def payload(paths: list[Path], side: dict[str, str] | None = None) -> dict:
    """The request body: `{"inputs": {"audio": [base64, ...], <attribute>: [value, ...]}}`."""
    inputs = {"audio": [base64.b64encode(p.read_bytes()).decode() for p in paths]}
    inputs.update({name: [value] * len(paths) for name, value in (side or {}).items()})
    return {"inputs": inputs}


def _side(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", type=Path, nargs="+")
    parser.add_argument("--url", default="http://127.0.0.1:5000/invocations")
    parser.add_argument(
        "--side", type=_side, action="append", default=[], help="side attribute NAME=VALUE"
    )
    args = parser.parse_args(argv)
    request = urllib.request.Request(
        args.url,
        data=json.dumps(payload(args.files, dict(args.side))).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as exc:
        sys.exit(f"{exc.code}: {exc.read().decode(errors='replace')[:2000]}")
    except urllib.error.URLError as exc:
        sys.exit(f"cannot reach {args.url} ({exc.reason}); is `mlflow models serve` running?")
    for path, prediction in zip(args.files, answer["predictions"], strict=True):
        top = max(prediction["probabilities"].values())
        windows = prediction.get("windows", 1)
        extra = f", {windows} windows" if windows > 1 else ""
        print(f"{path}: {prediction['label']} ({top:.3f}{extra})")


if __name__ == "__main__":
    main()
