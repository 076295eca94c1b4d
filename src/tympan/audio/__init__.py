"""Decoding, channel mixing, resampling and length fixing shared by training and serving."""

from tympan.audio.io import (
    AudioError,
    AudioProbe,
    Source,
    decode,
    fix_length,
    load_waveform,
    probe,
    resample,
    to_mono,
)

__all__ = [
    "AudioError",
    "AudioProbe",
    "Source",
    "decode",
    "fix_length",
    "load_waveform",
    "probe",
    "resample",
    "to_mono",
]
