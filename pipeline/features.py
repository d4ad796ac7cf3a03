"""HuBERT features of an audio file through the content-addressed cache: shared by the dub
job's and the prepare job's audio operators."""
from __future__ import annotations

import io

import numpy as np


def cached_features(cache, hubert, data: bytes):
    """(CachedFeatures, audio sha256, cache hit) for the audio file `data`: read from the
    cache when this model has seen these bytes before, else computed and stored."""
    from stages.audio import AudioError, load_audio
    from stages.audio.cache import content_hash

    sha = content_hash(data)
    cached = cache.lookup(hubert.model_id, sha)
    if cached is not None:
        return cached, sha, True
    wave = load_audio(io.BytesIO(data))
    if len(wave) == 0:
        raise AudioError("no samples")
    features = hubert(wave)
    return cache.store(hubert.model_id, sha, features, duration_s=len(wave) / 16000.0), sha, False


def _cached_of_track(cache, model_id: str, data: bytes, sha: str, rows_of):
    """CachedFeatures of what `rows_of(wave_16k)` computes from the audio file `data` (sha256
    `sha`): 50 Hz rows, two per 25 Hz frame; decoded and computed only on a miss."""
    from stages.audio import load_audio

    cached = cache.lookup(model_id, sha)
    if cached is not None:
        return cached
    wave = load_audio(io.BytesIO(data))
    return cache.store(model_id, sha, rows_of(wave), duration_s=len(wave) / 16000.0)


# The speech itself, kept beside its features for `imgtalk train hubert`: the same cache,
# the same 50 Hz rows (320 samples each, two per 25 fps frame), so a chunk's window of it is
# read exactly as its features are.
WAVEFORM_ID = "waveform-16k"
# The speech level the dub's silence gate reads (stages/audio/speech_level.py), each 25 Hz
# frame's value on both of its rows.
SPEECH_LEVEL_ID = "speech-level-db-v1"


def cached_waveform(cache, data: bytes, sha: str):
    """CachedFeatures of the 16 kHz waveform of the audio file `data` (sha256 `sha`), rows of
    320 samples at 50 Hz, zero-padded to whole 40 ms frames; decoded and stored on a miss."""
    from stages.audio.hubert import ROWS_PER_FRAME, SAMPLES_PER_FEATURE, num_feature_frames

    def rows(wave):
        padded = np.zeros(num_feature_frames(len(wave)) * SAMPLES_PER_FEATURE, np.float32)
        padded[: len(wave)] = wave
        return padded.reshape(-1, SAMPLES_PER_FEATURE // ROWS_PER_FRAME)

    return _cached_of_track(cache, WAVEFORM_ID, data, sha, rows)


def cached_speech_level(cache, data: bytes, sha: str):
    """CachedFeatures (dim 1) of the audio file's speech level in dB against its loudest 25 Hz
    frame, each frame's value on both of its 50 Hz rows."""
    from stages.audio.hubert import ROWS_PER_FRAME
    from stages.audio.speech_level import speech_level_db_25hz

    return _cached_of_track(cache, SPEECH_LEVEL_ID, data, sha,
                            lambda wave: np.repeat(speech_level_db_25hz(wave), ROWS_PER_FRAME)[:, None])


def hubert_and_cache(config, bundle, storage):
    """The audio operators' models: HuBERT on the job's device with its chunking, and the
    feature cache under `cache_uri` (config: a dub or prepare job config)."""
    from pipeline.weights import load_hubert
    from stages.audio.cache import FeatureCache
    from stages.completion.stage import resolve_device

    hubert = load_hubert(bundle, device=resolve_device(config.device))
    hubert.chunk_seconds = config.audio.chunk_seconds
    hubert.context_seconds = config.audio.context_seconds
    fs, root = storage.fs_for(config.cache_uri)
    return hubert, FeatureCache(fs, root, retry=storage.retry)
