"""The model bundle and its predictor, independent of MLflow.

A bundle is one torch file (plain tensors and dicts, loadable with `weights_only=True`):
feature and segment params, label list, model params, side-attribute vocabularies, input shape,
normalisation statistics and the state dict of every ensemble member. `Predictor` runs decode ->
mono -> resample -> windows -> feature stack -> every member -> mean probability, with the same
functions the training pipeline used, then aggregates windows per recording.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tympan.audio import AudioError, Source, decode, resample, to_mono
from tympan.config import (
    FeatureConfig,
    ModelConfig,
    SegmentConfig,
    params_from_dict,
    to_dict,
)
from tympan.features import windows
from tympan.features.stack import FeatureStack
from tympan.models import HEADS, build_model, to_output

BUNDLE_VERSION = 3
# A request item larger than this is refused before decoding (100 MiB is about 10 minutes of
# 44.1 kHz 16-bit stereo WAV); the server's environment can lower or raise it (README).
MAX_ITEM_ENV = "TYMPAN_MAX_ITEM_MB"
DEFAULT_MAX_ITEM_MB = 100.0
# Windows through the network at once: bounds memory for an hour-long request.
WINDOW_BATCH = 256


class PayloadError(ValueError):
    """A request item that is not usable audio; the message names the item and the problem."""


def save_bundle(
    path: Path,
    features: FeatureConfig,
    model: ModelConfig,
    labels: list[str],
    input_shape: tuple[int, int, int],
    mean: np.ndarray,
    std: np.ndarray,
    members: dict[int, dict[str, torch.Tensor]],
    segment: SegmentConfig | None = None,
    side_vocab: dict[str, list[str]] | None = None,
    head: str = "softmax",
) -> None:
    """Everything serving needs: feature and model params, labels, input shape, statistics,
    every member's weights, and `head` (softmax, sigmoid: classes; identity: regression)."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
    torch.save(
        {
            "version": BUNDLE_VERSION,
            "head": head,
            "features": to_dict(features),
            "segment": to_dict(segment or SegmentConfig()),
            "model": to_dict(model),
            "labels": list(labels),
            "side_vocab": {k: list(v) for k, v in (side_vocab or {}).items()},
            "input_shape": list(input_shape),
            "mean": torch.as_tensor(mean, dtype=torch.float32),
            "std": torch.as_tensor(std, dtype=torch.float32),
            "members": {str(seed): state for seed, state in members.items()},
        },
        path,
    )


@dataclass(frozen=True)
class Scored:
    """Mean member probabilities per recording `(items, n_classes)` and windows per item."""

    probs: np.ndarray
    windows: list[int]


