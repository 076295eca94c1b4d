from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from tympan.config import params_from_dict
from tympan.training.augment import AugmentConfig, Augmenter, soft_cross_entropy

ALL_ON = AugmentConfig(
    noise_std=1.0,
    noise_p=0.5,
    time_shift=0.2,
    pitch_shift=3,
    time_masks=2,
    time_mask_width=5,
    freq_masks=2,
    freq_mask_width=4,
    mixup_alpha=0.4,
)


def log_mel(batch: int = 8, n_bins: int = 40, frames: int = 63, seed: int = 0) -> torch.Tensor:
    """dB-like features `(batch, 1, n_bins, frames)`: values in (-70, 0], one floor of -80 each."""
    g = torch.Generator().manual_seed(seed)
    x = -70 * torch.rand(batch, 1, n_bins, frames, generator=g)
    x[:, 0, 0, 0] = -80.0
    return x


def targets(batch: int = 8, n_classes: int = 5) -> torch.Tensor:
    return torch.arange(batch) % n_classes


def test_disabled_is_identity_and_one_hot():
    x, y = log_mel(), targets()
    out, t = Augmenter(AugmentConfig(), n_classes=5, seed=0, seconds=1.0)(x, y)
    assert out is x
    assert not AugmentConfig().enabled
    assert t.dtype == torch.float32 and t.shape == (8, 5)
    torch.testing.assert_close(t, F.one_hot(y, 5).float(), rtol=0, atol=0)


def test_noise_std_without_probability_is_off():
    assert not AugmentConfig(noise_std=1.0, noise_p=0.0).enabled
    assert AugmentConfig(noise_std=1.0).enabled


def test_input_never_modified_and_shape_dtype_kept():
    for dtype in (torch.float32, torch.float16):
        x = log_mel().to(dtype)
        before = x.clone()
        out, t = Augmenter(ALL_ON, n_classes=5, seed=0, seconds=1.0)(x, targets())
        assert torch.equal(x, before)
        assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
        assert t.shape == (8, 5) and t.dtype == torch.float32


def test_time_shift_is_a_bounded_roll_per_clip_in_seconds():
    x = log_mel(batch=32, frames=50)  # 50 frames over a 2 s window: 0.2 s is 5 frames
    out, _ = Augmenter(AugmentConfig(time_shift=0.2), 5, seed=1, seconds=2.0)(x, targets(32))
    seen = set()
    for clip, moved in zip(x, out, strict=True):
        assert torch.equal(clip.flatten().sort().values, moved.flatten().sort().values)
        shifts = [k for k in range(-5, 6) if torch.equal(torch.roll(clip, k, dims=-1), moved)]
        assert len(shifts) == 1, "each clip is a roll by at most 0.2 s = 5 of 50 frames"
        seen.add(shifts[0])
    assert any(k > 0 for k in seen) and any(k < 0 for k in seen)
    assert max(abs(k) for k in seen) == 5


def test_time_shift_is_checked_against_the_window():
    with pytest.raises(ValueError, match=r"augment\.time_shift=6\.0 s is longer than the "):
        params_from_dict({"augment": {"time_shift": 6.0}, "features": {"seconds": 5.0}})
    assert params_from_dict({"augment": {"time_shift": 0.5}}).augment.time_shift == 0.5
    with pytest.raises(ValueError, match="in seconds"):
        Augmenter(AugmentConfig(time_shift=0.1), 5, seed=0)


def test_pitch_shift_moves_a_bright_bin_and_fills_with_the_floor():
    batch, n_bins, bright = 32, 40, 20
    x = torch.full((batch, 1, n_bins, 10), -80.0)
    x[:, :, bright, :] = 0.0
    out, _ = Augmenter(AugmentConfig(pitch_shift=3), n_classes=5, seed=2, seconds=1.0)(
        x, targets(batch)
    )
    moves = set()
    for clip in out:
        rows = (clip[0] == 0.0).all(dim=1).nonzero().flatten().tolist()
        assert len(rows) == 1
        assert abs(rows[0] - bright) <= 3
        moves.add(rows[0] - bright)
        others = torch.ones(n_bins, dtype=torch.bool)
        others[rows[0]] = False
        assert (clip[0, others] == -80.0).all()
    assert any(m > 0 for m in moves) and any(m < 0 for m in moves)


