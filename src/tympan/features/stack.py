"""Stacked feature front end: log-mel, MFCC, STFT, LPC, LSF, F0 and spectral descriptors.

`FeatureStack` turns `(batch, samples)` audio into one `(batch, C, bins, frames)` input by
concatenating the chosen kinds along the bins axis (study S2 stacks e.g. MFCC + LPC + spectral
contrast for a ResNet; S4 resizes spectrograms to images for torchvision backbones).

Every kind uses `cfg.hop_length` and centred frames, so a clip of `samples` gives
`samples // hop_length + 1` frames (`n_frames(cfg)` for fixed-length clips). The torch kinds
(logmel, mfcc, stft) run batched on the module's device, log-mel and MFCC from one mel
spectrogram (MFCC is librosa's: the DCT-II of the dB mel bands, `logmel.dct_matrix`), with
the conventions `FeatureConfig` names (librosa's or torchaudio's); the librosa and numpy kinds
(lpc, lsf, f0, contrast, centroid, zcr) run on CPU and come back on the input's device. Scales
differ a lot between kinds and nothing is normalised here: tympan standardises per bin with
train-split statistics later. Every value is finite, silence included.
"""

from __future__ import annotations

import functools
import math
from typing import TypeVar

import librosa
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from tympan.config import EncoderConfig, FeatureConfig, StackConfig, to_dict
from tympan.features.logmel import (
    LogMel,
    dct_matrix,
    n_frames,
    n_samples,
    power_to_db,
    reference,
    spectrogram,
)

TORCH_KINDS = ("logmel", "mfcc", "stft")
LIBROSA_KINDS = ("f0", "contrast", "centroid", "zcr")
EMBEDDING = "embedding"
WAVEFORM = "waveform"  # the clip itself, `(1, samples)`: what a fine-tuned encoder reads

Array = TypeVar("Array", np.ndarray, torch.Tensor)

# spectral_contrast: librosa's defaults (6 octave bands from 200 Hz), lowered for low sample rates
CONTRAST_BANDS = 6
CONTRAST_FMIN = 200.0
# CPU batches of the torch kinds are cut into pieces of about this many samples: 64 clips of
# 5 s at 44.1 kHz go through log-mel 2.2x faster one or two at a time (the STFT's
# intermediates stay in cache), while short clips keep large batches.
CPU_CHUNK_SAMPLES = 1 << 19
# LPC: white-noise correction (-60 dB) keeps the autocorrelation of pure tones well conditioned
LPC_NOISE_FLOOR = 1e-6


def encoder_for(spec: EncoderConfig, given: nn.Module | None = None):
    """`given` (a served model's own copy, rebuilt from its bundle) when there is one, else the
    encoder `spec` names, loaded from its source once per process
    (`tympan.encoders.load_encoder`)."""
    return given if given is not None else _encoder(spec)


@functools.lru_cache(maxsize=2)
def _encoder(spec: EncoderConfig):
    from tympan.encoders import load_encoder

    # building a model draws its random initialisation before the weights replace it: the
    # caller's generators stay as they were, so whether this process had already loaded
    # the encoder changes nothing a seeded run draws
    numpy_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        encoder = load_encoder(spec).requires_grad_(False)
    np.random.set_state(numpy_state)
    return encoder


def check_stack(cfg: FeatureConfig, stack: StackConfig, encoder: nn.Module | None = None) -> None:
    """Raise ValueError for stack parameters that do not fit the feature config (`encoder`:
    the embedding kind's, when not the one `stack.encoder` names on disk)."""
    if EMBEDDING in stack.kinds:
        rate = encoder_for(stack.encoder, encoder).sample_rate
        if cfg.sample_rate != rate:
            raise ValueError(
                f"features.sample_rate must be the encoder's own rate, {rate} Hz, for the "
                f"embedding kind (audio is resampled once, at featurize), got {cfg.sample_rate}"
            )
    if stack.lpc_order >= cfg.n_fft:
        raise ValueError(
            f"stack.lpc_order must be below features.n_fft ({cfg.n_fft}), got {stack.lpc_order!r}"
        )
    if "mfcc" in stack.kinds and stack.n_mfcc > cfg.n_mels:
        raise ValueError(
            f"stack.n_mfcc must not exceed features.n_mels ({cfg.n_mels}), got {stack.n_mfcc!r}"
        )
    if "f0" in stack.kinds and stack.f0_fmax > cfg.sample_rate / 2:
        raise ValueError(
            f"stack.f0_fmax must not exceed the Nyquist frequency ({cfg.sample_rate / 2:g} Hz), "
            f"got {stack.f0_fmax!r}"
        )


