"""Dataset adapters: each reads one real layout and lists candidate recordings.

An adapter returns a table with `path`, `label`, `group` and any side attributes, plus the
entries it could not even list (a file name that does not parse, a path outside the root).
Ingest then probes every candidate's audio. `data.group_by` replaces the adapter's default
group with another column it provides (FSDD: `speaker` for speaker-independent splits), or
with what a regex finds in a column or in the file name (`{pattern: '^(?P<group>[a-z]+)_'}`):
regrouping needs no hand-written CSV.

Nothing outside `data.root` is ever opened: a metadata row with an absolute or `..` path, and
a file or folder whose real path (symlinks resolved, the root's own included) lies outside the
real root, is a reject with the reason. The root itself may be a link to the dataset.

Candidates come in the listing's order: metadata row order, or sorted by path for the adapters
that walk folders. Ingest keeps the first of identical files in that order.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tympan.config import DataConfig, GroupByConfig
from tympan.data.manifest import ManifestError, check_columns


class AdapterError(ValueError):
    """A dataset folder that does not have the layout its adapter expects."""


Listing = tuple[pd.DataFrame, list[dict[str, str]]]

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


@dataclass(frozen=True)
class _Root:
    """A dataset root as configured (listed paths are written under it, as the project sees
    them) and as resolved (every listed path must resolve inside it)."""

    given: Path
    real: Path

    @classmethod
    def of(cls, root: Path) -> _Root:
        return cls(root, root.resolve())

    def escape(self, path: Path) -> str | None:
        """Why `path` may not be read: its real path lies outside the root; None when it stays
        inside. Resolving reads the links along the way and never opens the file."""
        try:
            target = path.resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop
            return f"unresolvable path ({exc})"
        if target.is_relative_to(self.real):
            return None
        return f"symlink to {target} outside data.root {self.real}"

    def row(self, relative: str, folder: str = "") -> tuple[str, str | None]:
        """A metadata row's path, `root/folder/relative`, and why it may not be read."""
        candidate = Path(relative)
        path = self.given / folder / candidate
        if candidate.is_absolute() or ".." in candidate.parts:
            return path.as_posix(), (
                f"path {relative!r} points outside data.root {self.real}: "
                "paths in the metadata must be relative and stay inside it"
            )
        return path.as_posix(), self.escape(path)

    def audio_files(
        self, folder: Path, rejects: list[dict[str, str]], recursive: bool = True
    ) -> list[Path]:
        """Audio files under `folder` (and its subfolders when `recursive`), sorted by path.
        Symlinked files and folders are followed while they resolve inside the root; one that
        leads outside is a reject, never read. A folder reached through two paths is listed
        under both (ingest rejects the second copy of each file); a link back to a folder
        being walked is not followed again."""
        files: list[Path] = []
        pending: list[tuple[Path, frozenset[Path]]] = [(folder, frozenset())]
        while pending:
            current, above = pending.pop()
            reason = self.escape(current)
            if reason is not None:
                rejects.append({"path": current.as_posix(), "reason": reason})
                continue
            real = current.resolve()
            if real in above:  # a link back to a folder above it: a loop
                continue
            below = []
            for entry in sorted(os.scandir(current), key=lambda e: e.name):
                path = current / entry.name
                audio = path.suffix.lower() in AUDIO_SUFFIXES
                if entry.is_symlink():
                    reason = self.escape(path)
                    if reason is not None:
                        if audio or (recursive and entry.is_dir()):
                            rejects.append({"path": path.as_posix(), "reason": reason})
                        continue
                if entry.is_dir():
                    below.append((path, above | {real}))
                elif audio and entry.is_file():
                    files.append(path)
            if recursive:
                pending.extend(reversed(below))
        return sorted(files, key=Path.as_posix)


def _metadata(root: _Root, relative: str) -> Path:
    """A metadata table named in params (`data.metadata`), which must lie inside the root."""
    path, reason = root.row(relative)
    if reason is not None:
        raise ManifestError(f"data.metadata: {reason}")
    return Path(path)


