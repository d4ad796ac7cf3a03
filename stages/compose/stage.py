"""Compose a segment: decode the source frames again (full-resolution frames never travel
between stages), paste the generated crops back through the inverse affine with a
feathered mouth mask, and encode the segment.

Frames without a face are written as decoded, so they equal the source up to codec loss.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np

from stages.face import paste_back
from stages.media import SegmentWriter, decode_frames


class ComposeStage:
    """`threads` caps both the decoder's and the encoder's threads, so a worker uses the
    cores its pool reserved (None: FFmpeg's and x264's automatic counts from the node's cores)."""

    def __init__(self, blend_mask: np.ndarray, codec: str = "libx264", crf: int = 18, preset: str = "medium",
                 threads: int | None = None):
        self.blend_mask = blend_mask.astype(np.float32)  # (256, 256) in [0, 1]
        self.codec, self.crf, self.preset = codec, crf, preset
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
        generated: np.ndarray,  # (N, 256, 256, 3) uint8, N = frame_end - frame_start
        affines: np.ndarray,  # (N, 2, 3), NaN where no face
        has_face: np.ndarray,  # (N,)
        crf: int | None = None,
    ) -> int:
        expected = frame_end - frame_start
        written = 0
        with SegmentWriter(
            out_path, width, height, fps, frame_start, codec=self.codec, crf=self.crf if crf is None else crf, preset=self.preset,
            threads=self.threads,
        ) as writer:
            for index, frame in decode_frames(source, frame_start, frame_end, threads=self.threads):
                i = index - frame_start
                if has_face[i]:
                    frame = paste_back(frame, generated[i], affines[i], self.blend_mask)
                writer.write(frame)
                written += 1
        if written != expected:
            raise ValueError(f"segment [{frame_start}, {frame_end}) decoded {written} frames, expected {expected}")
        return written