def bins_per_kind(
    cfg: FeatureConfig, stack: StackConfig, encoder: nn.Module | None = None
) -> dict[str, int]:
    """Rows each kind contributes to the stack, in stacking order."""
    check_stack(cfg, stack, encoder)
    sizes = {
        "logmel": cfg.n_mels,
        "mfcc": stack.n_mfcc,
        "stft": cfg.n_fft // 2 + 1,
        "lpc": stack.lpc_order,
        "lsf": stack.lpc_order,
        "f0": 1,
        "contrast": CONTRAST_BANDS + 1,
        "centroid": 1,
        "zcr": 1,
        WAVEFORM: 1,
    }
    if EMBEDDING in stack.kinds:
        width = encoder_for(stack.encoder, encoder).dim
        sizes[EMBEDDING] = width * (2 if stack.pooling == "mean_std" else 1)
    return {kind: sizes[kind] for kind in stack.kinds}


def embedding_layers(stack: StackConfig) -> int:
    """The embedding set's "frames": one per encoder layer kept (`stack.layers`)."""
    return encoder_for(stack.encoder).layers if stack.layers == "all" else 1


def output_shape(cfg: FeatureConfig, stack: StackConfig) -> tuple[int, int, int]:
    """`(channels, bins, frames)` of one fixed-length clip's features, without running audio."""
    if stack.image is not None:
        check_stack(cfg, stack)
        return (stack.image_channels, *stack.image)
    if EMBEDDING in stack.kinds:  # (dim, layers): pooled over time, one column per layer
        return (1, bins_per_kind(cfg, stack)[EMBEDDING], embedding_layers(stack))
    if WAVEFORM in stack.kinds:  # one row, one column per sample
        return (1, 1, n_samples(cfg))
    return (1, sum(bins_per_kind(cfg, stack).values()), n_frames(cfg))


def assemble(parts: dict[str, torch.Tensor], stack: StackConfig) -> torch.Tensor:
    """`{kind: (batch, bins_kind, frames)}` -> `(batch, C, bins, frames)`: the kinds
    concatenated along bins in `stack.kinds` order (C = 1), or with `stack.image = (H, W)`
    resized bilinearly to `(batch, image_channels, H, W)`. Training reads the cached sets
    through this and serving computes through it, so both see the same input."""
    out = torch.cat([parts[kind] for kind in stack.kinds], dim=-2).unsqueeze(1)
    if stack.image is None:
        return out
    out = F.interpolate(out.float(), size=stack.image, mode="bilinear", align_corners=False)
    return out.repeat(1, stack.image_channels, 1, 1)


def utterance_norm(x: torch.Tensor, how: str) -> torch.Tensor:
    """`(batch, bins, frames)` normalised per clip and bin over its frames: `cmn` subtracts the
    mean, `cmvn` also divides by the standard deviation (floored at 1e-5); `none`: as is."""
    if how == "none":
        return x
    centred = x - x.mean(dim=-1, keepdim=True)
    if how == "cmn":
        return centred
    return centred / x.std(dim=-1, keepdim=True, correction=0).clamp_min(1e-5)


