"""Audio decoding with soundfile and resampling with torchaudio's windowed-sinc filter.

Every function that fails on bad input raises AudioError with a short reason; callers add the
file name or payload index, so a rejects table or an HTTP 400 can say exactly what was wrong.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

Source = str | Path | bytes

# Blocks of this many frames are read when probing, so a one-hour file never sits in memory.
_PROBE_BLOCK = 1 << 18

# Sample rates a recording can have: below 1 kHz there is no speech or sound event left to
# classify, above 384 kHz no converter records. A header outside is refused before decoding
# (ingest rejects the file, serving answers 400): it is a broken or hostile file.
MIN_SAMPLE_RATE = 1_000
MAX_SAMPLE_RATE = 384_000
# Integer formats cannot exceed full scale; a float file can (a mix bus a few dB over 0 dBFS),
# but a peak 100 times full scale (+40 dBFS) is no recording: its features overflow float16
# and its statistics become NaN. Such a clip is refused, as non-finite samples are.
MAX_PEAK_DBFS = 40.0
# Bounds on the resampler's ratio terms (see `resample_ratio`).
MAX_RATIO_PRODUCT = 1 << 20
MAX_RATIO_TERM = 1024


class AudioError(ValueError):
    """Audio that cannot be used, with the reason (for example 'silent: peak -96.3 dBFS')."""


@dataclass(frozen=True)
class AudioProbe:
    """What ingest records about one file, read without decoding it all at once."""

    sample_rate: int
    channels: int
    frames: int
    duration_s: float
    peak_dbfs: float
    sha256: str


def open_audio(source: Source) -> sf.SoundFile:
    """A file or in-memory bytes opened with soundfile; AudioError when it is not audio."""
    try:
        return sf.SoundFile(io.BytesIO(source) if isinstance(source, bytes) else str(source))
    except sf.LibsndfileError as exc:
        raise AudioError(f"not decodable audio ({exc.error_string})") from None
    except (RuntimeError, TypeError) as exc:
        raise AudioError(f"not decodable audio ({exc})") from None


def check_rate(sample_rate: int) -> None:
    """Refuse a header rate outside `[MIN_SAMPLE_RATE, MAX_SAMPLE_RATE]`."""
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise AudioError(
            f"sample rate {sample_rate} Hz is outside {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz"
        )


def check_peak(peak: float) -> None:
    """Refuse a clip whose peak (linear, full scale 1.0) is beyond `MAX_PEAK_DBFS`."""
    if not math.isfinite(peak):
        raise AudioError("contains NaN or infinite samples")
    if peak > 10.0 ** (MAX_PEAK_DBFS / 20.0):
        raise AudioError(
            f"extreme amplitude: peak {20.0 * math.log10(peak):+.1f} dBFS is above "
            f"{MAX_PEAK_DBFS:+g} dBFS (over {10.0 ** (MAX_PEAK_DBFS / 20.0):g} times full scale)"
        )


def _sha256(source: Source) -> str:
    digest = hashlib.sha256()
    if isinstance(source, bytes):
        digest.update(source)
    else:
        with open(source, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _wav_shortfall(source: Source) -> str | None:
    """For RIFF/WAVE, compare the `data` chunk's declared size with the bytes present.

    libsndfile quietly shortens a truncated WAV to what is there, so the header is the only
    witness that audio is missing.
    """
    if isinstance(source, bytes):
        head, size = source[: 1 << 16], len(source)
    else:
        size = Path(source).stat().st_size
        with open(source, "rb") as handle:
            head = handle.read(1 << 16)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos = 12
    while pos + 8 <= len(head):
        chunk, length = head[pos : pos + 4], int.from_bytes(head[pos + 4 : pos + 8], "little")
        if chunk == b"data":
            present = size - (pos + 8)
            if length != 0xFFFFFFFF and present < length:
                return f"truncated: header declares {length} bytes of audio, file holds {present}"
            return None
        pos += 8 + length + (length & 1)
    return None


def probe(source: Source, silence_dbfs: float, max_duration_s: float) -> AudioProbe:
    """Check one file block by block: decodable, a plausible rate, non-empty, finite, not
    silent, not beyond `MAX_PEAK_DBFS`, not too long."""
    if not isinstance(source, bytes) and Path(source).stat().st_size == 0:
        raise AudioError("empty file (0 bytes)")
    with open_audio(source) as handle:
        shortfall = _wav_shortfall(source)
        if shortfall:
            raise AudioError(shortfall)
        sample_rate, channels, frames = handle.samplerate, handle.channels, handle.frames
        check_rate(sample_rate)
        if frames <= 0:
            raise AudioError("no audio frames")
        duration = frames / sample_rate
        if duration > max_duration_s:
            raise AudioError(
                f"too long: {duration:.1f} s > data.max_duration_s={max_duration_s:g} s"
            )
        peak, seen = 0.0, 0
        try:
            for block in handle.blocks(blocksize=_PROBE_BLOCK, dtype="float32", always_2d=True):
                if not np.isfinite(block).all():
                    raise AudioError("contains NaN or infinite samples")
                peak = max(peak, float(np.abs(block).max(initial=0.0)))
                seen += len(block)
        except sf.LibsndfileError as exc:
            raise AudioError(f"truncated or corrupt after {seen} frames ({exc})") from None
    if seen < frames:
        raise AudioError(f"truncated: header says {frames} frames, only {seen} readable")
    check_peak(peak)
    peak_dbfs = 20.0 * math.log10(peak) if peak > 0 else -math.inf
    if peak_dbfs < silence_dbfs:
        raise AudioError(f"silent: peak {peak_dbfs:.1f} dBFS < data.silence_dbfs={silence_dbfs:g}")
    return AudioProbe(sample_rate, channels, frames, duration, peak_dbfs, _sha256(source))


@dataclass(frozen=True)
class AudioHeader:
    """What a file's header says, read without decoding any audio."""

    sample_rate: int
    channels: int
    frames: int

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate


