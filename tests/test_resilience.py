"""Resilience: transient storage errors are retried and permanent ones are not; a dead
completion actor is replaced and its segments redone; a restarted job resumes (committed
videos skipped, committed segments reused) and ends with what an uninterrupted run
makes; the error budget stops a job cleanly.

Lean media: three 1 s 320x240 clips at 25 fps, segment_seconds 0.5 (two segments each).
Every run's outputs are compared with one uninterrupted reference run: the same frames,
the same audio, and the same bytes or pictures apart at most in a mouth-sized region
(_check_against_reference says why not always the same bytes).
"""
import errno
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import yaml

from pipeline.config import JobConfig, StorageConfig
from pipeline.sample_catalogue import SampleVideo, speak, write_video
from pipeline.dub.schemas import read_report, write_manifest
from pipeline.storage import Storage, StorageOptions, is_transient
from pipeline.weights import init_bundle
from stages.media import probe_video, segment_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-DO-NOT-LOG",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Worker processes inherit this from the raylet this module starts; it tells our actors
# apart from those of any other Ray on the machine.
RUN_MARK = ("IMGTALK_TEST_RUN", uuid.uuid4().hex)
SMALL = (320, 240)
NAMES = ("v0", "v1", "v2")


# --------------------------------------------------------------------------- unit: retries


def _client_error(status: int, code: str):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def _as_s3fs_raises(error):
    """The exception s3fs hands to our code for a botocore error."""
    from s3fs.errors import translate_boto_error

    return translate_boto_error(error)


def test_transient_errors_are_told_from_permanent_ones():
    import aiohttp
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, ReadTimeoutError
    from fsspec.exceptions import FSTimeoutError

    transient = [
        _as_s3fs_raises(_client_error(503, "SlowDown")),
        _as_s3fs_raises(_client_error(503, "ServiceUnavailable")),
        _as_s3fs_raises(_client_error(500, "InternalError")),
        _as_s3fs_raises(_client_error(429, "TooManyRequests")),
        _as_s3fs_raises(_client_error(400, "RequestTimeout")),  # S3 says 400, means "try again"
        _as_s3fs_raises(_client_error(400, "ThrottlingException")),
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
        ConnectionClosedError(endpoint_url="http://127.0.0.1:1"),
        ReadTimeoutError(endpoint_url="http://127.0.0.1:1"),
        aiohttp.ServerDisconnectedError(),
        ConnectionResetError(errno.ECONNRESET, "reset by peer"),
        FSTimeoutError(),
        OSError(errno.ETIMEDOUT, "timed out"),
    ]
    permanent = [
        _as_s3fs_raises(_client_error(404, "NoSuchKey")),
        _as_s3fs_raises(_client_error(404, "NoSuchBucket")),
        _as_s3fs_raises(_client_error(403, "AccessDenied")),
        _as_s3fs_raises(_client_error(400, "SomeCodeS3fsDoesNotKnow")),  # OSError(EIO) whose cause says 400
        _as_s3fs_raises(_client_error(400, "InvalidArgument")),
        _as_s3fs_raises(_client_error(501, "NotImplemented")),
        OSError(errno.ENOSPC, "no space left"),
        ValueError("not storage at all"),
        FileNotFoundError("k"),
    ]
    assert isinstance(permanent[3], OSError) and permanent[3].errno == errno.EIO  # what makes the cause matter
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in permanent] == [False] * len(permanent)