def test_pitch_shift_fills_vacated_bins_with_the_clip_floor():
    x = log_mel(batch=32)
    out, _ = Augmenter(AugmentConfig(pitch_shift=5), n_classes=5, seed=3, seconds=1.0)(
        x, targets(32)
    )
    for clip, moved in zip(x, out, strict=True):
        k = next(k for k in range(-5, 6) if torch.equal(moved[0, 5:35], clip[0, 5 - k : 35 - k]))
        if k > 0:
            assert (moved[0, :k] == -80.0).all()
        elif k < 0:
            assert (moved[0, k:] == -80.0).all()


@pytest.mark.parametrize(("axis", "count", "width"), [(3, 1, 6), (3, 3, 4), (2, 1, 5), (2, 2, 3)])
def test_masks_set_whole_stripes_to_the_clip_floor(axis, count, width):
    name = "time" if axis == 3 else "freq"
    cfg = AugmentConfig(**{f"{name}_masks": count, f"{name}_mask_width": width})
    x = log_mel(batch=64)
    out, _ = Augmenter(cfg, n_classes=5, seed=4, seconds=1.0)(x, targets(64))
    floor = -80.0
    total = 0
    for clip, masked in zip(x, out, strict=True):
        other = 1 if axis == 3 else 2  # a stripe spans this axis of (1, bins, frames)
        stripes = (masked == floor).all(dim=other).flatten()  # (frames,) or (bins,)
        changed = (masked != clip).any(dim=other).flatten()
        assert not (changed & ~stripes).any(), "only masked stripes change"
        n = int(stripes.sum())
        assert n <= count * width
        if count == 1 and n:
            run = stripes.nonzero().flatten()
            assert int(run[-1] - run[0]) + 1 == n, "one mask is one contiguous stripe"
        total += n
    assert total > 0


def test_noise_has_the_right_std_and_probability():
    x = log_mel(batch=400, n_bins=16, frames=16)
    out, _ = Augmenter(AugmentConfig(noise_std=2.0, noise_p=0.5), 5, seed=5, seconds=1.0)(
        x, targets(400)
    )
    diff = out - x
    noisy = (diff != 0).flatten(1).any(dim=1)
    assert 0.4 < noisy.float().mean() < 0.6
    assert (diff[~noisy] == 0).all()
    assert abs(diff[noisy].std().item() - 2.0) < 0.05
    assert abs(diff[noisy].mean().item()) < 0.05


def test_mixup_mixes_inputs_and_one_hots_with_one_lambda():
    batch = 16
    x, y = log_mel(batch=batch), torch.arange(batch)  # one class per clip: targets reveal pairs
    out, t = Augmenter(AugmentConfig(mixup_alpha=0.4), n_classes=batch, seed=6, seconds=1.0)(x, y)
    torch.testing.assert_close(t.sum(dim=1), torch.ones(batch))
    lams = set()
    for i in range(batch):
        lam = t[i, i].item()
        others = [j for j in range(batch) if j != i and t[i, j] > 0]
        assert len(others) <= 1
        j = others[0] if others else i
        if j != i:
            assert t[i, j].item() == pytest.approx(1 - lam, abs=1e-6)
            lams.add(round(lam, 5))
        torch.testing.assert_close(out[i], lam * x[i] + (1 - lam) * x[j])
    assert len(lams) == 1, "one lambda per batch"


def test_mixup_lambda_follows_beta_even_for_tiny_alphas():
    """numpy's Beta sampler (replacing a hand-written Marsaglia-Tsang one) on the batch's
    lambda: its law, and values in [0, 1] where gamma draws underflow (alpha 0.01)."""
    stats = pytest.importorskip("scipy.stats")
    x, y = log_mel(batch=2), torch.tensor([0, 1])
    for alpha in (0.01, 0.5, 1.0, 3.0):
        aug = Augmenter(AugmentConfig(mixup_alpha=alpha), 2, seed=0)
        draws = [aug(x, y)[1][0].max().item() for _ in range(1200)]  # max(lam, 1 - lam)
        assert all(0.5 <= d <= 1.0 for d in draws)
        draws = [d for d in draws if d < 1.0]  # not the batches permuted onto themselves
        if alpha >= 0.5:  # smaller ones put much of their mass within float32 rounding of 1
            law = stats.beta(alpha, alpha)
            cdf = lambda v, b=law: 2 * b.cdf(v) - 1  # noqa: E731 (the law of max(lam, 1-lam))
            assert stats.kstest(draws, cdf).pvalue > 1e-3, alpha