def inspect(source: Source) -> AudioHeader:
    """Read and check the header only: decodable format, a rate in range, some frames, and for
    WAV the data the header declares actually present. Costs the header, not the audio."""
    with open_audio(source) as handle:
        header = AudioHeader(handle.samplerate, handle.channels, handle.frames)
    check_rate(header.sample_rate)
    if header.frames <= 0:
        raise AudioError("no audio frames")
    shortfall = _wav_shortfall(source)
    if shortfall:
        raise AudioError(shortfall)
    return header


def decode(source: Source) -> tuple[np.ndarray, int]:
    """Decode a file or in-memory bytes to float32 `(channels, frames)` and its sample rate;
    refuses non-finite samples and a peak beyond `MAX_PEAK_DBFS`."""
    with open_audio(source) as handle:
        try:
            data = handle.read(dtype="float32", always_2d=True)
        except sf.LibsndfileError as exc:
            raise AudioError(f"truncated or corrupt ({exc})") from None
        sample_rate = handle.samplerate
    if data.size == 0:
        raise AudioError("no audio frames")
    check_peak(float(np.abs(data).max()))
    return np.ascontiguousarray(data.T), sample_rate


def to_mono(wave: torch.Tensor) -> torch.Tensor:
    """Average channels: `(channels, frames)` -> `(frames,)`."""
    if wave.shape[0] == 1:  # the common case, and a threaded mean costs more than the decode
        return wave[0]
    return wave.mean(dim=0)


def resample_ratio(orig_rate: int, new_rate: int) -> tuple[int, int]:
    """The ratio `(orig, new)` the resampler runs at, both terms small enough for its kernel.

    torchaudio's windowed-sinc kernel has one phase per term of `new` and about `orig` taps per
    phase (after dividing both rates by their gcd), so its size is their product: 441 x 160
    for 44.1 -> 16 kHz, but 16,001 x 16,000 (1 GB) for a coprime 16,001 Hz header and 64 GB
    for 1,000,003 Hz. An exact ratio whose product is at most `MAX_RATIO_PRODUCT` is kept
    (every pair of the usual rates up to 384 -> 22.05 kHz); any other becomes the nearest
    fraction with both terms at most `MAX_RATIO_TERM` (16,001 Hz is read as 16,000 Hz: the
    pitch moves by 0.001 semitone), so time and memory stay linear in the clip.
    """
    ratio = Fraction(orig_rate, new_rate)
    if ratio.numerator * ratio.denominator <= MAX_RATIO_PRODUCT:
        return ratio.numerator, ratio.denominator
    if ratio >= 1:
        inverse = (1 / ratio).limit_denominator(MAX_RATIO_TERM)
        return inverse.denominator, max(1, inverse.numerator)
    near = ratio.limit_denominator(MAX_RATIO_TERM)
    return max(1, near.numerator), near.denominator


