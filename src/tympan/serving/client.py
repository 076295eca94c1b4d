"""Send audio files to a served tympan model: `python -m tympan.serving.client a.wav b.flac`."""

from __future__ import annotations

import argparse
import base64
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path


def payload(paths: list[Path]) -> dict:
    """The request body: `{"inputs": {"audio": [base64, ...]}}`."""
    return {"inputs": {"audio": [base64.b64encode(p.read_bytes()).decode() for p in paths]}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", type=Path, nargs="+")
    parser.add_argument("--url", default="http://127.0.0.1:5000/invocations")
    args = parser.parse_args(argv)
    request = urllib.request.Request(
        args.url,
        data=json.dumps(payload(args.files)).encode(),
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
        print(f"{path}: {prediction['label']} ({top:.3f})")


if __name__ == "__main__":
    main()
