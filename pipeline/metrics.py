"""Prometheus metrics of the dubbing job, through Ray's metrics API (ray.util.metrics).

Every actor, task and the driver records into its own process; the dashboard agent on
each node exports what that node's processes recorded, so Prometheus scrapes every node
(deploy/prometheus/prometheus.yml finds them through Ray's service-discovery file).

What Ray 2.60 puts on the wire (checked against a local run):
  - every name gets a `ray_` prefix: imgtalk_frames_processed_total is scraped as
    ray_imgtalk_frames_processed_total; histograms as ray_imgtalk_batch_seconds_{bucket,sum,count};
  - each series also carries WorkerId, NodeAddress, SessionName, Component, Version
    (user metrics keep WorkerId), so queries sum over workers: `sum by (stage) (...)`;
  - counters are cumulative in the agent and outlive the worker that recorded them;
    a gauge is exported only when it is set and dropped two export intervals later, so a
    gauge that must stay visible is set again periodically (JobMetrics.refresh), and the
    per-stage GPU memory gauges show while a stage is busy;
  - a histogram's _sum is rebuilt from bucket midpoints (each observation counts as the
    middle of its bucket; the last bucket as twice its lower bound), so it is approximate:
    latency panels use the buckets (histogram_quantile), not _sum/_count;
  - processes push to the agent every RAY_metrics_report_interval_ms (default 10000 ms,
    never faster than 1000 ms), read from the environment when Ray starts;
  - each node's agent exports even with include_dashboard=False, but the service-
    discovery file is written by the dashboard head: a local Ray started for
    `imgtalk dub --metrics-port` runs its dashboard (on loopback) for that reason.

Labels are `stage`, `job` (the job id), `kind` (errors) and `status` (videos): never a
URI, a path or anything from the storage options, so no credential can reach a label.

Outside Ray (unit tests, pipeline.dub.local_loop) every call here is a no-op.
"""
from __future__ import annotations

import functools
import re
import sys
import time

# Stages whose unit of work is a segment: they count frames and segments.
SEGMENT_STAGES = ("face", "motion", "complete", "compose")
# Stages run by the operators (pipeline.dub.operators); failures elsewhere (manifest,
# finalize, ...) are counted by the driver when the video's report row settles.
OPERATOR_STAGES = ("plan", "analyse", "audio") + SEGMENT_STAGES
VIDEO_STATUSES = ("ok", "failed", "skipped")

# Seconds per batch: from a cached-feature lookup (~10 ms) to a long GPU batch (minutes).
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)

# SyncNet confidence (LSE-C) of a dubbed video: higher is better (syncnet_python's example
# clip scores 10.0; qc.low_sync_conf defaults to 3).
SYNC_CONF_BUCKETS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 15.0)

# name -> (type, description, tag keys[, boundaries]); names as recorded (Ray adds `ray_`).
SPECS: dict[str, tuple] = {
    "imgtalk_frames_processed_total": ("counter", "Video frames processed, per stage", ("stage", "job")),
    "imgtalk_segments_processed_total": ("counter", "Segments processed, per stage", ("stage", "job")),
    "imgtalk_face_frames_total": ("counter", "Frames in which the face stage found a face", ("stage", "job")),
    "imgtalk_segments_reused_total": ("counter", "Segments an earlier run of the same work committed, not processed again", ("stage", "job")),
    "imgtalk_batch_seconds": ("histogram", "Seconds per operator call (one video or segment)", ("stage", "job"), LATENCY_BUCKETS_S),
    "imgtalk_errors_total": ("counter", "Rows failed, per stage and kind (exception class or category)", ("stage", "kind", "job")),
    "imgtalk_cache_hits_total": ("counter", "HuBERT feature cache hits", ("stage", "job")),
    "imgtalk_cache_misses_total": ("counter", "HuBERT feature cache misses (features computed)", ("stage", "job")),
    "imgtalk_gpu_memory_allocated_bytes": ("gauge", "CUDA memory held by tensors in a stage's process", ("stage", "job")),
    "imgtalk_gpu_memory_reserved_bytes": ("gauge", "CUDA memory reserved by the caching allocator in a stage's process", ("stage", "job")),
    "imgtalk_videos_finished_total": ("counter", "Videos finished, by status (ok, failed, skipped)", ("status", "job")),
    "imgtalk_output_frames_total": ("counter", "Frames in committed output videos", ("job",)),
    "imgtalk_sync_confidence": ("histogram", "SyncNet lip-sync confidence (LSE-C) of each committed video (bundles with syncnet/)", ("job",), SYNC_CONF_BUCKETS),
    "imgtalk_job_videos": ("gauge", "Videos in the job's manifest", ("job",)),
    "imgtalk_train_steps_total": ("counter", "Optimisation steps taken by a training run", ("stage",)),
    "imgtalk_train_samples_total": ("counter", "Training samples consumed, all ranks", ("stage",)),
    "imgtalk_train_loss": ("gauge", "Latest training loss terms (rank 0)", ("stage", "part")),
}

