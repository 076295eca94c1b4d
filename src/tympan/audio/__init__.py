"""Decoding, channel mixing, resampling and length fixing shared by training and serving."""

from tympan.audio.io import (
    MAX_PEAK_DBFS,
    MAX_SAMPLE_RATE,
    MIN_SAMPLE_RATE,
    AudioError,
    AudioProbe,
    Source,
    check_peak,
    check_rate,
    decode,
    fix_length,
    load_waveform,
    probe,
    resample,
    to_mono,
)

__all__ = [
    "MAX_PEAK_DBFS",
    "MAX_SAMPLE_RATE",
    "MIN_SAMPLE_RATE",
    "AudioError",
    "AudioProbe",
    "Source",
    "check_peak",
    "check_rate",
    "decode",
    "fix_length",
    "load_waveform",
    "probe",
    "resample",
    "to_mono",
]
