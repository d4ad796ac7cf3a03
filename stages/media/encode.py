"""Encode one segment of RGB frames into its own file, timestamped in source frame units."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from fractions import Fraction

import av
import numpy as np

from .probe import MediaError

log = logging.getLogger(__name__)

# 4:2:0 subsamples chroma by two both ways, so H.264 can only code (and crop to) even
# sizes. The output must keep the source's exact size, so an odd size switches to 4:4:4,
# which crops by one pixel. The price: High 4:4:4 Predictive profile, which some hardware
# decoders and browsers refuse; even sizes (nearly all real video) keep yuv420p.
_SUBSAMPLED_420 = {"yuv420p", "yuvj420p", "nv12"}
_CRF_CODECS = {"libx264", "libx265"}


def pix_fmt_for_size(pix_fmt: str, width: int, height: int) -> str:
    if pix_fmt in _SUBSAMPLED_420 and (width % 2 or height % 2):
        return "yuv444p"
    return pix_fmt


class SegmentWriter:
    """Write frames as one self-contained segment (video only).

    Frame i gets pts = frame_start + i in a 1/fps time base, so segments placed end to end
    form one timeline. Every segment starts with an IDR frame (an encoder's first frame is
    always one), and B-frames are off: with them each segment would start with negative
    dts and the decode delay would have to match across independently encoded segments
    for the concatenated dts to stay monotonic; without them dts == pts and stream-copy
    concatenation is trivially valid, at some cost in compression efficiency.
    Colours are converted with BT.709 and tagged so.
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
    ):
        if width <= 0 or height <= 0:
            raise ValueError(f"segment {path!r}: bad size {width}x{height}")
        if threads is not None and threads < 1:
            raise ValueError(f"segment {path!r}: threads must be >= 1, got {threads}")
        fps = Fraction(fps)
        if fps <= 0:
            raise ValueError(f"segment {path!r}: bad frame rate {fps}")
        self.path = path
        self.width, self.height = width, height
        self.frame_start = frame_start
        self.frames_written = 0
        self.pix_fmt = pix_fmt_for_size(pix_fmt, width, height)
        if self.pix_fmt != pix_fmt:
            log.warning("segment %s: odd size %dx%d, encoding %s instead of %s",
                        path, width, height, self.pix_fmt, pix_fmt)

        self.time_base = Fraction(fps.denominator, fps.numerator)  # one tick per frame
        options = {"crf": str(crf), "preset": preset} if codec in _CRF_CODECS else {}
        try:
            self._container = av.open(path, "w")
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise MediaError(f"segment {path!r}: cannot be created ({exc})") from exc
        try:
            self._stream = self._container.add_stream(codec, rate=fps, options=options)
        except (av.FFmpegError, ValueError) as exc:
            self._container.close()
            raise MediaError(f"segment {path!r}: cannot encode with {codec!r} ({exc})") from exc
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = self.pix_fmt
        self._stream.time_base = self.time_base
        ctx = self._stream.codec_context
        ctx.time_base = self.time_base
        ctx.max_b_frames = 0
        if threads is not None:
            ctx.thread_count = threads  # read when the encoder opens, at the first frame
        ctx.colorspace = ctx.color_primaries = ctx.color_trc = 1  # BT.709
        ctx.color_range = 1  # limited ("tv") range
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
        frame = frame.reformat(format=self.pix_fmt, dst_colorspace="itu709", dst_color_range=1)
        frame.pts = self.frame_start + self.frames_written
        frame.time_base = self.time_base
        self._mux(frame)
        self.frames_written += 1

    def _mux(self, frame: av.VideoFrame | None) -> None:
        try:
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
