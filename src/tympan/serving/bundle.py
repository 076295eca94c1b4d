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
import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tympan.audio import AudioError, Source, decode, inspect, resample, to_mono
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
# Serving limits, from the server's environment (README, "Serving limits"). Bytes cap what
# is decoded from base64; audio seconds cap what is decoded from the bytes, read from each
# item's header before any sample is (a FLAC of a constant signal holds an hour in 0.17 MiB).
MAX_ITEM_ENV = "TYMPAN_MAX_ITEM_MB"
DEFAULT_MAX_ITEM_MB = 100.0
MAX_AUDIO_ENV = "TYMPAN_MAX_AUDIO_S"
MAX_REQUEST_AUDIO_ENV = "TYMPAN_MAX_REQUEST_AUDIO_S"
# Default item cap: this many windows of `features.seconds` every `segment.hop` (600.5 s for
# the demo's 1 s windows every 0.5 s); a request holds at most four such items.
DEFAULT_MAX_WINDOWS = 1200
DEFAULT_REQUEST_ITEMS = 4
# Windows through the network at once: bounds memory for a long request.
WINDOW_BATCH = 256


class PayloadError(ValueError):
    """A request item that is not usable audio; the message names the item and the problem."""


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={raw!r} must be a positive number")
    return value


@dataclass(frozen=True)
class Limits:
    """What one request may hold: bytes per item (after base64), audio seconds per item and
    per request (from the headers, before decoding)."""

    item_bytes: int
    item_audio_s: float
    request_audio_s: float

    @classmethod
    def from_env(cls, features: FeatureConfig, segment: SegmentConfig) -> Limits:
        """`TYMPAN_MAX_ITEM_MB` (100), `TYMPAN_MAX_AUDIO_S` (`DEFAULT_MAX_WINDOWS` windows),
        `TYMPAN_MAX_REQUEST_AUDIO_S` (four items' worth)."""
        audio = features.seconds + (DEFAULT_MAX_WINDOWS - 1) * segment.hop
        item_audio = _env_number(MAX_AUDIO_ENV, audio)
        return cls(
            item_bytes=max_item_bytes(),
            item_audio_s=item_audio,
            request_audio_s=_env_number(MAX_REQUEST_AUDIO_ENV, DEFAULT_REQUEST_ITEMS * item_audio),
        )


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
    encoder: dict | None = None,
) -> None:
    """Everything serving needs: feature and model params, labels, input shape, statistics,
    every member's weights, `head` (softmax, sigmoid: classes; identity: regression) and, for
    embedding features, the encoder itself (`Encoder.export`: its weights, not a hub id)."""
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
            **({"encoder": encoder} if encoder is not None else {}),
        },
        path,
    )


