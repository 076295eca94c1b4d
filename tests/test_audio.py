import math

import numpy as np
import pytest
import torch

from tympan.audio import AudioError, decode, fix_length, load_waveform, probe, resample

from audio_helpers import encode, tone, truncated, write


def test_resampling_preserves_a_tone_frequency():
    rate, target = 44100, 16000
    wave = torch.from_numpy(tone(1000.0, 1.0, rate))
    out = resample(wave, rate, target).numpy()
    assert len(out) == target
    spectrum = np.abs(np.fft.rfft(out * np.hanning(len(out))))
    peak = np.fft.rfftfreq(len(out), 1 / target)[spectrum.argmax()]
    assert abs(peak - 1000.0) <= 1.0


def test_resampling_removes_content_above_the_new_nyquist():
    rate, target = 48000, 16000
    wave = torch.from_numpy(tone(12000.0, 1.0, rate))  # above 8 kHz: must not alias to 4 kHz
    out = resample(wave, rate, target).numpy()
    assert np.sqrt(np.mean(out[1000:-1000] ** 2)) < 0.01 * np.sqrt(np.mean(wave.numpy() ** 2))


def test_stereo_bytes_are_downmixed_and_resampled():
    left, right = tone(440, 0.5, 22050), tone(880, 0.5, 22050)
    data = encode(np.stack([left, right], axis=1), 22050, fmt="FLAC")
    channels, rate = decode(data)
    assert channels.shape == (2, 11025) and rate == 22050
    wave = load_waveform(data, 16000, 16000, "start")
    assert wave.shape == (16000,)
    assert torch.all(wave[8000:] == 0)  # 0.5 s padded to 1 s


def test_fix_length_crops_center_and_start():
    wave = torch.arange(10.0)
    assert fix_length(wave, 4, "start").tolist() == [0, 1, 2, 3]
    assert fix_length(wave, 4, "center").tolist() == [3, 4, 5, 6]
    assert fix_length(wave, 12, "center").tolist()[-2:] == [0, 0]


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "FLOAT"])
def test_probe_accepts_common_encodings(tmp_path, subtype):
    path = write(tmp_path / "ok.wav", tone(440, 0.3, 96000), 96000, subtype=subtype)
    info = probe(path, silence_dbfs=-60, max_duration_s=10)
    assert info.sample_rate == 96000 and info.channels == 1
    assert math.isclose(info.duration_s, 0.3, rel_tol=1e-3)
    assert -7.0 < info.peak_dbfs < -5.0  # amplitude 0.5
    assert len(info.sha256) == 64


def _raw(path, data: bytes):
    path.write_bytes(data)
    return path


def _bad_files(tmp_path):
    nan = tone(440, 0.2, 8000)
    nan[100] = np.nan
    return {
        "empty file": _raw(tmp_path / "zero.wav", b""),
        "not decodable": _raw(tmp_path / "text.wav", b"hello"),
        "silent": write(tmp_path / "silence.wav", np.zeros(8000, np.float32), 8000),
        "NaN": write(tmp_path / "nan.wav", nan, 8000, subtype="FLOAT"),
        "truncated": truncated(tmp_path / "cut.wav"),
        "too long": write(tmp_path / "long.wav", tone(440, 3.0, 8000), 8000),
    }


def test_probe_rejects_bad_files_with_a_reason(tmp_path):
    for reason, path in _bad_files(tmp_path).items():
        with pytest.raises(AudioError) as err:
            probe(path, silence_dbfs=-60, max_duration_s=2.0)
        assert reason in str(err.value), (path, str(err.value))


def test_decode_rejects_garbage_bytes():
    with pytest.raises(AudioError, match="not decodable"):
        decode(b"RIFF....not really")
