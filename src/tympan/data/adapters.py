"""Dataset adapters: each reads one real layout and lists candidate recordings.

An adapter returns a table with `path`, `label`, `group` and any side attributes, plus the
entries it could not even list (a file name that does not parse, a path outside the root).
Ingest then probes every candidate's audio. `data.group_by` replaces the adapter's default
group with another column it provides (FSDD: `speaker` for speaker-independent splits).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from tympan.data.manifest import ManifestError, check_columns


class AdapterError(ValueError):
    """A dataset folder that does not have the layout its adapter expects."""


Listing = tuple[pd.DataFrame, list[dict[str, str]]]


def _inside(root: Path, relative: str, where: str) -> str:
    """`root/relative` as a path string, refusing escapes from the dataset root."""
    candidate = Path(relative)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise ManifestError(
            f"{where}: path {relative!r} points outside the dataset root {root}; "
            "paths must be relative and stay inside it"
        )
    return (root / candidate).as_posix()


def _read_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    if not path.exists():
        raise AdapterError(f"{path}: not found")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    check_columns(table, required, path)
    return table


def demo(root: Path) -> Listing:
    """The generated demo set: `metadata.csv` (filename,label,session,snr_db) + `audio/`."""
    meta = _read_csv(root / "metadata.csv", ("filename", "label", "session", "snr_db"))
    where = str(root / "metadata.csv")
    table = pd.DataFrame(
        {
            "path": [_inside(root, f, where) for f in meta["filename"]],
            "label": meta["label"],
            "group": meta["session"],
            "session": meta["session"],
            "snr_db": meta["snr_db"].astype(float),
        }
    )
    return table, []


FSDD_NAME = re.compile(r"^(?P<digit>\d)_(?P<speaker>[A-Za-z]+)_(?P<take>\d+)\.wav$")


def fsdd(root: Path) -> Listing:
    """Free Spoken Digit Dataset: `metadata.csv`, else names `{digit}_{speaker}_{take}.wav`.

    Default group: the recording itself; `data.group_by: speaker` gives speaker-independent splits.
    """
    rejects: list[dict[str, str]] = []
    if (root / "metadata.csv").exists():
        meta = _read_csv(root / "metadata.csv", ("filename", "digit", "speaker", "take"))
        where = str(root / "metadata.csv")
        rows = []
        for record in meta.to_dict("records"):
            if not re.fullmatch(r"\d", record["digit"]):
                rejects.append(
                    {
                        "path": record["filename"],
                        "reason": f"unknown label {record['digit']!r}: digits are 0-9",
                    }
                )
                continue
            rows.append({**record, "path": _inside(root, record["filename"], where)})
        table = pd.DataFrame(rows)
    else:
        folder = root / "recordings" if (root / "recordings").is_dir() else root
        rows = []
        for path in sorted(folder.glob("*.wav")):
            match = FSDD_NAME.match(path.name)
            if match is None:
                rejects.append(
                    {
                        "path": path.as_posix(),
                        "reason": "file name does not match {digit}_{speaker}_{take}.wav",
                    }
                )
                continue
            rows.append(
                {
                    **match.groupdict(),
                    "path": path.as_posix(),
                    "filename": path.relative_to(root).as_posix(),
                }
            )
        if not rows:
            raise AdapterError(f"{root}: no metadata.csv and no *.wav named like 3_theo_12.wav")
        table = pd.DataFrame(rows)
    out = pd.DataFrame(
        {
            "path": table["path"],
            "label": table["digit"],
            "group": table["path"].map(lambda p: Path(p).stem),
        }
    )
    for column in ("speaker", "take", "accent", "gender"):
        if column in table.columns:
            out[column] = table[column].to_numpy()
    return out, rejects


ADAPTERS: dict[str, Callable[[Path], Listing]] = {"demo": demo, "fsdd": fsdd}


def list_recordings(adapter: str, root: Path, group_by: str | None) -> Listing:
    """Run an adapter and apply `group_by`; errors name the folder and the column."""
    if not root.is_dir():
        raise AdapterError(f"data.root {root} is not a folder; point it at the dataset")
    table, rejects = ADAPTERS[adapter](root)
    if group_by is not None:
        if group_by not in table.columns:
            raise AdapterError(
                f"data.group_by={group_by!r} is not a column the {adapter} adapter provides "
                f"(available: {', '.join(table.columns)})"
            )
        table["group"] = table[group_by].astype(str)
    return table, rejects
