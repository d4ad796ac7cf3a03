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