_metrics: dict[str, object] = {}


def enabled() -> bool:
    """True in a process connected to Ray (an actor, a task, or a driver after ray.init)."""
    ray = sys.modules.get("ray")  # never import Ray just to find out it is not running
    return ray is not None and ray.is_initialized()


def _metric(name: str):
    if name not in _metrics:
        from ray.util import metrics as rm

        kind, description, tags, *rest = SPECS[name]
        if kind == "counter":
            _metrics[name] = rm.Counter(name, description=description, tag_keys=tags)
        elif kind == "gauge":
            _metrics[name] = rm.Gauge(name, description=description, tag_keys=tags)
        else:
            _metrics[name] = rm.Histogram(name, description=description, boundaries=list(rest[0]), tag_keys=tags)
    return _metrics[name]


def _inc(name: str, value: float, **tags: str) -> None:
    if value > 0:
        _metric(name).inc(float(value), tags=tags)


def _zero(name: str, **tags: str) -> None:
    # Prometheus practice: a series that starts at 0 lets rate() see its first increment.
    # Counter.inc() refuses 0, so record the point directly.
    _metric(name)._record(0.0, tags=tags)


# ------------------------------------------------------------------ error kinds

_CLASS_IN_MESSAGE = re.compile(r"\b([A-Z][A-Za-z0-9]*(?:Error|Exception|Timeout|Exit|Interrupt))\b")


def error_kind(error: BaseException | str | None, active: BaseException | None = None) -> str:
    """The `kind` label of a failure: the exception's class when there is one (raised, or
    being handled where the row was failed), else the class a message names ("…: OSError:
    …"), else a short category from the message."""
    if isinstance(error, BaseException):
        return type(error).__name__
    if active is not None:
        return type(active).__name__
    message = error or ""
    match = _CLASS_IN_MESSAGE.search(message)
    if match:
        return match.group(1)
    lowered = message.lower()
    if "no such file" in lowered or "not found" in lowered:
        return "not_found"
    if "no face" in lowered:
        return "no_face"
    if "segments completed" in lowered:
        return "lost_segments"
    if "lip-sync confidence" in lowered:
        return "low_sync"
    return "other"


# ------------------------------------------------------------------ operators


def counting_failures(fail):
    """Wrap rows.fail so every row an operator fails is counted where it fails, while the
    exception being handled (if any) still names its kind."""

    @functools.wraps(fail)
    def fail_counted(row: dict, stage: str, error: BaseException | str) -> dict:
        if enabled():
            kind = error_kind(error, active=sys.exc_info()[1])
            _inc("imgtalk_errors_total", 1, stage=stage, kind=kind, job=str(row.get("job_id", "")))
        return fail(row, stage, error)

    return fail_counted


def instrumented(stage: str):
    """Decorate an operator's __call__(self, row) -> row: latency of every call that did
    work, and what a successful call processed (frames, segments, faces, cache use).
    Rows that failed upstream, or whose segment an earlier run committed, pass through
    uncounted."""

    def wrap(call):
        @functools.wraps(call)
        def run(self, row: dict) -> dict:
            if not enabled() or row.get("error") or row.get("segment_reused"):
                return call(self, row)
            start = time.perf_counter()
            out = call(self, row)
            record_call(stage, out, time.perf_counter() - start)
            return out

        return run

    return wrap