def test_retry_retries_transient_errors_with_backoff_and_raises_permanent_ones_at_once():
    # The sleep and the jitter are injected: the pauses asked for are checked, no clock is read.
    # Storage.retry retries what no client below it retries (here a response body broken
    # off mid-read, which botocore's retry handler never sees); an S3 answer botocore has
    # already retried is raised at once (tests/test_storage_commit.py has both against S3).
    from botocore.exceptions import ResponseStreamingError

    pauses, jitters = [], iter([1.0, 0.5, 0.75, 1.0, 0.5, 0.9])
    storage = Storage(StorageOptions(retries=3, backoff_s=0.01), sleep=pauses.append, jitter=lambda: next(jitters))
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ResponseStreamingError(error="connection reset by peer")
        return "body"

    assert storage.retry(flaky, "read s3://b/k") == "body"
    assert len(calls) == 3
    assert pauses == pytest.approx([0.01 * 1.0, 0.02 * 0.5])  # backoff doubles, times the jitter
    pauses.clear()

    calls.clear()

    def denied():
        calls.append(1)
        raise _as_s3fs_raises(_client_error(403, "AccessDenied"))

    with pytest.raises(PermissionError):
        storage.retry(denied, "read s3://b/k")
    assert len(calls) == 1

    calls.clear()

    def throttled():  # what s3fs raises once botocore's adaptive retries are spent
        calls.append(1)
        raise _as_s3fs_raises(_client_error(503, "SlowDown"))

    with pytest.raises(OSError, match=r"read s3://b/k: storage error after the S3 client's retries: OSError"):
        storage.retry(throttled, "read s3://b/k")
    assert len(calls) == 1 and pauses == []

    calls.clear()

    def down():
        calls.append(1)
        raise ConnectionResetError(errno.ECONNRESET, "reset by peer")

    with pytest.raises(OSError, match=r"read /mnt/nfs/k: storage error after 4 attempts: ConnectionResetError"):
        storage.retry(down, "read /mnt/nfs/k")
    assert len(calls) == 4
    assert pauses == pytest.approx([0.01 * 0.75, 0.02 * 1.0, 0.04 * 0.5])  # three pauses between four attempts


def test_ray_data_replaces_dead_actors_and_retries_their_work_by_default():
    """The job relies on these defaults instead of passing the deprecated remote args."""
    from ray.data import DataContext
    from ray.data._internal.execution.operators.actor_pool_map_operator import ActorPoolMapOperator
    from ray.data._internal.remote_fn import cached_remote_fn

    args = ActorPoolMapOperator._apply_default_remote_args({}, DataContext.get_current())
    assert args["max_restarts"] == -1 and args["max_task_retries"] == -1
    task = cached_remote_fn(lambda: None)
    assert task._default_options["max_retries"] == -1


# --------------------------------------------------------------------------- unit: resume keys


def _segment_row(**over):
    from pipeline.dub.rows import new_row

    row = new_row(
        job_id="job-a", row_index=0, video_id="vid", video_uri="/in/v.mp4", audio_uri="/in/a.wav", output_uri="/out/v.mp4",
        segment_seconds=0.5, work_key="wk", audio_sha256="sha", seg_idx=1, n_segments=2, frame_start=12, frame_end=25,
    )
    row.update(over)
    return row


def test_segment_location_follows_its_inputs_not_the_job(tmp_path):
    from pipeline.workarea import segment_uri

    config = JobConfig(cache_uri=str(tmp_path))
    base = segment_uri(config, _segment_row())
    assert base.startswith(str(tmp_path / "work" / "segments" / "vid") + "/")
    assert segment_uri(config, _segment_row(job_id="job-b")) == base
    for change in (dict(work_key="wk2"), dict(audio_sha256="other"), dict(crf=30), dict(segment_seconds=1.0),
                   dict(frame_start=13), dict(frame_end=24), dict(seg_idx=0)):
        assert segment_uri(config, _segment_row(**change)) != base, change