def _read_csv(path: Path, required: tuple[str, ...], root: Path) -> pd.DataFrame:
    """A metadata table of the dataset at `root`, which must resolve inside it (a symlinked
    table leading elsewhere is refused before it is opened)."""
    if not path.exists():
        raise AdapterError(f"{path}: not found")
    reason = _Root.of(root).escape(path)
    if reason is not None:
        raise AdapterError(f"{path}: {reason}; the metadata must be a file inside the dataset")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    check_columns(table, required, path)
    return table


def demo(root: Path, cfg: DataConfig | None = None) -> Listing:
    """The generated demo set: `metadata.csv` (filename,label,session,snr_db) + `audio/`."""
    meta = _read_csv(root / "metadata.csv", ("filename", "label", "session", "snr_db"), root)
    tree = _Root.of(root)
    rows, rejects = [], []
    for record in meta.to_dict("records"):
        path, reason = tree.row(record["filename"])
        if reason is not None:
            rejects.append({"path": path, "reason": reason})
            continue
        rows.append(
            {
                "path": path,
                "label": record["label"],
                "group": record["session"],
                "session": record["session"],
                "snr_db": float(record["snr_db"]),
            }
        )
    return pd.DataFrame(rows, columns=["path", "label", "group", "session", "snr_db"]), rejects


FSDD_NAME = re.compile(r"^(?P<digit>\d)_(?P<speaker>[A-Za-z]+)_(?P<take>\d+)\.wav$")


def fsdd(root: Path, cfg: DataConfig | None = None) -> Listing:
    """Free Spoken Digit Dataset: `metadata.csv`, else names `{digit}_{speaker}_{take}.wav`.

    Default group: the recording itself; `data.group_by: speaker` gives speaker-independent splits.
    """
    rejects: list[dict[str, str]] = []
    tree = _Root.of(root)
    if (root / "metadata.csv").exists():
        meta = _read_csv(root / "metadata.csv", ("filename", "digit", "speaker", "take"), root)
        rows = []
        for record in meta.to_dict("records"):
            path, reason = tree.row(record["filename"])
            if reason is None and not re.fullmatch(r"\d", record["digit"]):
                reason = f"unknown label {record['digit']!r}: digits are 0-9"
            if reason is not None:
                rejects.append({"path": path, "reason": reason})
                continue
            rows.append({**record, "path": path})
        table = pd.DataFrame(rows, columns=[*meta.columns, "path"])
    else:
        folder = root / "recordings" if (root / "recordings").is_dir() else root
        rows = []
        for path in tree.audio_files(folder, rejects, recursive=False):
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


def esc50(root: Path, cfg: DataConfig | None = None) -> Listing:
    """ESC-50: `meta/esc50.csv` (filename,fold,target,category,esc10,src_file,take) + `audio/`.

    Label: `category`. Group: `src_file`, the Freesound clip the 5 s excerpts were cut from, so
    excerpts of one source never straddle splits. `fold` is kept for the official 5-fold
    protocol; `data.esc10: true` keeps the ESC-10 subset.
    """
    columns = ("filename", "fold", "target", "category", "esc10", "src_file", "take")
    meta_path = root / "meta" / "esc50.csv"
    meta = _read_csv(meta_path, columns, root)
    if cfg is not None and cfg.esc10:
        flags = meta["esc10"].str.strip().str.lower()
        unknown = sorted(set(flags) - {"true", "false"})
        if unknown:
            raise AdapterError(f"{meta_path}: esc10 must be True or False, got {unknown[0]!r}")
        meta = meta[flags == "true"]
    tree = _Root.of(root)
    rows, rejects = [], []
    for record in meta.to_dict("records"):
        path, reason = tree.row(record["filename"], "audio")
        if reason is not None:
            rejects.append({"path": path, "reason": reason})
            continue
        rows.append(
            {
                "path": path,
                "label": record["category"],
                "group": record["src_file"],
                "fold": record["fold"],
                "take": record["take"],
            }
        )
    return pd.DataFrame(rows, columns=["path", "label", "group", "fold", "take"]), rejects


MLEND_LABELS = {"true story": "true", "deceptive story": "deceptive"}


