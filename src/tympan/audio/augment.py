"""Waveform transforms shared by training-time augmentation and featurize's fixed copies.

`pitch_shift` is the batched torch pitch shift of training-time augmentation; `augmented_copy`
makes one fixed copy of a clip from a `CopyRecipe` (`copies.recipes`), drawing from a
generator seeded by the clip's audio, so the same clip always gets the same copy whatever the
order of the rows. A copy's pitch shift is librosa's `effects.pitch_shift`, the function S3's
and S4's notebooks called: made once per clip, its cost does not matter, its fidelity does.
"""

from __future__ import annotations

import hashlib
import math
from fractions import Fraction

import numpy as np
import torch
import torchaudio
from torch.nn import functional as F

from tympan.config import CopyRecipe


def pitch_shift(wave: torch.Tensor, steps: float, n_fft: int = 512) -> torch.Tensor:
    """`(batch, samples)` shifted by `steps` semitones, same length.

    Time-stretch by the phase vocoder, then resample back to the original duration. The
    ratio 2^(steps/12) is taken as a fraction p/q with q <= 64 (within 0.01 semitone), so the
    resampling kernel stays small: torchaudio's own `pitch_shift` resamples between
    `int(sr / rate)` and `sr`, coprime rates whose kernel makes one call take seconds.
    """
    ratio = Fraction(2.0 ** (steps / 12)).limit_denominator(64)
    up, down = ratio.numerator, ratio.denominator
    hop = n_fft // 4
    window = torch.hann_window(n_fft, device=wave.device, dtype=wave.dtype)
    spec = torch.stft(wave, n_fft, hop, window=window, return_complex=True)
    advance = torch.linspace(0, math.pi * hop, spec.shape[-2], device=wave.device)[..., None]
    stretched = torchaudio.functional.phase_vocoder(spec, down / up, advance)
    length = round(wave.shape[-1] * up / down)
    longer = torch.istft(stretched, n_fft, hop, window=window, length=length)
    out = torchaudio.functional.resample(longer, up, down)
    if out.shape[-1] >= wave.shape[-1]:
        return out[..., : wave.shape[-1]]
    return F.pad(out, (0, wave.shape[-1] - out.shape[-1]))


def copy_seed(seed: int, sha256: str, recipe: int) -> int:
    """The generator seed of one copy: `copies.seed`, the clip's audio hash and the recipe's
    number, so a copy depends on nothing else (not the row order, split or batch)."""
    digest = hashlib.sha256(f"{seed}:{sha256}:{recipe}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def augmented_copy(
    wave: torch.Tensor, recipe: CopyRecipe, sample_rate: int, seed: int
) -> torch.Tensor:
    """One fixed copy of `(windows, samples)` float32 audio (a clip, or a recording's windows)
    by `recipe`: time shift (zero-filled), pitch shift, Gaussian noise, clipping, in that
    order; draws from a CPU generator seeded with `seed` (see `copy_seed`)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out = wave.float().cpu().clone()
    limit = round(recipe.shift_s * sample_rate)
    if limit > 0:
        shifts = torch.randint(-limit, limit + 1, (out.shape[0],), generator=generator)
        for i, shift in enumerate(shifts.tolist()):
            out[i] = _shifted(out[i], shift)
    if recipe.pitch_semitones != 0:
        import librosa

        shifted = [
            librosa.effects.pitch_shift(w, sr=sample_rate, n_steps=recipe.pitch_semitones)
            for w in out.numpy()
        ]
        out = torch.from_numpy(np.stack(shifted).astype(np.float32))
    if recipe.noise_std > 0:
        out = out + recipe.noise_std * torch.randn(out.shape, generator=generator)
    if recipe.clip:
        out = out.clamp(-1.0, 1.0)
    return out


def _shifted(wave: torch.Tensor, shift: int) -> torch.Tensor:
    """`(samples,)` moved later by `shift` samples (earlier when negative), zero-filled."""
    if shift == 0:
        return wave
    out = torch.zeros_like(wave)
    if shift > 0:
        out[shift:] = wave[:-shift]
    else:
        out[:shift] = wave[-shift:]
    return out