def test_same_seed_reproduces_and_different_seeds_differ():
    x, y = log_mel(), targets()
    a1, t1 = Augmenter(ALL_ON, 5, seed=7, seconds=1.0)(x, y)
    a2, t2 = Augmenter(ALL_ON, 5, seed=7, seconds=1.0)(x, y)
    b, _ = Augmenter(ALL_ON, 5, seed=8, seconds=1.0)(x, y)
    assert torch.equal(a1, a2) and torch.equal(t1, t2)
    assert not torch.equal(a1, b)


def test_seeds_in_lockstep_equal_each_seed_alone():
    batches = [(log_mel(seed=i), targets()) for i in range(4)]

    def alone(seed: int) -> list[torch.Tensor]:
        aug = Augmenter(ALL_ON, 5, seed=seed, seconds=1.0)
        return [aug(x, y)[0] for x, y in batches]

    first, second = (
        Augmenter(ALL_ON, 5, seed=0, seconds=1.0),
        Augmenter(ALL_ON, 5, seed=1, seconds=1.0),
    )
    interleaved = [(first(x, y)[0], second(x, y)[0]) for x, y in batches]
    for (a, b), ref_a, ref_b in zip(interleaved, alone(0), alone(1), strict=True):
        assert torch.equal(a, ref_a) and torch.equal(b, ref_b)


def test_global_rng_is_untouched():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    Augmenter(ALL_ON, 5, seed=0, seconds=1.0)(log_mel(), targets())
    assert torch.equal(torch.get_rng_state(), state)


def test_state_dict_resumes_the_same_draws():
    x, y = log_mel(), targets()
    aug = Augmenter(ALL_ON, 5, seed=9, seconds=1.0)
    aug(x, y)
    state = aug.state_dict()
    expected = aug(x, y)[0]
    resumed = Augmenter(ALL_ON, 5, seed=0, seconds=1.0)
    resumed.load_state_dict(state)
    assert torch.equal(resumed(x, y)[0], expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draws_equal_cpu_draws():
    x, y = log_mel(), targets()
    cpu, t_cpu = Augmenter(ALL_ON, 5, seed=10, seconds=1.0)(x, y)
    gpu, t_gpu = Augmenter(ALL_ON, 5, seed=10, seconds=1.0)(x.cuda(), y.cuda())
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu)
    torch.testing.assert_close(t_gpu.cpu(), t_cpu)


@pytest.mark.parametrize("weighted", [False, True])
def test_soft_cross_entropy_equals_cross_entropy_on_one_hots(weighted):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 3, 0])
    weight = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64) if weighted else None
    ours = soft_cross_entropy(logits, F.one_hot(y, 4).double(), weight)
    torch.testing.assert_close(ours, F.cross_entropy(logits, y, weight=weight))