def set_params(kind: str, cfg: FeatureConfig, stack: StackConfig) -> dict:
    """The params one feature set depends on: the clip framing, pre-emphasis and storage
    type every set shares, plus the kind's own. `batch_size` and the stacking (`kinds`,
    `image`) change no set, so they never cause a recomputation."""
    common = {
        "sample_rate": cfg.sample_rate,
        "seconds": cfg.seconds,
        "crop": cfg.crop,
        "wave_norm": cfg.wave_norm,
        "n_fft": cfg.n_fft,
        "hop_length": cfg.hop_length,
        "dtype": cfg.dtype,
        "preemphasis": stack.preemphasis,
    }
    # the levers added later join a set's key only when on, so earlier caches keep theirs
    trim = {"trim_db": cfg.trim_db} if cfg.trim_db > 0 else {}
    per_clip = {"utterance_norm": cfg.utterance_norm} if cfg.utterance_norm != "none" else {}
    if kind in ("wave", WAVEFORM):  # the clip itself (never pre-emphasised)
        framing = (
            "sample_rate",
            "seconds",
            "crop",
            "wave_norm",
            *(("n_fft", "hop_length") if trim else ()),
        )
        # both stored float32 whatever features.dtype says (cache._dtype): not part of the key
        return {"kind": kind, **{k: v for k, v in common.items() if k in framing}, **trim}
    common.update(trim)
    if kind == EMBEDDING:  # the encoder's weights by hash: another checkpoint, another set
        framing = ("sample_rate", "seconds", "crop", "wave_norm", "dtype", "trim_db")
        return {
            "kind": kind,
            **{k: v for k, v in common.items() if k in framing},
            "encoder": to_dict(stack.encoder),
            "weights": encoder_for(stack.encoder).weights_hash,
            "pooling": stack.pooling,
            "layers": stack.layers,
        }
    stft = {"pad_mode": cfg.pad_mode, "top_db": cfg.top_db}
    mel = {
        **stft,
        "n_mels": cfg.n_mels,
        "f_min": cfg.f_min,
        "f_max": cfg.f_max,
        "mel_scale": cfg.mel_scale,
        "mel_norm": cfg.mel_norm,
    }
    own = {
        "logmel": {**mel, "db_ref": cfg.db_ref, **per_clip},
        "mfcc": {**mel, "n_mfcc": stack.n_mfcc, **per_clip},
        "stft": {**stft, "db_ref": cfg.db_ref, **per_clip},
        "lpc": {"lpc_order": stack.lpc_order},
        "lsf": {"lpc_order": stack.lpc_order},
        "f0": {
            "f0_method": stack.f0_method,
            "f0_fmin": stack.f0_fmin,
            "f0_fmax": stack.f0_fmax,
            "top_db": cfg.top_db,
        },
        "contrast": {},
        "centroid": {},
        "zcr": {},
    }
    return {"kind": kind, **common, **own[kind]}


def contrast_fmin(sample_rate: int) -> float:
    """Lowest band edge for spectral contrast: 200 Hz, or lower so every band starts below
    Nyquist (librosa refuses 200 Hz x 2^5 >= sr / 2, e.g. at 8 kHz)."""
    nyquist = sample_rate / 2
    if nyquist > CONTRAST_FMIN * 2 ** (CONTRAST_BANDS - 1):
        return CONTRAST_FMIN
    return nyquist / 2**CONTRAST_BANDS


def f0_frame_length(cfg: FeatureConfig, stack: StackConfig) -> int:
    """Even YIN frame length: at least `n_fft`, and two periods of `f0_fmin` plus a margin."""
    need = 2 * (math.ceil(cfg.sample_rate / stack.f0_fmin) + 1)
    length = max(cfg.n_fft, need)
    return length + length % 2


def preemphasize(wave: torch.Tensor, coef: float) -> torch.Tensor:
    """`(batch, samples)` -> `(batch, samples)`, y[t] = x[t] - coef * x[t-1] (x[-1] = 0)."""
    return torch.cat([wave[:, :1], wave[:, 1:] - coef * wave[:, :-1]], dim=1)


def fit_frames(x: Array, frames: int) -> Array:
    """`(..., bins, n)` -> `(..., bins, frames)`: trim, or repeat the last frame.

    Centred framing gives `samples // hop + 1` frames for an even window; an odd one (zero or
    reflect padding of `n_fft // 2`) can give one fewer.
    """
    have = x.shape[-1]
    if have >= frames:
        return x[..., :frames]
    last = x[..., -1:]
    if isinstance(x, torch.Tensor):
        return torch.cat([x, last.expand(*x.shape[:-1], frames - have)], dim=-1)
    return np.concatenate([x, np.repeat(last, frames - have, axis=-1)], axis=-1)


