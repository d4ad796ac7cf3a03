"""HuBERT features of an audio file through the content-addressed cache: shared by the dub
job's and the prepare job's audio operators."""
from __future__ import annotations

import io


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
