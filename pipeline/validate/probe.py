"""What `imgtalk validate` finds out about one manifest row, and the thin Ray operator that
runs it. Reuses the dub job's own readers (stages.media.probe_video, stages.audio's
audio_duration, the face tracker analyse uses), so a problem found here is one the dub
would hit."""
from __future__ import annotations

import json
import os

import numpy as np

# mediapipe's C++ logging prints a warning per graph (pipeline/logs.py has the rest).
os.environ.setdefault("GLOG_minloglevel", "2")

from pipeline.config import JobConfig
from pipeline.steps import ConfiguredOp, open_source
from pipeline.storage import Storage
from pipeline.validate.schemas import problem

# Where the dub job has no check of its own (stages.media.encode.deliverable_format, which
# knows what compose can keep), source pixel formats whose picture an 8-bit pipeline keeps:
# 10/12-bit depth, alpha and exotic layouts would be lost.
KEPT_PIX_FMTS = frozenset({
    "yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p", "nv12", "nv21", "rgb24", "bgr24", "gray",
})
# FFmpeg's field orders of interlaced streams; the face tracker and the paste-back work on
# whole frames, so combed fields would be dubbed as they are.
_INTERLACED_FIELD_ORDERS = frozenset({"tt", "bb", "tb", "bt"})


def _field_order(storage: Storage, uri: str) -> str | None:
    from stages.media.probe import open_media, video_stream_of

    with open_source(storage, uri) as src:
        with open_media(src, "video") as container:
            return getattr(video_stream_of(container, src).codec_context, "field_order", None)


def _format_problem(info, config: JobConfig, video_uri: str) -> str | None:
    """Why the output could not keep the source's format, or None: the dub job's own check
    at plan when it has one, else the pixel format against KEPT_PIX_FMTS."""
    from stages.media import MediaError

    try:
        from pipeline.dub.operators import encoder_settings
        from stages.media.encode import deliverable_format
    except ImportError:
        deliverable_format = None
    if deliverable_format is not None:
        try:
            deliverable_format(info, encoder_settings(config.output).for_source(info).codec, video_uri)
        except MediaError as e:
            return str(e)
        return None
    if info.pix_fmt not in KEPT_PIX_FMTS:
        return (f"video {video_uri}: pixel format {info.pix_fmt} would be decoded to 8-bit RGB and written as 8-bit yuv "
                f"(kept: {', '.join(sorted(KEPT_PIX_FMTS))})")
    return None


def _interlaced(storage: Storage, uri: str) -> bool:
    try:
        return _field_order(storage, uri) in _INTERLACED_FIELD_ORDERS
    except Exception:  # noqa: BLE001 - it does not open: not a question of format
        return False


def _sampled_faces(storage: Storage, uri: str, n_frames: int, count: int, tracker) -> tuple[int, int]:
    """(frames sampled, frames with a face): `count` frames spread over the video, each
    tracked as its own clip, as the analyse stage does."""
    from stages.media import decode_frames

    indices = np.unique(np.linspace(0, n_frames - 1, min(count, n_frames)).round().astype(np.int64))
    faces = 0
    with open_source(storage, uri) as src:
        for i in indices:
            for _, frame in decode_frames(src, int(i), int(i) + 1, threads=1):
                faces += bool(tracker([frame]).has_face[0])
    return len(indices), faces


def probe_row(video_uri: str, audio_uri: str, config: JobConfig, storage: Storage, tracker, face_frames: int) -> dict:
    """The ValidationRow fields of one admitted row (all but its identity and status):
    every problem found, and the figures the estimate needs. Never raises for a bad input:
    each check that fails becomes a problem naming the file."""
    from stages.audio.load import AudioError, audio_duration
    from stages.media import MediaError, probe_video

    found: dict = {"problems": []}
    problems = found["problems"]
    info = None
    if not storage.exists(video_uri):
        problems.append(problem("missing_video", f"video {video_uri}: no such file"))
    else:
        try:
            with open_source(storage, video_uri) as src:
                info = probe_video(src, threads=1)
        except MediaError as e:
            # A probe that refuses interlaced video (the dub's does) names a format, not a broken file.
            problems.append(problem("unsupported_format" if _interlaced(storage, video_uri) else "unreadable_video", str(e)))
        except Exception as e:  # noqa: BLE001 - storage errors too: the row is reported, the run goes on
            problems.append(problem("unreadable_video", f"video {video_uri}: {type(e).__name__}: {e}"))
    if info is not None:
        found.update(frames=info.n_frames, fps=float(info.fps), width=info.width, height=info.height,
                     pix_fmt=info.pix_fmt, duration_s=info.duration_s)
        if _interlaced(storage, video_uri):  # a probe that admits interlaced video
            problems.append(problem("unsupported_format", f"video {video_uri}: interlaced; deinterlace it first"))
        unkept = _format_problem(info, config, video_uri)
        if unkept:
            problems.append(problem("unsupported_format", unkept))
        if face_frames > 0:
            try:
                sampled, faces = _sampled_faces(storage, video_uri, info.n_frames, face_frames, tracker)
            except Exception as e:  # noqa: BLE001 - probed, yet a frame does not decode
                problems.append(problem("unreadable_video", f"video {video_uri}: sampled frame does not decode: {e}"))
            else:
                found.update(sampled_frames=sampled, sampled_face_frames=faces)
                if faces == 0:
                    problems.append(problem("no_face", f"video {video_uri}: no face in any of {sampled} frames sampled across it"))

    audio_s = None
    if not storage.exists(audio_uri):
        problems.append(problem("missing_audio", f"audio {audio_uri}: no such file"))
    else:
        try:
            with open_source(storage, audio_uri) as src:
                audio_s = float(audio_duration(src))
        except AudioError as e:
            problems.append(problem("unreadable_audio", f"audio {audio_uri}: {e}" if audio_uri not in str(e) else str(e)))
        except Exception as e:  # noqa: BLE001
            problems.append(problem("unreadable_audio", f"audio {audio_uri}: {type(e).__name__}: {e}"))
        else:
            found["audio_duration_s"] = audio_s
    if info is not None and audio_s is not None:
        gap = audio_s - info.duration_s
        if abs(gap) > config.qc.max_audio_fit_s:
            fit = "trimmed" if gap > 0 else "padded with silence"
            problems.append(problem(
                "length_mismatch",
                f"dubbed audio {audio_s:.2f} s vs video {info.duration_s:.2f} s: {abs(gap):.2f} s would be {fit} "
                f"(tolerance qc.max_audio_fit_s = {config.qc.max_audio_fit_s} s)"))
    return found


class ProbeOp(ConfiguredOp):
    """Ray Data operator: probe one row. Builds the face tracker once per actor."""

    config_model = JobConfig

    def __init__(self, config: dict, face_frames: int):
        from stages.face import FaceTracker

        super().__init__(config)
        self.face_frames = face_frames
        self.tracker = FaceTracker(min_detection_confidence=self.config.face.min_detection_confidence,
                                   smoothing_sigma_frames=0.0) if face_frames > 0 else None

    def __call__(self, row: dict) -> dict:
        found = probe_row(row["video_uri"], row["audio_uri"], self.config, self.storage, self.tracker, self.face_frames)
        # One JSON column: every block has the same Arrow schema whatever was found.
        return {"row_index": int(row["row_index"]), "found": json.dumps(found)}
