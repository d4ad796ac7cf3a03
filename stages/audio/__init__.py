"""Audio stage: any audio file -> 16 kHz mono waveform -> HuBERT features at 25 Hz."""
from .hubert import (
    DEFAULT_HUBERT,
    FEATURE_RATE,
    HubertFeatures,
    hubert_features_25hz,
    hubert_large_config,
    normalize_waveform,
    num_feature_frames,
    sample_features,
    tiny_hubert_config,
)
from .load import SAMPLE_RATE, AudioError, audio_duration, load_audio

__all__ = [
    "SAMPLE_RATE",
    "FEATURE_RATE",
    "DEFAULT_HUBERT",
    "AudioError",
    "load_audio",
    "audio_duration",
    "tiny_hubert_config",
    "hubert_large_config",
    "HubertFeatures",
    "hubert_features_25hz",
    "normalize_waveform",
    "num_feature_frames",
    "sample_features",
]
