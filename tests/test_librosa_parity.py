"""The torch front end against librosa itself, for every preset's feature settings.

The studies (../shared/SEEDS.md) computed their features with librosa; a preset reruns a study
only if tympan's batched `FeatureStack` gives librosa's numbers. Each preset is loaded from
pipelines/ as it is (nothing about its features shrunk), and its torch kinds (log-mel, MFCC,
STFT) are computed on real FSDD recordings and on generated tones, sweeps, noise, silence and
near-silence at the preset's rate and length, all in one batch; librosa runs one clip at a
time on the very same float32 waveforms:

- log-mel: `power_to_db(melspectrogram(y, ...), ref=1.0 or np.max, top_db)`;
- MFCC: `librosa.feature.mfcc(y, ...)` (its dB is always re 1, top_db 80);
- STFT: `power_to_db(abs(stft(y, ...)) ** 2, ref=..., top_db)`.

Tolerances: dB within 0.01 absolute; MFCC within 1e-3 of each coefficient's range (its max
minus its min over all the clips and frames compared), since the higher coefficients are small
and cross zero. The front end is tested, not the cache: float16 storage (`features.dtype`, the
default) rounds dB values of magnitude 64-128 to steps of 0.0625 dB, above this tolerance;
`dtype: float32` keeps the front end's values.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import librosa
import numpy as np
import pandas as pd
import pytest
import scipy.fft
import torch
import torchaudio

from tympan.audio import load_waveform
from tympan.config import FeatureConfig, StackConfig, load_params, to_dict
from tympan.features.logmel import LogMel, dct_matrix, n_samples
from tympan.features.stack import TORCH_KINDS, FeatureStack, output_shape

from conftest import FSDD, REPO

DB_TOL = 0.01
MFCC_REL_TOL = 1e-3
# the FSDD recordings compared: spread over speakers, digits and takes
FSDD_CLIPS = 6


def presets_by_front_end() -> dict[str, tuple[FeatureConfig, list[str]]]:
    """`{ids: (features, [preset, ...])}`: every preset in pipelines/ with torch kinds,
    presets whose feature sets are alike tested once (batching, workers and the image the
    sets are resized to change no set)."""
    groups: dict[str, tuple[FeatureConfig, list[str]]] = {}
    for path in sorted((REPO / "pipelines").glob("*.yaml")):
        features = load_params(path).features
        if not set(features.stack.kinds) & set(TORCH_KINDS):
            continue
        sets = replace(features.stack, image=None, image_channels=1)
        key = repr(to_dict(replace(features, batch_size=1, workers=0, device="cpu", stack=sets)))
        groups.setdefault(key, (features, []))[1].append(path.stem)
    return {"+".join(names): (features, names) for features, names in groups.values()}


PRESETS = presets_by_front_end()


def generated(cfg: FeatureConfig) -> list[np.ndarray]:
    """Tones (low, mid, near Nyquist), a sweep, a two-tone chord in noise, white noise, a
    clipped square wave, DC plus a tone, a tone 80 dB down, a click train, half silence, and
    silence: `(samples,)` float32 each, at `cfg`'s rate and length."""
    rate, length = cfg.sample_rate, n_samples(cfg)
    t = np.arange(length) / rate
    nyquist = rate / 2
    rng = np.random.default_rng(14)
    sweep_top = 0.9 * nyquist
    clicks = np.zeros(length)
    clicks[:: max(1, rate // 50)] = 0.8
    half = np.where(t < t[-1] / 2, 0.3 * np.sin(2 * np.pi * 330 * t), 0.0)
    signals = [
        0.5 * np.sin(2 * np.pi * 110 * t),
        0.5 * np.sin(2 * np.pi * 0.23 * rate * t + 0.3),
        0.5 * np.sin(2 * np.pi * 0.47 * rate * t),
        0.5 * np.sin(2 * np.pi * (50 * t + (sweep_top - 50) / (2 * t[-1]) * t**2)),
        0.3 * np.sin(2 * np.pi * 440 * t)
        + 0.2 * np.sin(2 * np.pi * 0.1 * rate * t)
        + 0.01 * rng.standard_normal(length),
        0.3 * rng.standard_normal(length),
        np.clip(2.0 * np.sign(np.sin(2 * np.pi * 200 * t)), -1.0, 1.0),
        0.2 + 0.3 * np.sin(2 * np.pi * 1000 * t),
        1e-4 * np.sin(2 * np.pi * 700 * t),
        clicks,
        half,
        np.zeros(length),
    ]
    return [s.astype(np.float32) for s in signals]


def fsdd_clips(cfg: FeatureConfig) -> list[np.ndarray]:
    """`FSDD_CLIPS` real recordings decoded as featurize decodes them (8 kHz files resampled
    to `cfg.sample_rate`, padded or cropped to `cfg.seconds`)."""
    if not (FSDD / "metadata.csv").exists():
        pytest.skip(f"FSDD not found at {FSDD} (set TYMPAN_FSDD)")
    names = pd.read_csv(FSDD / "metadata.csv")["filename"]
    picked = [names[i * len(names) // FSDD_CLIPS + i] for i in range(FSDD_CLIPS)]
    return [
        load_waveform(Path(FSDD / name), cfg.sample_rate, n_samples(cfg), cfg.crop).numpy()
        for name in picked
    ]


def librosa_features(y: np.ndarray, kind: str, cfg: FeatureConfig, stack: StackConfig):
    """One clip through librosa's own functions: `(bins, frames)`."""
    ref = np.max if cfg.db_ref == "max" else 1.0
    common = {"n_fft": cfg.n_fft, "hop_length": cfg.hop_length, "pad_mode": cfg.pad_mode}
    if kind == "stft":
        power = np.abs(librosa.stft(y, **common)) ** 2
        return librosa.power_to_db(power, ref=ref, top_db=cfg.top_db)
    mel = {
        **common,
        "sr": cfg.sample_rate,
        "n_mels": cfg.n_mels,
        "fmin": cfg.f_min,
        "fmax": cfg.f_max,
        "htk": cfg.mel_scale == "htk",
    }
    norm = None if cfg.mel_norm == "none" else cfg.mel_norm
    if kind == "logmel":
        power = librosa.feature.melspectrogram(y=y, norm=norm, **mel)
        return librosa.power_to_db(power, ref=ref, top_db=cfg.top_db)
    assert kind == "mfcc"
    if cfg.top_db == 80.0:  # librosa.feature.mfcc's own power_to_db (ref 1.0, top_db 80)
        return librosa.feature.mfcc(y=y, n_mfcc=stack.n_mfcc, mel_norm=norm, **mel)
    power = librosa.feature.melspectrogram(y=y, norm=norm, **mel)
    db = librosa.power_to_db(power, top_db=cfg.top_db)
    return librosa.feature.mfcc(S=db, n_mfcc=stack.n_mfcc)


def parity(cfg: FeatureConfig, clips: list[np.ndarray]) -> dict[str, float]:
    """`{kind: error}` for the torch kinds of `cfg.stack`: the largest dB difference for
    log-mel and STFT, the largest difference relative to the coefficient's range for MFCC.
    tympan computes all `clips` in one batch."""
    stack = cfg.stack
    parts = FeatureStack(cfg, stack).parts(torch.from_numpy(np.stack(clips)))
    errors = {}
    for kind in (k for k in stack.kinds if k in TORCH_KINDS):
        ours = parts[kind].numpy()
        theirs = np.stack([librosa_features(y, kind, cfg, stack) for y in clips])
        assert ours.shape == theirs.shape, kind
        diff = np.abs(ours.astype(np.float64) - theirs)
        if kind == "mfcc":
            span = theirs.max(axis=(0, 2)) - theirs.min(axis=(0, 2))
            errors[kind] = float((diff.max(axis=(0, 2)) / span).max())
        else:
            errors[kind] = float(diff.max())
    return errors


def assert_parity(errors: dict[str, float]) -> None:
    for kind, error in errors.items():
        tol = MFCC_REL_TOL if kind == "mfcc" else DB_TOL
        assert error <= tol, f"{kind}: {error:.3g} from librosa (tolerance {tol:g})"


@pytest.mark.parametrize("ids", list(PRESETS))
def test_every_preset_matches_librosa_on_real_and_generated_clips(ids):
    cfg, _ = PRESETS[ids]
    errors = parity(cfg, fsdd_clips(cfg) + generated(cfg))
    assert errors
    assert_parity(errors)


CONVENTIONS = list(
    itertools.product(
        ("htk", "slaney"), ("none", "slaney"), ("reflect", "constant"), ("absolute", "max")
    )
)


@pytest.mark.parametrize(("mel_scale", "mel_norm", "pad_mode", "db_ref"), CONVENTIONS)
def test_every_convention_matches_librosa(mel_scale, mel_norm, pad_mode, db_ref):
    # 11025 Hz: an odd rate, where torchaudio's own mel grid would be off by half a hertz;
    # f_min / f_max inside the band, top_db not librosa's default
    cfg = FeatureConfig(
        sample_rate=11025,
        seconds=0.6,
        n_fft=512,
        hop_length=128,
        n_mels=48,
        f_min=60.0,
        f_max=5000.0,
        top_db=60.0,
        mel_scale=mel_scale,
        mel_norm=mel_norm,
        pad_mode=pad_mode,
        db_ref=db_ref,
        stack=StackConfig(kinds=("logmel", "mfcc", "stft"), n_mfcc=20),
    )
    assert_parity(parity(cfg, fsdd_clips(cfg)[:3] + generated(cfg)))


@pytest.mark.parametrize(("n_mfcc", "n_mels"), [(40, 128), (13, 40), (1, 1)])
def test_the_dct_is_scipys_orthonormal_dct_ii(n_mfcc, n_mels):
    x = np.random.default_rng(0).normal(-40.0, 15.0, (n_mels, 7))
    expected = scipy.fft.dct(x, type=2, norm="ortho", axis=0)[:n_mfcc]
    ours = dct_matrix(n_mfcc, n_mels).double() @ torch.from_numpy(x)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-4)


def test_log_mel_referenced_to_max_peaks_at_zero_db_per_clip():
    cfg = FeatureConfig(db_ref="max", top_db=50.0)
    clips = generated(cfg)
    out = LogMel(cfg)(torch.from_numpy(np.stack(clips)))[:, 0]
    torch.testing.assert_close(out.amax(dim=(-2, -1)), torch.zeros(len(clips)))
    assert out.amin() >= -50.0 - 1e-4


def test_the_defaults_are_torchaudios_conventions():
    # demo and fsdd keep the numbers they had: torchaudio's MelSpectrogram and MFCC
    cfg = FeatureConfig(stack=StackConfig(kinds=("logmel", "mfcc"), n_mfcc=30))
    wave = torch.from_numpy(np.stack(generated(cfg)[:-1]))
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length, n_mels=40
    )
    db = 10.0 * torch.log10(mel(wave).clamp_min(1e-10))
    db = torch.maximum(db, db.amax(dim=(-2, -1), keepdim=True) - cfg.top_db)
    mfcc = torchaudio.transforms.MFCC(
        sample_rate=cfg.sample_rate,
        n_mfcc=30,
        melkwargs={"n_fft": cfg.n_fft, "hop_length": cfg.hop_length, "n_mels": 40},
    )
    parts = FeatureStack(cfg, cfg.stack).parts(wave)
    torch.testing.assert_close(parts["logmel"], db, rtol=0, atol=1e-3)
    torch.testing.assert_close(parts["mfcc"], mfcc(wave.unsqueeze(1))[:, 0], rtol=0, atol=2e-3)


LIBROSA = {"mel_scale": "slaney", "mel_norm": "slaney", "pad_mode": "constant", "top_db": 80.0}
# What each study computed (SEEDS.md), as FeatureConfig fields, and its `(bins, frames)` per
# clip where the study states it. S2, S4 and S5 do not state their dB reference: librosa's
# usual power_to_db(ref=np.max) is assumed, and said so in their presets.
STUDIES = {
    "s1": (
        {
            **LIBROSA,
            "sample_rate": 44100,
            "n_fft": 2048,
            "hop_length": 512,
            "n_mels": 128,
            "db_ref": "max",
        },
        (128, 256),
    ),
    "s2": ({**LIBROSA, "db_ref": "max"}, None),
    "s3": (
        {
            **LIBROSA,
            "sample_rate": 16000,
            "seconds": 2.0,
            "n_fft": 2048,
            "hop_length": 512,
            "n_mels": 128,
        },
        (40, 63),
    ),
    "s4": ({**LIBROSA, "sample_rate": 44100, "n_mels": 128, "db_ref": "max"}, None),
    "s5": (
        {
            **LIBROSA,
            "sample_rate": 8000,
            "n_fft": 2048,
            "hop_length": 512,
            "n_mels": 128,
            "db_ref": "max",
        },
        None,
    ),
}


@pytest.mark.parametrize(
    "path", sorted((REPO / "pipelines").glob("s[1-5]_*.yaml")), ids=lambda p: p.stem
)
def test_every_study_preset_uses_its_studys_front_end(path):
    features = load_params(path).features
    fields, shape = STUDIES[path.stem[:2]]
    assert {key: getattr(features, key) for key in fields} == fields
    if shape is not None:
        stack = replace(features.stack, image=None)
        assert output_shape(features, stack)[1:] == shape
