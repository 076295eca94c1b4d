"""`tympan predict`: the registered model over files or folders, in this process.

The model is loaded with `mlflow.pyfunc.load_model` and its `Predictor` (the very code the
server runs: header checks, limits, windows, side attributes) scores one file at a time, so a
bad file is a row with its reason, not the end of the run. Output: one CSV row per file with
`path`, `label` (or `value`), `confidence`, `windows`, one `p_<label>` column per class, and
`error` (empty when the file was scored).
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Mapping
from pathlib import Path

from tympan.progress import track
from tympan.serving.client import audio_files


def read_side_table(path: Path) -> dict[str, dict[str, str]]:
    """A CSV with a `path` column and one column per side attribute -> {path: {name: value}}."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "path" not in rows[0]:
        raise ValueError(f"{path}: expected a CSV with a 'path' column and side attribute columns")
    return {row.pop("path"): row for row in rows}


def predict_files(
    model_uri: str,
    files: list[Path],
    out: Path,
    side: Mapping[str, str] | None = None,
    table: Mapping[str, Mapping[str, str]] | None = None,
    progress: bool = True,
) -> tuple[int, int]:
    """Score `files` with the model at `model_uri`; write `out`; -> (scored, failed).

    Side attributes: `side` gives one value for every file; `table` per file (keyed by the
    path as given or by the file name), overriding `side`.
    """
    import mlflow

    from tympan.serving.bundle import PayloadError

    predictor = mlflow.pyfunc.load_model(model_uri).unwrap_python_model().predictor
    given = set(side or {}) | {name for row in (table or {}).values() for name in row}
    missing = [name for name in predictor.side_vocab if name not in given]
    if missing:
        raise ValueError(
            f"the model needs the side attribute(s) {', '.join(missing)} for every file: "
            f"--side {missing[0]}=VALUE, or --side-table with a '{missing[0]}' column "
            f"(known values: {', '.join(predictor.side_vocab[missing[0]])})"
        )
    labels = [] if predictor.regression else predictor.labels
    columns = ["path", "value" if predictor.regression else "label", "confidence", "windows"]
    columns += [f"p_{label}" for label in labels] + ["error"]
    scored = failed = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for path in track(files, len(files), "predict", "file", enabled=progress):
            row: dict[str, object] = {"path": str(path)}
            values = {**(side or {}), **_row_of(table, path)}
            attributes = {name: [values.get(name)] for name in predictor.side_vocab}
            try:
                data = path.read_bytes()
                (answer,) = predictor.predict([data], attributes)
            except (PayloadError, OSError) as exc:
                row["error"] = str(exc).removeprefix("item 0: ")
                failed += 1
            else:
                row["windows"] = answer["windows"]
                if predictor.regression:
                    row["value"] = answer["value"]
                else:
                    probs = answer["probabilities"]
                    row["label"] = answer["label"]
                    row["confidence"] = probs[answer["label"]]
                    row.update({f"p_{label}": probs[label] for label in labels})
                scored += 1
            writer.writerow(row)
    return scored, failed


def _row_of(table: Mapping[str, Mapping[str, str]] | None, path: Path) -> Mapping[str, str]:
    if not table:
        return {}
    return table.get(str(path)) or table.get(path.name) or {}


def main(args) -> None:
    """`tympan predict` (arguments parsed by tympan.cli)."""
    files = audio_files(args.inputs)
    if not files:
        sys.exit(
            "tympan predict: no audio files (.wav, .flac, .ogg) in "
            + ", ".join(map(str, args.inputs))
        )
    try:
        table = read_side_table(args.side_table) if args.side_table else None
    except (OSError, ValueError) as exc:
        sys.exit(f"tympan predict: {exc}")
    try:
        scored, failed = predict_files(args.model, files, args.out, dict(args.side), table)
    except ValueError as exc:
        sys.exit(f"tympan predict: {exc}")
    print(f"predict: {scored} of {len(files)} files scored, {failed} refused -> {args.out}")
    if failed:
        print(f"  the refused files and why are the rows of {args.out} with an 'error'")
