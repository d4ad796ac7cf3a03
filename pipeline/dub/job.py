"""The dubbing job on Ray Data: manifest in, lip-synced videos + Parquet report out.

    manifest rows ─ plan ─ analyse ─ audio ─ flat_map(segments) ─ face ─ motion ─ complete ─ compose ─┐
      (tasks)      (actors)  (actors)                       (actors) (actors)  (GPU actors) (actors)    │
                                                                                                     ▼
    driver: stream_rows → when every segment of a video is back → finalize task → report row

One streaming Ray Data graph over videos; a video becomes its segments inside the graph
(flat_map), so segments of the first videos reach the GPU while later videos are still
being planned, but at most `max_videos_in_flight` of them (pipeline/dub/gate.py). Nothing
is shuffled: the driver regroups segments by (video_id, seg_idx).
On one small machine (`stage_layout`, pipeline/dub/fused.py) the same operators run
fused: plan, analyse and audio in one actor, face to compose in one actor per CPU.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from pipeline.config import JobConfig
from pipeline.progress import JobTracker, Report
from pipeline.raydata import one_row_per_block, stream_rows
from pipeline.dub.fused import SEGMENT_STAGES, VIDEO_STAGES, FusedOp, FusedVideoOp, fused_pool
from pipeline.dub.gate import VideoGate, gate_limit
from pipeline.dub.qc import QCError, qc_warnings, untrained_warning
from pipeline.dub.results import Decision, ResultStore, decide, decide_all, describe_output, input_identity, settings_identity
from pipeline.dub.rows import new_row, normalise
from pipeline.dub.schemas import ManifestRow, ReportRow, read_manifest, write_report
from pipeline.security import PolicyError, job_policy, on_cluster, redact
from pipeline.storage import Storage, join_uri
from pipeline import workarea

log = logging.getLogger("imgtalk")


@dataclass
class JobResult:
    job_id: str
    report_uri: str
    rows: list[ReportRow]
    seconds: float
    frames: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    stopped: str | None = None  # why the job ended early (error budget, pipeline failure), if it did
    segments_reused: int = 0  # encoded segments an earlier run committed, not recomputed
    warnings: list[str] = field(default_factory=list)  # job-level: also in every ok row's `warnings` (with its own)

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def _init_ray(address: str | None, num_cpus: int | None = None, metrics_export_port: int | None = None) -> bool:
    """Connect to `address`, or start a local Ray for this job. True if we started it.

    With `metrics_export_port` a local Ray exports Prometheus metrics on that port and
    runs its dashboard head on loopback: the head is what writes Ray's service-discovery
    file (/tmp/ray/prom_metrics_service_discovery.json) that deploy/prometheus reads. A
    cluster sets its ports at `ray start --metrics-export-port`."""
    import ray

    from pipeline import logs

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return False
    # Inside `ray job submit` Ray sets RAY_ADDRESS: join that cluster, never start one.
    address = address or os.environ.get("RAY_ADDRESS")
    # Worker output reaches the terminal only with --verbose; else Ray's logs folder and the job log (pipeline/logs.py).
    logs.before_ray_init()
    if address:
        ray.init(address=address, log_to_driver=logs.log_to_driver())
        logs.after_ray_init(started=False)
        return False
    exporting = (
        dict(include_dashboard=True, dashboard_host="127.0.0.1", _metrics_export_port=metrics_export_port)
        if metrics_export_port
        else dict(include_dashboard=False)
    )
    ray.init(num_cpus=num_cpus or os.cpu_count(), log_to_driver=logs.log_to_driver(), logging_level=logging.WARNING, **exporting)
    logs.after_ray_init(started=True)
    return True


def _report_row(job_id: str, index: int, m: ManifestRow | None, raw: dict, **fields) -> ReportRow:
    base = dict(
        job_id=job_id,
        row_index=index,
        video_id=m.video_id if m else "",
        video_uri=m.video_uri if m else str(raw.get("video_uri", "")),
        audio_uri=m.audio_uri if m else str(raw.get("audio_uri", "")),
        output_uri=m.output_uri if m else str(raw.get("output_uri", "")),
    )
    base.update(fields)
    for key in ("video_uri", "audio_uri", "output_uri", "error"):
        if base.get(key):
            base[key] = redact(base[key])
    return ReportRow(**base)


def _video_report(job_id: str, row: dict, segments: list[dict], final: dict | None, error: str | None, stage: str | None) -> ReportRow:
    fps = row["fps_num"] / row["fps_den"] if row["fps_num"] else None
    face_frames = sum(int(s["face_frames"]) for s in segments)
    n = int(row["n_frames"]) or None
    fields = dict(
        job_id=job_id,
        row_index=int(row["row_index"]),
        video_id=row["video_id"],
        video_uri=row["video_uri"],
        audio_uri=row["audio_uri"],
        output_uri=row["output_uri"],
        status="failed" if error else "ok",
        error=error,
        error_stage=stage,
        source_frames=n,
        fps=fps,
        width=int(row["width"]) or None,
        height=int(row["height"]) or None,
        duration_s=float(row["duration_s"]) or None,
        audio_duration_s=float(row["audio_duration_s"]) or None,
        face_fraction=(face_frames / n) if (n and segments and not error) else None,
        segments=int(row["n_segments"]) or None,
        feature_cache_hit=bool(row["cache_hit"]) if row["features_path"] else None,
        time_plan_s=float(row["time_plan_s"]),
        time_analyse_s=float(row["time_analyse_s"]),
        time_audio_s=float(row["time_audio_s"]),
        time_face_s=sum(float(s["time_face_s"]) for s in segments),
        time_motion_s=sum(float(s["time_motion_s"]) for s in segments),
        time_complete_s=sum(float(s["time_complete_s"]) for s in segments),
        time_compose_s=sum(float(s["time_compose_s"]) for s in segments),
    )
    if final:
        fields.update(final)
    return ReportRow(**fields)


def _check_stage2_condition(bundle) -> None:
    """An audio-conditioned IMC-UNet (the ablation of IMCUNetConfig.condition) reads the
    bundle's HuBERT rows: refuse a pair that cannot fit before any work."""
    from pipeline.weights import BundleError
    from stages.common.checkpoint import load_config
    from stages.completion.imc_unet import IMCUNetConfig

    unet = load_config(IMCUNetConfig, bundle.path("stage2"))
    if unet.condition != "audio":
        return
    with open(os.path.join(bundle.path("hubert"), "config.json")) as f:
        hidden = int(json.load(f)["hidden_size"])
    if unet.audio_dim != hidden:
        raise BundleError(f"{bundle.path('stage2')}: an audio-conditioned IMC-UNet with audio_dim={unet.audio_dim} "
                          f"cannot take this bundle's HuBERT features ({hidden}-d, {bundle.path('hubert')})")


