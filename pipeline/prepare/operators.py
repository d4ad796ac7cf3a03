"""Ray Data operators of `imgtalk prepare`: thin wrappers that open URIs, call a Ray-free
stage (probe, HuBERT through the feature cache shared with dub, the corpus chunk stage)
and write one shard file per chunk, atomically.

A shard is `<out>/chunks/<video_id>/<chunk_idx>.parquet`: one row whose array columns
are `.npy` bytes (pipeline.arrays) and whose `crops` column holds one JPEG/PNG per frame.
A video counts as prepared only once the driver has written `<out>/videos/<video_id>.json`
after all its chunks are in, so a crash never leaves a half-prepared video that training
or a rerun would take for a whole one.
"""
from __future__ import annotations

import io
import json
import math
import os
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

os.environ.setdefault("GLOG_minloglevel", "2")

from pipeline.arrays import pack
from pipeline.features import TrackAudio, cached_features, cached_waveform, hubert_and_cache
from pipeline.prepare.config import PrepareConfig
from pipeline.steps import ConfiguredOp, RowError, make_row_step, open_source, video_subject
from pipeline.storage import join_uri
from pipeline.weights import load_motion_extractor

ROW_DEFAULTS: dict = {
    "row_index": -1,
    "video_id": "",
    "video_uri": "",
    "audio_uri": "",  # "" = the video's own audio stream
    "speaker_id": "",
    "error": "",
    "error_stage": "",
    "fps_num": 0,
    "fps_den": 1,
    "source_frames": 0,
    "frames": 0,  # at 25 fps
    "features_path": "",
    "feature_frames": 0,
    "feature_dim": 0,
    "wave_path": "",  # the speech's 16 kHz samples in the feature cache (pipeline/features.py)
    "chunk_idx": -1,
    "n_chunks": 0,
    "first": 0,
    "stop": 0,
    "chunk_uri": "",
    "summary": "",  # JSON: counts, sums, neutral candidate of the chunk
    "time_plan_s": 0.0,
    "time_audio_s": 0.0,
    "time_chunk_s": 0.0,
}

SHARD_ARRAYS = ("has_face", "shot", "x_c", "exp", "R", "t", "scale", "pose", "mouth_open", "audio", "wave")


def normalise(row: dict) -> dict:
    out = dict(ROW_DEFAULTS)
    for k in ROW_DEFAULTS:
        if k in row:
            v = row[k]
            out[k] = v.item() if isinstance(v, np.generic) else v
    return out


def fail(row: dict, stage: str, error: str) -> dict:
    return dict(row, error=error, error_stage=stage)


row_step = make_row_step(normalise, lambda row: bool(row["error"]), fail)


def _audio(row: dict) -> str:
    return f"audio {row['audio_uri'] or row['video_uri']}"


def _chunk(row: dict) -> str:
    return f"video {row['video_uri']} chunk {row['chunk_idx']}"


class _Op(ConfiguredOp):
    config_model = PrepareConfig


class PrepPlanOp(_Op):
    """Probe the video: its rate and length, and so its 25 fps frame count."""

    @row_step("plan", video_subject)
    def __call__(self, row: dict) -> dict:
        from stages.media import probe_video
        from stages.media.probe import codec_threads

        with open_source(self.storage, row["video_uri"]) as src:
            info = probe_video(src, threads=codec_threads(self.config.pools["plan"].num_cpus))
        frames = int(math.floor(info.duration_s * 25 + 1e-6))
        if frames < 1:
            raise RowError(f"video {row['video_uri']}: shorter than one frame at 25 fps")
        return dict(fps_num=info.fps.numerator, fps_den=info.fps.denominator, source_frames=info.n_frames, frames=frames)


class PrepAudioOp(_Op):
    """HuBERT features of the speech (the audio file, or the video's own audio stream), and
    the speech's samples for `imgtalk train hubert`, both in the feature cache."""

    def __init__(self, config: dict, weights_uri: str):
        super().__init__(config, weights_uri)
        self.hubert, self.cache = hubert_and_cache(self.config, self.bundle, self.storage)

    @row_step("audio", _audio)
    def __call__(self, row: dict) -> dict:
        track = TrackAudio(self.storage.read_bytes(row["audio_uri"] or row["video_uri"]))
        cached, _ = cached_features(self.cache, self.hubert, track)
        wave = cached_waveform(self.cache, track)
        return dict(features_path=cached.path, feature_frames=cached.n_frames, feature_dim=cached.dim, wave_path=wave.path)


