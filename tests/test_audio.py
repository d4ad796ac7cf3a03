"""Audio stage: decoding any container to 16 kHz mono, HuBERT rows at 50 Hz and their
25 Hz pair means, and the 50 Hz feature cache."""
import fractions
import json
import math

import av
import numpy as np
import pytest
import torch
import transformers

from stages.audio import (
    DEFAULT_HUBERT,
    FEATURE_RATE,
    SAMPLE_RATE,
    AudioError,
    HUBERT_RATE,
    HubertFeatures,
    audio_duration,
    hubert_features_25hz,
    hubert_features_50hz,
    hubert_large_config,
    load_audio,
    normalize_waveform,
    pair_mean,
    sample_features,
    steps_per_frame,
    tiny_hubert_config,
)
from stages.audio.cache import ROWS_PER_GROUP, CachedFeatures, FeatureCache, content_hash

SINE_HZ = 440.0
REAL_KERNELS = (10, 3, 3, 3, 3, 2, 2)
REAL_STRIDES = (5, 2, 2, 2, 2, 2, 2)


# ---------------------------------------------------------------- test media, made with PyAV


def _sine(seconds, rate, amplitude=0.5):
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * SINE_HZ * t)).astype(np.float32)


def _add_video(container, seconds):
    stream = container.add_stream("libx264", rate=25)
    stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
    frames = []
    for i in range(int(seconds * 25)):
        frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), (i * 9) % 255, np.uint8), format="rgb24")
        frame.pts = i
        frames.append(frame)
    return stream, frames


def _encode_video(container, stream, frames):
    for frame in frames:
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def write_sine(path, fmt, codec, rate, layout, seconds, video=False, amplitude=0.5, audio_start_s=0.0):
    """A `seconds`-long 440 Hz sine, the same in every channel, optionally beside a video."""
    samples = _sine(seconds, rate, amplitude)
    channels = 2 if layout == "stereo" else 1
    with av.open(str(path), "w", format=fmt) as container:
        if video:
            video_stream, video_frames = _add_video(container, seconds + audio_start_s)
        stream = container.add_stream(codec, rate=rate, layout=layout)
        offset = int(round(audio_start_s * rate))
        for start in range(0, len(samples), 1024):
            block = np.ascontiguousarray(np.repeat(samples[None, start : start + 1024], channels, axis=0))
            frame = av.AudioFrame.from_ndarray(block, format="fltp", layout=layout)
            frame.sample_rate = rate
            frame.pts = offset + start
            frame.time_base = fractions.Fraction(1, rate)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
        if video:
            _encode_video(container, video_stream, video_frames)
    return path


def dominant_hz(x, rate=SAMPLE_RATE):
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spectrum) * rate / len(x)


# Lengths are not whole numbers of codec frames (1024 for AAC, 1152 for MP3) or of
# 44.1k -> 16k resampler steps, so padding or delay would show.
MEDIA = [
    ("speech.wav", "wav", "pcm_s16le", 44100, "stereo", False),
    ("speech.flac", "flac", "flac", 22050, "mono", False),
    ("speech.mp3", "mp3", "libmp3lame", 48000, "mono", False),
    ("speech.m4a", "ipod", "aac", 48000, "stereo", False),
    ("talk.mp4", "mp4", "aac", 48000, "stereo", True),
]


@pytest.mark.parametrize("name,fmt,codec,rate,layout,video", MEDIA, ids=[m[0] for m in MEDIA])
def test_load_audio_any_container_gives_16k_mono_sine(tmp_path, name, fmt, codec, rate, layout, video):
    seconds = 1.37
    path = write_sine(tmp_path / name, fmt, codec, rate, layout, seconds, video=video)
    x = load_audio(path)
    assert x.dtype == np.float32 and x.ndim == 1
    # The resampler is flushed and AAC end padding is cut to the declared duration, so the
    # only slack is rounding: +-1 sample at 16 kHz.
    assert abs(len(x) - round(seconds * SAMPLE_RATE)) <= 1
    assert np.abs(x).max() <= 1.0
    assert abs(dominant_hz(x) - SINE_HZ) < 2.0
    assert audio_duration(path) == pytest.approx(seconds, abs=1e-3)
    # Bytes and open binary files decode to the same samples as the path.
    raw = path.read_bytes()
    np.testing.assert_array_equal(load_audio(raw), x)
    with open(path, "rb") as f:
        np.testing.assert_array_equal(load_audio(f), x)


