"""Compose a segment: decode the source frames again (full-resolution frames never travel
between stages), paste the generated crops back through the inverse affine with a
feathered mouth mask, and encode the segment.

Composition happens in the source's own pixel format: the decoded Y'CbCr planes at their
own bit depth and chroma subsampling, the generated mouth converted into them with the
source's matrix and range (stages/media/colour.py), and the segment encoded in the same
pixel format with the same colour primaries, transfer, matrix and range tags. So an HDR10,
HLG, 10-bit or 4:2:2 master comes out as one, and frames without a face (and every pixel
outside the mouth) are the source's decoded samples, up to codec loss. A source whose
format cannot be kept is refused with an error naming the file and the format.
"""
from __future__ import annotations

from dataclasses import replace
from fractions import Fraction

import numpy as np

from stages.face.paste import paste_back_native
from stages.media import SegmentWriter, VideoInfo, probe_video
from stages.media.colour import RANGE_JPEG, RANGE_MPEG, SWS_MATRIX, UNSPECIFIED_MATRIX, Coding, guessed_matrix
from stages.media.decode import decode_native_frames
from stages.media.encode import EncoderSettings, deliverable_format
from stages.media.probe import MediaError, media_name


class ComposeStage:
    """`threads` caps both the decoder's and the encoder's threads, so a worker uses the
    cores its pool reserved (None: FFmpeg's and x264's automatic counts from the node's cores).
    `codec` may be "match-source" (EncoderSettings.for_source); `bitrate`, `gop`, `qscale`
    and `prores_profile` are EncoderSettings'; `container` ('mp4', 'mov', 'mkv'; None:
    from out_path's extension) is the segment's muxer."""

    def __init__(self, blend_mask: np.ndarray, codec: str = "libx264", crf: int = 18, preset: str = "medium",
                 threads: int | None = None, bitrate: int | None = None, gop: int | None = None, qscale: int = 4,
                 prores_profile: str = "auto", container: str | None = None):
        self.blend_mask = blend_mask.astype(np.float32)  # (256, 256) in [0, 1]
        self.codec, self.crf, self.preset = codec, crf, preset
        self.settings = EncoderSettings(codec=codec, crf=crf, preset=preset, bitrate=bitrate, gop=gop,
                                        qscale=qscale, prores_profile=prores_profile)
        self.container = container
        self.threads = threads

    def __call__(
        self,
        source,  # path or seekable binary file of the source video
        out_path: str,
        frame_start: int,
        frame_end: int,
        width: int,
        height: int,
        fps: Fraction,
        generated: np.ndarray,  # (N, 256, 256, 3) uint8 R'G'B' code values, N = frame_end - frame_start
        affines: np.ndarray,  # (N, 2, 3), NaN where no face
        has_face: np.ndarray,  # (N,)
        crf: int | None = None,
        video: VideoInfo | None = None,  # the source's probe (pixel format, colour, codec); None: probed here
    ) -> int:
        expected = frame_end - frame_start
        if video is None:
            video = probe_video(source, threads=self.threads, measure_gop=self.codec == "match-source")
        settings = self.settings if crf is None else replace(self.settings, crf=crf)
        settings = settings.for_source(video, source)
        # HDR10 static metadata goes with the source's colour unless set otherwise.
        settings = replace(settings, mastering_display=settings.mastering_display or video.mastering_display,
                           content_light=settings.content_light or video.content_light)
        pix_fmt = deliverable_format(video, settings.codec, source)
        coding = Coding.of(pix_fmt, video.colorspace, video.color_range, height)
        color_range = RANGE_JPEG if pix_fmt != video.pix_fmt and video.pix_fmt.startswith("yuvj") else video.color_range
        sws_range = RANGE_JPEG if coding.full_range else RANGE_MPEG
        sws_matrix = SWS_MATRIX[guessed_matrix(height) if video.colorspace == UNSPECIFIED_MATRIX else video.colorspace]
        written = 0
        with SegmentWriter(
            out_path, width, height, fps, frame_start, pix_fmt=pix_fmt, threads=self.threads, settings=settings,
            color_primaries=video.color_primaries, color_trc=video.color_trc, colorspace=video.colorspace,
            color_range=color_range, container=self.container,
        ) as writer:
            for index, frame in decode_native_frames(source, frame_start, frame_end, threads=self.threads):
                if frame.format.name != video.pix_fmt:
                    raise MediaError(f"video {media_name(source)!r}: frame {index} is {frame.format.name}, "
                                     f"the stream starts as {video.pix_fmt}; a format change mid-stream is not supported")
                if frame.format.name != pix_fmt:
                    # Odd size (4:4:4 twin) or a "j" format the encoder names without the j:
                    # the same matrix and range, only chroma resampled or the name changed.
                    frame = frame.reformat(format=pix_fmt, src_colorspace=sws_matrix, dst_colorspace=sws_matrix,
                                           src_color_range=sws_range, dst_color_range=sws_range)
                i = index - frame_start
                if has_face[i]:
                    frame = paste_back_native(frame, generated[i], affines[i], self.blend_mask, coding)
                writer.write_frame(frame)
                written += 1
        if written != expected:
            raise ValueError(f"segment [{frame_start}, {frame_end}) decoded {written} frames, expected {expected}")
        return written