class Predictor:
    """Ensemble predictor over raw audio; batch-safe (one answer per item, in order)."""

    def __init__(self, bundle: dict[str, Any], device: torch.device | None = None) -> None:
        if bundle.get("version") != BUNDLE_VERSION:
            raise ValueError(
                f"model bundle version {bundle.get('version')} is not {BUNDLE_VERSION}; "
                "re-run `dvc repro` to retrain with this version of tympan"
            )
        params = params_from_dict(
            {key: bundle[key] for key in ("features", "segment", "model")},
            source="model bundle",
        )
        self.features = params.features
        self.segment = params.segment
        self.labels: list[str] = bundle["labels"]
        self.head: str = bundle["head"]
        self.regression = self.head == "identity"
        self.side_vocab: dict[str, list[str]] = bundle["side_vocab"]
        self.device = device or torch.device("cpu")
        self.frontend = FeatureStack(self.features, self.features.stack).to(self.device).eval()
        shape = tuple(bundle["input_shape"])
        outputs = len(self.labels) if self.head == "softmax" else 1
        self.members = []
        for state in bundle["members"].values():
            member = build_model(
                params.model,
                shape,
                outputs,
                bundle["mean"],
                bundle["std"],
                self.side_vocab,
            )
            member.load_state_dict(state)
            self.members.append(member.to(self.device).eval())

    @classmethod
    def load(cls, path: str | Path, device: torch.device | None = None) -> Predictor:
        return cls(torch.load(path, map_location="cpu", weights_only=True), device)

    def side_codes(self, side: Mapping[str, Sequence[Any]] | None, items: int) -> torch.Tensor:
        """Validate side attributes -> codes `(items, n_side)`; errors name item and value."""
        side = side or {}
        columns = []
        for name, known in self.side_vocab.items():
            if name not in side:
                raise PayloadError(
                    f"missing side attribute '{name}': this model needs "
                    f"{', '.join(self.side_vocab)} for every item"
                )
            values = list(side[name])
            if len(values) != items:
                raise PayloadError(f"side attribute '{name}' has {len(values)} values for {items}")
            codes = []
            for i, value in enumerate(values):
                if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
                    raise PayloadError(f"item {i}: missing side attribute '{name}'")
                text = str(value)
                if text not in known:
                    raise PayloadError(
                        f"item {i}: unknown {name} {text!r} (known: {', '.join(known)})"
                    )
                codes.append(known.index(text) + 1)
            columns.append(codes)
        if not columns:
            return torch.zeros((items, 0), dtype=torch.int64)
        return torch.tensor(columns, dtype=torch.int64).T.contiguous()

    def _windows(self, i: int, source: Source) -> torch.Tensor:
        try:
            data, rate = decode(source)
        except AudioError as exc:
            raise PayloadError(f"item {i}: {exc}") from None
        wave = resample(to_mono(torch.from_numpy(data)), rate, self.features.sample_rate)
        return windows(wave, self.features, self.segment.hop, self.segment.min_last)

    @torch.no_grad()
    def score(
        self, sources: Sequence[Source], side: Mapping[str, Sequence[Any]] | None = None
    ) -> Scored:
        """Probabilities per recording for files or in-memory audio bytes, with window counts
        (for a regression model: the prediction `(items, 1)`).

        Every window goes through every member; a recording's probability is the `aggregate`
        (mean or max, renormalised) of its windows' ensemble probabilities.
        """
        codes = self.side_codes(side, len(sources))
        per_item = [self._windows(i, source) for i, source in enumerate(sources)]
        counts = [len(w) for w in per_item]
        if not per_item:
            width = 1 if self.regression else len(self.labels)
            return Scored(np.zeros((0, width), dtype=np.float32), [])
        waves = torch.cat(per_item)  # (all windows, samples)
        window_codes = codes.repeat_interleave(torch.tensor(counts), dim=0)
        chunks = []
        for start in range(0, len(waves), WINDOW_BATCH):
            x = self.frontend(waves[start : start + WINDOW_BATCH].to(self.device))
            s = window_codes[start : start + WINDOW_BATCH].to(self.device)
            outputs = [
                to_output(m(x, s) if self.side_vocab else m(x), self.head) for m in self.members
            ]
            chunks.append(torch.stack(outputs).mean(0).cpu())
        probs = torch.cat(chunks)
        out = []
        for block in torch.split(probs, counts):
            if self.segment.aggregate == "max":
                top = block.amax(0)
                out.append(top if self.regression else top / top.sum())
            else:
                out.append(block.mean(0))
        return Scored(torch.stack(out).numpy(), counts)

    def predict_proba(
        self, sources: Sequence[Source], side: Mapping[str, Sequence[Any]] | None = None
    ) -> np.ndarray:
        """Mean member probability per recording `(items, n_classes)`."""
        return self.score(sources, side).probs

    def predict(
        self, sources: Sequence[Source], side: Mapping[str, Sequence[Any]] | None = None
    ) -> list[dict[str, Any]]:
        """`[{"label": ..., "probabilities": {label: p}, "windows": n}]`, one per item; for a
        regression model `[{"value": v, "windows": n}]`."""
        scored = self.score(sources, side)
        if self.regression:
            return [
                {"value": float(row[0]), "windows": n}
                for row, n in zip(scored.probs, scored.windows, strict=True)
            ]
        return [
            {
                "label": self.labels[int(row.argmax())],
                "probabilities": {
                    label: float(p) for label, p in zip(self.labels, row, strict=True)
                },
                "windows": n,
            }
            for row, n in zip(scored.probs, scored.windows, strict=True)
        ]


def max_item_bytes() -> int:
    """The per-item size limit: `TYMPAN_MAX_ITEM_MB` (MiB) if set, else 100 MiB."""
    raw = os.environ.get(MAX_ITEM_ENV, "")
    try:
        mib = float(raw) if raw else DEFAULT_MAX_ITEM_MB
    except ValueError:
        raise ValueError(f"{MAX_ITEM_ENV}={raw!r} is not a number of MiB") from None
    return int(mib * 1024 * 1024)


def decode_items(values: Sequence[Any]) -> list[bytes]:
    """Base64 strings (or raw bytes) -> audio bytes; errors name the item index."""
    limit = max_item_bytes()
    too_big = f"larger than the {limit / 2**20:.3g} MiB limit ({MAX_ITEM_ENV})"
    out = []
    for i, value in enumerate(values):
        if isinstance(value, bytes | bytearray):
            data = bytes(value)
        elif isinstance(value, str):
            if len(value) > limit * 4 // 3 + 4:
                raise PayloadError(f"item {i}: {too_big}")
            try:
                data = base64.b64decode(value.strip(), validate=True)
            except (binascii.Error, ValueError):
                raise PayloadError(
                    f"item {i}: 'audio' is not valid base64; send the WAV/FLAC/OGG file's bytes "
                    "base64-encoded"
                ) from None
        else:
            raise PayloadError(
                f"item {i}: 'audio' must be a base64 string, got {type(value).__name__}"
            )
        if not data:
            raise PayloadError(f"item {i}: empty audio")
        if len(data) > limit:
            raise PayloadError(f"item {i}: {too_big}")
        out.append(data)
    return out
