"""Log-mel front end as frozen torch modules, so the model package carries its own features.

Training computes features through `LogMel` once and caches them; serving runs the very same
module on decoded request audio (see tympan.serving). The conventions (`FeatureConfig`:
mel scale and filter normalisation, STFT padding, dB reference) cover both torchaudio's and
librosa's, so a study computed with librosa is reproduced to float32 rounding
(tests/test_librosa_parity.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import librosa
import numpy as np
import torch
import torchaudio
from torch import nn

from tympan.audio import Source, fix_length, load_waveform, trim, zscore
from tympan.config import FeatureConfig

# power_to_db's floor on power (librosa's and torchaudio's `amin`): silence is -100 dB re 1
AMIN = 1e-10


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


def spectrogram(cfg: FeatureConfig) -> torchaudio.transforms.Spectrogram:
    """`(batch, samples)` -> `(batch, n_fft // 2 + 1, frames)` power: periodic Hann window of
    `n_fft`, centred frames padded by `cfg.pad_mode` (librosa.stft's, for `constant`)."""
    return torchaudio.transforms.Spectrogram(
        n_fft=cfg.n_fft, hop_length=cfg.hop_length, power=2.0, pad_mode=cfg.pad_mode
    )


def mel_filters(cfg: FeatureConfig) -> torch.Tensor:
    """`(n_fft // 2 + 1, n_mels)` float32 mel filter bank, `cfg.mel_scale` and `cfg.mel_norm`
    (one filter per column, as torchaudio lays it out).

    Built by librosa.filters.mel itself, the reference the studies used. torchaudio's
    melscale_fbanks defines the same triangles but places its frequency grid up to
    `sample_rate // 2`, off by half a hertz at odd sample rates.
    """
    bank = librosa.filters.mel(
        sr=cfg.sample_rate,
        n_fft=cfg.n_fft,
        n_mels=cfg.n_mels,
        fmin=cfg.f_min,
        fmax=cfg.f_max,
        htk=cfg.mel_scale == "htk",
        norm=None if cfg.mel_norm == "none" else cfg.mel_norm,
        dtype=np.float32,
    )
    return torch.from_numpy(bank.T.copy())


def power_to_db(power: torch.Tensor, top_db: float) -> torch.Tensor:
    """`(batch, bins, frames)` power -> dB re 1, floored `top_db` below each clip's maximum
    (librosa.power_to_db with ref=1.0 and amin 1e-10, one clip at a time)."""
    db = 10.0 * torch.log10(power.clamp_min(AMIN))
    return torch.maximum(db, db.amax(dim=(-2, -1), keepdim=True) - top_db)


def reference(db: torch.Tensor, db_ref: str) -> torch.Tensor:
    """`(batch, bins, frames)` dB re 1 -> dB re `db_ref`: unchanged for `absolute`, each clip's
    maximum subtracted for `max` (power_to_db's ref=np.max: the loudest bin is 0 dB)."""
    if db_ref == "absolute":
        return db
    return db - db.amax(dim=(-2, -1), keepdim=True)


class LogMel(nn.Module):
    """`(batch, samples)` -> `(batch, 1, n_mels, frames)` mel power in dB (see `FeatureConfig`).

    Each clip is floored `top_db` below its own maximum (and with `db_ref: max` referenced to
    it), so a batch gives exactly the per-item result, and silence gives a finite constant
    instead of -inf.
    """

    def __init__(self, cfg: FeatureConfig) -> None:
        super().__init__()
        self.top_db = cfg.top_db
        self.db_ref = cfg.db_ref
        self.spectrogram = spectrogram(cfg)
        self.register_buffer("filters", mel_filters(cfg))
        self.requires_grad_(False)

    def power(self, wave: torch.Tensor) -> torch.Tensor:
        """`(batch, samples)` -> `(batch, n_mels, frames)` mel power (a transposed view: one
        matrix product over all frames of the batch, as torchaudio's MelScale does it)."""
        spec = self.spectrogram(wave)  # (batch, n_freqs, frames)
        return torch.matmul(spec.transpose(-1, -2), self.filters).transpose(-1, -2)

    def db(self, wave: torch.Tensor) -> torch.Tensor:
        """`(batch, samples)` -> `(batch, n_mels, frames)` mel power in dB re 1, floored."""
        return power_to_db(self.power(wave), self.top_db)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return reference(self.db(wave), self.db_ref).unsqueeze(1)


def dct_matrix(n_mfcc: int, n_mels: int) -> torch.Tensor:
    """`(n_mfcc, n_mels)` float32: the first `n_mfcc` rows of the orthonormal DCT-II, so that
    `dct_matrix(k, m) @ x` is `scipy.fftpack.dct(x, type=2, norm="ortho", axis=-2)[:k]`
    (librosa.feature.mfcc's transform). Computed in float64."""
    k = np.arange(n_mfcc)[:, None]
    n = np.arange(n_mels)[None, :]
    basis = np.cos(np.pi * k * (2 * n + 1) / (2 * n_mels)) * np.sqrt(2.0 / n_mels)
    basis[0] /= np.sqrt(2.0)
    return torch.from_numpy(basis.astype(np.float32))


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


def trimming(cfg: FeatureConfig) -> tuple[float, int, int] | None:
    """`features.trim_db` as `trim`'s `(top_db, frame_length, hop_length)`, None when off."""
    return (cfg.trim_db, cfg.n_fft, cfg.hop_length) if cfg.trim_db > 0 else None


def waveform_batch(sources: Sequence[Source], cfg: FeatureConfig) -> torch.Tensor:
    """Decode, downmix, resample, trim and fix the length of several clips: -> `(batch,
    samples)`."""
    length, zscored, trimmed = n_samples(cfg), cfg.wave_norm == "zscore", trimming(cfg)
    return torch.stack(
        [load_waveform(s, cfg.sample_rate, length, cfg.crop, zscored, trimmed) for s in sources]
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
    `trim_db` and `wave_norm: zscore` the whole recording is trimmed and normalised first, as
    `waveform_batch` does."""
    trimmed = trimming(cfg)
    if trimmed is not None:
        wave = trim(wave, *trimmed)
    if cfg.wave_norm == "zscore":
        wave = zscore(wave)
    window = n_samples(cfg)
    hop = max(1, round(hop_s * cfg.sample_rate))
    starts = window_starts(wave.shape[-1], window, hop, min_last)
    if len(starts) == 1:
        return fix_length(wave, window, cfg.crop).unsqueeze(0)
    return torch.stack([fix_length(wave[s : s + window], window, "start") for s in starts])
