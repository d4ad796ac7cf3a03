"""The fused stage layout (pipeline/dub/fused.py): which layout a job takes, what a fused
actor reserves, and that a fused actor passes each row through its operators in order
with each operator's own failure handling. tests/test_resilience.py shows that the two
layouts give the same bytes (its reference run uses pools, its other runs fused)."""
from __future__ import annotations

import os
import tempfile
import threading

import pytest

from pipeline.config import JobConfig, PoolConfig
from pipeline.dub.fused import SEGMENT_STAGES, VIDEO_STAGES, FusedOp, FusedVideoOp, claim_lead, fused_pool
from pipeline.dub.job import stage_layout
from pipeline.dub.rows import new_row


class FakeRay:
    def __init__(self, nodes: int, cpus: float, gpus: float = 0):
        self._nodes, self._resources = nodes, {"CPU": cpus, **({"GPU": gpus} if gpus else {})}

    def nodes(self):
        return [{"Alive": True}] * self._nodes + [{"Alive": False}]  # a dead node does not count

    def cluster_resources(self):
        return dict(self._resources)


@pytest.mark.parametrize("nodes, cpus, gpus, expected", [
    (1, 2, 0, "fused"),  # a laptop
    (1, 4, 0, "fused"),
    (1, 8, 0, "pools"),  # enough cores for a pool per stage
    (1, 2, 1, "pools"),  # a GPU wants its own completion actor
    (2, 4, 0, "pools"),  # a cluster
])
def test_auto_fuses_only_on_one_small_cpu_node(nodes, cpus, gpus, expected):
    assert stage_layout(FakeRay(nodes, cpus, gpus), JobConfig()) == expected


@pytest.mark.parametrize("chosen", ["pools", "fused"])
def test_a_chosen_layout_is_kept_whatever_the_cluster(chosen):
    for ray in (FakeRay(1, 2), FakeRay(3, 64, 8)):
        assert stage_layout(ray, JobConfig(stage_layout=chosen)) == chosen


def test_a_fused_actor_reserves_the_largest_share_and_all_the_memory():
    pools = JobConfig(pools={
        "face": PoolConfig(num_cpus=1.0, memory_gb=1.5),
        "motion": PoolConfig(num_cpus=0.5, memory_gb=1.0),
        "complete": PoolConfig(num_cpus=0.25, num_gpus=1.0, memory_gb=6.0),
        "compose": PoolConfig(num_cpus=2.0),
    }).pools
    pool = fused_pool(pools, SEGMENT_STAGES, size=3)
    assert (pool.size, pool.num_cpus, pool.num_gpus, pool.memory_gb) == (3, 2.0, 1.0, 8.5)
    assert fused_pool(JobConfig().pools, VIDEO_STAGES, size=1).memory_gb is None  # nothing reserved, nothing summed


class Stamp:
    """An operator stand-in: appends its name, or fails the row when told to."""

    def __init__(self, name: str, fail_on: str | None = None):
        self.name, self.fail_on = name, fail_on

    def __call__(self, row: dict) -> dict:
        if row.get("error"):  # what pipeline.steps' row_step does with a failed row
            return row
        if row["id"] == self.fail_on:
            return dict(row, error=f"{self.name} failed", error_stage=self.name)
        return dict(row, trail=row["trail"] + [self.name])


def test_a_fused_actor_runs_its_operators_in_order_and_a_failed_row_skips_the_rest():
    op = FusedOp([(Stamp, ("face",)), (Stamp, ("motion", "b")), (Stamp, ("compose",))])
    assert [s.name for s in op.ops] == ["face", "motion", "compose"]  # each built once, with its arguments
    assert op({"id": "a", "trail": []})["trail"] == ["face", "motion", "compose"]
    failed = op({"id": "b", "trail": []})
    assert (failed["trail"], failed["error_stage"]) == (["face"], "motion")


