"""Small audio makers for tests: tones, encoded bytes, and a few broken files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile as sf


def tone(freq: float, seconds: float, rate: int, amp: float = 0.5) -> np.ndarray:
    """`(frames,)` float32 sine."""
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write(
    path: Path, wave: np.ndarray, rate: int, subtype: str = "PCM_16", fmt: str | None = None
) -> Path:
    """Write `(frames,)` or `(frames, channels)` audio; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wave, rate, subtype=subtype, format=fmt)
    return path


def encode(wave: np.ndarray, rate: int, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, wave, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def truncated(path: Path, rate: int = 16000) -> Path:
    """A WAV whose header promises more frames than the file holds."""
    data = encode(tone(440, 1.0, rate), rate)
    path.write_bytes(data[: len(data) // 3])
    return path


def with_rate(data: bytes, rate: int) -> bytes:
    """A PCM WAV's bytes with its header's sample rate (and byte rate) rewritten to `rate`:
    the same samples, claiming another rate."""
    assert data[:4] == b"RIFF" and data[12:16] == b"fmt ", "expects soundfile's plain WAV"
    block_align = int.from_bytes(data[32:34], "little")
    return (
        data[:24]
        + rate.to_bytes(4, "little")
        + (rate * block_align).to_bytes(4, "little")
        + data[32:]
    )