def mlend_deception(root: Path, cfg: DataConfig | None = None) -> Listing:
    """MLEnd deception: `CBU0521DD_stories_attributes.csv` (filename,Language,Story_type) and
    `CBU0521DD_stories/*.wav`, one story per file.

    Label: `true` or `deceptive` from Story_type in any case or spacing; another value is a
    reject naming it. Group: the story (its file), so windows of one story stay together.
    `language` is kept as a side attribute.
    """
    meta_path = root / "CBU0521DD_stories_attributes.csv"
    meta = _read_csv(meta_path, ("filename", "Language", "Story_type"), root)
    tree = _Root.of(root)
    rows, rejects = [], []
    for record in meta.to_dict("records"):
        path, reason = tree.row(record["filename"], "CBU0521DD_stories")
        if reason is not None:
            rejects.append({"path": path, "reason": reason})
            continue
        story = " ".join(record["Story_type"].split()).lower()
        if story not in MLEND_LABELS:
            rejects.append(
                {
                    "path": path,
                    "reason": f"unknown label {record['Story_type']!r}: "
                    "expected 'True Story' or 'Deceptive Story'",
                }
            )
            continue
        rows.append(
            {
                "path": path,
                "label": MLEND_LABELS[story],
                "group": Path(record["filename"]).stem,
                "language": " ".join(record["Language"].split()),
            }
        )
    return pd.DataFrame(rows, columns=["path", "label", "group", "language"]), rejects


def filename_pattern(root: Path, cfg: DataConfig | None = None) -> Listing:
    """Label and group parsed from each audio file's name by `data.pattern`.

    S3's layout: `^(?P<group>(?P<label>Argentinian|Other)\\d+)(_\\d+)?\\.wav$` reads both
    `Argentinian3.wav` and its chunks `Argentinian3_01.wav` with the source recording as group.
    """
    if cfg is None or not cfg.pattern:
        raise AdapterError("the filename_pattern adapter needs data.pattern (a regex)")
    try:
        regex = re.compile(cfg.pattern)
    except re.error as exc:
        raise AdapterError(f"data.pattern {cfg.pattern!r} is not a valid regex: {exc}") from None
    if "label" not in regex.groupindex:
        raise AdapterError(f"data.pattern {cfg.pattern!r} has no named group (?P<label>...)")
    rows, rejects = [], []
    for path in _Root.of(root).audio_files(root, rejects):
        match = regex.fullmatch(path.name)
        if match is None:
            rejects.append(
                {"path": path.as_posix(), "reason": f"file name does not match {cfg.pattern}"}
            )
            continue
        fields = {k: v for k, v in match.groupdict().items() if v is not None}
        rows.append({**fields, "path": path.as_posix(), "group": fields.get("group", path.stem)})
    if not rows:
        raise AdapterError(f"{root}: no audio file name matches data.pattern {cfg.pattern!r}")
    table = pd.DataFrame(rows)
    side = [c for c in table.columns if c not in ("path", "label", "group")]
    return table[["path", "label", "group", *side]], rejects


def folder_per_class(root: Path, cfg: DataConfig | None = None) -> Listing:
    """`root/<class>/**/*.wav|flac|ogg`: the label is the top folder's name, the group the file.

    Rows are sorted by path across classes, as the other folder-walking adapters list them.
    """
    tree = _Root.of(root)
    rows: list[dict[str, str]] = []
    rejects: list[dict[str, str]] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in tree.audio_files(folder, rejects):
            rows.append({"path": path.as_posix(), "label": folder.name, "group": path.stem})
    for path in tree.audio_files(root, rejects, recursive=False):
        rejects.append({"path": path.as_posix(), "reason": "audio file outside a class folder"})
    if not rows:
        raise AdapterError(
            f"{root}: no class folders with audio files (expected root/<class>/*.wav)"
        )
    return pd.DataFrame(rows).sort_values("path", kind="stable", ignore_index=True), rejects