def record_call(stage: str, row: dict, seconds: float) -> None:
    job = str(row.get("job_id", ""))
    if row.get("segment_reused"):  # found committed, not processed
        _inc("imgtalk_segments_reused_total", 1, stage=stage, job=job)
        return
    _metric("imgtalk_batch_seconds").observe(seconds, tags={"stage": stage, "job": job})
    _gpu_memory(stage, job)
    if row.get("error"):
        return  # counted by counting_failures
    if stage in SEGMENT_STAGES:
        _inc("imgtalk_frames_processed_total", int(row["frame_end"]) - int(row["frame_start"]), stage=stage, job=job)
        _inc("imgtalk_segments_processed_total", 1, stage=stage, job=job)
    if stage == "face":
        _inc("imgtalk_face_frames_total", int(row["face_frames"]), stage=stage, job=job)
    if stage == "audio":
        _inc("imgtalk_cache_hits_total" if row["cache_hit"] else "imgtalk_cache_misses_total", 1, stage=stage, job=job)


def _gpu_memory(stage: str, job: str) -> None:
    torch = sys.modules.get("torch")
    # is_initialized: only a process that has touched CUDA has memory to report.
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    _metric("imgtalk_gpu_memory_allocated_bytes").set(float(torch.cuda.memory_allocated()), tags={"stage": stage, "job": job})
    _metric("imgtalk_gpu_memory_reserved_bytes").set(float(torch.cuda.memory_reserved()), tags={"stage": stage, "job": job})


# ------------------------------------------------------------------ driver


class JobMetrics:
    """The driver's metrics of one job: its size (a gauge, for the ETA panel), the videos
    finished by status, and the frames committed.

    Ray 2.60 exports a gauge only when it is set and drops it two export intervals later,
    so the job-size gauge is set again each time `refresh()` runs (pipeline.progress
    calls it every second while the job runs)."""

    def __init__(self, job: str, videos: int):
        self.job = job
        self.videos = videos
        if not enabled():
            return
        # Counters start at 0 so that rate() sees the first video finish.
        for status in VIDEO_STATUSES:
            _zero("imgtalk_videos_finished_total", status=status, job=job)
        _zero("imgtalk_output_frames_total", job=job)
        self.refresh()

    def refresh(self) -> None:
        if enabled():
            _metric("imgtalk_job_videos").set(float(self.videos), tags={"job": self.job})

    def video_finished(self, status: str, output_frames: int = 0, error_stage: str | None = None, error: str | None = None,
                       sync_conf: float | None = None) -> None:
        """One report row settled. Failures outside the operators (manifest, finalize,
        qc, ...) are counted here; the operators count their own where they happen. An ok
        video's SyncNet confidence, when it was scored, goes into imgtalk_sync_confidence."""
        if not enabled():
            return
        _inc("imgtalk_videos_finished_total", 1, status=status, job=self.job)
        _inc("imgtalk_output_frames_total", output_frames, job=self.job)
        if status == "ok" and sync_conf is not None:
            _metric("imgtalk_sync_confidence").observe(float(sync_conf), tags={"job": self.job})
        if status == "failed" and (error_stage or "") not in OPERATOR_STAGES:
            _inc("imgtalk_errors_total", 1, stage=error_stage or "unknown", kind=error_kind(error), job=self.job)


# ------------------------------------------------------------------ training


def training_step(stage: str, values: dict[str, float], samples: int) -> None:
    """One optimisation step of `imgtalk train` (rank 0): steps, samples, and the loss terms."""
    if not enabled():
        return
    _inc("imgtalk_train_steps_total", 1, stage=stage)
    _inc("imgtalk_train_samples_total", samples, stage=stage)
    for part, value in values.items():
        _metric("imgtalk_train_loss").set(float(value), tags={"stage": stage, "part": part})
