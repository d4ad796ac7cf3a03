"""Decode a range of frames by index, seeking instead of decoding from the start."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from fractions import Fraction

import av
import numpy as np

from .colour import RANGE_JPEG, RANGE_MPEG, SWS_MATRIX, UNSPECIFIED_MATRIX, guessed_matrix
from .probe import MediaError, frame_rate_of, media_name, open_media, video_stream_of


def frame_to_rgb(frame: av.VideoFrame) -> np.ndarray:
    """HxWx3 uint8 R'G'B' code values, at any source bit depth. The matrix and range are
    the frame's own, named to swscale explicitly (PyAV leaves the range unspecified, which
    swscale reads as limited): compose converts the generated mouth back with the same
    ones (colour.rgb_to_ycbcr). An untagged matrix is the one a player would assume
    (BT.709 from 720 lines up, BT.601 below). The transfer function is not converted: an
    HDR source gives its PQ/HLG code values."""
    matrix = guessed_matrix(frame.height) if frame.colorspace == UNSPECIFIED_MATRIX else int(frame.colorspace)
    full = frame.color_range == RANGE_JPEG or frame.format.name.startswith("yuvj")
    if frame.format.is_rgb or matrix not in SWS_MATRIX:
        return frame.to_ndarray(format="rgb24")  # nothing better to name; compose refuses these formats
    return frame.to_ndarray(format="rgb24", src_colorspace=SWS_MATRIX[matrix],
                            src_color_range=RANGE_JPEG if full else RANGE_MPEG)


def decode_frames(path: str, frame_start: int, frame_end: int, threads: int | None = None
                  ) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (frame_index, HxWx3 uint8 RGB) for frame_start <= frame_index < frame_end.

    A frame's index comes from its presentation time, never from decode order (B-frames
    reorder): round((pts * time_base - start_time) * fps), exact for constant-rate sources.
    Timestamps that skip an index (variable-rate sources) repeat the previous frame and
    ones that land on a taken index are dropped, the way `ffmpeg -vsync cfr` conforms
    them, so exactly frame_end - frame_start frames come out. A stream that ends before
    frame_end raises MediaError. `threads` caps the decoder's threads (None: FFmpeg's
    automatic count from the node's cores); the frames are the same either way.
    """
    return _decode_frames(path, frame_start, frame_end, threads, frame_to_rgb)


def decode_native_frames(path: str, frame_start: int, frame_end: int, threads: int | None = None
                         ) -> Iterator[tuple[int, av.VideoFrame]]:
    """decode_frames' frames as the decoder gives them: the source's own pixel format,
    bit depth and colour tags, nothing converted. A repeated frame (a timestamp gap) is
    the same VideoFrame object again: treat them as read-only."""
    return _decode_frames(path, frame_start, frame_end, threads, lambda frame: frame)


def _decode_frames(path, frame_start: int, frame_end: int, threads: int | None, convert
                   ) -> Iterator[tuple[int, np.ndarray]]:
    if frame_start < 0 or frame_end < frame_start:
        raise ValueError(f"bad frame range [{frame_start}, {frame_end}) for {media_name(path)!r}")
    if frame_end == frame_start:
        return
    # A seek lands on a keyframe found by decode timestamp (mp4) or by bisecting the byte
    # stream (mpeg-ts), which can present after the target; then seek further back, and
    # as a last resort decode from the start.
    backoffs_s = (0.0, 2.0, 8.0, None) if frame_start > 0 else (None,)
    for backoff_s in backoffs_s:
        frames = _decode_range(path, frame_start, frame_end, backoff_s, threads, convert)
        first = next(frames, None)  # None: the seek landed past the last frame
        if first is not None and (first[0] == frame_start or backoff_s is None):
            break
        frames.close()
    yield first
    yield from frames


def _decode_range(path: str, frame_start: int, frame_end: int, backoff_s: float | None, threads: int | None, convert):
    """Decode from a seek `backoff_s` seconds before frame_start (None: from the start)."""
    with open_media(path, "video", threads) as container:
        stream = video_stream_of(container, path)
        stream.thread_type = "AUTO"
        fps = frame_rate_of(stream, path)
        time_base = Fraction(stream.time_base)
        origin = stream.start_time or 0  # first pts is not always 0 (edit lists, ts, segments)

        if backoff_s is not None:
            # Half a frame early so a rounded timestamp cannot push the seek past the target.
            start_s = (Fraction(frame_start) - Fraction(1, 2)) / fps - Fraction(backoff_s)
            target = origin + start_s / time_base
            container.seek(int(target), stream=stream, backward=True, any_frame=False)

        expected = frame_start
        previous = None
        try:
            for frame in container.decode(stream):
                if frame.pts is None:
                    raise MediaError(f"video {media_name(path)!r}: decoded frame without a timestamp")
                index = round((frame.pts - origin) * time_base * fps)
                if index < expected:
                    continue
                if index > expected and previous is None and backoff_s is not None:
                    # Overshot the seek: report the first index so the caller retries.
                    yield index, convert(frame)
                    return
                current = convert(frame) if index < frame_end or previous is None else None
                fill = previous if previous is not None else current
                while expected < min(index, frame_end):
                    yield expected, fill.copy() if isinstance(fill, np.ndarray) else fill
                    expected += 1
                if index >= frame_end:
                    return
                yield index, current
                previous = current
                expected = index + 1
                if expected >= frame_end:
                    return
        except av.FFmpegError as exc:
            raise MediaError(f"video {media_name(path)!r}: decoding failed near frame {expected} ({exc})") from exc
        if previous is None and backoff_s is not None:
            return  # nothing decoded after the seek: the caller seeks further back
        raise MediaError(
            f"video {media_name(path)!r}: stream ended at frame {expected}, frames up to {frame_end} were asked for"
        )


def source_frames_at_rate(first: int, stop: int, source_fps: Fraction, n_source: int, rate: int = 25) -> np.ndarray:
    """Source frame index shown at the centre of each frame [first, stop) of a `rate` fps
    timeline: frame i covers [i/rate, (i+1)/rate), its centre falls in source frame
    floor((i + 1/2) * source_fps / rate). At equal rates frame i is source frame i; faster
    sources drop frames and slower ones repeat them, as a constant-rate conversion does."""
    index = (np.arange(first, stop) * 2 + 1) * Fraction(source_fps) / (2 * rate)
    return np.minimum(np.floor(index.astype(np.float64) + 1e-9).astype(np.int64), n_source - 1)


def iter_at_rate(path, first: int, stop: int, source_fps: Fraction, n_source: int, rate: int = 25,
                 threads: int | None = None) -> Iterator[np.ndarray]:
    """Frames [first, stop) of the video resampled to `rate` fps (see source_frames_at_rate),
    one at a time, in one pass over the source frames they need: a repeated source frame
    (a source slower than `rate`) is the same array again, so treat them as read-only.
    `threads` as for decode_frames."""
    wanted = source_frames_at_rate(first, stop, source_fps, n_source, rate)
    if len(wanted) == 0:
        return
    repeats = Counter(wanted.tolist())  # non-decreasing, so each index is one run
    for i, frame in decode_frames(path, int(wanted[0]), int(wanted[-1]) + 1, threads):
        for _ in range(repeats.get(i, 0)):
            yield frame


def decode_at_rate(path, first: int, stop: int, source_fps: Fraction, n_source: int, rate: int = 25,
                   threads: int | None = None) -> list[np.ndarray]:
    """iter_at_rate's frames as a list (all of them in memory: for short clips)."""
    return list(iter_at_rate(path, first, stop, source_fps, n_source, rate, threads))
