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
