"""Audio stage: any audio file -> 16 kHz mono waveform -> HuBERT rows at 50 Hz (two per
25 fps frame) and their pair means at 25 Hz."""
from .hubert import (
    DEFAULT_HUBERT,
    FEATURE_RATE,
    HUBERT_RATE,
    MODEL_ID_SUFFIX,
    ROWS_PER_FRAME,
    HubertFeatures,
    hubert_features_25hz,
    hubert_features_50hz,
    hubert_large_config,
    normalize_waveform,
    num_feature_frames,
    pair_mean,
    sample_features,
    steps_per_frame,
    tiny_hubert_config,
)
from .load import SAMPLE_RATE, AudioError, audio_duration, load_audio

__all__ = [
    "SAMPLE_RATE",
    "FEATURE_RATE",
    "HUBERT_RATE",
    "ROWS_PER_FRAME",
    "MODEL_ID_SUFFIX",
    "DEFAULT_HUBERT",
    "AudioError",
    "load_audio",
    "audio_duration",
    "tiny_hubert_config",
    "hubert_large_config",
    "HubertFeatures",
    "hubert_features_50hz",
    "hubert_features_25hz",
    "pair_mean",
    "steps_per_frame",
    "normalize_waveform",
    "num_feature_frames",
    "sample_features",
]
