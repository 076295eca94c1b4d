"""Time-frequency front ends and the memory-mapped feature cache."""

from tympan.features.cache import FeatureCache, build_cache, open_cache
from tympan.features.logmel import LogMel, Normalizer, waveform_batch, window_starts, windows

__all__ = [
    "FeatureCache",
    "LogMel",
    "Normalizer",
    "build_cache",
    "open_cache",
    "waveform_batch",
    "window_starts",
    "windows",
]