def csv_table(root: Path, cfg: DataConfig | None = None) -> Listing:
    """A metadata table (`data.metadata`, relative to root) with path, label or numeric target,
    optional group and side-attribute columns, named by `data.*_column`."""
    if cfg is None or not cfg.metadata:
        raise AdapterError("the csv adapter needs data.metadata (a CSV file inside data.root)")
    if (cfg.label_column is None) == (cfg.target_column is None):
        raise AdapterError("the csv adapter needs exactly one of data.label_column, target_column")
    tree = _Root.of(root)
    meta_path = _metadata(tree, cfg.metadata)
    value_column = cfg.target_column or cfg.label_column
    required = tuple(
        c for c in (cfg.path_column, value_column, cfg.group_column, *cfg.side_columns) if c
    )
    meta = _read_csv(meta_path, required, root)
    rows, rejects = [], []
    for record in meta.to_dict("records"):
        path, reason = tree.row(record[cfg.path_column])
        if reason is not None:
            rejects.append({"path": path, "reason": reason})
            continue
        value = record[value_column].strip()
        if not value:
            rejects.append({"path": path, "reason": f"empty {value_column!r}"})
            continue
        if cfg.target_column is not None:
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if not math.isfinite(number):
                reason = f"target {value!r} in {value_column!r} is not a finite number"
                rejects.append({"path": path, "reason": reason})
                continue
        group = record[cfg.group_column] if cfg.group_column else Path(path).stem
        row = {"path": path, "label": value, "group": group}
        if cfg.target_column is not None:
            row["target"] = number
        row.update({c: record[c] for c in cfg.side_columns})
        rows.append(row)
    columns = ["path", "label", "group"] + (["target"] if cfg.target_column else [])
    return pd.DataFrame(rows, columns=[*columns, *cfg.side_columns]), rejects


ADAPTERS: dict[str, Callable[[Path, DataConfig | None], Listing]] = {
    "demo": demo,
    "fsdd": fsdd,
    "esc50": esc50,
    "mlend_deception": mlend_deception,
    "filename_pattern": filename_pattern,
    "folder_per_class": folder_per_class,
    "csv": csv_table,
}


def list_recordings(
    adapter: str,
    root: Path,
    group_by: str | GroupByConfig | None,
    cfg: DataConfig | None = None,
) -> Listing:
    """Run an adapter and apply `group_by` (`regroup`); errors name the folder and the column."""
    if not root.is_dir():
        raise AdapterError(f"data.root {root} is not a folder; point it at the dataset")
    table, rejects = ADAPTERS[adapter](root, cfg)
    if group_by is None:
        return table, rejects
    table, unmatched = regroup(table, group_by, adapter)
    return table, rejects + unmatched


def regroup(
    table: pd.DataFrame, group_by: str | GroupByConfig, adapter: str = "the"
) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """`table` with its `group` replaced per `data.group_by` (a column, or a `GroupByConfig`),
    less the rows whose value the pattern does not match -> (table, those rows as rejects)."""
    spec = GroupByConfig(column=group_by) if isinstance(group_by, str) else group_by
    if spec.column is None:
        values = table["path"].map(lambda p: Path(p).name)
        where = "file name"
    elif spec.column in table.columns:
        values = table[spec.column].astype(str)
        where = f"{spec.column} value"
    else:
        key = "data.group_by" if isinstance(group_by, str) else "data.group_by.column"
        raise AdapterError(
            f"{key}={spec.column!r} is not a column the {adapter} adapter provides "
            f"(available: {', '.join(table.columns)})"
        )
    if spec.pattern is None:
        return table.assign(group=values.to_numpy()), []
    regex = re.compile(spec.pattern)
    found = values.map(lambda v: _captured(regex, v))
    missed = found.isna().to_numpy()
    rejects = [
        {
            "path": path,
            "reason": f"data.group_by.pattern '{spec.pattern}' finds no group in its {where} "
            f"'{value}'",
        }
        for path, value in zip(table["path"][missed], values[missed], strict=True)
    ]
    kept = table[~missed].assign(group=found[~missed].to_numpy())
    return kept.reset_index(drop=True), rejects


def _captured(regex: re.Pattern[str], value: str) -> str | None:
    """What `regex` finds in `value`: its group `group`, else its first group, else the whole
    match; None when it does not match (or captures nothing)."""
    match = regex.search(value)
    if match is None:
        return None
    if "group" in regex.groupindex:
        found = match.group("group")
    else:
        found = match.group(1) if regex.groups else match.group(0)
    return found or None