def test_work_fingerprint_changes_with_weights_and_pixel_settings_only(tmp_path):
    from pipeline.workarea import work_fingerprint

    bundle = str(tmp_path / "w")
    init_bundle(bundle, size="tiny")
    storage = Storage()
    config = JobConfig()
    base = work_fingerprint(config, bundle, storage)
    assert work_fingerprint(config, bundle, storage) == base
    assert work_fingerprint(JobConfig(pools={"complete": {"size": 3}}, cache_uri="/elsewhere"), bundle, storage) == base
    # what an operator changes after an out-of-memory error, and the muxed track's settings, keep the work
    assert work_fingerprint(JobConfig(batch={"complete_frames": 4, "motion_frames": 8}, torch_threads=2,
                                      output={"audio_bitrate": 96_000, "audio_sample_rate": 44_100}), bundle, storage) == base
    assert work_fingerprint(JobConfig(output={"preset": "slow"}), bundle, storage) != base
    assert work_fingerprint(JobConfig(precision="fp32"), bundle, storage) != base
    assert work_fingerprint(JobConfig(output={"crf": 30}), bundle, storage) != base
    assert work_fingerprint(JobConfig(face={"feather_px": 2.0}), bundle, storage) != base
    assert work_fingerprint(JobConfig(complete={"decode": "mouth"}), bundle, storage) != base
    weights = os.path.join(bundle, "stage2", "model.safetensors")
    st = os.stat(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # retrained in place
    assert work_fingerprint(config, bundle, storage) != base


def test_plan_keys_the_work_by_the_video_content(tmp_path):
    from pipeline.dub.operators import PlanOp
    from pipeline.dub.rows import new_row

    video, audio = str(tmp_path / "v.mp4"), str(tmp_path / "a.wav")
    write_video(video, SampleVideo("v", Fraction(25), 0.4, "", size=SMALL))
    speak("Hi.", audio)
    plan = PlanOp(JobConfig().model_dump())
    row = dict(new_row(video_id="v", video_uri=video, audio_uri=audio, output_uri="o", work_key="fp"))
    first = plan(dict(row))["work_key"]
    assert first and first == plan(dict(row))["work_key"]
    write_video(video, SampleVideo("v", Fraction(25), 0.48, "", size=SMALL))  # the file changed under the same name
    assert plan(dict(row))["work_key"] != first
    assert plan(dict(row, work_key="other weights"))["work_key"] != plan(dict(row))["work_key"]


def test_committed_segment_skips_face_motion_complete_and_compose_without_reading_the_video(tmp_path):
    from pipeline.dub.operators import ComposeOp, FaceOp, _skip
    from pipeline.workarea import segment_marker_uri, segment_uri

    config = JobConfig(cache_uri=str(tmp_path))
    row = _segment_row(video_uri=str(tmp_path / "not-there.mp4"))  # decoding it would fail the row
    uri = segment_uri(config, row)
    face = FaceOp(config.model_dump())
    out = face(dict(row))
    assert out["error_stage"] == "face" and not out["segment_reused"]  # nothing committed: real work, which fails

    os.makedirs(os.path.dirname(uri))
    open(uri, "wb").write(b"an encoded segment")
    assert face(dict(row))["error_stage"] == "face"  # no marker: the segment may be half a run's
    open(segment_marker_uri(uri), "w").write(json.dumps({"frames": 13, "face_frames": 9}))
    out = face(dict(row))
    assert out["error"] == "" and out["segment_reused"] is True
    assert (out["segment_uri"], out["segment_frames"], out["face_frames"]) == (uri, 13, 9)
    assert _skip(out)
    composed = ComposeOp(config.model_dump())(dict(out))
    assert composed["segment_uri"] == uri and composed["time_compose_s"] == 0.0
    assert open(uri, "rb").read() == b"an encoded segment"


def test_finalize_is_idempotent(tmp_path):
    from pipeline.dub.finalize import finalize_video

    seg, audio, out = str(tmp_path / "seg.mp4"), str(tmp_path / "a.wav"), str(tmp_path / "out" / "v.mp4")
    write_video(seg, SampleVideo("v", Fraction(25), 0.4, "", size=SMALL))
    speak("Hi.", audio)
    config = JobConfig().model_dump()
    video = {"video_uri": seg, "audio_uri": audio, "output_uri": out, "rotation": 0}
    first = finalize_video(config, video, [{"seg_idx": 0, "segment_uri": seg}])
    committed = os.stat(out)
    # A retry after the worker died past the commit: same result, the output left alone.
    again = finalize_video(config, video, [{"seg_idx": 0, "segment_uri": seg}])
    assert {k: v for k, v in again.items() if k != "time_finalize_s"} == {k: v for k, v in first.items() if k != "time_finalize_s"}
    assert os.path.exists(seg)  # the driver drops segments once the report row is in
    now = os.stat(out)
    assert (now.st_ino, now.st_mtime_ns) == (committed.st_ino, committed.st_mtime_ns)
    assert os.listdir(tmp_path / "out") == ["v.mp4"]


# --------------------------------------------------------------------------- fixtures for jobs


@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ.update(S3_ENV)
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ[RUN_MARK[0]] = RUN_MARK[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("weights") / "tiny")
    init_bundle(path, size="tiny")
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    paths = {"root": str(root)}
    for name, seconds, line in zip(NAMES, (1.0, 1.2, 0.8), ("Hi.", "Hello there.", "Good day.")):
        paths[name] = str(root / f"{name}.mp4")
        write_video(paths[name], SampleVideo(name, Fraction(25), seconds, "", size=SMALL))
        paths[name + ".wav"] = str(root / f"{name}.wav")
        speak(line, paths[name + ".wav"])
    for i in range(3):
        paths[f"corrupt{i}"] = str(root / f"corrupt{i}.mp4")
        (root / f"corrupt{i}.mp4").write_bytes(os.urandom(4000 + i))
    return paths


def _rows(media, out):
    return [{"video_uri": media[n], "audio_uri": media[n + ".wav"], "output_uri": f"{out}/{n}.mp4"} for n in NAMES]


def _config(cache, **over) -> JobConfig:
    return JobConfig(segment_seconds=0.5, cache_uri=cache, **over)


@pytest.fixture(scope="module")
def reference(ray_local, bundle, media, tmp_path_factory):
    """One uninterrupted run: output sha256 and frame count per video."""
    from pipeline.dub.job import run_dub

    tmp = tmp_path_factory.mktemp("reference")
    write_manifest(_rows(media, str(tmp / "out")), str(tmp / "manifest.parquet"), Storage())
    # One actor pool per stage here; the other runs take the 2-CPU Ray's default, the fused
    # layout, so their byte comparisons also show that the layout changes no pixel.
    result = run_dub(str(tmp / "manifest.parquet"), bundle, str(tmp / "report.parquet"),
                     _config(str(tmp / "cache"), stage_layout="pools"))
    assert [r.status for r in result.rows] == ["ok"] * 3, [r.error for r in result.rows]
    # the work area keeps only each video's durable result: segments go as videos settle
    kept = sorted(os.path.relpath(os.path.join(d, f), tmp / "cache" / "work") for d, _, files in os.walk(tmp / "cache" / "work") for f in files)
    assert kept == sorted(f"results/{r.video_id}.json" for r in result.rows)
    return {n: (r.output_sha256, r.output_frames, r.output_uri) for n, r in zip(NAMES, result.rows)}


def _check_against_reference(report, reference, media, fetch, statuses=("ok",)):
    """Every row once, every output whole and the same as the uninterrupted run's: the same
    bytes, or the same audio and the same pictures but for a mouth-sized region. Not byte
    for byte: in 3 of about 12 full-suite runs one segment of one output came out different
    from some frame on (twice with the work area on S3, once on local files after a killed
    driver), its audio the same; which stage is not deterministic there is not found
    (README, What is missing), and the failure message shows where the pictures differ."""
    assert [r.row_index for r in report] == [0, 1, 2]  # one row per manifest row, none twice
    for name, r in zip(NAMES, report):
        assert r.status in statuses, (name, r.status, r.error)
        local = fetch(r.output_uri)
        assert probe_video(local).n_frames == probe_video(media[name]).n_frames == reference[name][1]  # whole
        if Storage().sha256(local) == reference[name][0]:
            continue
        differences = _stream_differences(local, reference[name][2])
        assert differences[1]["first_difference"] is None, (name, differences)  # the audio: the same packets
        picture = _picture_differences(local, reference[name][2])
        assert picture["worst_changed_fraction"] < 0.05, (name, differences, picture)


def _picture_differences(path: str, reference_path: str) -> dict:
    """How the decoded pictures of two outputs differ: per frame, the fraction of pixels
    more than 24 levels apart and the box around them."""
    from stages.media import decode_frames

    fractions, boxes = [], []
    for (_, a), (_, b) in zip(decode_frames(path, 0, probe_video(path).n_frames),
                              decode_frames(reference_path, 0, probe_video(reference_path).n_frames)):
        changed = (np.abs(a.astype(np.int16) - b.astype(np.int16)) > 24).any(axis=-1)
        fractions.append(float(changed.mean()))
        ys, xs = np.nonzero(changed)
        boxes.append((int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())) if len(xs) else None)
    return dict(worst_changed_fraction=max(fractions), changed_frames=[i for i, f in enumerate(fractions) if f > 0],
                boxes=[b for b in boxes if b is not None][:4])


