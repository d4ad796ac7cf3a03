"""The work area and its resume protocol.

Encoded segments wait under `work_uri/segments/<video_id>/<key>/` until their video is
finalized. A segment's key depends on everything that decides its bytes (stage code,
weights, pixel settings, the video's identity, the dubbed audio, the frame range) and
never on the job, so a restarted job finds what a crashed one committed, and changed
inputs never meet a stale segment. A `<segment>.json` marker written after the segment
says it is whole.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os

from pipeline.config import JobConfig
from pipeline.storage import Storage, is_remote, join_uri


def digest(*parts) -> str:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:24]


# Settings that change an encoded segment's pixels or bytes. Not: paths, pools, storage,
# policy; batch sizes and torch threads (the networks are per-frame, so batching changes no
# pixel: the usual fix after an out-of-memory error must not throw the committed work away);
# the output's audio settings (the dubbed track is muxed in finalize, not in segments).
PIXEL_SETTINGS = ("device", "precision", "output.codec", "output.crf", "output.preset", "output.bitrate", "output.gop",
                  "output.qscale", "output.prores_profile", "face", "analyse", "audio", "motion", "complete")


def work_fingerprint(config: JobConfig, weights_uri: str, storage: Storage) -> str:
    """What every segment of a job depends on besides its own video and audio: the stage
    code, the weights bundle (each file's size and ETag or mtime) and PIXEL_SETTINGS.
    Computed once by the driver; PlanOp adds the video, segment_uri the rest."""
    import stages

    code = hashlib.sha256()
    # The stages and the dub job's operators decide a segment's bytes.
    roots = [os.path.dirname(os.path.abspath(stages.__file__)), os.path.join(os.path.dirname(os.path.abspath(__file__)), "dub")]
    for root in roots:
        files = [root] if os.path.isfile(root) else sorted(
            os.path.join(d, f) for d, _, names in os.walk(root) for f in names if f.endswith(".py")
        )
        for f in files:
            with open(f, "rb") as fh:
                code.update(os.path.relpath(f, os.path.dirname(roots[0])).encode() + b"\0" + fh.read())
    from pipeline.weights import bundle_identity

    # The identity each node's bundle cache is keyed on too: new keys mean new weights.
    weights = bundle_identity(weights_uri, storage)
    dumped = config.model_dump(mode="json")
    settings = {}
    for name in PIXEL_SETTINGS:
        value = dumped
        for part in name.split("."):
            value = value[part]
        settings[name] = value
    return digest(code.hexdigest(), json.dumps(weights), json.dumps(settings, sort_keys=True))


def segment_uri(config: JobConfig, row: dict) -> str:
    """Where a segment's encoded part goes. Keyed by everything that decides its bytes
    (work_key: stage code, weights, settings, the video's identity; the dubbed audio's
    content hash; per-row segment length, crf and face choice; the frame range) and never by the job:
    a restarted job finds what a crashed one committed, and changed inputs never meet a
    stale part."""
    key = digest(row["work_key"], row["audio_sha256"], row["segment_seconds"], row["crf"],
                 *([] if row.get("face", "largest") == "largest" else [row["face"]]))
    name = f"{int(row['seg_idx']):05d}-{int(row['frame_start'])}-{int(row['frame_end'])}.mp4"
    return join_uri(config.work_dir(), "segments", row["video_id"], key, name)


def segment_marker_uri(uri: str) -> str:
    """Written after the segment itself: its presence means the segment is whole."""
    return uri[: -len(".mp4")] + ".json" if uri.endswith(".mp4") else uri + ".json"


def committed_segment(storage: Storage, uri: str) -> dict | None:
    """The marker of a segment an earlier run committed ({frames, face_frames}), or None."""
    try:
        marker = json.loads(storage.read_bytes(segment_marker_uri(uri)))
        if not storage.exists(uri):
            return None
        return {"frames": int(marker["frames"]), "face_frames": int(marker["face_frames"])}
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return None  # a marker we cannot read is no promise: redo the segment


def drop_segments(storage: Storage, segments: list[dict]) -> None:
    """Delete a settled video's encoded parts (and their markers): the folder they share."""
    folders = {s["segment_uri"].rsplit("/", 1)[0] for s in segments if s["segment_uri"]}
    for uri in {s["ref_crops_uri"] for s in segments if s.get("ref_crops_uri")}:
        storage.rm(uri)
    for folder in folders:
        storage.rm(folder, recursive=True)
        if not is_remote(folder):  # the per-video folder above it, when now empty
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(folder[len("file://") :] if folder.startswith("file://") else folder))


# A video whose segment failed in this job: its remaining segments are skipped, not
# computed (its committed ones stay for the rerun). Keyed by the job, so a rerun, with a
# new job id, is never held back by an earlier run's failure.


def failed_video_uri(config: JobConfig, row: dict) -> str:
    return join_uri(config.work_dir(), "failed", str(row["job_id"]), f"{row['video_id']}.json")


def mark_video_failed(storage: Storage, config: JobConfig, row: dict) -> None:
    """Record that one of this job's segments of the row's video failed, and which."""
    marker = {"seg_idx": int(row["seg_idx"]), "stage": row["error_stage"], "error": row["error"]}
    storage.write_bytes_atomic(json.dumps(marker).encode(), failed_video_uri(config, row))


def video_failure(storage: Storage, config: JobConfig, row: dict) -> dict | None:
    """The marker of a failed segment of the row's video in this job ({seg_idx, stage,
    error}), or None. One read, no separate existence check."""
    try:
        marker = json.loads(storage.read_bytes(failed_video_uri(config, row)))
        return {"seg_idx": int(marker["seg_idx"]), "stage": str(marker["stage"]), "error": str(marker["error"])}
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return {"seg_idx": -1, "stage": "", "error": ""}  # written by this job, if unreadable: still a failure


# GPU faults per segment (per video at the per-video stages) and stage in this job. A
# fault ends the actor and Ray resubmits the row, without limit; this count lets the stage
# fail a row that faults every GPU it meets instead. Only one attempt of a row runs at a
# time (the resubmission follows the death), so reading and rewriting the count races
# with nothing.


def device_fault_uri(config: JobConfig, row: dict, stage: str) -> str:
    seg_idx = int(row["seg_idx"])
    name = f"{row['video_id']}-{f'{seg_idx:05d}' if seg_idx >= 0 else 'video'}-{stage}.json"
    return join_uri(config.work_dir(), "failed", str(row["job_id"]), "device", name)


def device_faults(storage: Storage, config: JobConfig, row: dict, stage: str) -> int:
    """How many GPU faults this job's attempts at the segment met at `stage`."""
    try:
        return int(json.loads(storage.read_bytes(device_fault_uri(config, row, stage)))["count"])
    except FileNotFoundError:
        return 0
    except (ValueError, KeyError, TypeError):
        return 1  # written, so at least one fault, however unreadable


def record_device_fault(storage: Storage, config: JobConfig, row: dict, stage: str) -> int:
    """Count one more GPU fault of the segment at `stage`; the new count."""
    count = device_faults(storage, config, row, stage) + 1
    storage.write_bytes_atomic(json.dumps({"count": count}).encode(), device_fault_uri(config, row, stage))
    return count
