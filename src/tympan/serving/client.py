"""Send audio files to a served tympan model: `python -m tympan.serving.client a.wav folder/`.

Standard library only (no torch, no numpy), so it starts at once. Folders are searched for
.wav, .flac and .ogg files. Models that declare side attributes need them: `--side
language=english` (same for every file). `--write-request body.json` writes the request body
instead of sending it, the input `mlflow models predict -i body.json -t json` takes.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


def audio_files(inputs: list[Path]) -> list[Path]:
    """Files as given, and every audio file under each folder (sorted, recursively)."""
    out: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found = (p for p in item.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
            out.extend(sorted(p for p in found if p.is_file()))
        else:
            out.append(item)
    return out


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


def _reason(body: bytes) -> str:
    """The server's message in full (its JSON `message`, else the body as text)."""
    text = body.decode(errors="replace")
    try:
        return str(json.loads(text)["message"])
    except (ValueError, KeyError, TypeError):
        return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("inputs", type=Path, nargs="+", help="audio files or folders")
    parser.add_argument("--url", default="http://127.0.0.1:5000/invocations")
    parser.add_argument(
        "--side", type=_side, action="append", default=[], help="side attribute NAME=VALUE"
    )
    parser.add_argument(
        "--write-request", type=Path, help="write the request body here instead of sending it"
    )
    args = parser.parse_args(argv)
    files = audio_files(args.inputs)
    if not files:
        sys.exit("no audio files (.wav, .flac, .ogg) in " + ", ".join(map(str, args.inputs)))
    body = json.dumps(payload(files, dict(args.side))).encode()
    if args.write_request:
        args.write_request.write_bytes(body)
        print(f"wrote the request for {len(files)} file(s) to {args.write_request}")
        return
    request = urllib.request.Request(
        args.url, data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as exc:
        sys.exit(f"{exc.code}: {_reason(exc.read())}")
    except urllib.error.URLError as exc:
        sys.exit(f"cannot reach {args.url} ({exc.reason}); is `tympan serve` running?")
    for path, prediction in zip(files, answer["predictions"], strict=True):
        windows = prediction.get("windows", 1)
        extra = f", {windows} windows" if windows > 1 else ""
        if "value" in prediction:  # a regression model
            print(
                f"{path}: {prediction['value']:.4f}{f' ({windows} windows)' if windows > 1 else ''}"
            )
        else:
            top = max(prediction["probabilities"].values())
            print(f"{path}: {prediction['label']} ({top:.3f}{extra})")


if __name__ == "__main__":
    main()
