"""Encode one segment of RGB frames into its own file, timestamped in source frame units."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from fractions import Fraction

import av
import numpy as np

from .colour import FULL_CHROMA, NON_J, PLANAR_YUV, RANGE_JPEG, SWS_MATRIX, Coding
from .probe import MediaError, VideoInfo, media_name

log = logging.getLogger(__name__)

# 4:2:0 subsamples chroma by two both ways (4:2:2 across), so H.264 can only code (and
# crop to) even sizes. The output must keep the source's exact size, so an odd size
# switches to the 4:4:4 format of the same depth, which crops by one pixel. The price:
# High 4:4:4 Predictive profile, which some hardware decoders and browsers refuse; even
# sizes (nearly all real video) keep the source's format.
_SUBSAMPLED_420 = {"yuv420p", "yuvj420p", "nv12", "yuv420p10le"}
_SUBSAMPLED_422 = {"yuv422p", "yuvj422p", "yuv422p10le"}
_CRF_CODECS = {"libx264", "libx265"}
# x264's preset names as SVT-AV1 (0 slowest .. 13) and libvpx (cpu-used 0 slowest .. 8) speeds.
_SPEED = {"ultrafast": (12, 8), "superfast": (11, 7), "veryfast": (10, 6), "faster": (9, 5), "fast": (8, 5),
          "medium": (6, 4), "slow": (5, 3), "slower": (4, 2), "veryslow": (2, 1), "placebo": (0, 0)}
_PRORES_PROFILES = {"proxy": 0, "lt": 1, "standard": 2, "hq": 3, "4444": 4, "4444xq": 5}
_QP2LAMBDA = 118  # FF_QP2LAMBDA: global_quality is a qscale in lambda units
# codec: match-source: the encoder of the source's codec family.
MATCH_SOURCE_ENCODERS = {"h264": "libx264", "hevc": "libx265", "av1": "libsvtav1", "vp9": "libvpx-vp9",
                         "prores": "prores_ks", "mpeg4": "mpeg4"}
# Containers an output (and its segments) can be written in: extension -> FFmpeg muxer.
CONTAINER_FORMATS = {"mp4": "mp4", "mov": "mov", "mkv": "matroska"}
_EXTENSIONS = {".mov": "mov", ".mkv": "mkv"}


_REAL_TIME = {os.SCHED_FIFO, os.SCHED_RR} if hasattr(os, "SCHED_FIFO") else set()


def _thread_policies() -> dict[int, int]:
    policies = {}
    for name in os.listdir("/proc/self/task"):
        try:
            policies[int(name)] = os.sched_getscheduler(int(name))
        except OSError:  # the thread ended meanwhile
            pass
    return policies


@contextmanager
def real_time_undone() -> Iterator[None]:
    """Puts every thread of the process that turned real-time inside the block back in the
    class it had, or, for a thread started inside it, in the calling thread's class (the one
    it would have inherited: SCHED_IDLE in a fused actor that is not the lead). SVT-AV1, run
    as root, makes the thread that opens it and every thread it starts SCHED_FIFO: on a
    worker node those run ahead of the raylet and every other process until they block, and
    the opening thread stays real-time (so do the threads it starts later, Ray's included)
    after the encoder is gone."""
    if not _REAL_TIME or not os.path.isdir("/proc/self/task"):
        yield
        return
    before, caller = _thread_policies(), os.sched_getscheduler(0)
    try:
        yield
    finally:
        for tid, policy in _thread_policies().items():
            was = before.get(tid, caller)
            if policy in _REAL_TIME and was not in _REAL_TIME:
                try:
                    os.sched_setscheduler(tid, was, os.sched_param(0))
                except OSError:
                    pass


def pix_fmt_for_size(pix_fmt: str, width: int, height: int) -> str:
    if (pix_fmt in _SUBSAMPLED_420 and (width % 2 or height % 2)) or (pix_fmt in _SUBSAMPLED_422 and width % 2):
        return FULL_CHROMA.get(pix_fmt, "yuv444p")
    return pix_fmt


def container_for(output_uri: str) -> str:
    """'mp4', 'mov' or 'mkv': the container an output (and so each of its segments, which
    are stream-copied into it) is written in, from its extension (.mov, .mkv; else mp4, as
    finalize names it)."""
    _, ext = os.path.splitext(output_uri.split("?", 1)[0].lower())
    return _EXTENSIONS.get(ext, "mp4")


def check_container(codec: str, container: str, name) -> None:
    """MediaError naming the output when `container` cannot hold `codec`'s stream (ProRes
    in mp4, say), found by asking the muxer, before any work is done."""
    out = av.open(io.BytesIO(), "w", format=CONTAINER_FORMATS[container])
    try:
        out.add_stream(codec)
    except (av.FFmpegError, ValueError) as exc:
        raise MediaError(
            f"output {media_name(name)!r}: {container} cannot hold {codec} ({exc}); name the output .mov or .mkv"
        ) from None
    finally:
        out.close()


@dataclass(frozen=True)
class EncoderSettings:
    """What an encoded segment's quality depends on, for every supported encoder:
    libx264/libx265 crf + preset, libsvtav1 crf + preset (x264 names map to its speeds),
    libvpx-vp9 crf with b=0 (constant quality), prores_ks profile + qscale, mpeg4 qscale;
    or an explicit `bitrate` (bits/s) instead of crf/qscale (not prores_ks, which has none).
    `gop`: keyframe interval in frames (None: the encoder's default; every segment starts
    with a keyframe anyway)."""

    codec: str = "libx264"
    crf: int = 18
    preset: str = "medium"
    bitrate: int | None = None
    gop: int | None = None
    qscale: int = 4
    prores_profile: str = "auto"
    # HDR10 static metadata to write (VideoInfo's x265 notation; "" none): x265, x264 and
    # SVT-AV1 write it as SEI / metadata OBUs; other encoders cannot, and say so in the log.
    mastering_display: str = ""
    content_light: str = ""

    def for_source(self, video: VideoInfo, name="") -> EncoderSettings:
        """codec 'match-source' made concrete: the encoder of the source's codec family,
        its bitrate (when the container states one and no bitrate is set; else crf /
        qscale) and its keyframe interval (when measured and no gop is set)."""
        if self.codec != "match-source":
            return self
        encoder = MATCH_SOURCE_ENCODERS.get(video.codec)
        if encoder is None:
            raise MediaError(
                f"video {media_name(name)!r}: codec match-source: no encoder for the source codec {video.codec!r} "
                f"(known: {', '.join(sorted(MATCH_SOURCE_ENCODERS))}); set output.codec"
            )
        bitrate = self.bitrate
        if bitrate is None and encoder != "prores_ks" and video.bit_rate > 0:
            bitrate = video.bit_rate
        gop = self.gop if self.gop is not None else (video.gop or None)
        return replace(self, codec=encoder, bitrate=bitrate, gop=gop)

    def options(self, pix_fmt: str) -> tuple[dict, int | None]:
        """(encoder options, codec bit_rate or None) for writing `pix_fmt`."""
        speed = _SPEED.get(self.preset)
        if self.codec == "prores_ks":
            if self.bitrate is not None:
                raise ValueError("prores_ks has no bitrate control: set qscale (and prores_profile) instead")
            profile = self.prores_profile
            if profile == "auto":  # HQ for 4:2:2, 4444 for 4:4:4 sources
                profile = "4444" if pix_fmt.startswith("yuv444") else "hq"
            if profile not in _PRORES_PROFILES:
                raise ValueError(f"prores_profile {profile!r} is not one of auto, {', '.join(_PRORES_PROFILES)}")
            return {"profile": str(_PRORES_PROFILES[profile]), "flags": "+qscale",
                    "global_quality": str(self.qscale * _QP2LAMBDA)}, None
        if self.codec == "mpeg4":
            if self.bitrate is not None:
                return {}, self.bitrate
            # mpegvideo takes a fixed qscale from each frame's quality, which PyAV cannot
            # set; pinning the rate control's quantiser range to it does the same.
            return {"qmin": str(self.qscale), "qmax": str(self.qscale)}, None
        options: dict = {}
        md, cll = self.mastering_display, self.content_light
        if self.codec in _CRF_CODECS:
            options["preset"] = self.preset
            if self.codec == "libx265":
                params = ["log-level=warning"] + ([f"master-display={md}"] if md else []) + ([f"max-cll={cll}"] if cll else [])
                options["x265-params"] = ":".join(params)
            elif md or cll:
                options["x264-params"] = ":".join(([f"mastering-display={md}"] if md else []) + ([f"cll={cll}"] if cll else []))
        elif self.codec == "libsvtav1":
            options["preset"] = self.preset if self.preset.isdigit() else str(speed[0] if speed else 8)
            params = ([f"mastering-display={_svt_mastering_display(md)}"] if md else []) + ([f"content-light={cll}"] if cll else [])
            if params:
                options["svtav1-params"] = ":".join(params)
        elif md or cll:
            log.warning("%s cannot write HDR10 static metadata; the output carries the colour tags only", self.codec)
        elif self.codec == "libvpx-vp9":
            options.update({"deadline": "good", "cpu-used": str(speed[1] if speed else 4), "row-mt": "1"})
        if self.bitrate is not None:
            return options, self.bitrate
        if self.codec in _CRF_CODECS | {"libsvtav1", "libvpx-vp9"}:
            options["crf"] = str(self.crf)
            if self.codec == "libvpx-vp9":
                options["b"] = "0"  # constant quality: crf alone would be a cap on a default bitrate
        return options, None


def _svt_mastering_display(md: str) -> str:
    """x265's integer notation (1/50000, 1/10000 cd/m² units) as SVT-AV1's decimal one."""
    import re

    numbers = [int(n) for n in re.findall(r"\d+", md)]  # G x y, B x y, R x y, WP x y, L max min
    xy, (lum_max, lum_min) = [n / 50000 for n in numbers[:8]], numbers[8:10]
    return (f"G({xy[0]:.5f},{xy[1]:.5f})B({xy[2]:.5f},{xy[3]:.5f})R({xy[4]:.5f},{xy[5]:.5f})"
            f"WP({xy[6]:.5f},{xy[7]:.5f})L({lum_max / 10000:.4f},{lum_min / 10000:.4f})")


def deliverable_format(video: VideoInfo, codec: str, name) -> str:
    """The pixel format compose writes for `video` with encoder `codec` (the source's own,
    or its 4:4:4 twin at odd sizes, or its non-"j" twin tagged full range); MediaError
    naming the file and the format when the source's format, matrix or depth cannot be
    kept: 12-bit, alpha, RGB, packed or semi-planar formats, matrices other than
    BT.709/601/240M/FCC/2020-NCL, or an encoder that cannot write the format."""
    try:
        Coding.of(video.pix_fmt, video.colorspace, video.color_range, video.height)
    except ValueError as exc:
        raise MediaError(
            f"video {media_name(name)!r}: {video.describe_colour()}: {exc}; the output would not keep the source's "
            f"colour, so it is not made"
        ) from None
    pix_fmt = pix_fmt_for_size(video.pix_fmt, video.width, video.height)
    try:
        writable = {f.name for f in (av.codec.Codec(codec, "w").video_formats or [])}
    except (av.FFmpegError, ValueError) as exc:  # unknown encoder
        raise MediaError(f"video {media_name(name)!r}: encoder {codec!r} is not available ({exc})") from None
    if pix_fmt not in writable and NON_J.get(pix_fmt) in writable:
        pix_fmt = NON_J[pix_fmt]  # the same samples; the full range is in the tags
    if pix_fmt not in writable:
        bits, sx, sy = PLANAR_YUV[video.pix_fmt]
        raise MediaError(
            f"video {media_name(name)!r}: {video.describe_colour()} ({bits}-bit) cannot be written by {codec} "
            f"(it writes {', '.join(sorted(writable))}); choose an encoder that can, e.g. codec: match-source"
        )
    return pix_fmt


class SegmentWriter:
    """Write frames as one self-contained segment (video only).

    Frame i gets pts = frame_start + i in a 1/fps time base, so segments placed end to end
    form one timeline. Every segment starts with an IDR frame (an encoder's first frame is
    always one), and B-frames are off: with them each segment would start with negative
    dts and the decode delay would have to match across independently encoded segments
    for the concatenated dts to stay monotonic; without them dts == pts and stream-copy
    concatenation is trivially valid, at some cost in compression efficiency.
    The stream is tagged with the given colour primaries, transfer, matrix and range
    (AVColor* values; default BT.709, limited range). write() converts RGB frames with
    that matrix and range; write_frame() takes frames already in `pix_fmt` (compose's
    native path) and converts nothing.
    `settings` (EncoderSettings) replaces codec/crf/preset when given and adds bitrate,
    GOP, qscale and ProRes profile. `container` ('mp4', 'mov', 'mkv'; None: from the
    path's extension) picks the muxer.
    `threads` caps the encoder's threads (None: x264's automatic count, about 1.5 per core
    of the node, whatever the worker reserved); each x264 frame thread holds its own
    frames, so the cap bounds memory as well as CPU.
    On an exception inside `with`, the partial file is removed.
    """

    def __init__(
        self,
        path: str,
        width: int,
        height: int,
        fps: Fraction,
        frame_start: int,
        codec: str = "libx264",
        crf: int = 18,
        preset: str = "medium",
        pix_fmt: str = "yuv420p",
        threads: int | None = None,
        settings: EncoderSettings | None = None,
        color_primaries: int = 1,
        color_trc: int = 1,
        colorspace: int = 1,
        color_range: int = 1,
        container: str | None = None,
    ):
        if width <= 0 or height <= 0:
            raise ValueError(f"segment {path!r}: bad size {width}x{height}")
        if threads is not None and threads < 1:
            raise ValueError(f"segment {path!r}: threads must be >= 1, got {threads}")
        fps = Fraction(fps)
        if fps <= 0:
            raise ValueError(f"segment {path!r}: bad frame rate {fps}")
        settings = settings or EncoderSettings(codec=codec, crf=crf, preset=preset)
        self.settings = settings
        self.path = path
        self.width, self.height = width, height
        self.frame_start = frame_start
        self.frames_written = 0
        self.pix_fmt = pix_fmt_for_size(pix_fmt, width, height)
        if self.pix_fmt != pix_fmt:
            log.warning("segment %s: odd size %dx%d, encoding %s instead of %s",
                        path, width, height, self.pix_fmt, pix_fmt)
        self.colour = (int(color_primaries), int(color_trc), int(colorspace), int(color_range))

        self.time_base = Fraction(fps.denominator, fps.numerator)  # one tick per frame
        try:
            options, bit_rate = settings.options(self.pix_fmt)
        except ValueError as exc:
            raise MediaError(f"segment {path!r}: {exc}") from None
        try:
            self._container = av.open(path, "w", format=CONTAINER_FORMATS[container] if container else None)
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise MediaError(f"segment {path!r}: cannot be created ({exc})") from exc
        try:
            self._stream = self._container.add_stream(settings.codec, rate=fps, options=options)
        except (av.FFmpegError, ValueError) as exc:
            self._container.close()
            raise MediaError(f"segment {path!r}: cannot encode with {settings.codec!r} ({exc})") from exc
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = self.pix_fmt
        self._stream.time_base = self.time_base
        ctx = self._stream.codec_context
        ctx.time_base = self.time_base
        ctx.max_b_frames = 0
        if bit_rate is not None:
            ctx.bit_rate = int(bit_rate)
        elif settings.codec == "libvpx-vp9":
            ctx.bit_rate = 0  # b=0: constant quality
        if settings.gop:
            ctx.gop_size = int(settings.gop)
        if threads is not None:
            ctx.thread_count = threads  # read when the encoder opens, at the first frame
        ctx.color_primaries, ctx.color_trc, ctx.colorspace, ctx.color_range = self.colour
        self._closed = False

    @property
    def threads(self) -> int:
        """The encoder's thread count as its codec context holds it (0: automatic)."""
        return self._stream.codec_context.thread_count

    def write(self, frame_rgb: np.ndarray) -> None:
        if self._closed:
            raise MediaError(f"segment {self.path!r}: write after close")
        if frame_rgb.shape != (self.height, self.width, 3) or frame_rgb.dtype != np.uint8:
            raise ValueError(
                f"segment {self.path!r}: frame is {frame_rgb.shape} {frame_rgb.dtype}, "
                f"expected ({self.height}, {self.width}, 3) uint8"
            )
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame_rgb), format="rgb24")
        _, _, colorspace, color_range = self.colour
        full = color_range == RANGE_JPEG or self.pix_fmt.startswith("yuvj")
        frame = frame.reformat(format=self.pix_fmt, dst_colorspace=SWS_MATRIX.get(colorspace, 1),
                               dst_color_range=RANGE_JPEG if full else 1)
        self._encode(frame)

    def write_frame(self, frame: av.VideoFrame) -> None:
        """Encode a frame already in this segment's pixel format and colour coding (its
        samples go to the encoder as they are). Its pts is set here."""
        if self._closed:
            raise MediaError(f"segment {self.path!r}: write after close")
        if (frame.width, frame.height, frame.format.name) != (self.width, self.height, self.pix_fmt):
            raise ValueError(
                f"segment {self.path!r}: frame is {frame.width}x{frame.height} {frame.format.name}, "
                f"expected {self.width}x{self.height} {self.pix_fmt}"
            )
        self._encode(frame)

    def _encode(self, frame: av.VideoFrame) -> None:
        # Some encoders (prores_ks) write the frame's tags, not the stream's, into each frame.
        frame.color_primaries, frame.color_trc, frame.colorspace, frame.color_range = self.colour
        frame.pts = self.frame_start + self.frames_written
        frame.time_base = self.time_base
        self._mux(frame)
        self.frames_written += 1

    def _mux(self, frame: av.VideoFrame | None) -> None:
        # SVT-AV1 opens at the first frame and starts threads later too: guard every call.
        guard = real_time_undone() if self.settings.codec == "libsvtav1" else nullcontext()
        try:
            with guard:
                for packet in self._stream.encode(frame):
                    packet.duration = 1  # one frame: gives the last sample of the file its length
                    self._container.mux(packet)
        except (av.FFmpegError, OSError) as exc:
            raise MediaError(f"segment {self.path!r}: encoding or writing failed ({exc})") from exc

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._mux(None)
        finally:
            self._container.close()
        if self.frames_written == 0:
            if os.path.exists(self.path):
                os.remove(self.path)
            raise MediaError(f"segment {self.path!r}: no frames were written")

    def abort(self) -> None:
        """Close without flushing and remove the partial file."""
        if not self._closed:
            self._closed = True
            try:
                self._container.close()
            except (av.FFmpegError, OSError):
                pass  # the original error is the one worth reporting
        if os.path.exists(self.path):
            os.remove(self.path)

    def __enter__(self) -> SegmentWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def encode_frames(
    path: str,
    frames_iter: Iterable,
    width: int,
    height: int,
    fps: Fraction,
    frame_start: int = 0,
    **codec_opts,
) -> int:
    """Encode RGB frames (or decode_frames' (index, frame) pairs, whose indices must run
    on from frame_start) into `path`; returns the number of frames written."""
    with SegmentWriter(path, width, height, fps, frame_start, **codec_opts) as writer:
        for item in frames_iter:
            if isinstance(item, tuple):
                index, item = item
                if index != frame_start + writer.frames_written:
                    raise ValueError(
                        f"segment {path!r}: frame index {index} arrived where "
                        f"{frame_start + writer.frames_written} was expected"
                    )
            writer.write(item)
        return writer.frames_written