def lpc(wave: np.ndarray, n_fft: int, hop_length: int, order: int) -> np.ndarray:
    """`(batch, samples)` -> `(batch, order, frames)` LPC coefficients a_1..a_order.

    Frames of `n_fft` samples centred every `hop_length` (zero-padded edges), Hann window,
    autocorrelation method with Levinson-Durbin in float64. Silent frames give zeros.
    """
    pad = n_fft // 2
    padded = np.pad(wave.astype(np.float64), ((0, 0), (pad, pad)))
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft, axis=-1)[:, ::hop_length]
    frames = frames * librosa.filters.get_window("hann", n_fft, fftbins=True)
    size = 1 << (n_fft + order).bit_length()  # no circular wrap into lags 0..order
    spectrum = np.fft.rfft(frames, size, axis=-1)
    r = np.fft.irfft(spectrum.real**2 + spectrum.imag**2, size, axis=-1)[..., : order + 1]
    r[..., 0] *= 1.0 + LPC_NOISE_FLOOR
    silent = r[..., 0] <= 0.0
    r[silent] = 0.0
    r[silent, 0] = 1.0
    a = np.zeros((*r.shape[:-1], order + 1))
    a[..., 0] = 1.0
    err = r[..., 0].copy()
    for i in range(1, order + 1):
        k = -np.einsum("...j,...j->...", a[..., :i], r[..., i:0:-1]) / err
        a[..., 1:i] = a[..., 1:i] + k[..., None] * a[..., i - 1 : 0 : -1]
        a[..., i] = k
        err = err * (1.0 - k * k)
    return np.moveaxis(a[..., 1:], -1, -2)


def lsf(coefs: np.ndarray) -> np.ndarray:
    """`(..., order, frames)` LPC coefficients -> `(..., order, frames)` line spectral
    frequencies in radians, sorted within (0, pi).

    Roots of P(z) = A(z) + z^-(p+1) A(1/z) and Q(z) = A(z) - z^-(p+1) A(1/z) via companion
    matrices; of their 2p + 2 root angles, the trivial roots at 0 and pi are dropped and each
    conjugate pair is kept once.
    """
    order = coefs.shape[-2]
    a = np.moveaxis(coefs, -2, -1).reshape(-1, order)
    ext = np.concatenate([np.ones((len(a), 1)), a, np.zeros((len(a), 1))], axis=1)
    flipped = ext[:, ::-1]
    polys = np.concatenate([ext + flipped, ext - flipped])  # (2m, p + 2), monic in z
    n = order + 1
    companion = np.zeros((len(polys), n, n))
    companion[:, 0, :] = -polys[:, 1:]
    companion[:, np.arange(1, n), np.arange(n - 1)] = 1.0
    angles = np.abs(np.angle(np.linalg.eigvals(companion)))
    angles = np.concatenate([angles[: len(a)], angles[len(a) :]], axis=1)
    freqs = np.sort(angles, axis=1)[:, 1 : 2 * order : 2]
    eps = 1e-6
    freqs = np.clip(freqs, eps, np.pi - eps)
    return np.moveaxis(freqs.reshape(*coefs.shape[:-2], coefs.shape[-1], order), -1, -2)


