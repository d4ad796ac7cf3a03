"""The same operators as the Ray Data graph, run in one plain Python loop in this process.

Used by the benchmark as the no-Ray baseline, and handy for debugging one video: every
stage runs exactly the code the cluster runs, one row at a time, in order.
"""
from __future__ import annotations

import time

from pipeline.dub import finalize as finalize_step
from pipeline.dub import operators as ops
from pipeline.config import JobConfig
from pipeline.dub.rows import new_row


def dub_rows_locally(rows: list[dict], config: JobConfig, weights_uri: str) -> list[dict]:
    """rows: new_row(...) video rows. Returns one dict per video: the video row fields of
    its first segment plus `segments` (the compose outputs) and `final` (finalize output)."""
    cfg = config.model_dump()
    plan = ops.PlanOp(cfg)
    analyse = ops.AnalyseOp(cfg, weights_uri)
    audio = ops.AudioOp(cfg, weights_uri)
    face = ops.FaceOp(cfg)
    motion = ops.MotionOp(cfg, weights_uri)
    complete = ops.CompleteOp(cfg, weights_uri)
    compose = ops.ComposeOp(cfg)
    results = []
    for row in rows:
        video = audio(analyse(plan(row)))
        segments = [compose(complete(motion(face(seg)))) for seg in ops.split_segments(video)]
        final = None
        if all(not s["error"] for s in segments) and segments and segments[0]["n_segments"]:
            final = finalize_step.finalize_video(
                cfg,
                {k: video[k] for k in finalize_step.FINALIZE_VIDEO_KEYS},
                [{"seg_idx": s["seg_idx"], "segment_uri": s["segment_uri"]} for s in segments],
            )
        results.append({"video": video, "segments": segments, "final": final})
    return results


def make_rows(manifest_rows: list[dict], config: JobConfig) -> list[dict]:
    from pipeline.dub.schemas import ManifestRow

    job_id = "local-" + time.strftime("%Y%m%dT%H%M%S")
    out = []
    for i, r in enumerate(manifest_rows):
        m = ManifestRow.model_validate(r)
        out.append(
            new_row(
                job_id=job_id,
                row_index=i,
                video_id=m.video_id,
                video_uri=m.video_uri,
                audio_uri=m.audio_uri,
                output_uri=m.output_uri,
                segment_seconds=m.options.segment_seconds or config.segment_seconds,
                face=m.options.face_key(),
            )
        )
    return out