def resampled_length(frames: int, orig_rate: int, new_rate: int) -> int:
    """Samples `resample` returns for `frames` input samples (torchaudio rounds up)."""
    if orig_rate == new_rate:
        return frames
    orig, new = resample_ratio(orig_rate, new_rate)
    return -(-new * frames // orig)


# `resample`'s Kaiser-windowed sinc (torchaudio's "kaiser_best"); tympan.data.similar applies
# the same filter through its own polyphase code
RESAMPLE_FILTER = {"lowpass_filter_width": 16, "rolloff": 0.945, "beta": 14.769656459379492}


def resample(wave: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Band-limited resampling of `(..., frames)` (Kaiser-windowed sinc), never sample slicing;
    at `resample_ratio`, so a hostile rate costs no more than a usual one."""
    if orig_rate == new_rate:
        return wave
    orig, new = resample_ratio(orig_rate, new_rate)
    return AF.resample(wave, orig, new, resampling_method="sinc_interp_kaiser", **RESAMPLE_FILTER)


def fix_length(wave: torch.Tensor, n_samples: int, crop: str) -> torch.Tensor:
    """Zero-pad at the end or crop (`start` or `center`) `(frames,)` to `(n_samples,)`."""
    length = wave.shape[-1]
    if length < n_samples:
        return torch.nn.functional.pad(wave, (0, n_samples - length))
    offset = (length - n_samples) // 2 if crop == "center" else 0
    return wave[..., offset : offset + n_samples]


def zscore(wave: torch.Tensor) -> torch.Tensor:
    """`(samples,)` to zero mean and unit variance (a silent clip to zeros), in float64 sums."""
    mean = wave.double().mean()
    std = wave.double().std(correction=0)
    centred = wave - mean.to(wave.dtype)
    return centred if std < 1e-8 else centred / std.to(wave.dtype)


def trim(wave: torch.Tensor, top_db: float, frame_length: int, hop_length: int) -> torch.Tensor:
    """`(samples,)` without leading and trailing silence, as `librosa.effects.trim`: the RMS
    of centred, zero-padded frames in dB re the loudest frame; audio from the first to the end
    of the last frame above `-top_db` is kept (a silent clip is kept whole)."""
    if wave.shape[-1] == 0:
        return wave
    pad = frame_length // 2
    padded = torch.nn.functional.pad(wave.double(), (pad, pad))
    if padded.shape[-1] < frame_length:
        padded = torch.nn.functional.pad(padded, (0, frame_length - padded.shape[-1]))
    frames = padded.unfold(-1, frame_length, hop_length)  # (frames, frame_length)
    rms = frames.pow(2).mean(dim=-1).sqrt()
    db = 20 * torch.log10(rms.clamp_min(1e-5))
    loud = torch.nonzero(db > db.max() - top_db).flatten()
    start = int(loud[0]) * hop_length
    end = min(wave.shape[-1], (int(loud[-1]) + 1) * hop_length)
    return wave[..., start:end]


def load_waveform(
    source: Source,
    sample_rate: int,
    n_samples: int,
    crop: str,
    zscored: bool = False,
    trimmed: tuple[float, int, int] | None = None,
) -> torch.Tensor:
    """Decode, downmix, resample (`trimmed`: `(top_db, frame_length, hop_length)` of `trim`;
    `zscored`: normalise, see `zscore`) and fix the length of one clip: -> `(n_samples,)`
    float32."""
    data, rate = decode(source)
    wave = to_mono(torch.from_numpy(data))
    wave = resample(wave, rate, sample_rate)
    if trimmed is not None:
        wave = trim(wave, *trimmed)
    if zscored:
        wave = zscore(wave)
    return fix_length(wave, n_samples, crop)
