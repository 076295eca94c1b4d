"""The built-in demo dataset: six kinds of synthesised sound with realistic nuisances.

Every clip belongs to a *session* (its group): a session has its own background noise colour
and level, microphone low-pass and loudness, and records clips of every class. A split by
group therefore tests generalisation to unseen sessions, like a split by speaker or device.

Classes are separable but overlap at the margins on purpose, so a good model lands high but
below 100%: a chirp with a narrow sweep resembles a tone, a slowly modulated tone resembles a
steady one, and at -6 dB SNR a noise burst hides in the background.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf

from tympan.config import DemoConfig

log = logging.getLogger(__name__)

CLASSES = ("tone", "chirp", "am_tone", "harmonic", "noise_burst", "clicks")


def _envelope(rng: np.random.Generator, n: int, rate: int) -> np.ndarray:
    """An event of random onset and length with short attack/release ramps, `(n,)`."""
    length = int(rng.uniform(0.4, 0.9) * n)
    onset = int(rng.integers(0, n - length + 1))
    ramp = max(1, int(0.01 * rate))
    env = np.zeros(n)
    body = np.ones(length)
    body[:ramp] = np.linspace(0, 1, ramp)
    body[-ramp:] = np.linspace(1, 0, ramp)
    env[onset : onset + length] = body
    return env


def _event(kind: str, rng: np.random.Generator, n: int, rate: int) -> np.ndarray:
    t = np.arange(n) / rate
    env = _envelope(rng, n, rate)
    if kind == "tone":
        return env * np.sin(2 * np.pi * rng.uniform(200, 2500) * t + rng.uniform(0, 2 * np.pi))
    if kind == "chirp":
        f0 = rng.uniform(200, 2000)
        ratio = rng.uniform(1.25, 4.0) ** rng.choice([-1, 1])
        dur = max(env.sum() / rate, 1e-3)
        phase = 2 * np.pi * f0 * dur / np.log(ratio) * (ratio ** (t / dur) - 1)
        return env * np.sin(phase)
    if kind == "am_tone":
        carrier = np.sin(2 * np.pi * rng.uniform(200, 2500) * t)
        depth = rng.uniform(0.7, 1.0)
        mod = 1 - depth * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(4, 10) * t))
        return env * carrier * mod
    if kind == "harmonic":
        f0 = rng.uniform(90, 400)
        k = np.arange(1, int(min(12, 3800 // f0)) + 1)
        amps = rng.uniform(0.5, 1.0, len(k)) / k ** rng.uniform(0.5, 1.5)
        return env * (amps[:, None] * np.sin(2 * np.pi * f0 * k[:, None] * t)).sum(0) / amps.sum()
    if kind == "noise_burst":
        spectrum = np.fft.rfft(rng.standard_normal(n))
        freqs = np.fft.rfftfreq(n, 1 / rate)
        low = rng.uniform(100, 3000)
        band = (freqs > low) & (freqs < low * rng.uniform(1.5, 4))
        return env * np.fft.irfft(spectrum * band, n) * 4
    if kind == "clicks":
        out = np.zeros(n)
        step = int(rate / rng.uniform(4, 40))
        start = int(rng.integers(0, step))
        click = np.exp(-np.arange(int(0.004 * rate)) / (0.0008 * rate))
        for pos in range(start, n - len(click), step):
            out[pos : pos + len(click)] += click * rng.uniform(0.6, 1.0) * rng.choice([-1, 1])
        return out * (env > 0)
    raise ValueError(f"unknown demo class {kind!r}")  # pragma: no cover


def _background(rng: np.random.Generator, n: int, colour: float) -> np.ndarray:
    """Noise with a 1/f^colour power spectrum (0 white, 1 pink, 2 brown), unit RMS."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.arange(len(spectrum))
    spectrum[1:] /= freqs[1:] ** (colour / 2)
    spectrum[0] = 0
    noise = np.fft.irfft(spectrum, n)
    return noise / (np.sqrt(np.mean(noise**2)) + 1e-12)


def _lowpass(x: np.ndarray, cutoff: float, rate: int) -> np.ndarray:
    spectrum = np.fft.rfft(x)
    freqs = np.fft.rfftfreq(len(x), 1 / rate)
    return np.fft.irfft(spectrum / np.sqrt(1 + (freqs / cutoff) ** 4), len(x))


def generate(cfg: DemoConfig, out_dir: Path) -> pd.DataFrame:
    """Write `clips_per_class * 6` WAV files and `metadata.csv` under `out_dir`.

    The same `cfg` always writes the same bytes (one seeded generator per clip).
    """
    rate, n = cfg.sample_rate, round(cfg.seconds * cfg.sample_rate)
    session_rng = np.random.default_rng([cfg.seed, 0])
    sessions = [
        {
            "colour": session_rng.choice([0.0, 1.0, 2.0]),
            "cutoff": session_rng.uniform(2500, rate / 2 * 0.95),
            "gain_db": session_rng.uniform(-20, -3),
        }
        for _ in range(cfg.groups)
    ]
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    rows = []
    for c, kind in enumerate(CLASSES):
        for i in range(cfg.clips_per_class):
            rng = np.random.default_rng([cfg.seed, 1, c, i])
            group = i % cfg.groups
            session = sessions[group]
            signal = _event(kind, rng, n, rate)
            signal /= np.sqrt(np.mean(signal[signal != 0] ** 2)) + 1e-12
            snr = float(rng.choice(cfg.snr_db))
            noise = _background(rng, n, session["colour"]) * 10 ** (-snr / 20)
            mix = _lowpass(signal + noise, session["cutoff"], rate)
            mix *= 10 ** (session["gain_db"] / 20) / (np.abs(mix).max() + 1e-12)
            name = f"audio/{kind}_{i:04d}.wav"
            sf.write(out_dir / name, mix.astype(np.float32), rate, subtype="PCM_16")
            rows.append(
                {"filename": name, "label": kind, "session": f"session{group:02d}", "snr_db": snr}
            )
    meta = pd.DataFrame(rows)
    meta.to_csv(out_dir / "metadata.csv", index=False)
    log.info("demo: wrote %d clips of %d classes to %s", len(meta), len(CLASSES), out_dir)
    return meta