def test_the_fused_video_actor_hands_on_each_video_as_its_segment_rows():
    """FusedVideoOp: the per-video operators, then split_segments, as the pools layout's
    flat_map task would: 30 fps, 250 frames at 4 s a segment -> 120 + 130 frames (a tail
    under half a segment joins the one before); a video that failed in its operators comes
    out as one marker row with no segments."""
    video = new_row(job_id="j", row_index=0, video_id="v", video_uri="/in/v.mp4", audio_uri="/in/a.wav",
                    output_uri="/out/v.mp4", segment_seconds=4.0)
    probed = dict(width=64, height=48, fps_num=30, fps_den=1, n_frames=250, duration_s=250 / 30)

    class Probe(Stamp):
        def __call__(self, row: dict) -> dict:
            return dict(row, **probed) if not row["error"] else row

    class Broken(Stamp):
        def __call__(self, row: dict) -> dict:
            return dict(row, error="analyse failed", error_stage="analyse")

    segments = FusedVideoOp([(Probe, ("plan",))])(video)
    assert [(s["seg_idx"], s["frame_start"], s["frame_end"], s["n_segments"]) for s in segments] == [
        (0, 0, 120, 2), (1, 120, 250, 2)]
    assert {s["video_id"] for s in segments} == {"v"}
    [marker] = FusedVideoOp([(Probe, ("plan",)), (Broken, ("analyse",))])(video)
    assert (marker["n_segments"], marker["error_stage"]) == (0, "analyse")


@pytest.fixture
def lock_folder(tmp_path, monkeypatch):
    """The node's temporary folder, where the lead's lock lives, as a folder of the test's own."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_one_actor_claims_the_lead_until_it_lets_go(lock_folder):
    name = "imgtalk-segment-lead"
    first = claim_lead(name)
    assert first is not None
    assert claim_lead(name) is None  # flock locks are per open file: a second open conflicts too
    assert claim_lead(f"{name}-other") is not None  # another job's pool has its own lead
    first.close()  # what the kernel does when the lead's process ends
    again = claim_lead(name)
    assert again is not None
    again.close()
    assert {p.name for p in lock_folder.iterdir()} == {f"{name}-{os.getuid()}.lock", f"{name}-other-{os.getuid()}.lock"}


def test_the_segment_actors_that_are_not_the_lead_build_and_run_in_the_idle_class(lock_folder):
    """Scheduling classes are per thread on Linux, so each actor is a thread here, started
    from the test's own thread, which never claims anything (it must not end up in the
    idle class, whatever happens). A thread starts in its creator's class, so the lead is
    compared with the test's thread."""
    name = "imgtalk-segment-lead"
    main_policy = os.sched_getscheduler(0)

    class Policy(Stamp):  # notes the scheduling class its actor's models load under
        def __init__(self, label: str):
            super().__init__(label)
            self.loaded_under = os.sched_getscheduler(0)

    def start_actor(label: str, release: threading.Event | None = None) -> dict:
        seen, built = {}, threading.Event()

        def actor():
            op = FusedOp([(Policy, (label,))], lead=name)
            seen.update(lead=op.lead is not None, idle=op.idle, loaded_under=op.ops[0].loaded_under,
                        trail=op({"id": "a", "trail": []})["trail"], runs_in=os.sched_getscheduler(0))
            built.set()
            if release is not None:
                release.wait()  # a lead holds its lock until its process ends
            if op.lead is not None:
                op.lead.close()

        thread = threading.Thread(target=actor)
        thread.start()
        built.wait()
        return dict(seen, thread=thread)

    first_ends = threading.Event()
    first = start_actor("first", first_ends)
    second = start_actor("second")
    assert (first["lead"], first["idle"], first["loaded_under"], first["runs_in"]) == (True, False, main_policy, main_policy)
    assert (second["lead"], second["idle"], second["loaded_under"], second["runs_in"]) == (False, True, os.SCHED_IDLE, os.SCHED_IDLE)
    assert second["trail"] == ["second"]  # it works all the same
    first_ends.set()  # the lead's process ends: the actor that replaces it takes the lead
    first["thread"].join()
    replacement = start_actor("replacement")
    assert (replacement["lead"], replacement["runs_in"]) == (True, main_policy)
    unled = FusedOp([(Stamp, ("face",))])
    assert (unled.lead, unled.idle) == (None, False)  # no lead asked for: nothing claimed, nothing changed
    assert os.sched_getscheduler(0) == main_policy
