"""Ingest: list recordings with an adapter, probe each file, write the manifest and rejects."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pandas as pd

from tympan.audio import AudioError, probe
from tympan.config import DataConfig
from tympan.data.adapters import list_recordings
from tympan.data.manifest import REJECT_COLUMNS
from tympan.progress import track

log = logging.getLogger(__name__)


class IngestError(RuntimeError):
    """Too many recordings were rejected to trust the dataset."""


def ingest(
    cfg: DataConfig, manifest_path: Path, rejects_path: Path, summary_path: Path
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write the manifest, the rejects table and a summary to the given paths.

    Rejects are always written before the reject-fraction check, so a failing run still
    leaves the list of files and reasons to fix. Candidates are probed in the adapter's
    listing order, so of identical files the first listed is kept and every later one is a
    reject naming it.
    """
    for path in (manifest_path, rejects_path, summary_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    candidates, rejects = list_recordings(cfg.adapter, Path(cfg.root), cfg.group_by, cfg)
    accepted = []
    seen: dict[str, str] = {}
    for row in track(candidates.to_dict("records"), len(candidates), "ingest", "file"):
        try:
            info = probe(row["path"], cfg.silence_dbfs, cfg.max_duration_s)
        except FileNotFoundError:
            rejects.append({"path": row["path"], "reason": "listed in the metadata but missing"})
            continue
        except AudioError as exc:
            rejects.append({"path": row["path"], "reason": str(exc)})
            continue
        if info.sha256 in seen:
            rejects.append(
                {
                    "path": row["path"],
                    "reason": f"duplicate: identical bytes to {seen[info.sha256]}",
                }
            )
            continue
        seen[info.sha256] = row["path"]
        accepted.append(
            {
                **row,
                "duration_s": round(info.duration_s, 4),
                "sample_rate": info.sample_rate,
                "channels": info.channels,
                "sha256": info.sha256,
            }
        )
    manifest = pd.DataFrame(accepted)
    reject_table = pd.DataFrame(rejects, columns=list(REJECT_COLUMNS))
    reject_table.to_csv(rejects_path, index=False)
    total = len(manifest) + len(reject_table)
    fraction = len(reject_table) / total if total else 1.0
    reasons = Counter(r.split(":")[0].split(" (")[0] for r in reject_table["reason"])
    summary = {
        "adapter": cfg.adapter,
        "root": cfg.root,
        "accepted": len(manifest),
        "rejected": len(reject_table),
        "reject_fraction": round(fraction, 4),
        "reasons": dict(reasons),
        "audio": audio_profile(manifest),
    }
    summary_path.write_text(json.dumps(summary, indent=1))
    for reject in rejects:
        log.warning("rejected %s: %s", reject["path"], reject["reason"])
    if not len(manifest) or fraction > cfg.max_reject_fraction:
        raise IngestError(
            f"rejected {len(reject_table)} of {total} recordings ({fraction:.1%} > "
            f"data.max_reject_fraction={cfg.max_reject_fraction:.1%}); reasons {dict(reasons)}; "
            f"see {rejects_path} and fix the files or raise the limit"
        )
    front = ["path", "label", "group", "duration_s", "sample_rate", "channels", "sha256"]
    manifest = manifest[front + [c for c in manifest.columns if c not in front]]
    manifest.to_csv(manifest_path, index=False)
    log.info("ingest: %d accepted, %d rejected", len(manifest), len(reject_table))
    return manifest, reject_table


def audio_profile(manifest: pd.DataFrame) -> dict:
    """How the accepted recordings are: duration quantiles (s), and recordings per sample rate
    and per channel count (what `features.seconds` and `sample_rate` should be set against)."""
    if not len(manifest):
        return {}
    durations = manifest["duration_s"].astype(float)
    quantiles = {"min": 0.0, "p5": 0.05, "median": 0.5, "p95": 0.95, "max": 1.0}
    return {
        "duration_s": {k: round(float(durations.quantile(q)), 3) for k, q in quantiles.items()},
        "sample_rate": _counts(manifest["sample_rate"]),
        "channels": _counts(manifest["channels"]),
    }


def _counts(values: pd.Series) -> dict[str, int]:
    return {str(k): int(v) for k, v in values.value_counts().sort_index().items()}


def describe(profile: dict) -> str:
    """`durations 0.4-2.3 s (median 1.0), 8000 Hz x 3000, mono` from `audio_profile`."""
    if not profile:
        return "no recordings"
    d = profile["duration_s"]
    span = f"{d['min']:g} s" if d["min"] == d["max"] else f"{d['min']:g}-{d['max']:g} s"
    rates = ", ".join(f"{rate} Hz x {n}" for rate, n in profile["sample_rate"].items())
    channels = ", ".join(f"{c} ch x {n}" for c, n in profile["channels"].items())
    return f"durations {span} (median {d['median']:g}), {rates}, {channels}"


def feature_fit(
    manifest: pd.DataFrame, seconds: float, sample_rate: int, segmented: bool
) -> list[str]:
    """Warnings when the recordings do not fit `features.seconds` / `features.sample_rate`:
    most clips padded (or, unsegmented, cropped) by more than a tenth of the window, or any
    clip upsampled. Each says what happens to the clips and the setting that fits them."""
    found = []
    n = len(manifest)
    durations = manifest["duration_s"].astype(float)
    median = float(durations.median())
    padded = int((durations < 0.9 * seconds).sum())
    if padded >= n / 2:
        found.append(
            f"{padded} of {n} recordings are shorter than features.seconds={seconds:g} (median "
            f"{median:g} s): each is padded with silence to {seconds:g} s; "
            f"features.seconds: {median:g} fits them"
        )
    cropped = int((durations > 1.1 * seconds).sum())
    if not segmented and cropped >= n / 2:
        found.append(
            f"{cropped} of {n} recordings are longer than features.seconds={seconds:g} (median "
            f"{median:g} s): only {seconds:g} s of each is used; raise features.seconds or "
            "set segment.enabled: true to score every window"
        )
    rates = manifest["sample_rate"].astype(int)
    below = int((rates < sample_rate).sum())
    if below:
        common = int(rates.mode().iloc[0])
        found.append(
            f"{below} of {n} recordings have a sample rate below features.sample_rate="
            f"{sample_rate} (most are {common} Hz): they are upsampled, and nothing in them "
            f"lies above {common // 2} Hz; features.sample_rate: {common} fits them"
        )
    return found
