"""On-the-fly augmentation of training batches of cached features, and a soft-label loss.

The rule: augmentation is applied by the trainer to TRAINING batches only. Validation, test,
tuning validation and serving never see it: `Augmenter` is called from the training step and
nowhere else, after the batch is read from the feature cache. Nothing augmented is ever written
back to the cache or added to the dataset, so an augmented copy of a test clip cannot leak into
training (the flaw of the ESC-50 study in SEEDS.md, which augmented before splitting).

The cache holds log-mel features in dB before per-bin normalisation (the model normalises
inside), so every operation works on `(batch, 1, n_bins, frames)` tensors in dB:

- Gaussian noise in dB, per clip with probability `noise_p`;
- time shift: a circular roll along frames by up to `time_shift` seconds, per clip (the
  frames cover `features.seconds`, resized for image backbones or not);
- vocal-tract-length perturbation (VTLP): each clip's mel axis warped by a factor near 1
  (`vtlp_sources`), linear interpolation between bins;
- pitch shift: a shift along the bin axis, per clip, vacated bins filled with the clip's floor;
- SpecAugment frequency and time masks, masked stripes set to the clip's floor (its minimum,
  the dB floor of silence), not 0, which in dB would be loud;
- mixup: one lambda ~ Beta(alpha, alpha) per batch, mixed with a permutation of the batch;
  targets become mixed one-hots, hence soft labels and `soft_cross_entropy`.

Waveform-domain augmentation (`WaveAugmenter`, `augment.wave_*`) comes first, on the training
batch's fixed-length waveforms (featurize keeps them when it is on): speed perturbation
(resampling, tempo and pitch together, length kept), a true pitch shift by whole semitones
(torchaudio's phase vocoder and resampling, duration kept) and white noise at an SNR drawn per
clip. `AugmentedInputs` then recomputes the batch's features with the same
`FeatureStack` featurize and serving use, so the spectral operations above apply on top.

Fixed copies (`copies.recipes`, S3's and S4's augmented sets) are not drawn per batch: they
are made once at featurize (`tympan.audio.augment.augmented_copy`) and join the train split.

The on-the-fly operations are applied in that order (mixup last); "the clip's floor" is the
minimum of the clip as read from the cache, before any noise. Every random draw comes from
the `Augmenter`'s own CPU `torch.Generator` (mixup's lambda from its own numpy
`Generator.beta`) and is then moved to the batch's device: the global torch RNG is never
touched (so several seeds stepped in lockstep stay independent and dropout draws do not change
when augmentation is switched on), and CPU and CUDA runs draw the same numbers.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import librosa
import numpy as np
import torch
import torch.nn.functional as F
import torchaudio

from tympan.audio import fix_length
from tympan.audio.augment import pitch_shift
from tympan.config import AugmentConfig, FeatureConfig
from tympan.features.stack import FeatureStack, assemble

# speed factors are drawn in steps of 1 / SPEED_STEPS
SPEED_STEPS = 20


class Augmenter:
    """Augments training batches with its own random generator.

    `seed` seeds a CPU `torch.Generator` and, for mixup's lambda, a numpy `Generator` owned
    by this object; `state_dict` / `load_state_dict` save and restore both, so a resumed run
    continues the same draws. `seconds`: the duration the frames axis covers
    (`features.seconds`), which turns `time_shift` from seconds into frames.
    """

    def __init__(
        self,
        cfg: AugmentConfig,
        n_classes: int,
        seed: int,
        seconds: float | None = None,
        bin_hz: np.ndarray | None = None,
    ) -> None:
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        if cfg.time_shift > 0 and not seconds:
            raise ValueError("augment.time_shift is in seconds: give the window's `seconds`")
        if cfg.vtlp > 0 and bin_hz is None:
            raise ValueError("augment.vtlp warps frequencies: give the bins' centres `bin_hz`")
        self.cfg, self.n_classes, self.seconds = cfg, n_classes, seconds
        self.bin_hz = None if bin_hz is None else np.asarray(bin_hz, dtype=np.float64)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        self.rng = np.random.default_rng(seed)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a batch `x` `(batch, 1, n_bins, frames)` (dB) with integer targets `y`
        `(batch,)`.

        Returns a new `x` of the same shape, dtype and device (the input is never modified;
        with nothing enabled it is returned as is) and soft targets `(batch, n_classes)` float32:
        one-hot, or mixed one-hots under mixup.
        """
        if x.ndim != 4:
            raise ValueError(f"x must be (batch, channels, n_bins, frames), got {tuple(x.shape)}")
        if y.shape != (x.shape[0],):
            raise ValueError(f"y must be (batch,) = ({x.shape[0]},), got {tuple(y.shape)}")
        targets = F.one_hot(y.long(), self.n_classes).to(torch.float32)
        cfg = self.cfg
        if not cfg.enabled:
            return x, targets
        batch, _, n_bins, n_frames = x.shape
        self._check_fits(n_bins, n_frames)
        floor = x.amin(dim=(1, 2, 3), keepdim=True)  # (batch, 1, 1, 1)
        out = x
        if cfg.noise:
            out = self._noise(out)
        if cfg.time_shift > 0:
            out = self._time_shift(out)
        if cfg.vtlp > 0:
            out = self._vtlp(out)
        if cfg.pitch_shift > 0:
            out = self._pitch_shift(out, floor)
        if cfg.freq_masks > 0:
            out = self._mask(out, floor, axis=2, count=cfg.freq_masks, width=cfg.freq_mask_width)
        if cfg.time_masks > 0:
            out = self._mask(out, floor, axis=3, count=cfg.time_masks, width=cfg.time_mask_width)
        if cfg.mixup_alpha > 0:
            lam = float(self.rng.beta(cfg.mixup_alpha, cfg.mixup_alpha))
            perm = torch.randperm(batch, generator=self.generator).to(x.device)
            out = lam * out + (1 - lam) * out[perm]
            targets = lam * targets + (1 - lam) * targets[perm.to(targets.device)]
        return out, targets

    def _check_fits(self, n_bins: int, n_frames: int) -> None:
        cfg = self.cfg
        if cfg.pitch_shift >= n_bins:
            raise ValueError(
                f"augment.pitch_shift={cfg.pitch_shift} must be below the {n_bins} bins "
                "of the features"
            )
        if cfg.vtlp > 0 and len(self.bin_hz) != n_bins:
            raise ValueError(
                f"augment.vtlp: {len(self.bin_hz)} bin centres for {n_bins} bins; VTLP needs "
                "the log-mel alone (features.stack.kinds: [logmel], no image)"
            )
        if cfg.freq_mask_width > n_bins:
            raise ValueError(
                f"augment.freq_mask_width={cfg.freq_mask_width} exceeds the {n_bins} bins "
                "of the features"
            )
        if cfg.time_mask_width > n_frames:
            raise ValueError(
                f"augment.time_mask_width={cfg.time_mask_width} exceeds the {n_frames} frames "
                "of the features"
            )

    def _uniform_int(self, high: int, size: tuple[int, ...]) -> torch.Tensor:
        """Integers in `[-high, high]` drawn on CPU."""
        return torch.randint(-high, high + 1, size, generator=self.generator)

    def _noise(self, x: torch.Tensor) -> torch.Tensor:
        """`(batch, 1, n_bins, frames)`: add N(0, noise_std) dB to each clip with prob noise_p."""
        hit = torch.rand(x.shape[0], generator=self.generator) < self.cfg.noise_p
        noise = torch.randn(x.shape, generator=self.generator) * self.cfg.noise_std
        noise = noise * hit.view(-1, 1, 1, 1)
        return x + noise.to(device=x.device, dtype=x.dtype)

    def _time_shift(self, x: torch.Tensor) -> torch.Tensor:
        """`(batch, 1, n_bins, frames)`: roll each clip by its own number of frames, at most
        `time_shift` seconds' worth."""
        n_frames = x.shape[3]
        most = int(self.cfg.time_shift / self.seconds * n_frames + 1e-9)
        shifts = self._uniform_int(most, (x.shape[0],))
        # out[..., t] = x[..., t - shift]: the same as torch.roll(clip, shift, dims=-1)
        index = (torch.arange(n_frames).view(1, -1) - shifts.view(-1, 1)) % n_frames
        index = index.to(x.device).view(x.shape[0], 1, 1, n_frames).expand_as(x)
        return torch.gather(x, 3, index)

    def _vtlp(self, x: torch.Tensor) -> torch.Tensor:
        """`(batch, 1, n_bins, frames)`: each clip's frequency axis warped by its own factor
        (see `vtlp_sources`), linear interpolation between neighbouring bins."""
        v = self.cfg.vtlp
        alphas = (
            1 - v + 2 * v * torch.rand(x.shape[0], generator=self.generator, dtype=torch.float64)
        )
        source = torch.from_numpy(np.stack([vtlp_sources(self.bin_hz, a) for a in alphas.tolist()]))
        low = source.floor().long().clamp(0, x.shape[2] - 1)
        high = (low + 1).clamp(max=x.shape[2] - 1)
        weight = (source - low).to(x.dtype)
        shape = (x.shape[0], 1, x.shape[2], 1)
        low, high, weight = (t.to(x.device).view(shape) for t in (low, high, weight))
        lower = torch.gather(x, 2, low.expand_as(x))
        upper = torch.gather(x, 2, high.expand_as(x))
        return lower + (upper - lower) * weight

    def _pitch_shift(self, x: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
        """`(batch, 1, n_bins, frames)`: move each clip up (positive) or down along the bins;
        bins moved in from outside hold the clip's floor."""
        n_bins = x.shape[2]
        shifts = self._uniform_int(self.cfg.pitch_shift, (x.shape[0],))
        source = torch.arange(n_bins).view(1, -1) - shifts.view(-1, 1)  # (batch, n_bins)
        inside = ((source >= 0) & (source < n_bins)).to(x.device).view(x.shape[0], 1, n_bins, 1)
        index = source.clamp(0, n_bins - 1).to(x.device).view(x.shape[0], 1, n_bins, 1)
        moved = torch.gather(x, 2, index.expand_as(x))
        return torch.where(inside, moved, floor)

    def _mask(
        self, x: torch.Tensor, floor: torch.Tensor, axis: int, count: int, width: int
    ) -> torch.Tensor:
        """`(batch, 1, n_bins, frames)`: set `count` stripes per clip along `axis` (2 = bins,
        3 = frames), each of a width uniform in `[0, width]`, to the clip's floor."""
        batch, size = x.shape[0], x.shape[axis]
        widths = torch.randint(0, width + 1, (batch, count), generator=self.generator)
        # start uniform in [0, size - w]; float64 so u * n never rounds up to n
        u = torch.rand((batch, count), generator=self.generator, dtype=torch.float64)
        starts = (u * (size - widths + 1)).floor().long().clamp(max=size - widths)
        position = torch.arange(size).view(1, 1, -1)
        hit = (position >= starts.unsqueeze(-1)) & (position < (starts + widths).unsqueeze(-1))
        hit = hit.any(dim=1)  # (batch, size)
        shape = [batch, 1, 1, 1]
        shape[axis] = size
        return torch.where(hit.to(x.device).view(shape), floor, x)

    def state_dict(self) -> dict[str, Any]:
        """The generators' states, for checkpoints."""
        return {"generator": self.generator.get_state(), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.rng.bit_generator.state = state["rng"]


def vtlp_sources(bin_hz: np.ndarray, alpha: float, boundary: float = 0.9) -> np.ndarray:
    """Where each output bin reads the input under a warp by `alpha`: `(n_bins,)` fractional
    bin indices, clamped to the axis.

    Jaitly & Hinton's (2013) piecewise-linear warp of frequency f over [0, f_top] (f_top: the
    last centre): f * alpha up to `boundary * f_top * min(alpha, 1) / alpha`, then a straight
    line to f_top, so the top stays put. Output bin k holds the input at the frequency that
    the warp sends to its centre; that frequency's place among the centres is its index.
    """
    top = float(bin_hz[-1])
    knee = boundary * top * min(alpha, 1.0) / alpha
    grid = np.linspace(0.0, top, 4 * len(bin_hz) + 1)
    warped = np.where(
        grid <= knee,
        grid * alpha,
        top - (top - knee * alpha) / (top - knee) * (top - grid),
    )
    source_hz = np.interp(bin_hz, warped, grid)  # the warp's inverse at each centre
    return np.interp(source_hz, bin_hz, np.arange(len(bin_hz), dtype=np.float64))


def mel_centres(cfg: FeatureConfig) -> np.ndarray:
    """`(n_mels,)` centre frequency in Hz of each mel filter of `cfg`."""
    f_max = cfg.f_max if cfg.f_max is not None else cfg.sample_rate / 2
    edges = librosa.mel_frequencies(
        cfg.n_mels + 2, fmin=cfg.f_min, fmax=f_max, htk=cfg.mel_scale == "htk"
    )
    return edges[1:-1]


class WaveAugmenter:
    """Noise at an SNR and pitch shift on `(batch, samples)` float32 waveforms.

    Each clip gets noise with probability `wave_p` (SNR uniform in `wave_snr_db`, relative to
    the clip's own RMS, so silence stays silent) and, independently, a shift by an integer
    number of semitones uniform in `[-wave_pitch, wave_pitch]` with probability `wave_p`. Its
    own CPU generator, as `Augmenter`.
    """

    def __init__(self, cfg: AugmentConfig, sample_rate: int, seed: int) -> None:
        self.cfg, self.sample_rate = cfg, sample_rate
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.ndim != 2:
            raise ValueError(f"wave must be (batch, samples), got {tuple(wave.shape)}")
        cfg, out = self.cfg, wave
        if cfg.wave_speed and cfg.wave_p > 0:
            out = self._speed(out)
        if cfg.wave_pitch > 0 and cfg.wave_p > 0:
            out = self._pitch(out)
        if cfg.wave_snr_db and cfg.wave_p > 0:
            out = self._noise(out)
        return out

    def _hits(self, batch: int) -> torch.Tensor:
        return torch.rand(batch, generator=self.generator) < self.cfg.wave_p

    def _noise(self, wave: torch.Tensor) -> torch.Tensor:
        low, high = self.cfg.wave_snr_db
        hit = self._hits(wave.shape[0])
        snr = low + (high - low) * torch.rand(wave.shape[0], generator=self.generator)
        noise = torch.randn(wave.shape, generator=self.generator)
        rms = wave.float().pow(2).mean(dim=1).sqrt().cpu()
        scale = rms / 10.0 ** (snr / 20.0) * hit  # noise RMS ~ signal RMS / 10^(snr/20)
        return wave + (noise * scale.view(-1, 1)).to(wave.device, wave.dtype)

    def _pitch(self, wave: torch.Tensor) -> torch.Tensor:
        high = self.cfg.wave_pitch
        hit = self._hits(wave.shape[0])
        steps = torch.randint(-high, high + 1, (wave.shape[0],), generator=self.generator) * hit
        out = wave.clone()
        for step in steps.unique().tolist():
            if step == 0:
                continue
            rows = (steps == step).nonzero().flatten().to(wave.device)
            out[rows] = pitch_shift(wave[rows], int(step))
        return out

    def _speed(self, wave: torch.Tensor) -> torch.Tensor:
        """`(batch, samples)`: each hit clip resampled by its factor (in twentieths: few
        distinct short resampling filters), so it plays `factor` times as fast and high, then
        zero-padded or cut to its length."""
        low, high = self.cfg.wave_speed
        hit = self._hits(wave.shape[0])
        u = torch.rand(wave.shape[0], generator=self.generator, dtype=torch.float64)
        steps = torch.round(SPEED_STEPS * (low + (high - low) * u)).long()
        steps = torch.where(hit, steps, torch.full_like(steps, SPEED_STEPS))
        out = wave.clone()
        for step in steps.unique().tolist():
            if step == SPEED_STEPS:
                continue
            rows = (steps == step).nonzero().flatten().to(wave.device)
            fast = torchaudio.functional.resample(wave[rows], int(step), SPEED_STEPS)
            out[rows] = fix_length(fast, wave.shape[1], "start")
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


class AugmentedInputs:
    """Training inputs from augmented waveforms, indexed like the feature cache.

    `waves`: the cache's fixed-length waveforms `(rows, samples)`; `inputs[rows]` augments
    those rows' waveforms and returns their features `(len(rows), C, bins, frames)` in the
    cache's dtype (the precision the model sees for unaugmented clips too).
    """

    def __init__(
        self, waves: np.ndarray, cfg: FeatureConfig, augment: AugmentConfig, seed: int
    ) -> None:
        self.waves, self.cfg = waves, cfg
        self.frontend = FeatureStack(cfg, replace(cfg.stack, image=None))
        self.augment = WaveAugmenter(augment, cfg.sample_rate, seed)

    def __len__(self) -> int:
        return len(self.waves)

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        wave = torch.from_numpy(np.asarray(self.waves[rows], dtype=np.float32))
        with torch.no_grad():
            x = assemble(self.frontend.parts(self.augment(wave)), self.cfg.stack)
        return x.numpy().astype(self.cfg.dtype)


def soft_cross_entropy(
    logits: torch.Tensor, soft_targets: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy of `logits` `(batch, n_classes)` against soft targets of the same shape.

    Without `weight`: the batch mean of `sum_c -t_c log p_c`. With class weights `(n_classes,)`:
    `sum_b sum_c w_c t_bc (-log p_bc) / sum_b sum_c w_c t_bc`, which on one-hot targets is
    exactly torch's weighted `cross_entropy` (a weighted mean over the batch).
    """
    if logits.ndim != 2 or soft_targets.shape != logits.shape:
        raise ValueError(
            f"logits and soft_targets must both be (batch, n_classes), got "
            f"{tuple(logits.shape)} and {tuple(soft_targets.shape)}"
        )
    log_p = F.log_softmax(logits, dim=1)
    targets = soft_targets.to(log_p.dtype)
    if weight is None:
        return -(targets * log_p).sum(dim=1).mean()
    weighted = targets * weight.to(log_p.dtype).view(1, -1)
    return -(weighted * log_p).sum() / weighted.sum()