def bundle_digest(path: Path) -> str:
    """sha256 of what a bundle holds (every member's weights, statistics, labels, params),
    read value by value, so it names the model whatever bytes torch wrote around it."""
    digest = hashlib.sha256()
    _feed(digest, torch.load(path, map_location="cpu", weights_only=True))
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"tensor {flat.dtype} {tuple(value.shape)}:".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        digest.update(f"dict {len(value)}:".encode())
        for key in sorted(value, key=str):
            _feed(digest, str(key))
            _feed(digest, value[key])
    elif isinstance(value, list | tuple):
        digest.update(f"list {len(value)}:".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(f"{type(value).__name__} {value!r};".encode())


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
        self.limits = Limits.from_env(self.features, self.segment)
        self.device = device or torch.device("cpu")
        self.encoder: dict | None = None  # the pretrained encoder this model carries
        # embedding features: the frontend computes them with the model's own copy of the
        # encoder; a fine-tuned encoder: its architecture, the members holding its weights
        embedder = finetuned = None
        if "encoder" in bundle:
            from tympan.encoders import from_export

            rebuilt = from_export(bundle["encoder"])
            if bundle["encoder"].get("finetuned"):
                finetuned = rebuilt
            else:
                embedder = rebuilt
            self.encoder = {k: bundle["encoder"][k] for k in ("kind", "source", "hash")}
        frontend = FeatureStack(self.features, self.features.stack, embedder)
        self.frontend = frontend.to(self.device).eval()
        shape = tuple(bundle["input_shape"])
        outputs = len(self.labels) if self.head == "softmax" else 1
        self.members = []
        # every weight is in the members' state dicts: the backbone's pretrained file (which
        # the serving machine need not have) is not read again
        model_cfg = replace(params.model, weights=None)
        for state in bundle["members"].values():
            member = build_model(
                model_cfg,
                shape,
                outputs,
                bundle["mean"],
                bundle["std"],
                self.side_vocab,
                finetuned,
                self.features,
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

    def check_headers(self, sources: Sequence[Source]) -> None:
        """Refuse, from the headers alone, an item that is not audio, has a rate outside the
        declared range, is truncated or longer than the item limit, and a request whose audio
        adds up past the request limit: a refused item costs its header, not its samples."""
        total = 0.0
        for i, source in enumerate(sources):
            try:
                header = inspect(source)
            except AudioError as exc:
                raise PayloadError(f"item {i}: {exc}") from None
            if header.duration_s > self.limits.item_audio_s:
                raise PayloadError(
                    f"item {i}: {header.duration_s:.1f} s of audio is over the "
                    f"{self.limits.item_audio_s:g} s limit per item ({MAX_AUDIO_ENV})"
                )
            total += header.duration_s
            if total > self.limits.request_audio_s:
                raise PayloadError(
                    f"items 0-{i} hold {total:.1f} s of audio, over the "
                    f"{self.limits.request_audio_s:g} s limit per request "
                    f"({MAX_REQUEST_AUDIO_ENV}); send fewer items per request"
                )

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
        self.check_headers(sources)
        per_item = [self._windows(i, source) for i, source in enumerate(sources)]
        counts = [len(w) for w in per_item]
        if not per_item:
            width = 1 if self.regression else len(self.labels)
            return Scored(np.zeros((0, width), dtype=np.float32), [])
        waves = torch.cat(per_item)  # (all windows, samples)
        window_codes = codes.repeat_interleave(torch.tensor(counts), dim=0)
        item_of = torch.arange(len(counts)).repeat_interleave(torch.tensor(counts))
        chunks = []
        for start in range(0, len(waves), WINDOW_BATCH):
            x = self.frontend(waves[start : start + WINDOW_BATCH].to(self.device))
            _refuse_non_finite(x, item_of[start : start + WINDOW_BATCH], "features")
            s = window_codes[start : start + WINDOW_BATCH].to(self.device)
            outputs = [
                to_output(m(x, s) if self.side_vocab else m(x), self.head) for m in self.members
            ]
            out = torch.stack(outputs).mean(0).cpu()
            _refuse_non_finite(out, item_of[start : start + WINDOW_BATCH], "model outputs")
            chunks.append(out)
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


def _refuse_non_finite(x: torch.Tensor, item_of: torch.Tensor, what: str) -> None:
    """PayloadError naming the items whose rows of `x` `(windows, ...)` hold NaN or inf."""
    finite = torch.isfinite(x.reshape(len(x), -1)).all(dim=1).cpu()
    if not bool(finite.all()):
        items = sorted({int(i) for i in item_of[~finite]})
        raise PayloadError(
            f"item {', '.join(map(str, items))}: non-finite {what}; the audio is not a usable "
            "recording"
        )


# ASCII whitespace: GNU `base64` wraps its output every 76 characters.
_WHITESPACE = str.maketrans("", "", " \t\r\n\v\f")
_URL_SAFE = str.maketrans("-_", "+/")


def _b64decode(value: str, i: int, limit: int, too_big: str) -> bytes:
    """Standard or URL-safe base64, line breaks and missing padding allowed; anything else
    is refused (never silently dropped, as `validate=False` would)."""
    if len(value) > (limit * 4 // 3) * 1.05 + 64:  # before copying it: a line break per 20 chars
        raise PayloadError(f"item {i}: {too_big}")
    try:  # what clients send: one padded line of the standard alphabet, checked in C
        return binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, ValueError):
        pass  # line breaks, the URL-safe alphabet or missing padding: cleaned first (the
        # cleaning cost a third more than decoding, on every request)
    text = value.translate(_WHITESPACE)
    if "-" in text or "_" in text:
        text = text.translate(_URL_SAFE)
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise PayloadError(
            f"item {i}: 'audio' is not valid base64; send the WAV/FLAC/OGG file's bytes "
            "base64-encoded (standard or URL-safe alphabet)"
        ) from None


def max_item_bytes() -> int:
    """The per-item size limit: `TYMPAN_MAX_ITEM_MB` (MiB) if set, else 100 MiB."""
    return int(_env_number(MAX_ITEM_ENV, DEFAULT_MAX_ITEM_MB) * 2**20)


def decode_items(values: Sequence[Any], limit: int | None = None) -> list[bytes]:
    """Base64 strings (or raw bytes) -> audio bytes, each at most `limit` bytes (default
    `max_item_bytes()`); errors name the item index."""
    limit = max_item_bytes() if limit is None else limit
    too_big = f"larger than the {limit / 2**20:.3g} MiB limit per item ({MAX_ITEM_ENV})"
    out = []
    for i, value in enumerate(values):
        if isinstance(value, bytes | bytearray):
            data = bytes(value)
        elif isinstance(value, str):
            data = _b64decode(value, i, limit, too_big)
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
