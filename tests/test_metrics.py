"""The job's Prometheus metrics, scraped over HTTP from a real local Ray's metrics agent
after a real job: every counter must equal what the job's report says was processed.

Two short videos and a corrupt one, segment_seconds 0.5 (two segments per video), then a
second job that dubs one of them again (feature cache hit) and finds another already
done (skipped). Ray exports user metrics with a `ray_` prefix and one series per worker
process, so the checks sum series by their `stage`/`job`/... labels.
"""
import math
import os
import socket
import time
import urllib.request
import wave
from fractions import Fraction

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.config import JobConfig
from pipeline.sample_catalogue import SampleVideo, write_video
from pipeline.dub.schemas import read_report, write_manifest
from pipeline.storage import Storage
from pipeline.weights import init_bundle

SEGMENT_STAGES = ("face", "motion", "complete", "compose")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def metrics_port():
    import ray

    # Workers push to the agent every report interval (default 10 s); 500 ms is floored
    # to Ray's 1 s minimum. It is read from the environment when Ray starts.
    saved = {k: os.environ.get(k) for k in ("RAY_metrics_report_interval_ms", "RAY_USAGE_STATS_ENABLED")}
    os.environ.update(RAY_metrics_report_interval_ms="500", RAY_USAGE_STATS_ENABLED="0")
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=port)
    yield port
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _tone(path: str, seconds: float, hz: float) -> None:
    t = np.arange(int(16000 * seconds)) / 16000
    pcm = (0.3 * np.sin(2 * math.pi * hz * t) * 32767).astype(np.int16)
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    paths = {"root": str(root)}
    # b has a stretch without the face, so frames-with-a-face differ from frames.
    for name, fps, seconds, no_face in [("a", Fraction(25), 1.2, None), ("b", Fraction(30000, 1001), 1.0, (0.5, 0.8))]:
        paths[name] = str(root / f"{name}.mp4")
        paths[name + "_frames"] = write_video(paths[name], SampleVideo(name, fps, seconds, "", no_face=no_face, size=(320, 240)))
        paths[name + "_audio"] = str(root / f"{name}.wav")
        _tone(paths[name + "_audio"], seconds, 220.0 if name == "a" else 330.0)  # two tracks: two cache entries
    paths["bad"] = str(root / "bad.mp4")
    with open(paths["bad"], "wb") as f:
        f.write(np.random.default_rng(0).bytes(4000))
    return paths


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("weights") / "tiny")
    init_bundle(path, size="tiny")
    return path


def scrape(port: int) -> list[tuple[str, dict, float]]:
    """(name, labels, value) of every imgtalk sample the node's agent exports."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("ray_imgtalk_")
    ]


def total(samples, name: str, **labels) -> float:
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


def settled(port: int, job: str, videos: int, timeout_s: float = 60.0):
    """Scrape until every video of `job` is counted and two scrapes 2.5 s apart (more than
    two export intervals) agree on every imgtalk sample of the job."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        samples = [s for s in scrape(port) if s[1].get("job") == job]
        key = sorted((n, tuple(sorted(lab.items())), v) for n, lab, v in samples)
        if total(samples, "ray_imgtalk_videos_finished_total") == videos and key == last:
            return samples
        last = key
        time.sleep(2.5)
    raise AssertionError(f"metrics of job {job} did not settle in {timeout_s} s: {last}")


def _dub(media, bundle, tmp_path, rows, name):
    from pipeline.dub.job import run_dub

    manifest = str(tmp_path / f"{name}.parquet")
    write_manifest(rows, manifest, Storage())
    config = JobConfig(segment_seconds=0.5, cache_uri=str(tmp_path / "cache"))
    result = run_dub(manifest, bundle, str(tmp_path / f"{name}-report.parquet"), config, progress=False)
    return result, read_report(str(tmp_path / f"{name}-report.parquet"), Storage())


