"""Durable results and the skip decision (pipeline/dub/results.py), the partial report's
pacing and the multi-node path rule (pipeline/dub/job.py): no Ray here; the jobs that
use them are in test_e2e.py, test_resilience.py and test_multinode.py."""
from __future__ import annotations

import json
import os
import threading

import pytest

from pipeline.config import JobConfig
from pipeline.dub.job import PartialReport, node_local_refusals
from pipeline.dub.results import ResultStore, decide, decide_all, input_identity, settings_identity
from pipeline.dub.schemas import ReportRow
from pipeline.storage import Storage


def _row(**over) -> ReportRow:
    base = dict(job_id="job-1", row_index=0, video_id="vid0", video_uri="/in/v.mp4", audio_uri="/in/a.wav",
                output_uri="/out/v.mp4", status="ok", output_frames=50, output_sha256="ab" * 32, output_bytes=1234,
                time_face_s=1.5, result_job_id="job-1")
    base.update(over)
    return ReportRow(**base)


@pytest.fixture
def files(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    video, audio, out = tmp_path / "in" / "v.mp4", tmp_path / "in" / "a.wav", tmp_path / "out" / "v.mp4"
    video.write_bytes(b"video")
    audio.write_bytes(b"audio one")
    storage = Storage()
    store = ResultStore(storage, str(tmp_path / "work"))
    settings = settings_identity(JobConfig())

    def identity():
        return input_identity(storage, str(video), str(audio), "bundle-1", settings, 4.0, -1)

    def decide_now(force=False, describe=None):
        return decide(storage, store, "vid0", str(out), identity, force, describe or (lambda uri: pytest.fail("describe")))

    return dict(video=video, audio=audio, out=out, storage=storage, store=store, identity=identity, decide=decide_now)


def test_an_unchanged_output_is_kept_with_its_earlier_row_and_anything_changed_is_redone(files):
    decide_now = files["decide"]
    assert decide_now().redo  # no output yet
    files["out"].write_bytes(b"dubbed")
    kept = decide_now()
    assert not kept.redo and kept.earlier is None and "no earlier result is recorded" in kept.note  # cannot be checked
    files["store"].write(_row(), files["identity"]())
    kept = decide_now()
    assert not kept.redo and kept.note is None
    assert kept.earlier.output_sha256 == "ab" * 32 and kept.earlier.time_face_s == 1.5 and kept.earlier.job_id == "job-1"
    assert decide_now(force=True).redo
    files["audio"].write_bytes(b"audio two, re-recorded")  # a new dub track: redone
    assert decide_now().redo


def test_a_changed_setting_or_bundle_is_redone(files):
    storage, store = files["storage"], files["store"]
    files["out"].write_bytes(b"dubbed")
    store.write(_row(), files["identity"]())
    base = files["identity"]()
    crf = input_identity(storage, str(files["video"]), str(files["audio"]), "bundle-1",
                         settings_identity(JobConfig(output={"crf": 30})), 4.0, -1)
    bundle = dict(base, bundle="bundle-2")
    for changed in (crf, bundle):
        assert decide(storage, store, "vid0", str(files["out"]), lambda c=changed: c, False, None).redo
    # batch sizes and threads decide no byte of the output
    same = settings_identity(JobConfig(batch={"complete_frames": 4}, torch_threads=3))
    assert same == settings_identity(JobConfig())


def test_a_record_left_finalizing_is_completed_from_the_output(files):
    files["out"].write_bytes(b"dubbed")
    pre = _row(output_frames=None, output_sha256=None, output_bytes=None, result_job_id=None)
    files["store"].write(pre, files["identity"](), state="finalizing")
    seen = []

    def describe(uri):
        seen.append(uri)
        return {"output_frames": 7, "output_bytes": 6, "output_sha256": "cd" * 32}

    kept = files["decide"](describe=describe)
    assert seen == [str(files["out"])] and not kept.redo
    assert (kept.earlier.output_frames, kept.earlier.output_sha256, kept.earlier.time_face_s) == (7, "cd" * 32, 1.5)
    record = files["store"].read("vid0")
    assert record["state"] == "settled" and record["row"]["output_frames"] == 7


def test_an_unreadable_record_is_no_promise(files, tmp_path):
    files["out"].write_bytes(b"dubbed")
    uri = files["store"].uri("vid0")
    os.makedirs(os.path.dirname(uri), exist_ok=True)
    for text in ("{not json", json.dumps({"state": "settled", "inputs": {}, "row": {"job_id": 1}})):
        with open(uri, "w") as f:
            f.write(text)
        assert files["store"].read("vid0") is None


def test_decisions_run_in_parallel_and_keep_the_rows_order():
    arrived, release = [], threading.Event()

    def slow(i):
        arrived.append(i)
        if len(arrived) == 4:
            release.set()
        assert release.wait(10), "the checks ran one after another"
        return i * 10

    assert decide_all([(i,) for i in range(4)], slow, threads=4) == [0, 10, 20, 30]


def test_partial_report_is_rewritten_at_most_once_per_interval():
    now, writes = [0.0], []
    partial = PartialReport(lambda: writes.append(now[0]), interval_s=30.0, clock=lambda: now[0])
    for t in (0.0, 10.0, 29.9, 30.0, 31.0, 75.0):
        now[0] = t
        partial.settled()
    assert writes == [0.0, 30.0, 75.0]
    every = PartialReport(lambda: writes.append("x"), interval_s=0.0, clock=lambda: 5.0)
    writes.clear()
    every.settled()
    every.settled()
    assert writes == ["x", "x"]


def test_node_local_paths_are_named_for_a_multi_node_cluster():
    local = JobConfig(cache_uri="/tmp/cache")
    found = node_local_refusals(local, ["s3://out/a.mp4", "/data/out/b.mp4", "file:///data/out/c.mp4"])
    assert found == ["cache_uri /tmp/cache", "work_uri /tmp/cache/work", "2 output URI(s) such as /data/out/b.mp4"]
    remote = JobConfig(cache_uri="s3://work/cache")
    assert node_local_refusals(remote, ["s3://out/a.mp4"]) == []
    assert node_local_refusals(JobConfig(cache_uri="s3://w/c", work_uri="/scratch"), []) == ["work_uri /scratch"]
