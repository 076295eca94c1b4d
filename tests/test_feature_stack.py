import librosa
import numpy as np
import pytest
import torch

from tympan.config import KINDS as ALL_KINDS
from tympan.config import FeatureConfig, StackConfig, params_from_dict
from tympan.features.logmel import LogMel, n_frames
from tympan.features.stack import (
    FeatureStack,
    bins_per_kind,
    lpc,
    lsf,
    output_shape,
)

# the kinds computed from the signal itself; `embedding` (a pretrained encoder's) and
# `waveform` (the clip, for fine-tuning), which stand alone, have their own tests in
# test_embeddings.py and test_finetune.py
KINDS = tuple(kind for kind in ALL_KINDS if kind not in ("embedding", "waveform"))
RATE = 16000
CFG = FeatureConfig(sample_rate=RATE, seconds=0.5)
FSDD_CFG = FeatureConfig(sample_rate=8000, seconds=0.5, n_fft=256, hop_length=128, n_mels=40)
N = round(CFG.seconds * RATE)
T = np.arange(N) / RATE


def sine(freq: float, amp: float = 0.5) -> np.ndarray:
    return amp * np.sin(2 * np.pi * freq * T)


def chirp() -> np.ndarray:
    """100 Hz -> 6 kHz linear sweep."""
    return 0.5 * np.sin(2 * np.pi * (100 * T + (6000 - 100) / (2 * CFG.seconds) * T**2))


def noise(amp: float = 0.3, seed: int = 0) -> np.ndarray:
    return amp * np.random.default_rng(seed).standard_normal(N)


def batch(*signals: np.ndarray) -> torch.Tensor:
    """`(batch, samples)` float32."""
    return torch.from_numpy(np.stack(signals).astype(np.float32))


def part(out: torch.Tensor, cfg: FeatureConfig, stack: StackConfig, kind: str) -> torch.Tensor:
    """Rows of one kind from a `(batch, 1, bins, frames)` stack -> `(batch, bins, frames)`."""
    start = 0
    for name, size in bins_per_kind(cfg, stack).items():
        if name == kind:
            return out[:, 0, start : start + size]
        start += size
    raise KeyError(kind)


@pytest.fixture(scope="module")
def signals() -> torch.Tensor:
    # a loud and a very quiet clip together: per-clip dB references must not mix them
    return batch(sine(440), chirp(), noise(), np.zeros(N), sine(300, amp=1e-4))


@pytest.mark.parametrize("cfg", [CFG, FSDD_CFG], ids=["16k", "fsdd"])
@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_has_its_shape_and_is_finite(kind, cfg, signals):
    stack = StackConfig(kinds=(kind,))
    wave = signals if cfg is CFG else signals[:, ::2].contiguous()
    out = FeatureStack(cfg, stack)(wave)
    assert out.shape == (len(wave), *output_shape(cfg, stack))
    assert out.shape[-1] == n_frames(cfg)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_logmel_alone_is_exactly_logmel(signals):
    out = FeatureStack(CFG, StackConfig())(signals)
    assert torch.equal(out, LogMel(CFG)(signals))


def test_kinds_are_stacked_in_order():
    wave = batch(chirp(), noise())
    stack = StackConfig(kinds=("zcr", "mfcc", "lpc", "logmel", "centroid"))
    out = FeatureStack(CFG, stack)(wave)
    bins = bins_per_kind(CFG, stack)
    assert list(bins) == list(stack.kinds)
    assert out.shape == (2, 1, 1 + 40 + 12 + 40 + 1, n_frames(CFG))
    for kind in stack.kinds:
        alone = FeatureStack(CFG, StackConfig(kinds=(kind,)))(wave)[:, 0]
        torch.testing.assert_close(part(out, CFG, stack, kind), alone, rtol=0, atol=0)


def test_batch_equals_per_item(signals):
    stack = StackConfig(kinds=KINDS, preemphasis=0.97)
    frontend = FeatureStack(CFG, stack)
    together = frontend(signals)
    alone = torch.cat([frontend(signals[i : i + 1]) for i in range(len(signals))])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-4)