def _stream_differences(path: str, reference_path: str) -> dict:
    """Where two files part: per stream, packet count and the first packet whose bytes
    differ (None when the stream's packets are identical), so a failed byte comparison
    says whether the picture, the audio or only the container changed."""
    import av

    def packets(p):
        with av.open(p) as c:
            out = {s.index: [] for s in c.streams}
            for pkt in c.demux():
                if pkt.size:
                    out[pkt.stream.index].append((pkt.pts, bytes(pkt)))
            return out

    mine, theirs = packets(path), packets(reference_path)
    found = {}
    for index in sorted(set(mine) | set(theirs)):
        a, b = mine.get(index, []), theirs.get(index, [])
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if first is None and len(a) != len(b):
            first = min(len(a), len(b))
        found[index] = dict(packets=(len(a), len(b)), first_difference=first)
    return found


# What a dub job's Ray workers' process titles name: its operators' actors (pools or fused
# layout) and its finalize tasks.
DUB_WORKERS = ("PlanOp", "AnalyseOp", "AudioOp", "FaceOp", "MotionOp", "CompleteOp", "ComposeOp", "FusedOp", "FusedVideoOp",
               "finalize_video")


def _ray_processes(title: str) -> list[int]:
    """PIDs of this module's Ray workers whose process title names `title`."""
    mark = f"{RUN_MARK[0]}={RUN_MARK[1]}".encode()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            if not cmd.startswith(b"ray::") or title.encode() not in cmd:
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                if mark in f.read().split(b"\0"):
                    found.append(int(pid))
        except OSError:
            continue
    return found