def _alive_nodes(ray) -> int:
    return sum(1 for n in ray.nodes() if n.get("Alive"))


def stage_layout(ray, config: JobConfig) -> str:
    """"pools" or "fused" (pipeline/dub/fused.py): config.stage_layout, with "auto" fused
    on one node of at most 4 CPUs and no GPU, where actor start-up dominates a job."""
    if config.stage_layout != "auto":
        return config.stage_layout
    resources = ray.cluster_resources()
    small = _alive_nodes(ray) == 1 and resources.get("CPU", 0) <= 4 and not resources.get("GPU")
    return "fused" if small else "pools"


def node_local_refusals(config: JobConfig, outputs: list[str]) -> list[str]:
    """On a cluster of more than one node, what may not be a node-local path: the cache
    (features and reference banks cross nodes through it), the work area (segments are
    committed on one node and finalized on another) and outputs (finalize writes them on
    whichever node runs it, where the operator will never find them)."""
    from pipeline.storage import is_remote

    found = [f"{name} {uri}" for name, uri in (("cache_uri", config.cache_uri), ("work_uri", config.work_dir())) if not is_remote(uri)]
    local_outputs = [u for u in outputs if not is_remote(u)]
    if local_outputs:
        found.append(f"{len(local_outputs)} output URI(s) such as {redact(local_outputs[0])}")
    return found