def test_load_audio_keeps_level_and_clips_loud_stereo_downmix(tmp_path):
    quiet = load_audio(write_sine(tmp_path / "quiet.flac", "flac", "flac", 16000, "mono", 1.0, amplitude=0.25))
    assert np.abs(quiet).max() == pytest.approx(0.25, abs=0.01)
    # swresample sums in-phase stereo at -3 dB: 0.9 * 1.414 > 1 must come back clipped.
    loud = load_audio(write_sine(tmp_path / "loud.wav", "wav", "pcm_s16le", 16000, "stereo", 1.0, amplitude=0.9))
    assert np.abs(loud).max() <= 1.0
    assert np.isclose(np.abs(loud), 1.0, atol=1e-6).sum() > 100


def test_audio_that_starts_after_the_video_is_preceded_by_silence(tmp_path):
    path = write_sine(tmp_path / "late.mp4", "mp4", "aac", 48000, "mono", 1.0, video=True, audio_start_s=0.5)
    x = load_audio(path)
    onset = int(np.argmax(np.abs(x) > 0.25))
    # AAC's pre-roll and edit list leave the onset within 1 ms of 0.5 s.
    assert abs(onset - SAMPLE_RATE // 2) <= 16
    assert np.abs(x[: int(0.45 * SAMPLE_RATE)]).max() < 0.02
    assert abs(len(x) - int(1.5 * SAMPLE_RATE)) <= 16
    assert audio_duration(path) == pytest.approx(1.5, abs=2e-3)


def test_file_without_audio_stream_raises_naming_file(tmp_path):
    path = tmp_path / "silent_film.mp4"
    with av.open(str(path), "w", format="mp4") as container:
        stream, frames = _add_video(container, 0.4)
        _encode_video(container, stream, frames)
    for read in (load_audio, audio_duration):
        with pytest.raises(AudioError, match="silent_film.mp4.*no audio stream"):
            read(path)


def test_corrupt_and_missing_files_raise_naming_file(tmp_path):
    corrupt = tmp_path / "corrupt_dub.m4a"
    corrupt.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(AudioError, match="corrupt_dub.m4a"):
        load_audio(corrupt)
    with pytest.raises(AudioError, match="corrupt_dub.m4a"):
        audio_duration(corrupt)
    with pytest.raises(AudioError, match="no_such_take.wav.*no such file"):
        load_audio(tmp_path / "no_such_take.wav")
    with pytest.raises(AudioError, match="bytes"):
        load_audio(corrupt.read_bytes())
    with pytest.raises(AudioError, match="empty"):
        load_audio(b"")


# ---------------------------------------------------------------- HuBERT


def speechlike(seconds, seed=0):
    """Voiced harmonics with a gliding pitch, syllable-rate envelope and breath noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * SAMPLE_RATE))) / SAMPLE_RATE
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = np.clip(np.sin(2 * np.pi * 4 * t + rng.uniform(0, 6)), 0, None) ** 2
    return (0.3 * envelope * voiced + 0.02 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.fixture
def tiny_model():
    return transformers.HubertModel(tiny_hubert_config()).eval()


def test_configs_keep_the_real_conv_stack():
    tiny, large = tiny_hubert_config(), hubert_large_config()
    for config in (tiny, large):
        assert tuple(config.conv_kernel) == REAL_KERNELS and tuple(config.conv_stride) == REAL_STRIDES
        assert config.feat_extract_norm == "layer" and config.do_stable_layer_norm
        assert config.num_conv_pos_embeddings == 128
    assert math.prod(REAL_STRIDES) == 320  # 20 ms hop at 16 kHz
    assert tiny.hidden_size == 32 and tiny.num_hidden_layers == 2 and max(tiny.conv_dim) <= 64
    assert tiny_hubert_config(48).hidden_size == 48


@pytest.mark.parametrize("seconds,frames", [(1.0, 25), (2.0, 50), (3.5, 88), (0.04, 1), (0.0401, 2)])
def test_feature_count_is_ceil_of_40ms_blocks(tiny_model, seconds, frames):
    # 3.5 s = 87.5 frames: a partial 40 ms block counts as a frame (ceil).
    # The stage returns HuBERT's 50 Hz rows, two per 25 Hz frame.
    stage = HubertFeatures(tiny_model)
    rows = stage(speechlike(seconds))
    assert rows.shape == (2 * frames, 32) and rows.dtype == np.float32
    assert stage.hidden_size == 32 and stage.feature_rate == HUBERT_RATE == 50
    assert np.isfinite(rows).all()
    assert hubert_features_25hz(tiny_model, speechlike(seconds)).shape == (frames, 32)


def test_empty_and_bad_waveforms(tiny_model):
    for features in (hubert_features_25hz, hubert_features_50hz):
        assert features(tiny_model, np.zeros(0, np.float32), 20.0, 2.0).shape == (0, 32)
        with pytest.raises(ValueError, match="1-D"):
            features(tiny_model, np.zeros((2, 16000), np.float32), 20.0, 2.0)


def test_normalisation_matches_wav2vec2_feature_extractor():
    extractor = transformers.Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=True, return_attention_mask=True
    )
    # A quiet signal makes the epsilon matter: var ~ 2e-8, so 1e-7 vs 1e-5 differs a lot.
    for x in (speechlike(1.3, seed=3), 2e-4 * speechlike(0.7, seed=4) + 0.01):
        expected = extractor(x, sampling_rate=SAMPLE_RATE, return_tensors="np").input_values[0]
        np.testing.assert_allclose(normalize_waveform(x), expected, rtol=1e-5, atol=1e-5)


def test_features_are_invariant_to_level_and_dc(tiny_model):
    # Whole-utterance normalisation: gain and offset do not change the features.
    x = speechlike(2.0, seed=5)
    a = hubert_features_25hz(tiny_model, x, 0.8, 0.4)
    b = hubert_features_25hz(tiny_model, 0.1 * x + 0.05, 0.8, 0.4)
    np.testing.assert_allclose(a, b, atol=2e-3)


def _relative_l2(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_chunked_features_match_whole_utterance(tiny_model):
    x = speechlike(8.3, seed=1)  # 2 s chunks -> 5 windows, the last partial
    whole = hubert_features_25hz(tiny_model, x, math.inf, 0.0)
    assert whole.shape == (208, 32)

    # Tolerances from the measurement in stages/audio/hubert.py (mid-size model, 2 s
    # context: max 0.046, relative L2 0.0093; this tiny model with 1.5 s: up to 0.06 and
    # 0.017), with ~3x margin.
    chunked = hubert_features_25hz(tiny_model, x, 2.0, 1.5)
    assert np.abs(chunked - whole).max() < 0.15
    assert _relative_l2(chunked, whole) < 0.03

    # More context, less difference: below 1.28 s the positional conv (128 taps at
    # 50 Hz) is cut at window edges, so the steps are large.
    errors = [_relative_l2(hubert_features_25hz(tiny_model, x, 2.0, c), whole) for c in (0.0, 0.5, 1.0, 1.5)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 3 * errors[-1]

    # Context that covers the whole file makes every window the whole file.
    np.testing.assert_array_equal(hubert_features_25hz(tiny_model, x, 2.0, 10.0), whole)


def test_save_pretrained_round_trip_and_model_id(tiny_model, tmp_path):
    x = speechlike(1.5, seed=2)
    folder = tmp_path / "hubert-tiny"
    tiny_model.save_pretrained(folder)
    from_memory = HubertFeatures(tiny_model)
    from_folder = HubertFeatures(str(folder))
    np.testing.assert_array_equal(from_folder(x), from_memory(x))
    assert from_folder.model_id.startswith("hubert-tiny-")
    # The id names the 50 Hz output, so entries of the former 25 Hz cache never match.
    assert from_folder.model_id.endswith("-50hz") and from_memory.model_id.endswith("-50hz")
    assert HubertFeatures(folder).model_id == from_folder.model_id  # stable across loads

    with torch.no_grad():
        tiny_model.encoder.layers[0].feed_forward.output_dense.bias.add_(1e-3)
    assert HubertFeatures(tiny_model).model_id != from_memory.model_id
    tiny_model.save_pretrained(folder)
    changed = HubertFeatures(folder)
    assert changed.model_id != from_folder.model_id
    assert not np.array_equal(changed(x), from_folder(x))


def test_hub_id_is_never_fetched_without_allow_download(monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("from_pretrained must not be called")

    monkeypatch.setattr(transformers.HubertModel, "from_pretrained", no_hub)
    with pytest.raises(AudioError, match=r"facebook/hubert-large-ls960-ft.*allow_download=True"):
        HubertFeatures(DEFAULT_HUBERT)


def test_allow_download_asks_the_hub(monkeypatch):
    calls = []

    def fake_hub(source, **kwargs):
        calls.append((source, kwargs))
        return transformers.HubertModel(tiny_hubert_config())

    monkeypatch.setattr(transformers.HubertModel, "from_pretrained", fake_hub)
    stage = HubertFeatures(DEFAULT_HUBERT, allow_download=True)
    assert calls == [(DEFAULT_HUBERT, {"local_files_only": False})]
    assert stage.model_id.startswith("facebook--hubert-large-ls960-ft-cfg") and stage.model_id.endswith("-50hz")


def test_folder_without_weights_raises_naming_folder(tmp_path):
    folder = tmp_path / "half-copied"
    folder.mkdir()
    tiny_hubert_config().save_pretrained(folder)
    with pytest.raises(AudioError, match="half-copied"):
        HubertFeatures(folder)


def test_sample_features_by_time():
    features = np.repeat(np.arange(30, dtype=np.float32)[:, None], 4, axis=1)  # row j holds j
    # 25 fps: frame i at i / 25 s gets row i exactly, float error in i / 25 included.
    np.testing.assert_array_equal(sample_features(features, np.arange(30) / 25.0), features)

    def rows(times):
        return sample_features(features, np.asarray(times))[:, 0].astype(int).tolist()

    # 29.97 fps, t = i * 1001 / 30000, 25 t = 0, 0.83, 4.17, 5.005, 24.19, 25.03
    assert rows([i * 1001 / 30000 for i in (0, 1, 5, 6, 29, 30)]) == [0, 0, 4, 5, 24, 25]
    # 50 fps: two video frames per feature row.
    assert rows([i / 50 for i in (0, 1, 2, 3, 48, 49)]) == [0, 0, 1, 1, 24, 24]
    # Outside the audio: clamp to the first and last rows.
    assert rows([-0.5, 1.19, 1.2, 100.0]) == [0, 29, 29, 29]
    with pytest.raises(ValueError):
        sample_features(np.zeros((0, 4)), np.zeros(3))


def test_paper_size_hubert_large_forward():
    config = hubert_large_config()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (1024, 24, 16)
    assert config.intermediate_size == 4096 and tuple(config.conv_dim) == (512,) * 7
    assert config.conv_bias and config.feat_proj_layer_norm and config.num_conv_pos_embedding_groups == 16
    model = transformers.HubertModel(config)
    # HuBERT Large has ~316 M parameters (ours lacks only the CTC head).
    assert 310e6 < sum(p.numel() for p in model.parameters()) < 320e6
    features = HubertFeatures(model)(speechlike(1.0))
    assert features.shape == (2 * FEATURE_RATE, 1024)
    assert np.isfinite(features).all() and features.std() > 0.1


# ---------------------------------------------------------------- HuBERT at 50 Hz


def _padded(x):
    """The normalised waveform padded as in stages/audio/hubert.py: ceil(N / 640) blocks, 40 each side."""
    n = -(-len(x) // 640)
    padded = np.zeros(n * 640 + 80, np.float32)
    padded[40 : 40 + len(x)] = normalize_waveform(x)
    return torch.from_numpy(padded)


def _old_features_25hz(model, waveform, chunk_seconds, context_seconds):
    """The 25 Hz implementation before the 50 Hz split, verbatim: results must not change."""
    n = -(-len(waveform) // 640)
    padded = _padded(waveform)
    chunk = n if math.isinf(chunk_seconds) else max(1, round(chunk_seconds * 25))
    context = max(0, round(context_seconds * 25))
    out = np.empty((n, model.config.hidden_size), np.float32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        first, last = max(0, start - context), min(n, stop + context)
        with torch.inference_mode():
            hidden = model(padded[first * 640 : last * 640 + 80][None]).last_hidden_state[0]
            feats = hidden.float().reshape(last - first, 2, -1).mean(dim=1)
        out[start:stop] = feats[start - first : stop - first].numpy()
    return out


@pytest.mark.parametrize("chunk,context", [(math.inf, 0.0), (0.8, 0.4), (1.0, 0.0)])
def test_50hz_pair_means_are_the_25hz_features_exactly(tiny_model, chunk, context):
    x = speechlike(2.33, seed=6)  # 58.25 blocks -> 59 frames, 118 rows
    rows = hubert_features_50hz(tiny_model, x, chunk, context)
    assert rows.shape == (118, 32) and rows.dtype == np.float32
    features = hubert_features_25hz(tiny_model, x, chunk, context)
    np.testing.assert_array_equal(pair_mean(rows), features)
    np.testing.assert_array_equal(features, _old_features_25hz(tiny_model, x, chunk, context))
    # The two rows of a pair really differ: 50 Hz carries detail that 25 Hz averages away.
    assert np.abs(rows[0::2] - rows[1::2]).mean() > 1e-3


def test_50hz_rows_are_hubert_frames_and_chunks_keep_pairs_whole(tiny_model):
    x = speechlike(8.3, seed=1)  # 208 frames; 2 s chunks (50 frames), 1.5 s context (38 frames)
    padded = _padded(x)
    with torch.inference_mode():
        direct = tiny_model(padded[None]).last_hidden_state[0].numpy()
    whole = hubert_features_50hz(tiny_model, x, math.inf, 0.0)
    assert whole.shape == (416, 32)
    np.testing.assert_array_equal(whole, direct)

    chunked = hubert_features_50hz(tiny_model, x, 2.0, 1.5)
    np.testing.assert_array_equal(pair_mean(chunked), hubert_features_25hz(tiny_model, x, 2.0, 1.5))
    # Chunk 2 keeps frames [100, 150) = rows [200, 300) of a run over frames [62, 188):
    # the window starts on the 640-sample grid, so its rows pair up as in the whole file.
    with torch.inference_mode():
        window = tiny_model(padded[62 * 640 : 188 * 640 + 80][None]).last_hidden_state[0].numpy()
    np.testing.assert_array_equal(chunked[200:300], window[2 * 38 : 2 * 88])
    assert not np.array_equal(chunked[200:300], whole[200:300])  # context really is cut
    # Context that covers the whole file makes every window the whole file.
    np.testing.assert_array_equal(hubert_features_50hz(tiny_model, x, 2.0, 10.0), whole)


def test_steps_per_frame_maps_50hz_rows_to_k():
    rows = np.arange(12, dtype=np.float32).reshape(6, 2)  # 3 frames
    np.testing.assert_array_equal(steps_per_frame(rows, 2), rows)
    np.testing.assert_array_equal(steps_per_frame(rows, 1), [[1, 2], [5, 6], [9, 10]])
    assert steps_per_frame(rows, 1).dtype == np.float32
    for k in (3, 0, 4):
        with pytest.raises(ValueError, match=f"k={k}"):
            steps_per_frame(rows, k)
    with pytest.raises(ValueError, match="even"):
        steps_per_frame(rows[:5], 2)
    assert steps_per_frame(np.zeros((0, 2), np.float32), 1).shape == (0, 2)


# ---------------------------------------------------------------- feature cache at 50 Hz


@pytest.fixture
def cache(tmp_path):
    import fsspec

    return FeatureCache(fsspec.filesystem("file"), str(tmp_path / "cache"))


def test_cache_round_trip_of_50hz_rows(cache, tiny_model):
    import pyarrow.parquet as pq

    stage = HubertFeatures(tiny_model)
    x = speechlike(1.3, seed=8)
    rows = stage(x)  # 33 frames, 66 rows
    sha = content_hash(x.tobytes())
    assert cache.lookup(stage.model_id, sha) is None
    stored = cache.store(stage.model_id, sha, rows, duration_s=1.3)
    hit = cache.lookup(stage.model_id, sha)
    assert hit == stored and hit.n_frames == 33 and hit.n_rows == 66 and hit.dim == 32
    np.testing.assert_array_equal(cache.read_window(hit, 0, hit.n_frames), rows)
    np.testing.assert_array_equal(pair_mean(cache.read_window(hit, 5, 9)), hubert_features_25hz(tiny_model, x)[5:9])
    info = json.loads(pq.ParquetFile(hit.path).schema_arrow.metadata[b"imgtalk"])
    assert info["feature_rate"] == 50 and info["n_frames"] == 33 and info["n_rows"] == 66
    assert cache.lookup(stage.model_id.removesuffix("-50hz"), sha) is None  # the old 25 Hz key

    with pytest.raises(ValueError, match="odd"):
        cache.store("m", sha, rows[:-1], duration_s=1.3)
    with pytest.raises(ValueError, match="shape"):
        cache.store("m", sha, rows[0], duration_s=1.3)


def test_cache_read_window_at_any_window_across_row_groups(cache):
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    rows = rng.standard_normal((1234, 8)).astype(np.float32)  # 617 frames, 24.68 s
    cached = cache.store("m1", "a" * 64, rows, duration_s=24.68)
    assert cached.n_frames == 617
    groups = [pq.ParquetFile(cached.path).metadata.row_group(i).num_rows for i in range(3)]
    assert groups == [ROWS_PER_GROUP, ROWS_PER_GROUP, 234] and ROWS_PER_GROUP % 2 == 0
    # Frames 250 and 500 start row groups 1 and 2; windows across and on those edges.
    windows = [(240, 260), (249, 251), (250, 251), (0, 1), (499, 501), (250, 500), (100, 617), (616, 617)]
    windows += [tuple(sorted(rng.integers(0, 617, 2))) for _ in range(20)]
    for start, stop in windows:
        got = cache.read_window(cached, int(start), int(stop))
        assert got.shape == (2 * (stop - start), 8), (start, stop)
        np.testing.assert_array_equal(got, rows[2 * start : 2 * stop])
    # Clamped to the file.
    np.testing.assert_array_equal(cache.read_window(cached, -5, 3), rows[:6])
    np.testing.assert_array_equal(cache.read_window(cached, 600, 700), rows[1200:])
    assert cache.read_window(cached, 700, 800).shape == (0, 8)
    assert cache.read_window(cached, 10, 10).shape == (0, 8)
    # A CachedFeatures rebuilt from row fields (as the pipeline does) reads the same.
    rebuilt = CachedFeatures(cached.path, 617, 24.68, 8)
    np.testing.assert_array_equal(cache.read_window(rebuilt, 249, 251), rows[498:502])


def test_cache_file_of_another_rate_is_a_miss(cache):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = cache.path("m1", "b" * 64)
    cache.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    info = {"n_frames": 4, "dim": 2, "duration_s": 0.16, "feature_rate": 25}
    table = pa.table({"frame": pa.array(np.arange(4, dtype=np.int32))})
    pq.write_table(table.replace_schema_metadata({b"imgtalk": json.dumps(info).encode()}), path)
    assert cache.lookup("m1", "b" * 64) is None


def test_speech_level_is_the_voice_band_against_the_loudest_frame():
    """0 dB on the loudest frames, -20 dB for a tone at a tenth of the amplitude, and mains
    hum (50 Hz, below the voice band) far below the silence gate's -35 dB however loud it is.
    F frames as HuBERT counts them (a partial 40 ms counts)."""
    from stages.audio import num_feature_frames
    from stages.audio.speech_level import FLOOR_DB, speech_level_db_25hz

    t = np.arange(16000) / 16000.0  # 1 s: 25 frames of 640 samples
    tone = np.sin(2 * np.pi * 1000 * t).astype(np.float32)
    hum = 0.9 * np.sin(2 * np.pi * 50 * t).astype(np.float32)
    wave = np.concatenate([0.5 * tone, 0.05 * tone, hum, np.zeros(320, np.float32)])  # 75.5 frames
    level = speech_level_db_25hz(wave)
    assert level.shape == (num_feature_frames(len(wave)),) == (76,) and level.dtype == np.float32
    inner = slice(3, 22)  # away from each second's edges, where the filter rings across
    np.testing.assert_allclose(level[:25][inner], 0.0, atol=0.1)
    np.testing.assert_allclose(level[25:50][inner], -20.0, atol=0.1)
    assert (level[50:75][inner] < -50.0).all()
    assert (speech_level_db_25hz(np.zeros(1000, np.float32)) == FLOOR_DB).all()


def test_cached_speech_level_holds_each_frames_level_on_both_rows(cache, tmp_path):
    from pipeline.features import TrackAudio, cached_speech_level
    from stages.synth.speaker import write_wav
    from stages.audio.speech_level import speech_level_db_25hz

    rng = np.random.default_rng(0)
    wave = np.concatenate([rng.normal(0, 0.3, 8000), np.zeros(8000), rng.normal(0, 0.01, 4000)]).astype(np.float32)
    path = tmp_path / "speech.wav"
    write_wav(str(path), wave)
    track = TrackAudio(path.read_bytes())
    assert track.sha == content_hash(path.read_bytes())
    stored = cached_speech_level(cache, track)
    assert stored.dim == 1 and stored.n_frames == 32
    rows = cache.read_window(stored, 0, stored.n_frames)[:, 0]
    expected = speech_level_db_25hz(load_audio(str(path)))
    np.testing.assert_array_equal(rows[0::2], expected)
    np.testing.assert_array_equal(rows[1::2], expected)
    assert rows.max() == 0.0 and rows[:24].min() > -3.0 and rows[2 * 14:2 * 23].max() < -35.0  # speech, then silence
    # Found again by content, never recomputed: the same file comes back.
    again = TrackAudio(path.read_bytes())
    assert cached_speech_level(cache, again).path == stored.path and again._wave is None