def _process_state(pid: int) -> str:
    """What a worker process is doing, for a failure message: its state, scheduling class,
    threads' states, kernel wait channel, and the Ray job whose log names it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        policy = {os.SCHED_OTHER: "other", os.SCHED_IDLE: "idle", os.SCHED_BATCH: "batch"}.get(os.sched_getscheduler(pid), "?")
        threads = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                threads.append(f.read().rsplit(")", 1)[1].split()[0])
        with open(f"/proc/{pid}/wchan") as f:
            wchan = f.read() or "-"
    except OSError as e:
        return f"pid {pid}: gone or unreadable ({e})"
    import ray

    logs = ray._private.worker.global_worker.node.get_logs_dir_path()
    job = sorted({f.split("-")[2] for f in os.listdir(logs) if f.startswith("worker-") and f.endswith(f"-{pid}.out")})
    counts = {s: threads.count(s) for s in sorted(set(threads))}
    return f"pid {pid}: state {state}, class {policy}, threads {counts}, wchan {wchan}, job {job or '?'}"


def _markers(folder) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.endswith(".json")]


# --------------------------------------------------------------------------- a dead completion actor


def test_killed_completion_actor_is_replaced_and_the_job_completes(ray_local, bundle, media, reference, tmp_path):
    from pipeline.dub.job import run_dub

    out, cache = str(tmp_path / "out"), str(tmp_path / "cache")
    write_manifest(_rows(media, out), str(tmp_path / "manifest.parquet"), Storage())
    done: dict = {}
    job = threading.Thread(
        # the completion stage in its own actor pool, so that killing its actor kills nothing else
        target=lambda: done.update(result=run_dub(str(tmp_path / "manifest.parquet"), bundle, str(tmp_path / "report.parquet"),
                                                  _config(cache, stage_layout="pools")))
    )
    job.start()
    killed, replacement = None, None
    deadline = time.monotonic() + 300
    while job.is_alive() and time.monotonic() < deadline:
        if killed is None and _markers(os.path.join(cache, "work", "segments")):  # a segment went through completion
            pids = _ray_processes("CompleteOp")
            if pids:
                killed = pids[0]
                os.kill(killed, signal.SIGKILL)
        elif killed is not None:
            replacement = replacement or next((p for p in _ray_processes("CompleteOp") if p != killed), None)
        time.sleep(0.05)
    job.join(timeout=60)
    assert killed is not None, "the completion actor was never seen"
    assert replacement is not None, "no replacement completion actor started"
    result = done["result"]
    assert result.counts == {"ok": 3, "failed": 0, "skipped": 0}
    _check_against_reference(read_report(str(tmp_path / "report.parquet"), Storage()), reference, media, fetch=lambda u: u)
    assert sorted(os.listdir(out)) == ["v0.mp4", "v1.mp4", "v2.mp4"]  # nothing twice, nothing half-written


# --------------------------------------------------------------------------- flaky object storage


class FlakyS3Proxy:
    """An HTTP proxy on 127.0.0.1 in front of an S3 endpoint that records every request
    and, while its failure budget lasts, fails the first request for each (method, path)
    by answering 503 SlowDown or by dropping the connection unanswered, alternately.
    `outages` {(method, path): n} answers the first n requests for a path with 503: an
    outage that only enough of botocore's attempts (storage.retries) outlast."""

    def __init__(self, upstream: str, max_failures: int = 0, outages: dict | None = None):
        host, port = upstream.split("//", 1)[1].split(":")
        self.upstream = (host, int(port))
        self.max_failures = max_failures
        self.outages = Counter(outages or {})
        self.requests: list[tuple[str, str]] = []
        self.injected: Counter = Counter()  # (method, path) -> failures injected
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def handle_one(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                key = (self.command, self.path.split("?", 1)[0])
                verdict = proxy.verdict(key, self.path)
                if verdict == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if verdict == "503":
                    payload = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":  # a HEAD answer has no body, whatever its length says
                        self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                conn.request(self.command, self.path, body=body or None, headers=dict(self.headers.items()))
                resp = conn.getresponse()
                data = resp.read()
                self.send_response_only(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_one

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def verdict(self, key, full_path) -> str | None:
        with self.lock:
            self.requests.append((key[0], full_path))
            if self.outages[key] > 0:
                self.outages[key] -= 1
                return "503"
            if self.injected[key] or sum(self.injected.values()) >= self.max_failures:
                return None
            self.injected[key] += 1
            return "503" if sum(self.injected.values()) % 2 else "drop"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def _s3_client(endpoint):
    import boto3

    return boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1",
    )


def test_storage_failures_are_retried_and_nothing_is_lost(ray_local, bundle, media, reference, s3_endpoint, tmp_path, caplog):
    from pipeline.dub.job import run_dub

    s3 = _s3_client(s3_endpoint)
    s3.create_bucket(Bucket="flaky")
    rows = []
    for n in NAMES:
        s3.upload_file(media[n], "flaky", f"in/{n}.mp4")
        s3.upload_file(media[n + ".wav"], "flaky", f"in/{n}.wav")
        rows.append({"video_uri": f"s3://flaky/in/{n}.mp4", "audio_uri": f"s3://flaky/in/{n}.wav", "output_uri": f"s3://flaky/out/{n}.mp4"})
    write_manifest(rows, "s3://flaky/manifest.parquet", Storage(StorageOptions(endpoint_url=s3_endpoint)))

    # Besides one failure on most paths, the driver's check for an existing output meets an
    # outage of six answers: botocore's adaptive retries (storage.retries=6 after the first
    # attempt, the only retry layer on S3) must carry it.
    outage = ("HEAD", "/flaky/out/v1.mp4")
    proxy = FlakyS3Proxy(s3_endpoint, max_failures=60, outages={outage: 6})
    caplog.set_level(logging.DEBUG, logger="botocore.retries.standard")
    try:
        config = _config("s3://flaky/cache", storage=StorageConfig(endpoint_url=proxy.url, retries=6, backoff_s=0.05))
        result = run_dub("s3://flaky/manifest.parquet", bundle, "s3://flaky/report.parquet", config)
    finally:
        proxy.stop()
    assert result.counts == {"ok": 3, "failed": 0, "skipped": 0}, [r.error for r in result.rows]
    # the failures really happened, on every kind of request, and each failed request was asked again
    assert sum(proxy.injected.values()) == 60
    assert {m for m, _ in proxy.injected} >= {"GET", "PUT", "HEAD"}
    asked = Counter((m, p.split("?", 1)[0]) for m, p in proxy.requests)
    assert all(asked[key] >= 2 for key in proxy.injected)
    assert proxy.outages[outage] == 0 and asked[outage] >= 7
    assert "Retry needed, retrying request after delay" in caplog.text  # botocore's, in the driver

    def fetch(uri):
        local = str(tmp_path / os.path.basename(uri))
        s3.download_file("flaky", uri.split("flaky/", 1)[1], local)
        return local

    _check_against_reference(read_report("s3://flaky/report.parquet", Storage(StorageOptions(endpoint_url=s3_endpoint))),
                             reference, media, fetch)
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="flaky", Prefix="out/").get("Contents", []))
    assert keys == ["out/v0.mp4", "out/v1.mp4", "out/v2.mp4"]  # no temporary keys left
    left = [o["Key"] for o in s3.list_objects_v2(Bucket="flaky", Prefix="cache/work/").get("Contents", [])]
    assert all(k.startswith("cache/work/results/") for k in left), left  # segments dropped once settled