class PartialReport:
    """Rewrites the report while the job runs, at most every `interval_s` (clock injectable),
    so a job that dies leaves a readable report of every video settled so far."""

    def __init__(self, write: Callable[[], None], interval_s: float, clock: Callable[[], float] = time.monotonic):
        self.write, self.interval_s, self.clock = write, interval_s, clock
        self.last: float | None = None

    def settled(self) -> None:
        now = self.clock()
        if self.last is None or now - self.last >= self.interval_s:
            self.write()
            self.last = now


def run_dub(
    manifest_uri: str,
    weights_uri: str,
    report_uri: str,
    config: JobConfig | None = None,
    address: str | None = None,
    progress: bool | None = None,
    metrics_export_port: int | None = None,
    force: bool = False,
    clock: Callable[[], float] = time.monotonic,
) -> JobResult:
    """progress: draw a live progress line on stderr (None: when stderr is a terminal).
    force: redo every video, even one whose output exists and whose inputs are unchanged."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from pipeline.dub import finalize as finalize_step
    from pipeline.dub import operators as ops
    from pipeline.weights import bundle_identity, load_syncnet, localize_bundle, read_bundle_info

    config = config or JobConfig()
    storage = Storage(config.storage.options())
    started = time.perf_counter()
    job_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]

    policy = job_policy("dub", config.security, {"manifest": manifest_uri, "weights": weights_uri, "report": report_uri}, address)
    joins_cluster = on_cluster(address)

    # Fail fast on job-level mistakes (bad weights, bad manifest file) before any work.
    bundle = read_bundle_info(localize_bundle(weights_uri, storage))
    _check_stage2_condition(bundle)
    load_syncnet(bundle)  # optional; a bundle whose SyncNet file is broken fails here, before any work
    warnings = [] if bundle.trained else [untrained_warning(weights_uri)]
    for warning in warnings:
        log.warning(warning)
    manifest = read_manifest(manifest_uri, storage)
    by_index = {i: m for i, m, _ in manifest}

    started_ray = False
    if joins_cluster or ray.is_initialized():
        # Joined before any work: whether node-local paths are allowed depends on the cluster.
        started_ray = _init_ray(address, metrics_export_port=metrics_export_port)
        if _alive_nodes(ray) > 1:
            refused = node_local_refusals(config, [m.output_uri for m in by_index.values() if m is not None])
            if refused:
                raise PolicyError(f"this cluster has {_alive_nodes(ray)} nodes, and every node must reach the job's files: "
                                  f"node-local {'; '.join(refused)} would be written on one node and looked for on "
                                  "another; use object storage (deploy/job.cluster.yaml)")

    show = sys.stderr.isatty() if progress is None else progress
    tracker = JobTracker(job_id, len(manifest), stream=sys.stderr if show else None)
    report: dict[int, ReportRow] = Report(tracker)

    def assembled() -> list[ReportRow]:
        """The report as written: URIs as the manifest wrote them (the job may have used a
        resolved form), user-info redacted; every ok row's `warnings` built in one place
        (pipeline/dub/qc.py), the job-level ones first."""
        rows = [
            report[i].model_copy(update={k: redact(getattr(by_index[i], k)) for k in ("video_uri", "audio_uri", "output_uri")})
            if by_index.get(i) is not None else report[i]
            for i in sorted(report)
        ]

        def quality_warnings(r: ReportRow) -> str | None:
            found = qc_warnings(r.model_dump(), config.qc, bundle.trained, weights_uri, sync_expected=bundle.has("syncnet"))
            return "; ".join(found) or None

        return [r.model_copy(update={"warnings": quality_warnings(r)}) if r.status == "ok" else r for r in rows]

    partial = PartialReport(lambda: write_report(assembled(), report_uri, storage), config.report_interval_s, clock)
    results = ResultStore(storage, config.work_dir())
    candidates: list[tuple[int, ManifestRow, tuple[str, str, str]]] = []
    for index, m, error in manifest:
        if m is None:
            report[index] = _report_row(job_id, index, None, {}, status="failed", error=error, error_stage="manifest")
            continue
        # Checked before anything opens them: a refused row is never read or written.
        refused = [policy.check(uri, kind) for uri, kind in ((m.video_uri, "video"), (m.audio_uri, "audio"), (m.output_uri, "output"))]
        refused = [r for r in refused if r]
        if refused:
            report[index] = _report_row(job_id, index, m, {}, status="failed", error="; ".join(refused), error_stage="security")
            continue
        candidates.append((index, m, tuple(policy.canonical(u) for u in (m.video_uri, m.audio_uri, m.output_uri))))

    bundle_id = bundle_identity(weights_uri, storage)
    settings = settings_identity(config)

    def decide_one(index: int, m: ManifestRow, uris: tuple[str, str, str]) -> Decision:
        video_uri, audio_uri, output_uri = uris
        seconds = m.options.segment_seconds or config.segment_seconds
        crf = m.options.crf if m.options.crf is not None else -1
        return decide(storage, results, m.video_id, output_uri,
                      lambda: input_identity(storage, video_uri, audio_uri, bundle_id, m.options.output_settings(settings), seconds, crf,
                                             face=m.options.face_key()),
                      force, lambda uri: describe_output(storage, uri))

    todo: list[dict] = []
    inputs: dict[int, dict | None] = {}
    for (index, m, (video_uri, audio_uri, output_uri)), decision in zip(candidates, decide_all(candidates, decide_one)):
        if not decision.redo:
            # This run skips it; its row is the run's that made the output, when recorded.
            earlier = decision.earlier.model_dump() if decision.earlier else {}
            earlier.update(job_id=job_id, row_index=index, status="skipped", error=decision.note, error_stage=None,
                           warnings=None, result_job_id=earlier.get("result_job_id") or earlier.get("job_id"))
            report[index] = _report_row(job_id, index, m, {}, **{k: v for k, v in earlier.items() if k not in _IDENTITY_FIELDS})
            continue
        inputs[index] = decision.inputs
        todo.append(
            new_row(
                job_id=job_id,
                row_index=index,
                video_id=m.video_id,
                video_uri=video_uri,
                audio_uri=audio_uri,
                output_uri=output_uri,
                crf=m.options.crf if m.options.crf is not None else -1,
                audio_mode=m.options.audio_mode,
                audio_language=m.options.audio_language or "",
                segment_seconds=m.options.segment_seconds or config.segment_seconds,
                face=m.options.face_key(),
            )
        )

    budget = config.max_failed_videos
    failed_early = sum(r.status == "failed" for r in report.values())
    stopped, reused = None, 0
    try:
        if todo and budget is not None and failed_early > budget:
            stopped = f"{failed_early} videos failed before any work started (max_failed_videos={budget})"
        elif todo:
            fingerprint = workarea.work_fingerprint(config, weights_uri, storage)
            for row in todo:
                row["work_key"] = fingerprint
            started_ray = _init_ray(address, metrics_export_port=metrics_export_port) or started_ray
            tracker.attach_metrics()
            remaining = None if budget is None else budget - failed_early
            sink = GraphSink(report, results, inputs, partial)
            stopped, reused = _run_graph(ray, ActorPoolStrategy, DataContext, ops, finalize_step, config, weights_uri, job_id, todo,
                                         sink, remaining, sync_weights_uri=weights_uri if bundle.has("syncnet") else None)
    finally:
        tracker.close()
        if started_ray:
            ray.shutdown()
    if stopped:
        log.error("job %s stopped early: %s", job_id, stopped)
    for row in todo:  # every manifest row gets exactly one report row, even when the job stopped
        index = int(row["row_index"])
        if index not in report:
            m = by_index[index]
            report[index] = _report_row(
                job_id, index, m, {}, status="skipped" if stopped else "failed",
                error=f"not processed: the job stopped early ({stopped})" if stopped else "never came back from the pipeline",
                error_stage="budget" if stopped and "max_failed_videos" in stopped else "pipeline",
            )

    rows = assembled()
    write_report(rows, report_uri, storage)
    counts = {s: sum(r.status == s for r in rows) for s in ("ok", "failed", "skipped")}
    frames = sum(r.output_frames or 0 for r in rows if r.status == "ok")
    return JobResult(job_id, report_uri, rows, time.perf_counter() - started, frames, counts, stopped, reused, warnings)


# The stages a report row times (time_<stage>_s), in graph order: the per-video log line.
_TIMED_STAGES = ("plan", "analyse", "audio", "face", "motion", "complete", "compose", "finalize")

# A report row's own identity: never taken from an earlier run's row.
_IDENTITY_FIELDS = ("job_id", "row_index", "video_id", "video_uri", "audio_uri", "output_uri")


@dataclass
class GraphSink:
    """Where the graph's settled videos go: the report (and its tracker), the work area's
    durable results, and the partial report."""

    report: dict
    results: ResultStore
    inputs: dict  # row_index -> input_identity of the video (what its output is made from)
    partial: PartialReport

    def finalizing(self, row: ReportRow) -> None:
        """Before a video's output is committed: if the driver dies during the commit, the
        next run completes this row from the output itself."""
        self.results.write(row, self.inputs.get(row.row_index), state="finalizing")

    def settle(self, index: int, row: ReportRow) -> None:
        log.info("video %s row %d %s%s: %s frames; %s", row.video_id, index, row.status,
                 f" [{row.error_stage}] {row.error}" if row.status == "failed" else "", row.source_frames,
                 ", ".join(f"{stage} {getattr(row, f'time_{stage}_s') or 0.0:.2f} s" for stage in _TIMED_STAGES))
        if row.status == "ok":
            row = row.model_copy(update={"result_job_id": row.job_id})
        self.report[index] = row
        try:
            self.results.write(row, self.inputs.get(index))
        except OSError as e:  # the output and this run's final report still hold it
            log.warning("could not record the result of %s in the work area: %s", row.output_uri, e)
        try:
            self.partial.settled()
        except OSError as e:  # the final report is written at the end all the same
            log.warning("could not write the partial report: %s", e)


def _run_graph(
    ray, ActorPoolStrategy, DataContext, ops, finalize_step, config: JobConfig, weights_uri: str, job_id: str, todo: list[dict],
    sink: GraphSink, max_failures: int | None = None, sync_weights_uri: str | None = None,
) -> tuple[str | None, int]:
    """Run the graph, settling each video into `sink` as it finishes; (why it stopped early
    or None, how many segments an earlier run had committed).

    With `max_failures` the driver stops consuming the stream once more videos than that
    have failed: the executor is shut down (queued and running segment work cancelled),
    in-flight finalize tasks are awaited, and the caller reports the rest as skipped.

    With `sync_weights_uri` (a bundle holding SyncNet weights) finalize scores each video
    before committing it (pipeline/dub/qc.py)."""
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the job draws its own line (pipeline.progress)
    ctx.print_on_execution_start = False
    cfg = config.model_dump()
    pools = config.pools

    if not any(p.memory_gb for p in pools.values()):
        # Without memory reservations Ray's high-memory detector repeats the advice to set
        # them every 30 s; the README's operator guide says when to (pools.<stage>.memory_gb).
        ctx.issue_detectors_config.detectors = [
            d for d in ctx.issue_detectors_config.detectors if "HighMemory" not in d.__name__
        ]

    # Fault tolerance is Ray Data's default for actor pools (max_restarts=-1,
    # max_task_retries=-1: a dead actor is replaced and its segments resubmitted) and for
    # map tasks (max_retries=-1). Passing them here is the deprecated **ray_remote_args
    # route; tests/test_resilience.py pins the defaults and kills a completion actor.
    def actors(name: str):
        return pools[name].actor_args()

    steps = {
        "plan": (ops.PlanOp, (cfg,)),
        "analyse": (ops.AnalyseOp, (cfg, weights_uri)),
        "audio": (ops.AudioOp, (cfg, weights_uri)),
        "face": (ops.FaceOp, (cfg,)),
        "motion": (ops.MotionOp, (cfg, weights_uri)),
        "complete": (ops.CompleteOp, (cfg, weights_uri)),
        "compose": (ops.ComposeOp, (cfg,)),
    }
    layout = stage_layout(ray, config)

    def pooled(ds, names: tuple[str, ...]):  # an actor pool per stage
        for n in names:
            op, args = steps[n]
            ds = ds.map(op, fn_constructor_args=args, **actors(n))
        return ds

    def fused(apply, op: type, names: tuple[str, ...], size: int, *extra):  # one pool for the stages
        return apply(op, fn_constructor_args=([steps[n] for n in names], *extra), **fused_pool(pools, names, size).actor_args())

    # Backpressure (pipeline/dub/gate.py): the first per-video stage waits on the gate
    # before each video; the driver lets each one go once its segments are all back.
    segment_actors = max(1, int(ray.cluster_resources().get("CPU", 1))) if layout == "fused" else pools["complete"].size
    gate = ray.remote(num_cpus=0)(VideoGate).remote(gate_limit(config.max_videos_in_flight, segment_actors))
    # One row per block: a video's segments then spread over the actor pools instead of
    # travelling (and being processed) together, and no block grows with video length.
    ds = one_row_per_block(ray.data.from_items(todo, override_num_blocks=len(todo)))
    if layout == "fused":  # the video actor cuts its videos into segment rows itself
        ds = fused(ds.flat_map, FusedVideoOp, VIDEO_STAGES, 1, None, gate)
    else:
        ds = ds.map(FusedOp, fn_constructor_args=([steps["plan"]], None, gate), **actors("plan"))
        ds = pooled(ds, VIDEO_STAGES[1:]).flat_map(ops.split_segments, num_cpus=pools["plan"].num_cpus)
    if layout == "fused":  # one segment actor per CPU, one of them the lead (pipeline/dub/fused.py)
        ds = fused(ds.map, FusedOp, SEGMENT_STAGES, segment_actors, "imgtalk-segment-lead" if config.fused_lead else None)
    else:
        ds = pooled(ds, SEGMENT_STAGES)

    finalize = ray.remote(max_retries=2, **pools["finalize"].task_args())(finalize_step.finalize_video)
    pending: dict[str, list[dict]] = {}
    closed: set[str] = set()  # videos whose segments all came back: a late duplicate is ignored
    futures: dict = {}  # finalize tasks in flight -> their video's segment rows
    waiting: deque = deque()  # videos whose segments are all back, waiting for a finalize slot
    report, tracker = sink.report, sink.report.tracker
    failures = 0
    storage = Storage(config.storage.options())
    # Finished finalize tasks are settled by a thread of their own as they finish, not when
    # the next segment happens to reach the driver (on a short catalogue that could be
    # many seconds, or the end of the job). `lock` serialises that thread and this loop.
    lock = threading.RLock()
    poller_stop = threading.Event()
    poller_errors: list[BaseException] = []

    def settle(index: int, row: ReportRow) -> None:
        nonlocal failures
        if index in report:  # never two rows for one manifest row
            log.warning("row %d already settled as %s; ignoring a second %s", index, report[index].status, row.status)
            return
        sink.settle(index, row)
        failures += row.status == "failed"

    def drop(segments: list[dict]) -> None:
        try:
            workarea.drop_segments(storage, segments)
        except OSError as e:  # leftovers only cost space; the work area may be expired
            log.warning("could not remove segments of %s: %s", segments[0]["output_uri"], e)

    def close_video(segments: list[dict]) -> None:
        head = segments[0]
        failed = [s for s in segments if s["error"]]
        if failed:
            first = sorted(failed, key=lambda s: int(s["seg_idx"]))[0]
            settle(int(head["row_index"]), _video_report(job_id, head, segments, None, first["error"], first["error_stage"]))
            # Its committed segments stay in the work area: a rerun (with the input fixed)
            # reuses them instead of redoing an hour of video for one bad segment.
            return
        video = {k: head[k] for k in finalize_step.FINALIZE_VIDEO_KEYS}
        seg_info = [{"seg_idx": s["seg_idx"], "segment_uri": s["segment_uri"]} for s in segments]
        sink.finalizing(_video_report(job_id, head, segments, None, None, None))
        waiting.append((video, seg_info, segments))
        launch_finalize()

    def launch_finalize() -> None:
        # pools.finalize.size finalize tasks at a time, like the actor pools' sizes: each
        # holds a whole output on local disk while it writes it.
        while waiting and len(futures) < pools["finalize"].size:
            video, seg_info, segments = waiting.popleft()
            futures[finalize.remote(cfg, video, seg_info, sync_weights_uri)] = segments

    def finalized(fut, segments: list[dict]) -> None:
        head = segments[0]
        try:
            final = ray.get(fut)
        except Exception as e:  # noqa: BLE001 - one video's finalize failure is that video's
            cause = getattr(e, "cause", None) or e
            if isinstance(cause, QCError):  # finished but failed a quality check: not committed
                settle(int(head["row_index"]), _video_report(job_id, head, segments, cause.fields, str(cause), "qc"))
                drop(segments)
                return
            settle(int(head["row_index"]), _video_report(
                job_id, head, segments, None, f"output {head['output_uri']}: {type(cause).__name__}: {cause}", "finalize"
            ))
            return
        settle(int(head["row_index"]), _video_report(job_id, head, segments, final, None, None))
        drop(segments)  # only now: finalize may be retried until its result is in

    def over_budget() -> bool:
        return max_failures is not None and failures > max_failures

    def settle_finished(timeout: float | None) -> None:
        """Settle the finalize tasks that finish within `timeout` s (None: wait for one)."""
        with lock:
            running = list(futures)
        if not running:
            return
        done, _ = ray.wait(running, num_returns=1 if timeout is None else len(running), timeout=timeout)
        with lock:
            for fut in done:
                if fut in futures:
                    finalized(fut, futures.pop(fut))
            launch_finalize()

    def poll_finalize() -> None:
        try:
            while not poller_stop.is_set():
                with lock:
                    idle = not futures
                if idle:
                    poller_stop.wait(0.05)
                else:
                    settle_finished(0.1)
        except BaseException as e:  # noqa: BLE001 - raised again by the driver's thread below
            poller_errors.append(e)

    stopped, reused = None, 0

    def take(raw: dict) -> str | None:
        """One row from the stream, held until its video's segments are all back; why the
        job must stop now, or None."""
        nonlocal reused
        row = normalise(raw)
        vid = row["video_id"]
        if int(row["n_segments"]) == 0:  # failed before it was split
            gate.leave.remote(int(row["row_index"]))
            settle(int(row["row_index"]), _video_report(job_id, row, [], None, row["error"] or "no segments", row["error_stage"] or "plan"))
            drop([row])  # its reference bank, if analyse got that far
        elif vid in closed or any(s["seg_idx"] == row["seg_idx"] for s in pending.get(vid, [])):
            log.warning("segment %s of %s came back twice; keeping the first", row["seg_idx"], row["output_uri"])
        else:
            pending.setdefault(vid, []).append(row)
            tracker.segment(row)
            reused += bool(row["segment_reused"])
            if len(pending[vid]) == int(row["n_segments"]):
                closed.add(vid)
                gate.leave.remote(int(row["row_index"]))
                close_video(pending.pop(vid))
        if over_budget():
            total = failures + config.max_failed_videos - max_failures  # with those failed before the graph
            return f"{total} videos failed, more than max_failed_videos={config.max_failed_videos}"
        return None

    poller = threading.Thread(target=poll_finalize, name="imgtalk-finalize-poller", daemon=True)
    poller.start()
    rows = stream_rows(ds)
    try:
        for raw in rows:
            with lock:
                stopped = take(raw)
            if stopped:
                break
    except Exception as e:  # noqa: BLE001 - the stream itself failed: report what settled
        log.exception("the Ray Data stream failed")
        stopped = f"the pipeline failed: {type(e).__name__}: {e}"
    finally:
        rows.close()  # shuts the streaming executor down: queued and running work is cancelled
        ray.kill(gate)

    poller_stop.set()
    poller.join()
    if poller_errors:
        raise poller_errors[0]
    # Every video whose segments all came back is finalized, even when the job stopped early.
    while futures or waiting:
        with lock:
            launch_finalize()
        settle_finished(None)
    try:  # this job's failed-video markers (pipeline/workarea.py) only held its own segments back
        storage.rm(join_uri(config.work_dir(), "failed", job_id), recursive=True)
    except OSError as e:
        log.warning("could not remove this job's failure markers: %s", e)
    if stopped is None:
        for vid, segments in pending.items():  # should not happen: a segment never came back
            head = segments[0]
            settle(int(head["row_index"]), _video_report(
                job_id, head, segments, None, f"only {len(segments)} of {head['n_segments']} segments completed", "pipeline"
            ))
    return stopped, reused