def test_counters_equal_what_the_job_processed(metrics_port, media, bundle, tmp_path):
    out = str(tmp_path / "out")
    rows = [
        {"video_uri": media["a"], "audio_uri": media["a_audio"], "output_uri": f"{out}/a.mp4"},
        {"video_uri": media["b"], "audio_uri": media["b_audio"], "output_uri": f"{out}/b.mp4"},
        {"video_uri": media["bad"], "audio_uri": media["a_audio"], "output_uri": f"{out}/bad.mp4"},
    ]
    result, report = _dub(media, bundle, tmp_path, rows, "first")
    assert [r.status for r in report] == ["ok", "ok", "failed"], [r.error for r in report]
    assert report[2].error_stage == "plan"
    samples = settled(metrics_port, result.job_id, videos=3)
    job = result.job_id
    ok = report[:2]

    # Frames and segments per stage: every frame of every ok video passed every stage once.
    frames = sum(r.source_frames for r in ok)
    segments = sum(r.segments for r in ok)
    assert frames == media["a_frames"] + media["b_frames"] and segments >= 4
    for stage in SEGMENT_STAGES:
        assert total(samples, "ray_imgtalk_frames_processed_total", stage=stage, job=job) == frames, stage
        assert total(samples, "ray_imgtalk_segments_processed_total", stage=stage, job=job) == segments, stage
        # one latency observation per segment call
        assert total(samples, "ray_imgtalk_batch_seconds_count", stage=stage, job=job) == segments, stage
    face_frames = sum(round(r.face_fraction * r.source_frames) for r in ok)
    assert face_frames < frames  # b's stretch without the face is not counted
    assert total(samples, "ray_imgtalk_face_frames_total", stage="face", job=job) == face_frames
    assert total(samples, "ray_imgtalk_output_frames_total", job=job) == sum(r.output_frames for r in ok) == frames
    # per-video stages: plan saw all three, later stages only the two that passed plan
    assert total(samples, "ray_imgtalk_batch_seconds_count", stage="plan", job=job) == 3
    assert total(samples, "ray_imgtalk_batch_seconds_count", stage="analyse", job=job) == 2
    assert total(samples, "ray_imgtalk_batch_seconds_count", stage="audio", job=job) == 2
    # the +Inf bucket holds every observation; the sum is real time spent
    assert total(samples, "ray_imgtalk_batch_seconds_bucket", stage="face", job=job, le="+Inf") == segments
    assert total(samples, "ray_imgtalk_batch_seconds_sum", stage="face", job=job) > 0

    # The corrupt video: one error, at plan, of the kind the probe raised.
    assert total(samples, "ray_imgtalk_errors_total", job=job) == 1
    assert total(samples, "ray_imgtalk_errors_total", stage="plan", kind="MediaError", job=job) == 1

    assert total(samples, "ray_imgtalk_videos_finished_total", status="ok", job=job) == 2
    assert total(samples, "ray_imgtalk_videos_finished_total", status="failed", job=job) == 1
    assert total(samples, "ray_imgtalk_videos_finished_total", status="skipped", job=job) == 0
    assert total(samples, "ray_imgtalk_cache_misses_total", stage="audio", job=job) == 2
    assert total(samples, "ray_imgtalk_cache_hits_total", stage="audio", job=job) == 0

    # No URI, path or file name in any label.
    for name, labels, _ in samples:
        for value in labels.values():
            assert "/" not in value and media["root"] not in value and ".mp4" not in value, (name, labels)

    # Second job: `a` again to a new output (its features are cached), `b` already done.
    rows2 = [
        {"video_uri": media["a"], "audio_uri": media["a_audio"], "output_uri": f"{out}/a-again.mp4"},
        {"video_uri": media["b"], "audio_uri": media["b_audio"], "output_uri": f"{out}/b.mp4"},
    ]
    result2, report2 = _dub(media, bundle, tmp_path, rows2, "second")
    assert [r.status for r in report2] == ["ok", "skipped"]
    assert report2[0].feature_cache_hit is True
    samples2 = settled(metrics_port, result2.job_id, videos=2)
    job2 = result2.job_id
    assert total(samples2, "ray_imgtalk_cache_hits_total", stage="audio", job=job2) == 1
    assert total(samples2, "ray_imgtalk_cache_misses_total", stage="audio", job=job2) == 0
    assert total(samples2, "ray_imgtalk_videos_finished_total", status="skipped", job=job2) == 1
    assert total(samples2, "ray_imgtalk_videos_finished_total", status="ok", job=job2) == 1
    assert total(samples2, "ray_imgtalk_frames_processed_total", stage="compose", job=job2) == report2[0].source_frames
    assert total(samples2, "ray_imgtalk_errors_total", job=job2) == 0
    # the first job's series are still there, unchanged: counters are per job
    assert total(scrape(metrics_port), "ray_imgtalk_frames_processed_total", stage="face", job=job) == frames


def test_error_kind_names_the_exception_or_a_category():
    from pipeline.metrics import error_kind
    from stages.media import MediaError

    assert error_kind(ValueError("bad")) == "ValueError"
    # rows failed inside an `except` block: the exception being handled names the kind
    assert error_kind("video 'x.mp4': cannot be opened as media", active=MediaError("x")) == "MediaError"
    # a message that carries its exception's class (the operators' catch-all branches)
    assert error_kind("output /o/a.mp4: OSError: disk full") == "OSError"
    assert error_kind("audio /in/a.wav: no such file") == "not_found"
    assert error_kind("video /in/a.mp4: no face found in any of 24 frames") == "no_face"
    assert error_kind("only 1 of 3 segments completed") == "lost_segments"
    assert error_kind(None) == error_kind("") == "other"