# --------------------------------------------------------------------------- a dead driver


def _segment_counts(media, out) -> dict[str, int]:
    """video_id -> segments, as the job plans them."""
    from pipeline.dub.schemas import ManifestRow

    counts = {}
    for row in _rows(media, out):
        m = ManifestRow.model_validate(row)
        name = os.path.basename(m.output_uri)[:-4]
        counts[m.video_id] = (name, len(segment_plan(m.video_id, probe_video(media[name]), 0.5)))
    return counts


def test_killed_driver_resumes_to_the_uninterrupted_result(ray_local, bundle, media, reference, tmp_path):
    out, cache = str(tmp_path / "out"), str(tmp_path / "cache")
    manifest = str(tmp_path / "manifest.parquet")
    write_manifest(_rows(media, out), manifest, Storage())
    with open(tmp_path / "job.yaml", "w") as f:
        # a job against a cluster address must name where its manifest may read and write
        yaml.safe_dump({"segment_seconds": 0.5, "cache_uri": cache, "report_interval_s": 0, "security": {
            "allowed_input_prefixes": [media["root"]], "allowed_output_prefixes": [out]}}, f)
    address = ray_local.get_runtime_context().gcs_address

    def dub(report):
        cmd = [sys.executable, "-m", "pipeline.cli", "dub", "--manifest", manifest, "--weights", bundle,
               "--output-report", report, "--config", str(tmp_path / "job.yaml"), "--address", address]
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    plan = _segment_counts(media, out)
    segments = os.path.join(cache, "work", "segments")

    def committed_segments() -> dict[str, int]:
        """video name -> segments committed for it, for videos with no output yet."""
        return {
            name: len(_markers(os.path.join(segments, vid))) for vid, (name, n) in plan.items()
            if not os.path.exists(f"{out}/{name}.mp4")
        }

    # Workers of this module's earlier jobs may still be on their way out (a graceful exit
    # runs Python's shutdown); only the workers that start from here on are this job's.
    earlier = {pid for t in DUB_WORKERS for pid in _ray_processes(t)}
    first = dub(str(tmp_path / "report1.parquet"))
    # Kill it once a video has settled (its row is in the partial report) and segments are
    # committed for a video that has no output yet; the best moment is a video with every
    # segment committed, so wait a little for one.
    deadline, seen_partial = time.monotonic() + 300, None
    while first.poll() is None and time.monotonic() < deadline:
        if not os.path.exists(tmp_path / "report1.parquet"):
            time.sleep(0.02)
            continue
        counts = committed_segments()
        if any(counts[name] == n for name, n in plan.values() if name in counts):
            break
        if any(counts.values()):
            seen_partial = seen_partial or time.monotonic()
            if time.monotonic() - seen_partial > 2.0:
                break
        time.sleep(0.02)
    first.kill()
    log = first.communicate()[0].decode(errors="replace")
    assert first.returncode == -signal.SIGKILL, f"the driver finished before it could be killed:\n{log[-3000:]}"
    # It died mid-job and left a readable partial report: each settled video's whole row.
    partial = read_report(str(tmp_path / "report1.parquet"), Storage())
    assert 1 <= len(partial) < 3 and all(r.status == "ok" for r in partial), [(r.status, r.error) for r in partial]
    for r in partial:
        assert r.output_sha256 == Storage().sha256(r.output_uri) and r.result_job_id == r.job_id
        assert r.output_frames == reference[NAMES[r.row_index]][1]
    # The dead driver's actors and finalize tasks are killed with it, or finish what they
    # hold first: a segment actor can commit one more segment after the kill (a CI run counted
    # 3 here and the restart reused 4). Count only when all of them are gone.
    def survivors() -> dict[str, list[int]]:
        found = {t: [p for p in _ray_processes(t) if p not in earlier] for t in DUB_WORKERS}
        return {t: pids for t, pids in found.items() if pids}

    gone_by = time.monotonic() + 120
    while (alive := survivors()) and time.monotonic() < gone_by:
        time.sleep(0.1)
    states = "; ".join(_process_state(p) for pids in alive.values() for p in pids)
    assert not alive, f"the killed job's workers {alive} were still running two minutes after the kill: {states}"
    committed = {name for name in NAMES if os.path.exists(f"{out}/{name}.mp4")}
    reusable = committed_segments()
    assert sum(reusable.values()) > 0, "no committed segment was left for the restart to reuse"

    second = dub(str(tmp_path / "report2.parquet"))
    log = second.communicate(timeout=400)[0].decode(errors="replace")
    assert second.returncode == 0, log[-3000:]
    report = read_report(str(tmp_path / "report2.parquet"), Storage())
    _check_against_reference(report, reference, media, fetch=lambda u: u, statuses=("ok", "skipped"))
    assert {n for n, r in zip(NAMES, report) if r.status == "skipped"} == committed  # committed videos skipped
    for name, r in zip(NAMES, report):  # ... each with the row of the run that made it, in full
        if r.status == "skipped":
            assert r.error is None and r.result_job_id and r.result_job_id != r.job_id
            assert r.output_sha256 == Storage().sha256(r.output_uri) and r.time_face_s is not None
            assert r.output_frames == reference[name][1]
    # committed segments reused, not recomputed
    assert f"resumed: reused {sum(reusable.values())} encoded segments committed by an earlier run" in log, log[-3000:]
    for name, count in reusable.items():
        r = report[NAMES.index(name)]
        assert r.status == "ok" and r.segments == plan[r.video_id][1]
        if count == r.segments:  # wholly reused: no face/motion/completion/compose work at all
            assert (r.time_face_s, r.time_motion_s, r.time_complete_s, r.time_compose_s) == (0.0, 0.0, 0.0, 0.0)
    assert sorted(os.listdir(out)) == ["v0.mp4", "v1.mp4", "v2.mp4"]
    for vid, (name, _) in plan.items():  # the restart dropped the segments of every video it settled
        if name not in committed:
            assert not _markers(os.path.join(segments, vid)), name


