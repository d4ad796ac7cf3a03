"""Media stage: probe, segment planning, PyAV decode/encode, stream-copy concat, audio mux.

Chain per video: probe_video -> segment_plan -> per segment decode_frames ... SegmentWriter
-> concat_segments -> mux_audio. The result keeps the source's coded size, exact frame
rate and frame count.
"""

from .decode import decode_frames, decode_native_frames, frame_to_rgb
from .encode import EncoderSettings, SegmentWriter, deliverable_format, encode_frames, pix_fmt_for_size
from .mux import MuxResult, concat_segments, mux_audio
from .probe import MediaError, VideoInfo, probe_video
from .segments import Segment, segment_plan

__all__ = [
    "EncoderSettings",
    "MediaError",
    "MuxResult",
    "Segment",
    "SegmentWriter",
    "VideoInfo",
    "concat_segments",
    "decode_frames",
    "decode_native_frames",
    "deliverable_format",
    "encode_frames",
    "frame_to_rgb",
    "mux_audio",
    "pix_fmt_for_size",
    "probe_video",
    "segment_plan",
]
