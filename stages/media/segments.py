"""Split a video into segments of a few seconds: the pipeline's unit of work.

Segments are ranges of frame indices, not keyframe-aligned: decode_frames seeks to the
keyframe before a segment's start, so an unaligned start costs at most one GOP of extra
decoding, and the plan needs nothing but the probe.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from .probe import VideoInfo


@dataclass(frozen=True)
class Segment:
    video_id: str
    seg_idx: int
    frame_start: int  # [frame_start, frame_end) in source frame indices
    frame_end: int
    t0: float  # frame_start / fps
    t1: float  # frame_end / fps


def segment_plan(video_id: str, info: VideoInfo, segment_seconds: float) -> list[Segment]:
    """Segments of round(segment_seconds * fps) frames covering every frame once, in order.
    A tail shorter than half a segment joins the previous segment, so no worker is handed
    a few frames (and no encoded segment is a handful of frames of overhead)."""
    if not segment_seconds > 0:
        raise ValueError(f"segment_seconds must be > 0, got {segment_seconds}")
    fps = Fraction(info.fps)
    if info.n_frames <= 0 or fps <= 0:
        raise ValueError(f"video {video_id!r}: nothing to segment (n_frames={info.n_frames}, fps={fps})")
    seg_frames = max(1, round(Fraction(segment_seconds) * fps))

    starts = list(range(0, info.n_frames, seg_frames))
    tail = info.n_frames - starts[-1]
    if len(starts) > 1 and 2 * tail < seg_frames:
        starts.pop()
    ends = starts[1:] + [info.n_frames]
    return [
        Segment(video_id, i, s, e, float(s / fps), float(e / fps))
        for i, (s, e) in enumerate(zip(starts, ends))
    ]