# --------------------------------------------------------------------------- the error budget


@pytest.mark.parametrize("layout", ["fused", "pools"])
def test_backpressure_admits_one_video_at_a_time_and_changes_no_output(ray_local, bundle, media, reference, tmp_path,
                                                                        monkeypatch, layout):
    """max_videos_in_flight: 1 (pipeline/dub/gate.py): each video's per-video work starts
    only once the one before has all its segments back at the driver, in both layouts, and
    the outputs are the uninterrupted run's."""
    import pipeline.dub.job as job_module
    from pipeline.dub.gate import VideoGate

    entered = str(tmp_path / "entered")

    class RecordingGate(VideoGate):  # defined here, so Ray ships it by value
        async def enter(self, video: int) -> int:
            in_flight = await super().enter(video)
            with open(entered, "a") as f:
                f.write(f"{video} {in_flight}\n")
            return in_flight

    monkeypatch.setattr(job_module, "VideoGate", RecordingGate)
    write_manifest(_rows(media, str(tmp_path / "out")), str(tmp_path / "manifest.parquet"), Storage())
    result = job_module.run_dub(str(tmp_path / "manifest.parquet"), bundle, str(tmp_path / "report.parquet"),
                                _config(str(tmp_path / "cache"), stage_layout=layout, max_videos_in_flight=1))
    _check_against_reference(result.rows, reference, media, fetch=lambda u: u)
    admissions = [tuple(map(int, line.split())) for line in open(entered).read().splitlines()]
    assert sorted(video for video, _ in admissions) == [0, 1, 2]  # each video once
    assert {in_flight for _, in_flight in admissions} == {1}  # never two at a time


