"""HuBERT features of an audio file through the content-addressed cache: shared by the dub
job's and the prepare job's audio operators."""
from __future__ import annotations

import io

import numpy as np


class TrackAudio:
    """One audio file: its bytes, their sha256 (the cache's key) and its 16 kHz mono samples,
    decoded once, when something not in the cache first needs them."""

    def __init__(self, data: bytes):
        from stages.audio.cache import content_hash

        self.data = data
        self.sha = content_hash(data)
        self._wave: np.ndarray | None = None

    @property
    def wave(self) -> np.ndarray:
        if self._wave is None:
            from stages.audio import load_audio

            self._wave = load_audio(io.BytesIO(self.data))
        return self._wave


def cached_features(cache, hubert, track: TrackAudio):
    """(CachedFeatures, cache hit) of the track: read from the cache when this model has seen
    these bytes before, else computed and stored."""
    from stages.audio import AudioError

    cached = cache.lookup(hubert.model_id, track.sha)
    if cached is not None:
        return cached, True
    if len(track.wave) == 0:
        raise AudioError("no samples")
    return _store(cache, hubert.model_id, track, hubert(track.wave)), False


def _store(cache, model_id: str, track: TrackAudio, rows_50hz: np.ndarray):
    return cache.store(model_id, track.sha, rows_50hz, duration_s=len(track.wave) / 16000.0)


def _cached_of_track(cache, model_id: str, track: TrackAudio, rows_of):
    """CachedFeatures of what `rows_of(wave_16k)` computes from the track: 50 Hz rows, two
    per 25 Hz frame; computed only on a miss."""
    cached = cache.lookup(model_id, track.sha)
    return cached if cached is not None else _store(cache, model_id, track, rows_of(track.wave))


# The speech itself, kept beside its features for `imgtalk train hubert`: the same cache,
# the same 50 Hz rows (320 samples each, two per 25 fps frame), so a chunk's window of it is
# read exactly as its features are.
WAVEFORM_ID = "waveform-16k"
# The speech level the dub's silence gate reads (stages/audio/speech_level.py), each 25 Hz
# frame's value on both of its rows.
SPEECH_LEVEL_ID = "speech-level-db-v1"


def cached_waveform(cache, track: TrackAudio):
    """CachedFeatures of the track's 16 kHz waveform, rows of 320 samples at 50 Hz,
    zero-padded to whole 40 ms frames."""
    from stages.audio.hubert import ROWS_PER_FRAME, SAMPLES_PER_FEATURE, num_feature_frames

    def rows(wave):
        padded = np.zeros(num_feature_frames(len(wave)) * SAMPLES_PER_FEATURE, np.float32)
        padded[: len(wave)] = wave
        return padded.reshape(-1, SAMPLES_PER_FEATURE // ROWS_PER_FRAME)

    return _cached_of_track(cache, WAVEFORM_ID, track, rows)


def cached_speech_level(cache, track: TrackAudio):
    """CachedFeatures (dim 1) of the track's speech level in dB against its loudest 25 Hz
    frame, each frame's value on both of its 50 Hz rows."""
    from stages.audio.hubert import ROWS_PER_FRAME
    from stages.audio.speech_level import speech_level_db_25hz

    return _cached_of_track(cache, SPEECH_LEVEL_ID, track,
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