def test_soft_cross_entropy_is_linear_in_mixed_targets():
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    a, b, lam = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([1, 2, 0, 2, 0, 1]), 0.3
    mixed = lam * F.one_hot(a, 3).float() + (1 - lam) * F.one_hot(b, 3).float()
    expected = lam * F.cross_entropy(logits, a) + (1 - lam) * F.cross_entropy(logits, b)
    torch.testing.assert_close(soft_cross_entropy(logits, mixed), expected)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"noise_std": -1.0}, "noise_std"),
        ({"noise_p": 1.5}, "noise_p"),
        ({"noise_p": -0.1}, "noise_p"),
        ({"time_shift": 1.2}, "time_shift"),
        ({"pitch_shift": -2}, "pitch_shift"),
        ({"pitch_shift": 1.5}, "pitch_shift"),
        ({"time_masks": 2}, "time_mask_width"),
        ({"time_mask_width": 5}, "time_masks"),
        ({"freq_masks": 1, "freq_mask_width": -1}, "freq_mask_width"),
        ({"freq_mask_width": 3}, "freq_masks"),
        ({"mixup_alpha": -0.2}, "mixup_alpha"),
        ({"mixup_alpha": float("nan")}, "mixup_alpha"),
        ({"time_masks": True, "time_mask_width": 2}, "time_masks"),
    ],
)
def test_invalid_values_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        params_from_dict({"augment": changes})


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        (AugmentConfig(pitch_shift=40), "pitch_shift"),
        (AugmentConfig(freq_masks=1, freq_mask_width=41), "freq_mask_width"),
        (AugmentConfig(time_masks=1, time_mask_width=64), "time_mask_width"),
    ],
)
def test_too_wide_for_the_features_names_the_field(cfg, field):
    with pytest.raises(ValueError, match=field):
        Augmenter(cfg, 5, seed=0, seconds=1.0)(log_mel(), targets())


# --- waveform domain ---------------------------------------------------------------------


def _tones(batch: int, freq: float = 440.0, rate: int = 8000) -> torch.Tensor:
    t = torch.arange(rate) / rate
    return 0.5 * torch.sin(2 * torch.pi * freq * t).repeat(batch, 1)


def _peak_hz(wave: torch.Tensor, rate: int = 8000) -> torch.Tensor:
    spectrum = torch.fft.rfft(wave * torch.hann_window(wave.shape[1]), dim=1).abs()
    return spectrum.argmax(dim=1).float() * rate / wave.shape[1]


def test_wave_noise_is_at_the_drawn_snr_and_silence_stays_silent():
    from tympan.training.augment import WaveAugmenter

    cfg = AugmentConfig(wave_snr_db=(10.0, 10.0), wave_p=1.0)
    wave = torch.cat([_tones(4), torch.zeros(1, 8000)])
    out = WaveAugmenter(cfg, 8000, seed=0)(wave)
    noise = out - wave
    snr = 10 * torch.log10(wave[:4].pow(2).mean(1) / noise[:4].pow(2).mean(1))
    torch.testing.assert_close(snr, torch.full((4,), 10.0), atol=0.2, rtol=0)
    assert noise[4].abs().max() == 0
    ranged = WaveAugmenter(replace(cfg, wave_snr_db=(0.0, 20.0)), 8000, seed=0)(_tones(64))
    snr = 10 * torch.log10(_tones(1).pow(2).mean() / (ranged - _tones(64)).pow(2).mean(1))
    assert snr.min() > -0.5 and snr.max() < 20.5 and snr.std() > 3


def test_wave_pitch_shift_moves_the_frequency_by_whole_semitones_and_keeps_length():
    from tympan.training.augment import WaveAugmenter

    cfg = AugmentConfig(wave_pitch=3, wave_p=1.0)
    wave = _tones(32)
    out = WaveAugmenter(cfg, 8000, seed=1)(wave)
    assert out.shape == wave.shape
    steps = 12 * torch.log2(_peak_hz(out) / 440.0)
    torch.testing.assert_close(steps, steps.round(), atol=0.15, rtol=0)
    assert set(steps.round().int().tolist()) == {-3, -2, -1, 0, 1, 2, 3}
    unshifted = WaveAugmenter(replace(cfg, wave_p=0.0), 8000, seed=1)(wave)
    assert torch.equal(unshifted, wave)


def test_wave_params_are_checked():
    with pytest.raises(ValueError, match=r"augment\.wave_snr_db must be \[low, high\]"):
        AugmentConfig(wave_snr_db=(20.0, 5.0))
    with pytest.raises(ValueError, match=r"augment\.wave_p=2\.0 is out of range"):
        params_from_dict({"augment": {"wave_p": 2.0}})
    assert AugmentConfig(wave_snr_db=(-5.0, 5.0)).waveform
    assert not AugmentConfig(wave_snr_db=(-5.0, 5.0), wave_p=0.0).waveform