class FeatureStack(nn.Module):
    """`(batch, samples)` float32 -> `(batch, C, bins, frames)` stacked features.

    Without `image`: C = 1 and bins = `sum(bins_per_kind(cfg, stack).values())`, the kinds
    concatenated in `stack.kinds` order. With `image=(H, W)`: bilinear resize to
    `(batch, image_channels, H, W)`. `kinds=("logmel",)` alone is exactly `LogMel(cfg)`.
    """

    def __init__(
        self, cfg: FeatureConfig, stack: StackConfig, encoder: nn.Module | None = None
    ) -> None:
        super().__init__()
        check_stack(cfg, stack, encoder)
        self.cfg = cfg
        self.stack = stack
        self.bins = bins_per_kind(cfg, stack, encoder)
        self.torch_kinds = [kind for kind in stack.kinds if kind in TORCH_KINDS]
        # log-mel and MFCC share one mel spectrogram; MFCC adds its DCT, `(n_mels, n_mfcc)`
        needs_mel = "logmel" in stack.kinds or "mfcc" in stack.kinds
        self.mel = LogMel(cfg) if needs_mel else None
        dct = dct_matrix(stack.n_mfcc, cfg.n_mels).T.contiguous() if "mfcc" in stack.kinds else None
        self.register_buffer("dct", dct)
        self.stft = spectrogram(cfg) if "stft" in stack.kinds else None
        # the embedding kind's encoder, frozen: `encoder` (a served model's own copy), else the
        # one `stack.encoder` names, shared by every stack of this process
        self.encoder = encoder_for(stack.encoder, encoder) if EMBEDDING in stack.kinds else None
        self.requires_grad_(False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return assemble(self.parts(wave), self.stack)

    def parts(self, wave: torch.Tensor) -> dict[str, torch.Tensor]:
        """`(batch, samples)` -> `{kind: (batch, bins_kind, frames)}` in `stack.kinds` order:
        the feature sets the cache stores one array each."""
        if wave.dim() != 2:
            raise ValueError(f"expected (batch, samples) audio, got shape {tuple(wave.shape)}")
        if self.encoder is not None:
            return {EMBEDDING: self.embed(wave)}
        if self.stack.kinds == (WAVEFORM,):
            return {WAVEFORM: wave[:, None, :].float()}
        if self.stack.preemphasis is not None:
            wave = preemphasize(wave, self.stack.preemphasis)
        # centred STFT framing, as torchaudio computes it (see logmel.n_frames)
        n_fft = self.cfg.n_fft
        frames = (wave.shape[-1] + 2 * (n_fft // 2) - n_fft) // self.cfg.hop_length + 1
        parts = {k: fit_frames(v, frames) for k, v in self._torch_parts(wave).items()}
        parts.update(self._numpy_parts(wave, frames))
        for kind, part in parts.items():
            if part.shape[-2:] != (self.bins[kind], frames):
                raise RuntimeError(
                    f"{kind} gave {tuple(part.shape[-2:])} (bins, frames), "
                    f"expected {(self.bins[kind], frames)}"
                )
        return {kind: parts[kind] for kind in self.stack.kinds}

    def embed(self, wave: torch.Tensor) -> torch.Tensor:
        """`(batch, samples)` -> `(batch, dim, layers)`: the encoder's hidden states pooled over
        time per layer (`stack.pooling`), every layer or the last (`stack.layers`)."""
        from tympan.encoders import pooled

        with torch.no_grad():
            hidden = self.encoder(wave)  # (batch, layers, frames, dim)
        if self.stack.layers == "last":
            hidden = hidden[:, -1:]
        return pooled(hidden, self.stack.pooling).transpose(1, 2).float()

    def _torch_parts(self, wave: torch.Tensor) -> dict[str, torch.Tensor]:
        """Batched torch kinds, each `(batch, bins, frames)` on the module's device.

        On the CPU a large batch goes through in pieces of about `CPU_CHUNK_SAMPLES`, so the
        STFT's intermediate arrays stay in cache (each clip's result is the same either way).
        """
        if wave.device.type == "cpu" and wave.numel() > CPU_CHUNK_SAMPLES and len(wave) > 1:
            step = max(1, CPU_CHUNK_SAMPLES // wave.shape[1])
            pieces = [self._torch_batch(piece) for piece in wave.split(step)]
            return {kind: torch.cat([p[kind] for p in pieces]) for kind in self.torch_kinds}
        return self._torch_batch(wave)

    def _torch_batch(self, wave: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        parts = {}
        if self.mel is not None:
            db = self.mel.db(wave)  # (batch, n_mels, frames) re 1, floored per clip
            if "logmel" in self.torch_kinds:
                parts["logmel"] = reference(db, cfg.db_ref)
            if self.dct is not None:  # librosa.feature.mfcc: dB re 1, whatever db_ref says
                parts["mfcc"] = torch.matmul(db.transpose(-1, -2), self.dct).transpose(-1, -2)
        if self.stft is not None:
            parts["stft"] = reference(power_to_db(self.stft(wave), cfg.top_db), cfg.db_ref)
        return {kind: utterance_norm(part, cfg.utterance_norm) for kind, part in parts.items()}

    def _numpy_parts(self, wave: torch.Tensor, frames: int) -> dict[str, torch.Tensor]:
        """CPU kinds, each `(batch, bins, frames)` back on the input's device.

        LPC and LSF are per-frame maths, vectorised over the batch; the librosa kinds run one
        clip at a time, because some reference the whole array they are given (spectral
        contrast's dB conversion floors at 80 dB below the array's maximum).
        """
        cfg, stack = self.cfg, self.stack
        kinds = [k for k in stack.kinds if k not in TORCH_KINDS]
        if not kinds:
            return {}
        y = wave.detach().cpu().numpy().astype(np.float32)
        parts: dict[str, np.ndarray] = {}
        if "lpc" in kinds or "lsf" in kinds:
            coefs = lpc(y, cfg.n_fft, cfg.hop_length, stack.lpc_order)
            parts["lpc"] = coefs
            if "lsf" in kinds:
                parts["lsf"] = lsf(coefs)
        per_clip = [k for k in kinds if k in LIBROSA_KINDS]
        if per_clip:
            clips = [self._librosa_clip(clip, per_clip) for clip in y]
            parts.update({kind: np.stack([clip[kind] for clip in clips]) for kind in per_clip})
        return {
            kind: torch.from_numpy(fit_frames(part, frames)).to(wave.device, wave.dtype)
            for kind, part in parts.items()
            if kind in kinds
        }

    def _librosa_clip(self, y: np.ndarray, kinds: list[str]) -> dict[str, np.ndarray]:
        """`(samples,)` -> `{kind: (bins, frames)}` for f0, contrast, centroid and zcr."""
        cfg = self.cfg
        parts: dict[str, np.ndarray] = {}
        if "f0" in kinds:
            parts["f0"] = self._f0(y)
        if "contrast" in kinds or "centroid" in kinds:
            spec = np.abs(librosa.stft(y, n_fft=cfg.n_fft, hop_length=cfg.hop_length))
            if "contrast" in kinds:
                parts["contrast"] = librosa.feature.spectral_contrast(
                    S=spec,
                    sr=cfg.sample_rate,
                    n_fft=cfg.n_fft,
                    hop_length=cfg.hop_length,
                    fmin=contrast_fmin(cfg.sample_rate),
                    n_bands=CONTRAST_BANDS,
                )
            if "centroid" in kinds:
                parts["centroid"] = librosa.feature.spectral_centroid(
                    S=spec, sr=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length
                )
        if "zcr" in kinds:
            parts["zcr"] = librosa.feature.zero_crossing_rate(
                y, frame_length=cfg.n_fft, hop_length=cfg.hop_length, center=True
            )
        return parts

    def _f0(self, y: np.ndarray) -> np.ndarray:
        """`(samples,)` -> `(1, frames)` F0 in Hz; unvoiced and silent frames 0.

        YIN has no voicing decision, so frames whose RMS lies more than `top_db` below the
        clip's loudest frame (all frames of pure silence) count as unvoiced for both methods.
        """
        cfg, stack = self.cfg, self.stack
        length = f0_frame_length(cfg, stack)
        common = {
            "fmin": stack.f0_fmin,
            "fmax": stack.f0_fmax,
            "sr": cfg.sample_rate,
            "frame_length": length,
            "hop_length": cfg.hop_length,
            "center": True,
        }
        f0 = librosa.yin(y, **common) if stack.f0_method == "yin" else librosa.pyin(y, **common)[0]
        rms = librosa.feature.rms(y=y, frame_length=length, hop_length=cfg.hop_length)[0]
        floor = rms.max() * 10.0 ** (-cfg.top_db / 20.0)
        return np.where((rms > floor) & np.isfinite(f0), f0, 0.0)[None]
