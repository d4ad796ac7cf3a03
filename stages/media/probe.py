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
    # Colour coding, as AVColorPrimaries / AVColorTransferCharacteristic / AVColorSpace /
    # AVColorRange values (2, 2, 2, 0: untagged): the output is tagged the same.
    color_primaries: int = 2
    color_trc: int = 2
    colorspace: int = 2
    color_range: int = 0
    bit_depth: int = 8  # bits per luma sample
    bit_rate: int = 0  # the video stream's bits per second as the container states it (0: unknown)
    gop: int = 0  # frames from the first keyframe to the second (0: not measured, or one keyframe)
    # HDR10 static metadata of the first frame, in x265's notation ("" where absent):
    # "G(x,y)B(x,y)R(x,y)WP(x,y)L(max,min)" in 1/50000 and 1/10000 cd/m² units, "MaxCLL,MaxFALL".
    mastering_display: str = ""
    content_light: str = ""

    def describe_colour(self) -> str:
        """'yuv420p10le, bt2020/smpte2084/bt2020nc, tv range' for messages."""
        from .colour import MATRIX_NAMES, PRIMARIES_NAMES, TRC_NAMES

        ranges = {0: "unspecified range", 1: "tv range", 2: "pc range"}
        return (f"{self.pix_fmt}, {PRIMARIES_NAMES.get(self.color_primaries, self.color_primaries)}/"
                f"{TRC_NAMES.get(self.color_trc, self.color_trc)}/{MATRIX_NAMES.get(self.colorspace, self.colorspace)}, "
                f"{ranges.get(self.color_range, self.color_range)}")


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


# AVFieldOrder: anything but progressive (1) or unknown (0) is interlaced, named for messages.
_INTERLACED = {2: "top field first", 3: "bottom field first", 4: "top coded first, bottom shown first",
               5: "bottom coded first, top shown first"}
_UNSPECIFIED = 2  # AVCOL_PRI/TRC/SPC_UNSPECIFIED


def _measure_gop(container, stream, fps: Fraction, max_packets: int = 600) -> int:
    """Frames from the first keyframe to the second, by their presentation times, within
    the first `max_packets` (demuxing only: no decode); 0 when fewer than two keyframes
    are there. Decode order would miscount with B-frames (a keyframe is sent early)."""
    keyframes = []
    container.seek(0, stream=stream, backward=True, any_frame=True)
    for n, packet in enumerate(container.demux(stream)):
        if n >= max_packets or len(keyframes) == 2:
            break
        if packet.size > 0 and packet.is_keyframe and packet.pts is not None:
            keyframes.append(packet.pts)
    container.seek(0, stream=stream, backward=True, any_frame=False)
    if len(keyframes) < 2:
        return 0
    return round(abs(keyframes[1] - keyframes[0]) * Fraction(stream.time_base) * fps)


def _video_bit_rate(container, stream) -> int:
    """The stream's own rate, else the container's less its audio streams' (0: unknown)."""
    if stream.bit_rate:
        return int(stream.bit_rate)
    if container.bit_rate:
        audio = sum(int(a.bit_rate or 0) for a in container.streams.audio)
        return max(0, int(container.bit_rate) - audio)
    return 0


def hdr_static_metadata(frame) -> tuple[str, str]:
    """(mastering_display, content_light) of a decoded frame's side data, in x265's
    notation (VideoInfo), "" where absent."""
    import struct

    mastering = light = ""
    for side in frame.side_data:
        name = side.type.name
        data = bytes(side)
        if name == "MASTERING_DISPLAY_METADATA" and len(data) >= 88:
            # AVMasteringDisplayMetadata: primaries R, G, B and white point as (x, y) rationals,
            # then min and max luminance rationals, then has_primaries, has_luminance.
            v = struct.unpack("<20i2i", data[:88])
            ratio = [v[2 * i] / v[2 * i + 1] if v[2 * i + 1] else 0.0 for i in range(10)]
            if v[20] and v[21]:
                xy = [round(r * 50000) for r in ratio[:8]]
                lum_min, lum_max = round(ratio[8] * 10000), round(ratio[9] * 10000)
                mastering = (f"G({xy[2]},{xy[3]})B({xy[4]},{xy[5]})R({xy[0]},{xy[1]})WP({xy[6]},{xy[7]})"
                             f"L({lum_max},{lum_min})")
        elif name == "CONTENT_LIGHT_LEVEL" and len(data) >= 8:
            max_cll, max_fall = struct.unpack("<2I", data[:8])
            light = f"{max_cll},{max_fall}"
    return mastering, light


def _normalise_rotation(degrees: float) -> int:
    return int(round(degrees / 90.0)) * 90 % 360


def probe_video(path: str, threads: int | None = None, measure_gop: bool = False) -> VideoInfo:
    """Describe `path`. Corrupt files, files without a video stream or without frames raise
    MediaError, and so do interlaced ones (the pipeline works on whole progressive frames;
    a deinterlaced output would not be the source's). Cost: opening the container,
    decoding its first frame (for the display matrix, the colour tags, and to prove it
    decodes), and a packet-counting pass only when the container's frame count is missing
    or inconsistent with its duration (e.g. some mkv/ts/avi). `measure_gop` also demuxes
    up to the second keyframe (VideoInfo.gop, for codec: match-source).
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

        # The container's colour tags (mov colr, mkv Colour), read before decoding: a
        # decoder overwrites them with its bitstream's, which may leave them unspecified.
        stream_colour = (ctx.color_primaries, ctx.color_trc, ctx.colorspace, ctx.color_range)
        try:
            first = next(container.decode(stream), None)
        except av.FFmpegError as exc:
            raise MediaError(f"video {media_name(path)!r}: video stream does not decode ({exc})") from exc
        if first is None:
            raise MediaError(f"video {media_name(path)!r}: video stream has no decodable frames")
        field_order = int(ctx.field_order)
        if field_order in _INTERLACED or first.interlaced_frame:
            order = _INTERLACED.get(field_order, "interlaced frames")
            raise MediaError(
                f"video {media_name(path)!r}: interlaced ({order}); only progressive video is supported, "
                f"deinterlace it first"
            )
        gop = _measure_gop(container, stream, fps) if measure_gop else 0

        def tag(frame_value: int, stream_value: int, unspecified: int) -> int:
            # The decoded frame carries the bitstream's tags; the container may add them.
            return int(frame_value) if int(frame_value) != unspecified else int(stream_value)

        pix_fmt = ctx.pix_fmt or first.format.name
        mastering_display, content_light = hdr_static_metadata(first)
        luma = [c for c in first.format.components if c.is_luma] or list(first.format.components)

        return VideoInfo(
            width=int(ctx.width),
            height=int(ctx.height),
            rotation=_normalise_rotation(first.rotation),
            fps=fps,
            n_frames=int(n_frames),
            duration_s=float(n_frames / fps),
            codec=ctx.name,
            pix_fmt=pix_fmt,
            has_audio=len(container.streams.audio) > 0,
            color_primaries=tag(first.color_primaries, stream_colour[0], _UNSPECIFIED),
            color_trc=tag(first.color_trc, stream_colour[1], _UNSPECIFIED),
            colorspace=tag(first.colorspace, stream_colour[2], _UNSPECIFIED),
            color_range=tag(first.color_range, stream_colour[3], 0),
            bit_depth=int(luma[0].bits),
            bit_rate=_video_bit_rate(container, stream),
            gop=gop,
            mastering_display=mastering_display,
            content_light=content_light,
        )
