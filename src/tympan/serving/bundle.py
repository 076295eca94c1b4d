"""The model bundle and its predictor, independent of MLflow.

A bundle is one torch file (plain tensors and dicts, loadable with `weights_only=True`):
feature params, label list, model params, input shape, normalisation statistics and the state
dict of every ensemble member. `Predictor` runs decode -> resample -> log-mel -> every member
-> mean probability, with the same functions the training pipeline used.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tympan.audio import AudioError, Source
from tympan.config import FeatureConfig, ModelConfig, params_from_dict, to_dict
from tympan.features import LogMel, waveform_batch
from tympan.models import build_model

BUNDLE_VERSION = 1
# A request item larger than this is refused before decoding (about 10 minutes of 44.1 kHz
# 16-bit stereo WAV); the limit is documented in the README.
MAX_ITEM_BYTES = 100 * 1024 * 1024


class PayloadError(ValueError):
    """A request item that is not usable audio; the message names the item and the problem."""


def save_bundle(
    path: Path,
    features: FeatureConfig,
    model: ModelConfig,
    labels: list[str],
    input_shape: tuple[int, int],
    mean: np.ndarray,
    std: np.ndarray,
    members: dict[int, dict[str, torch.Tensor]],
) -> None:
    torch.save(
        {
            "version": BUNDLE_VERSION,
            "features": to_dict(features),
            "model": to_dict(model),
            "labels": list(labels),
            "input_shape": list(input_shape),
            "mean": torch.as_tensor(mean, dtype=torch.float32),
            "std": torch.as_tensor(std, dtype=torch.float32),
            "members": {str(seed): state for seed, state in members.items()},
        },
        path,
    )


class Predictor:
    """Ensemble predictor over raw audio; batch-safe (one answer per item, in order)."""

    def __init__(self, bundle: dict[str, Any], device: torch.device | None = None) -> None:
        if bundle.get("version") != BUNDLE_VERSION:
            raise ValueError(
                f"model bundle version {bundle.get('version')} is not {BUNDLE_VERSION}"
            )
        params = params_from_dict(
            {"features": bundle["features"], "model": bundle["model"]}, source="model bundle"
        )
        self.features = params.features
        self.labels: list[str] = bundle["labels"]
        self.device = device or torch.device("cpu")
        self.frontend = LogMel(self.features).to(self.device).eval()
        shape = tuple(bundle["input_shape"])
        self.members = []
        for state in bundle["members"].values():
            member = build_model(
                params.model, shape, len(self.labels), bundle["mean"], bundle["std"]
            )
            member.load_state_dict(state)
            self.members.append(member.to(self.device).eval())

    @classmethod
    def load(cls, path: str | Path, device: torch.device | None = None) -> Predictor:
        return cls(torch.load(path, map_location="cpu", weights_only=True), device)

    @torch.no_grad()
    def predict_proba(self, sources: Sequence[Source]) -> np.ndarray:
        """Mean member probability `(items, n_classes)` for files or in-memory audio bytes."""
        waves: list[torch.Tensor] = []
        for i, source in enumerate(sources):
            try:
                waves.append(waveform_batch([source], self.features)[0])
            except AudioError as exc:
                raise PayloadError(f"item {i}: {exc}") from None
        if not waves:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        x = self.frontend(torch.stack(waves).to(self.device))  # (items, 1, n_mels, frames)
        probs = torch.stack([torch.softmax(m(x), dim=1) for m in self.members]).mean(0)
        return probs.cpu().numpy()

    def predict(self, sources: Sequence[Source]) -> list[dict[str, Any]]:
        """`[{"label": ..., "probabilities": {label: p}}]`, one per item."""
        probs = self.predict_proba(sources)
        return [
            {
                "label": self.labels[int(row.argmax())],
                "probabilities": {
                    label: float(p) for label, p in zip(self.labels, row, strict=True)
                },
            }
            for row in probs
        ]


def decode_items(values: Sequence[Any]) -> list[bytes]:
    """Base64 strings (or raw bytes) -> audio bytes; errors name the item index."""
    out = []
    for i, value in enumerate(values):
        if isinstance(value, bytes | bytearray):
            data = bytes(value)
        elif isinstance(value, str):
            if len(value) > MAX_ITEM_BYTES * 4 // 3 + 4:
                raise PayloadError(f"item {i}: larger than the {MAX_ITEM_BYTES >> 20} MiB limit")
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
        if len(data) > MAX_ITEM_BYTES:
            raise PayloadError(f"item {i}: larger than the {MAX_ITEM_BYTES >> 20} MiB limit")
        out.append(data)
    return out
