"""The manifest: one row per accepted recording, the contract between ingest and later stages.

Columns: `path` (readable from the project folder), `label`, `group` (the unit that must never
straddle splits), `duration_s`, `sample_rate`, `channels`, `sha256`, then any side attributes.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

REQUIRED = ("path", "label", "group", "duration_s", "sample_rate", "channels", "sha256")
REJECT_COLUMNS = ("path", "reason")


class ManifestError(ValueError):
    """A manifest or splits table that breaks the contract."""


def check_columns(table: pd.DataFrame, required: tuple[str, ...], path: Path) -> None:
    """Raise ManifestError naming the file, each missing column and what was expected."""
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise ManifestError(
            f"{path}: missing column(s) {', '.join(missing)}; "
            f"expected {', '.join(required)} (found {', '.join(map(str, table.columns))})"
        )


def read_table(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """Read a CSV written by a tympan stage, naming the file and any missing column."""
    if not path.exists():
        raise ManifestError(f"{path}: not found; run the stage that writes it (`dvc repro`)")
    table = pd.read_csv(path, dtype={"label": str, "group": str, "path": str})
    check_columns(table, required, path)
    return table


def read_manifest(path: Path) -> pd.DataFrame:
    return read_table(path, REQUIRED)