def chunk_splitter(chunk_seconds: float):
    """flat_map function: one video row -> its chunk rows (the row itself when it already failed)."""
    size = max(1, round(25 * chunk_seconds))

    def split(row: dict) -> list[dict]:
        row = normalise(row)
        if row["error"]:
            return [row]
        n_chunks = -(-int(row["frames"]) // size)
        return [dict(row, chunk_idx=i, n_chunks=n_chunks, first=s, stop=min(s + size, int(row["frames"])))
                for i, s in enumerate(range(0, int(row["frames"]), size))]

    return split


def shard_uri(output_uri: str, video_id: str, chunk_idx: int) -> str:
    return join_uri(output_uri, "chunks", video_id, f"{int(chunk_idx):05d}.parquet")


def shard_bytes(row: dict, chunk: dict) -> bytes:
    columns = {
        "video_id": [row["video_id"]],
        "speaker_id": [row["speaker_id"]],
        "chunk_idx": [int(row["chunk_idx"])],
        "frame_start": [int(row["first"])],
        "n": [int(chunk["n"])],
        "crops": [list(chunk["crops"])],
        **{k: [pack(np.asarray(chunk[k]))] for k in SHARD_ARRAYS},
    }
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue()


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


class ChunkOp(_Op):
    """Decode the chunk at 25 fps, track and crop the face, run the motion extractor on
    the stored crops, attach the HuBERT rows, write the shard."""

    def __init__(self, config: dict, weights_uri: str, output_uri: str):
        from stages.audio.cache import FeatureCache
        from stages.completion.stage import resolve_device
        from stages.corpus.chunk import ChunkSettings, CorpusChunkStage
        from stages.face import FaceTracker
        from stages.media.probe import codec_threads

        super().__init__(config, weights_uri)
        c = self.config
        tracker = FaceTracker(min_detection_confidence=c.face.min_detection_confidence,
                              smoothing_sigma_frames=c.face.smoothing_sigma_frames, max_gap_frames=c.face.max_gap_frames)
        extractor = load_motion_extractor(self.bundle).to(resolve_device(c.device))
        settings = ChunkSettings(crop_format=c.crop_format, jpeg_quality=c.jpeg_quality, min_face_px=c.min_face_px,
                                 max_abs_yaw_deg=c.max_abs_yaw_deg, cut_threshold=c.cut_threshold)
        self.stage = CorpusChunkStage(tracker, extractor, settings, batch_frames=c.motion_frames,
                                      threads=codec_threads(c.pools["chunk"].num_cpus))
        fs, root = self.storage.fs_for(c.cache_uri)
        self.cache = FeatureCache(fs, root)
        self.output_uri = output_uri

    def _wave(self, row: dict, first: int, stop: int) -> np.ndarray:
        """(stop - first, 640) int16: the speech of each frame, silence past its end."""
        from stages.audio.cache import CachedFeatures
        from stages.audio.hubert import ROWS_PER_FRAME, SAMPLES_PER_FEATURE

        cached = CachedFeatures(row["wave_path"], int(row["feature_frames"]), 0.0, SAMPLES_PER_FEATURE // ROWS_PER_FRAME)
        samples = self.cache.read_window(cached, first, stop).reshape(-1)
        frames = np.zeros((stop - first) * SAMPLES_PER_FEATURE, np.float32)
        frames[: len(samples)] = samples
        pcm = np.round(np.clip(frames, -1.0, 32767 / 32768) * 32768).astype(np.int16)
        return pcm.reshape(stop - first, SAMPLES_PER_FEATURE)

    @row_step("chunk", _chunk)
    def __call__(self, row: dict) -> dict:
        from stages.audio.cache import CachedFeatures

        first, stop = int(row["first"]), int(row["stop"])
        cached = CachedFeatures(row["features_path"], int(row["feature_frames"]), 0.0, int(row["feature_dim"]))
        audio = self.cache.read_window(cached, first, stop)
        want = 2 * (stop - first)
        if len(audio) < want:  # the speech ends before the picture: those frames are not trained on
            audio = np.concatenate([audio, np.zeros((want - len(audio), cached.dim), np.float32)])
        with open_source(self.storage, row["video_uri"]) as src:
            chunk = self.stage(src, Fraction(int(row["fps_num"]), int(row["fps_den"])), int(row["source_frames"]),
                               first, stop, audio, int(row["feature_frames"]))
        chunk["wave"] = self._wave(row, first, stop)
        uri = shard_uri(self.output_uri, row["video_id"], row["chunk_idx"])
        self.storage.write_bytes_atomic(shard_bytes(row, chunk), uri)
        summary = {"counts": chunk["counts"], "sums": _jsonable(chunk["sums"]), "neutral": _jsonable(chunk["neutral"])}
        return dict(chunk_uri=uri, summary=json.dumps(summary))
