"""The row that flows through the Ray Data graph.

Every row has every key from the start, so all blocks share one Arrow schema whatever
stage a row failed in. Arrays travel as `.npy` bytes (pipeline.arrays).
Every row carries (video_id, seg_idx, frame range); order is restored by key, never by
arrival.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np

from pipeline.arrays import pack, unpack  # noqa: F401 - the row's array format


HEAVY_KEYS = ("crops", "affines", "has_face", "driving", "ref_index", "shows_reference", "generated")

ROW_DEFAULTS: dict = {
    # identity
    "job_id": "",
    "row_index": -1,
    "video_id": "",
    "video_uri": "",
    "audio_uri": "",
    "output_uri": "",
    "crf": -1,  # -1: job default
    "segment_seconds": 0.0,
    "face": "largest",  # who is dubbed: RowOptions.face_key()
    "audio_mode": "replace",  # RowOptions.audio_mode
    "audio_language": "",  # RowOptions.audio_language; "": the dub file's own tag
    # failure, if any
    "error": "",
    "error_stage": "",
    # plan
    "width": 0,
    "height": 0,
    "fps_num": 0,
    "fps_den": 1,
    "n_frames": 0,
    "duration_s": 0.0,
    "rotation": 0,
    # plan: the source's pixel format and colour coding (AVColor* values; 2/2/2/0 untagged),
    # which the output keeps, and its codec, bit rate and GOP (for codec: match-source)
    "pix_fmt": "",
    "color_primaries": 2,
    "color_trc": 2,
    "colorspace": 2,
    "color_range": 0,
    "bit_depth": 8,
    "source_codec": "",
    "source_bit_rate": 0,
    "source_gop": 0,
    "mastering_display": "",  # HDR10 static metadata (VideoInfo's x265 notation), written to the output
    "content_light": "",
    # analyse
    "neutral_frame": -1,
    "neutral_x_c": b"",
    "neutral_exp": b"",
    "ref_frames": b"",
    "ref_crops_uri": "",  # the reference bank (R, 256, 256, 3) uint8 as .npy in the work area
    "ref_pose": b"",
    "sampled_face_fraction": 0.0,
    "face_identity": b"",  # the dubbed person's signature (stages.face.identity), for every segment
    # audio
    "audio_sha256": "",
    "features_path": "",
    "speech_level_path": "",  # the track's speech level per frame (pipeline.features.cached_speech_level)
    "feature_frames": 0,
    "feature_dim": 0,
    "audio_duration_s": 0.0,
    "cache_hit": False,
    # segment
    "seg_idx": -1,
    "n_segments": 0,
    "frame_start": 0,
    "frame_end": 0,
    "face_frames": 0,
    "crops": b"",
    "affines": b"",
    "has_face": b"",
    "driving": b"",
    "ref_index": b"",
    "shows_reference": b"",  # (N,) bool: the silence gate shows the frame's reference crop (colour-matched), not Stage 2's
    "generated": b"",
    "segment_uri": "",
    "segment_frames": 0,
    # resume: what the segment's work location is keyed by, and whether a committed
    # segment from an earlier run stands in for face..compose
    "work_key": "",
    "segment_reused": False,
    # seconds spent per stage
    "time_plan_s": 0.0,
    "time_analyse_s": 0.0,
    "time_audio_s": 0.0,
    "time_face_s": 0.0,
    "time_motion_s": 0.0,
    "time_complete_s": 0.0,
    "time_compose_s": 0.0,
}


def new_row(**values) -> dict:
    unknown = set(values) - set(ROW_DEFAULTS)
    if unknown:
        raise KeyError(f"unknown row keys {sorted(unknown)}")
    return {**ROW_DEFAULTS, **values}


def normalise(row: dict) -> dict:
    """Ray may hand back numpy scalars; keep the row plain and complete."""
    out = dict(ROW_DEFAULTS)
    for k in ROW_DEFAULTS:
        if k in row:
            v = row[k]
            if isinstance(v, np.generic):
                v = v.item()
            out[k] = v
    return out


def fps_of(row: dict) -> Fraction:
    return Fraction(int(row["fps_num"]), int(row["fps_den"]))


def fail(row: dict, stage: str, error: BaseException | str) -> dict:
    """Mark a row failed; drop its heavy payload so it travels cheaply."""
    message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    row = dict(row)
    row["error"] = message
    row["error_stage"] = stage
    for k in HEAVY_KEYS:
        row[k] = b""
    return row