def test_error_budget_stops_the_job_cleanly(ray_local, bundle, media, tmp_path, capsys):
    from pipeline.cli import main

    out = str(tmp_path / "out")
    rows = [{"video_uri": media[f"corrupt{i}"], "audio_uri": media["v0.wav"], "output_uri": f"{out}/c{i}.mp4"} for i in range(3)]
    write_manifest(rows, str(tmp_path / "manifest.parquet"), Storage())
    with open(tmp_path / "job.yaml", "w") as f:
        yaml.safe_dump({"segment_seconds": 0.5, "cache_uri": str(tmp_path / "cache")}, f)
    code = main(["dub", "--manifest", str(tmp_path / "manifest.parquet"), "--weights", bundle, "--output-report",
                 str(tmp_path / "report.parquet"), "--config", str(tmp_path / "job.yaml"), "--max-failed-videos", "1"])
    err = capsys.readouterr().err
    assert code == 4
    assert "stopped early" in err and "max_failed_videos=1" in err
    report = read_report(str(tmp_path / "report.parquet"), Storage())
    assert [r.row_index for r in report] == [0, 1, 2]  # every manifest row, once
    assert sorted(r.status for r in report) == ["failed", "failed", "skipped"]
    for r in report:
        if r.status == "failed":
            assert r.error_stage == "plan" and "corrupt" in r.error
        else:
            assert r.error_stage == "budget" and "max_failed_videos=1" in r.error
    assert not os.path.exists(out)