def test_preemphasis_raises_the_high_frequency_share():
    wave = batch(sine(200) + sine(5000, amp=0.05), noise())
    plain = FeatureStack(CFG, StackConfig(kinds=("stft",)))(wave)
    emphasised = FeatureStack(CFG, StackConfig(kinds=("stft",), preemphasis=0.97))(wave)
    assert not torch.allclose(plain, emphasised)

    def high_share(db: torch.Tensor) -> torch.Tensor:
        power = 10.0 ** (db[:, 0] / 10.0)  # (batch, bins, frames)
        return power[:, CFG.n_fft // 4 :].sum(dim=(1, 2)) / power.sum(dim=(1, 2))

    assert (high_share(emphasised) > high_share(plain) + 0.05).all()


def test_yin_tracks_a_220_hz_sine_and_gives_zero_on_silence():
    f0 = FeatureStack(CFG, StackConfig(kinds=("f0",)))(batch(sine(220), np.zeros(N)))[:, 0, 0]
    voiced = f0[0, 2:-2]
    assert (voiced - 220).abs().max() < 5
    assert (f0[1] == 0).all()


def test_pyin_marks_unvoiced_frames_zero():
    stack = StackConfig(kinds=("f0",), f0_method="pyin")
    f0 = FeatureStack(CFG, stack)(batch(sine(220), noise()))[:, 0, 0]
    assert torch.isfinite(f0).all()
    assert (f0[0, 2:-2] - 220).abs().median() < 5
    assert (f0[1] == 0).float().mean() > 0.5


def test_centroid_of_a_1_khz_sine_is_near_1_khz():
    centroid = FeatureStack(CFG, StackConfig(kinds=("centroid",)))(batch(sine(1000)))
    assert (centroid[0, 0, 0, 2:-2] - 1000).abs().max() < 50


def test_zero_crossing_rate_of_noise_exceeds_a_low_sine():
    zcr = FeatureStack(CFG, StackConfig(kinds=("zcr",)))(batch(noise(), sine(200)))
    interior = zcr[:, 0, 0, 2:-2].mean(-1)
    assert interior[0] > 0.3
    assert interior[0] > 10 * interior[1]


def test_lpc_matches_librosa_on_an_interior_frame():
    wave = np.convolve(noise(seed=1), [1.0, 0.6, 0.3], mode="same")[None].astype(np.float32)
    coefs = lpc(wave, CFG.n_fft, CFG.hop_length, 12)
    centre = 10 * CFG.hop_length
    frame = wave[0, centre - CFG.n_fft // 2 : centre + CFG.n_fft // 2].astype(np.float64)
    frame = frame * librosa.filters.get_window("hann", CFG.n_fft, fftbins=True)
    np.testing.assert_allclose(coefs[0, :, 10], librosa.lpc(frame, order=12)[1:], atol=1e-4)


def test_lsf_are_sorted_within_zero_and_pi(signals):
    stack = StackConfig(kinds=("lsf",), preemphasis=0.97)
    freqs = FeatureStack(CFG, stack)(signals)[:, 0]
    assert ((freqs > 0) & (freqs < np.pi)).all()
    assert (freqs.diff(dim=1) >= 0).all()
    # silence: A(z) = 1, whose LSFs are k pi / (p + 1), evenly spaced
    expected = torch.arange(1, 13, dtype=torch.float32) * np.pi / 13
    torch.testing.assert_close(freqs[3, :, 0], expected)


@pytest.mark.parametrize("order", [1, 7, 12])
def test_lsf_roots_match_numpy(order):
    wave = noise(seed=2)[None].astype(np.float32)
    coefs = lpc(wave, CFG.n_fft, CFG.hop_length, order)[..., 5:8]
    freqs = lsf(coefs)
    for j in range(coefs.shape[-1]):
        a = np.r_[1.0, coefs[0, :, j]]
        p = np.r_[a, 0.0] + np.r_[0.0, a[::-1]]
        q = np.r_[a, 0.0] - np.r_[0.0, a[::-1]]
        angles = np.angle(np.r_[np.roots(p), np.roots(q)])
        expected = np.sort(angles[(angles > 1e-9) & (angles < np.pi - 1e-9)])
        np.testing.assert_allclose(freqs[0, :, j], expected, atol=1e-7)


@pytest.mark.parametrize("channels", [1, 3])
def test_image_mode_resizes_and_repeats_channels(channels, signals):
    stack = StackConfig(kinds=("mfcc", "stft", "f0"), image=(64, 64), image_channels=channels)
    out = FeatureStack(CFG, stack)(signals[:2])
    assert out.shape == (2, channels, 64, 64)
    assert output_shape(CFG, stack) == (channels, 64, 64)
    assert torch.equal(out, out[:, :1].expand_as(out))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "stack",
    [
        StackConfig(),
        StackConfig(kinds=("mfcc", "lpc", "contrast", "centroid", "zcr")),
        StackConfig(kinds=("stft", "f0", "contrast", "centroid"), n_mfcc=13, lpc_order=16),
        StackConfig(kinds=("lsf", "lpc"), preemphasis=0.97, image=(32, 48)),
    ],
)
@pytest.mark.parametrize("cfg", [CFG, FSDD_CFG], ids=["16k", "fsdd"])
def test_output_shape_matches_the_real_output(stack, cfg):
    wave = torch.from_numpy(noise()[: round(cfg.seconds * cfg.sample_rate)].astype(np.float32))
    out = FeatureStack(cfg, stack)(wave[None])
    assert out.shape[1:] == output_shape(cfg, stack)


def test_odd_window_sizes_still_align_frames():
    # n_fft 401 and 8000 % 160 == 0: zero-padded centred framing gives one frame fewer here
    cfg = FeatureConfig(sample_rate=RATE, seconds=0.5, n_fft=401, hop_length=160)
    out = FeatureStack(cfg, StackConfig(kinds=KINDS))(batch(chirp(), np.zeros(N)))
    assert out.shape == (2, *output_shape(cfg, StackConfig(kinds=KINDS)))
    assert torch.isfinite(out).all()


def test_bins_per_kind_for_the_fsdd_config():
    assert bins_per_kind(FSDD_CFG, StackConfig(kinds=KINDS)) == {
        "logmel": 40,
        "mfcc": 40,
        "stft": 129,
        "lpc": 12,
        "lsf": 12,
        "f0": 1,
        "contrast": 7,
        "centroid": 1,
        "zcr": 1,
    }


def test_torch_kinds_are_registered_for_to_device():
    frontend = FeatureStack(CFG, StackConfig(kinds=("logmel", "mfcc", "stft", "zcr")))
    names = {name for name, _ in frontend.named_buffers()}
    assert names == {"mel.filters", "mel.spectrogram.window", "dct", "stft.window"}
    assert not any(p.requires_grad for p in frontend.parameters())
    alone = FeatureStack(CFG, StackConfig(kinds=("mfcc",)))
    assert {name for name, _ in alone.named_buffers()} == {
        "mel.filters",
        "mel.spectrogram.window",
        "dct",
    }


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(signals):
    frontend = FeatureStack(CFG, StackConfig(kinds=("logmel", "mfcc", "stft", "lpc", "zcr")))
    cpu = frontend(signals)
    gpu = frontend.to("cuda")(signals.to("cuda"))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kinds": ("logmel", "chroma")}, "unknown kind 'chroma'"),
        ({"kinds": ()}, "features.stack.kinds must be a non-empty list"),
        ({"kinds": ("mfcc", "mfcc")}, "must not repeat"),
        ({"lpc_order": 0}, r"stack.lpc_order=0 is out of range: must be an integer >= 1"),
        ({"n_mfcc": 0}, r"stack.n_mfcc=0 is out of range: must be an integer >= 1"),
        ({"f0_fmin": 500.0, "f0_fmax": 400.0}, "stack.f0_fmin must be below stack.f0_fmax"),
        ({"f0_fmin": 0.0}, r"stack.f0_fmin=0.0 is out of range: must be a finite number > 0"),
        ({"f0_method": "crepe"}, "stack.f0_method must be one of yin, pyin, got 'crepe'"),
        ({"image": (0, 64)}, r"stack.image\[0\]=0 is out of range: must be an integer >= 1"),
        ({"image": (64,)}, r"stack.image must be two sizes \(H, W\)"),
        ({"image_channels": 2}, "stack.image_channels must be one of 1, 3, got 2"),
        ({"preemphasis": 1.5}, r"stack.preemphasis=1.5 is out of range: must be a number in \["),
    ],
)
def test_bad_stack_config_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        params_from_dict({"features": {"stack": kwargs}})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lpc_order": 512}, r"stack.lpc_order must be below features.n_fft \(512\), got 512"),
        ({"kinds": ("mfcc",), "n_mfcc": 41}, r"stack.n_mfcc must not exceed features.n_mels"),
        ({"kinds": ("f0",), "f0_fmax": 9000.0}, "stack.f0_fmax must not exceed the Nyquist"),
    ],
)
def test_stack_that_does_not_fit_the_features_is_rejected(kwargs, message):
    stack = StackConfig(**kwargs)
    with pytest.raises(ValueError, match=message):
        FeatureStack(CFG, stack)
    with pytest.raises(ValueError, match=message):
        output_shape(CFG, stack)


def test_wrong_input_rank_is_rejected():
    with pytest.raises(ValueError, match=r"expected \(batch, samples\)"):
        FeatureStack(CFG, StackConfig())(torch.zeros(2, 1, N))
