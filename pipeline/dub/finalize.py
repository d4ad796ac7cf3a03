"""Finalize, the last step of a dubbed video: its encoded segments joined without
re-encoding, the dubbed track muxed, the quality checks run, and the result committed
at the output URI. A Ray task (pipeline.dub.job decides where it runs, with the
`finalize` pool's reservation); no Ray here.

One streaming pass: segments and dubbed audio are read straight from storage (ranged
reads of one segment at a time) into the one local file the output is, which is
then committed with a single atomic upload. Local disk holds the output once, never
the segments or the audio."""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
import time

import numpy as np

from pipeline.config import JobConfig
from pipeline.dub.rows import unpack
from pipeline.storage import Storage

log = logging.getLogger("imgtalk.finalize")

# What finalize_video reads of a video's row.
FINALIZE_VIDEO_KEYS = ("video_uri", "audio_uri", "output_uri", "rotation", "audio_mode", "audio_language", "face_identity")


_SYNC_TOOLS: dict[tuple, tuple] = {}  # per worker process: (SyncNet scorer, FaceTracker) by weights file


def _sync_tools(path: str, config: JobConfig):
    """The SyncNet scorer and face tracker of this process, built once per weights file
    (a Ray worker runs many finalize tasks)."""
    import torch

    from stages.completion.stage import resolve_device
    from stages.eval.syncnet import SyncNetScorer
    from stages.face import FaceTracker

    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _SYNC_TOOLS:
        for _, tracker in _SYNC_TOOLS.values():
            tracker.close()
        _SYNC_TOOLS.clear()
        torch.set_num_threads(config.torch_threads)
        # Ray hides GPUs from tasks that reserved none, so "auto" lands on the CPU there.
        scorer = SyncNetScorer(path, device=resolve_device(config.device))
        # Each frame its own detection (no smoothing, no gap filling): stages.eval.sync_check.
        tracker = FaceTracker(min_detection_confidence=config.face.min_detection_confidence,
                              smoothing_sigma_frames=0.0, max_gap_frames=0)
        _SYNC_TOOLS[key] = (scorer, tracker)
    return _SYNC_TOOLS[key]


def sync_check(local_video: str, weights_uri: str | None, config: JobConfig, storage: Storage,
               identity: np.ndarray | None = None) -> dict:
    """SyncNet's report fields (sync_conf, sync_dist, sync_offset) of a local output file,
    its picture with its own (muxed) audio; all None when the bundle has no SyncNet
    weights or the video has nothing to score. `identity`: the dubbed person's signature
    (stages.face.identity), so that with two people in the picture the check scores the
    one whose mouth was re-rendered; None scores the largest face."""
    from pipeline.dub.qc import sync_fields
    from pipeline.weights import localize_bundle, read_bundle_info
    from stages.eval.sync_check import sync_score_video

    if not weights_uri:
        return sync_fields(None)
    bundle = read_bundle_info(localize_bundle(weights_uri, storage))
    if not bundle.has("syncnet"):
        return sync_fields(None)
    scorer, tracker = _sync_tools(bundle.path("syncnet"), config)
    score = sync_score_video(local_video, local_video, scorer, tracker, identity=identity)
    if score is None and identity is not None:
        # The re-rendered mouth can move the face mesh past the signature's bound on every
        # frame (an untrained bundle's noise mouth does): then the largest face is scored,
        # as it was before there was a face option, rather than nothing.
        log.warning("%s: the dubbed person's signature matched no face of the output; scoring the largest face",
                    os.path.basename(local_video))
        score = sync_score_video(local_video, local_video, scorer, tracker)
    return sync_fields(score)


def output_extension(output_uri: str) -> str:
    """The container the output is written in: Matroska or QuickTime when its URI says so
    (an .mkv keeps srt/ass subtitles), else mp4."""
    ext = os.path.splitext(output_uri.split("?", 1)[0])[1].lower()
    return ext if ext in (".mkv", ".mov") else ".mp4"


def finalize_video(config_dict: dict, video: dict, segments: list[dict], weights_uri: str | None = None) -> dict:
    """Concatenate a video's segments (no re-encode), mux the dubbed audio (config.output's
    codec; the dub's layout), probe the result, run the quality checks, and commit it
    atomically. Returns report fields.

    `video`: video_uri, audio_uri, output_uri, rotation, and optionally the row's
    audio_mode ("replace", the default, or "add": the source's audio tracks are kept after
    the dub) and audio_language (the dub track's tag). With output.keep_source_streams the
    source's subtitles, data streams, chapters and tags are kept too (stages.media.mux.KeepSource).

    Quality checks (pipeline/dub/qc.py): with `weights_uri` naming a bundle that holds
    SyncNet weights, the local result is scored (sync_conf / sync_dist / sync_offset)
    before the commit; when its confidence is below qc.min_sync_conf nothing is committed
    and QCError (with the report fields) is raised: the row fails at stage "qc".

    Idempotent, so Ray may retry it after a worker died: it leaves the segments in place
    (the driver drops them once the report row is written) and does not upload an output
    that is already there with the same content."""
    from pipeline.dub.qc import QCError, qc_failure
    from pipeline.steps import open_source
    from stages.media import probe_video
    from stages.media.probe import codec_threads
    from stages.media.mux import KeepSource, mux_segments

    config = JobConfig.model_validate(config_dict)
    storage = Storage(config.storage.options())
    start = time.perf_counter()
    segments = sorted(segments, key=lambda r: int(r["seg_idx"]))
    with tempfile.TemporaryDirectory(prefix="imgtalk-final-") as tmp:
        final = os.path.join(tmp, "final" + output_extension(video["output_uri"]))
        # The source is read only for streams it keeps ("add", keep_source_streams), in the same pass.
        keep = KeepSource(functools.partial(open_source, storage, video["video_uri"]),
                          audio=video.get("audio_mode", "replace") == "add", other=config.output.keep_source_streams)
        with open_source(storage, video["audio_uri"]) as audio:
            mux = mux_segments(
                [functools.partial(open_source, storage, seg["segment_uri"]) for seg in segments],
                audio,
                final,
                bitrate=config.output.audio_bitrate,
                sample_rate=config.output.audio_sample_rate,
                rotation=video.get("rotation") or None,  # keep a phone video's display matrix
                codec=config.output.audio_codec,
                language=video.get("audio_language") or None,
                keep=keep,
            )
        info = probe_video(final, threads=codec_threads(config.pools["finalize"].num_cpus))
        h = hashlib.sha256()
        with open(final, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        size = os.path.getsize(final)
        out = video["output_uri"]
        identity = unpack(video["face_identity"]) if video.get("face_identity") else None
        quality = sync_check(final, weights_uri, config, storage, identity)
        failure = qc_failure(quality, config.qc, out)
        if failure:  # before the commit: no output is better than one that fails the check
            raise QCError(failure, dict(quality, audio_padded_s=mux.padded_s, audio_trimmed_s=mux.trimmed_s,
                                        time_finalize_s=time.perf_counter() - start))
        if not (storage.exists(out) and storage.size(out) == size and storage.sha256(out) == h.hexdigest()):
            storage.put_atomic(final, out)
    return {
        "output_frames": info.n_frames,
        "output_bytes": size,
        "output_sha256": h.hexdigest(),
        "audio_padded_s": mux.padded_s,
        "audio_trimmed_s": mux.trimmed_s,
        **quality,
        "time_finalize_s": time.perf_counter() - start,
    }
