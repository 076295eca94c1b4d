"""Log-mel front end as frozen torch modules, so the model package carries its own features.

Training computes features through `LogMel` once and caches them; serving runs the very same
module on decoded request audio (see tympan.serving).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchaudio
from torch import nn

from tympan.audio import Source, fix_length, load_waveform, zscore
from tympan.config import FeatureConfig


def n_samples(cfg: FeatureConfig) -> int:
    """Fixed clip length in samples at the feature sample rate."""
    return round(cfg.seconds * cfg.sample_rate)


def n_frames(cfg: FeatureConfig) -> int:
    """STFT frames of a fixed-length clip (centred frames, as torchaudio computes them).

    Centring pads `n_fft // 2` on each side, so an odd `n_fft` gives one frame fewer than
    `samples // hop + 1` when the hop divides the clip.
    """
    padded = n_samples(cfg) + 2 * (cfg.n_fft // 2)
    return (padded - cfg.n_fft) // cfg.hop_length + 1


class LogMel(nn.Module):
    """`(batch, samples)` -> `(batch, 1, n_mels, frames)` mel power in dB.

    Each clip is referenced to its own maximum and floored `top_db` below it, so a batch gives
    exactly the per-item result, and silence gives a finite constant instead of -inf.
    """

    def __init__(self, cfg: FeatureConfig) -> None:
        super().__init__()
        self.top_db = cfg.top_db
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=cfg.sample_rate,
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            n_mels=cfg.n_mels,
            f_min=cfg.f_min,
            f_max=cfg.f_max,
            power=2.0,
        )
        self.requires_grad_(False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        power = self.mel(wave)  # (batch, n_mels, frames)
        db = 10.0 * torch.log10(power.clamp_min(1e-10))
        floor = db.amax(dim=(-2, -1), keepdim=True) - self.top_db
        return torch.maximum(db, floor).unsqueeze(1)


class Normalizer(nn.Module):
    """Per-mel-bin standardisation with statistics from the training split.

    `mean`, `std`: `(n_mels,)`; input and output `(batch, 1, n_mels, frames)`.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float().reshape(1, 1, -1, 1))
        self.register_buffer("std", std.float().clamp_min(1e-5).reshape(1, 1, -1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def waveform_batch(sources: Sequence[Source], cfg: FeatureConfig) -> torch.Tensor:
    """Decode, downmix, resample and fix the length of several clips: -> `(batch, samples)`."""
    length, zscored = n_samples(cfg), cfg.wave_norm == "zscore"
    return torch.stack(
        [load_waveform(s, cfg.sample_rate, length, cfg.crop, zscored) for s in sources]
    )


def window_starts(length: int, window: int, hop: int, min_last: float) -> list[int]:
    """Start samples of the windows over a recording of `length` samples.

    Up to `window + hop` samples is one window at 0 (the caller pads or crops it like a
    training clip). Longer: a window every `hop` samples while it fits, then one more if audio
    is left uncovered and that last window holds at least `min_last` of a window of audio
    (zero-padded by the caller).
    """
    if length <= window + hop:
        return [0]
    starts = list(range(0, length - window + 1, hop))
    tail = starts[-1] + hop
    if length > starts[-1] + window and length - tail >= min_last * window:
        starts.append(tail)
    return starts


def windows(wave: torch.Tensor, cfg: FeatureConfig, hop_s: float, min_last: float) -> torch.Tensor:
    """`(samples,)` at `cfg.sample_rate` -> `(n_windows, window)` (see `window_starts`); with
    `wave_norm: zscore` the whole recording is normalised first, as `waveform_batch` does."""
    if cfg.wave_norm == "zscore":
        wave = zscore(wave)
    window = n_samples(cfg)
    hop = max(1, round(hop_s * cfg.sample_rate))
    starts = window_starts(wave.shape[-1], window, hop, min_last)
    if len(starts) == 1:
        return fix_length(wave, window, cfg.crop).unsqueeze(0)
    return torch.stack([fix_length(wave[s : s + window], window, "start") for s in starts])
