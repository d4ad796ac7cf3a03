"""Probe a video file: size, rotation, exact frame rate and frame count, audio presence.

Frame indices are the pipeline's clock: a segment is a range of frame indices, and the
output must have exactly the source's frame count at exactly the source's rate. So the
rate is kept as a Fraction (30000/1001, never 29.97) and the count is exact.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction

import av


class MediaError(ValueError):
    """A media file cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class VideoInfo:
    width: int  # coded size: what decode_frames yields, before any display rotation
    height: int
    # Display rotation in degrees counter-clockwise (0/90/180/270), from the stream's
    # display matrix (FFmpeg turns a legacy `rotate` tag into one). The pipeline keeps the
    # coded orientation end to end, so the output has the source's coded size; an
    # upright view for face processing is np.rot90(frame, k=rotation // 90), and
    # mux_audio(..., rotation=info.rotation) writes the matrix back so players show the
    # output like the source.
    rotation: int
    fps: Fraction  # average frame rate, exact
    n_frames: int
    duration_s: float  # n_frames / fps: the span the frames cover
    codec: str
    pix_fmt: str
    has_audio: bool


def media_name(source) -> str:
    """What to call a source in messages: its path, or the URI of an fsspec file object."""
    if isinstance(source, str):
        return source
    fs, path = getattr(source, "fs", None), getattr(source, "path", None)
    if fs is not None and path is not None:
        return fs.unstrip_protocol(path)
    return str(getattr(source, "name", source))


def codec_threads(num_cpus: float) -> int:
    """FFmpeg/x264 threads for a worker that reserves `num_cpus` cores: at least one.

    Left at 0, FFmpeg sizes its thread pool from the machine's cores (about 1.5 threads per
    core of the node), so every actor on a 64-core node would run ~96 codec threads and hold
    a decoded frame per frame-thread, whatever its pool reserved."""
    return max(1, math.ceil(num_cpus))


def open_media(path, role: str = "file", threads: int | None = None) -> av.container.InputContainer:
    """av.open for reading, with every failure turned into a MediaError naming the file.
    `path` is a local path, a URL FFmpeg reads, or a seekable binary file object (an
    fsspec file for s3://: ranged reads, no full download). `threads` caps each video
    decoder's threads (None: FFmpeg's automatic count from the node's cores); it is set
    here because a codec reads it only when it opens, at the first decode."""
    if isinstance(path, str):
        if "://" not in path and not os.path.exists(path):
            raise MediaError(f"{role} {media_name(path)!r}: no such file")
    else:
        path.seek(0)  # a file object may be opened several times (seek retries)
    if threads is not None and threads < 1:
        raise ValueError(f"{role} {media_name(path)!r}: threads must be >= 1, got {threads}")
    try:
        container = av.open(path, "r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise MediaError(f"{role} {media_name(path)!r}: cannot be opened as media ({exc})") from exc
    if threads is not None:
        for stream in container.streams.video:
            stream.codec_context.thread_count = threads
    return container


def video_stream_of(container, path: str) -> av.video.stream.VideoStream:
    """The first real video stream; cover art (attached pictures) in audio files is not one."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    raise MediaError(f"video {media_name(path)!r}: has no video stream")


def frame_rate_of(stream, path: str) -> Fraction:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0:
            return Fraction(rate)
    raise MediaError(f"video {media_name(path)!r}: frame rate is unknown")


def _count_packets(container, stream) -> int:
    """Frames by demuxing (no decoding): one packet is one frame for H.264/HEVC/VP9/AV1 in
    mp4/mov/mkv/ts. Costs one read of the file (I/O bound, no decode), so it is used only
    when the container's own count is missing or disagrees with its duration."""
    container.seek(0, stream=stream, backward=True, any_frame=True)
    count = 0
    for packet in container.demux(stream):
        if packet.size > 0 and not packet.is_discard and not packet.is_corrupt:
            count += 1
    return count


def _normalise_rotation(degrees: float) -> int:
    return int(round(degrees / 90.0)) * 90 % 360


def probe_video(path: str, threads: int | None = None) -> VideoInfo:
    """Describe `path`. Corrupt files, files without a video stream or without frames raise
    MediaError. Cost: opening the container, decoding its first frame (for the display
    matrix and to prove it decodes), and a packet-counting pass only when the container's
    frame count is missing or inconsistent with its duration (e.g. some mkv/ts/avi).
    `threads`: decoder threads, as for open_media."""
    with open_media(path, "video", threads) as container:
        stream = video_stream_of(container, path)
        fps = frame_rate_of(stream, path)
        ctx = stream.codec_context

        n_frames = stream.frames or 0
        if n_frames > 0 and stream.duration is not None and stream.time_base is not None:
            # A trustworthy count spans the stream's duration to within one frame.
            expected = Fraction(stream.duration) * stream.time_base * fps
            if abs(expected - n_frames) > 1:
                n_frames = 0
        if n_frames <= 0:
            try:
                n_frames = _count_packets(container, stream)
            except av.FFmpegError as exc:
                raise MediaError(f"video {media_name(path)!r}: unreadable while counting frames ({exc})") from exc
            container.seek(0, stream=stream, backward=True, any_frame=False)
        if n_frames <= 0:
            raise MediaError(f"video {media_name(path)!r}: video stream has no frames")

        try:
            first = next(container.decode(stream), None)
        except av.FFmpegError as exc:
            raise MediaError(f"video {media_name(path)!r}: video stream does not decode ({exc})") from exc
        if first is None:
            raise MediaError(f"video {media_name(path)!r}: video stream has no decodable frames")

        return VideoInfo(
            width=int(ctx.width),
            height=int(ctx.height),
            rotation=_normalise_rotation(first.rotation),
            fps=fps,
            n_frames=int(n_frames),
            duration_s=float(n_frames / fps),
            codec=ctx.name,
            pix_fmt=ctx.pix_fmt or first.format.name,
            has_audio=len(container.streams.audio) > 0,
        )
