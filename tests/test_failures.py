"""Contained failures (issue 10, item 1): what an operator does with each class of error.

- input errors fail the row at once;
- transient errors run the stage body again, a bounded number of times (the pauses are
  asked of an injected sleep: no clock is read or waited on);
- CUDA out-of-memory in the completion stage retries the batch in halves;
- a GPU or driver fault ends the actor's process (an injected exit here), so that Ray
  replaces the actor and resubmits the segment;
- a failed segment marks its video failed for this job, and the video's other segments
  are skipped, not computed.

The last test runs a dub job on a real local Ray with one transient error and one CUDA
fault injected into the workers (a worker_process_setup_hook patches the stages; each
fault fires once, the first time it finds its flag file, which it deletes).
"""
import errno
import os
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch

from pipeline.config import JobConfig, RetryConfig
from pipeline.dub.rows import fail, new_row, normalise
from pipeline.errors import classify, is_device_fault, is_out_of_memory
from pipeline.steps import RowError, make_row_step
from stages.completion.imc_unet import IMCUNet, IMCUNetConfig
from stages.completion.stage import CompletionStage
from stages.completion.vae import LatentVAE, tiny_vae_config
from stages.face import MouthMask

SMALL = (320, 240)


def _segment_row(**over) -> dict:
    row = new_row(job_id="job-a", row_index=0, video_id="vid", video_uri="/in/v.mp4", audio_uri="/in/a.wav",
                  output_uri="/out/v.mp4", segment_seconds=0.5, work_key="wk", seg_idx=1, n_segments=3,
                  frame_start=12, frame_end=25)
    row.update(over)
    return row


def _subject(row: dict) -> str:
    return f"video {row['video_uri']} segment {row['seg_idx']}"


class _Probe:
    """An operator whose body runs `script`'s next step: raise it, or return the updates."""

    def __init__(self, *script):
        self.script = list(script)
        self.calls = 0

    def run(self, row):
        self.calls += 1
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(step, BaseException):
            raise step
        return step


def _step(stage="motion", attempts=3, backoff_s=0.5, **hooks):
    """A row step like the dub job's, its sleep and exit recorded instead of done."""
    pauses, exits = [], []
    row_step = make_row_step(normalise, lambda row: bool(row["error"]), fail,
                             retries=lambda op: RetryConfig(segment_attempts=attempts, backoff_s=backoff_s),
                             sleep=pauses.append, exit_process=exits.append, **hooks)

    class Op(_Probe):
        @row_step(stage, _subject)
        def __call__(self, row):
            return self.run(row)

    return Op, pauses, exits


# --------------------------------------------------------------------------- transient errors


def test_a_transient_error_is_tried_again_and_the_row_succeeds():
    Op, pauses, exits = _step()
    op = Op(ConnectionResetError(errno.ECONNRESET, "connection reset by peer"), {"driving": b"d"})
    out = op(_segment_row())
    assert out["error"] == "" and out["driving"] == b"d"
    assert op.calls == 2 and pauses == [0.5] and exits == []


def test_a_lasting_transient_error_fails_the_row_after_the_configured_tries_naming_the_file():
    Op, pauses, _ = _step(attempts=4)
    op = Op(OSError(errno.ETIMEDOUT, "timed out"))
    out = op(_segment_row())
    assert op.calls == 4
    assert pauses == [0.5, 1.0, 2.0]  # backoff doubles between tries; none after the last
    assert out["error_stage"] == "motion"
    assert out["error"] == "video /in/v.mp4 segment 1: TimeoutError: [Errno 110] timed out (after 4 tries)"


def test_input_errors_fail_the_row_on_the_first_try():
    from stages.media import MediaError

    for error, message in [
        (FileNotFoundError("/in/v.mp4"), "video /in/v.mp4 segment 1: no such file"),
        (MediaError("video /in/v.mp4: not a video"), "video /in/v.mp4: not a video"),
        (RowError("video /in/v.mp4: no face found"), "video /in/v.mp4: no face found"),
        (ValueError("a bug"), "video /in/v.mp4 segment 1: ValueError: a bug"),  # not transient: no second try
    ]:
        Op, pauses, _ = _step()
        op = Op(error, {})
        out = op(_segment_row())
        assert (op.calls, pauses, out["error"]) == (1, [], message), error


def test_an_input_error_caused_by_a_dropped_connection_is_tried_again():
    from stages.media import MediaError

    def media_error_from(cause):
        try:
            try:
                raise cause
            except OSError as e:
                raise MediaError("video /in/v.mp4: decoding failed near frame 12") from e
        except MediaError as wrapped:
            return wrapped

    dropped = media_error_from(ConnectionResetError(errno.ECONNRESET, "connection reset by peer"))
    assert classify(dropped) == "transient"
    assert classify(media_error_from(FileNotFoundError("/in/v.mp4"))) == "input"  # gone is gone
    assert classify(MediaError("video /in/v.mp4: not a video")) == "input"
    Op, pauses, _ = _step()
    op = Op(dropped, {"driving": b"d"})  # the second try reads the file whole
    out = op(_segment_row())
    assert (op.calls, pauses, out["error"], out["driving"]) == (2, [0.5], "", b"d")


def test_the_dub_job_tries_a_segment_the_configured_number_of_times(tmp_path, monkeypatch):
    from pipeline.dub.operators import CompleteOp
    from pipeline.storage import Storage

    op = CompleteOp.__new__(CompleteOp)  # no models: its stage is a probe
    op.config = JobConfig(cache_uri=str(tmp_path), retries={"segment_attempts": 2, "backoff_s": 0.0})
    op.storage = Storage()
    probe = _Probe(ConnectionError("reset"))
    op.stage = lambda *args: probe.run(args)
    op._references = lambda uri: None
    monkeypatch.setattr("pipeline.dub.operators.unpack", lambda packed: packed)
    out = op(_segment_row())
    assert probe.calls == 2
    assert (out["error_stage"], out["error"]) == ("complete", "video /in/v.mp4 segment 1: ConnectionError: reset (after 2 tries)")


# --------------------------------------------------------------------------- device faults


DEVICE_FAULTS = [
    RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be asynchronously reported"),
    RuntimeError("CUDA error: unspecified launch failure"),
    RuntimeError("cudaErrorIllegalAddress: an illegal memory access was encountered"),
    RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, opa, opb, m, n, k, ...)`"),
    RuntimeError("NCCL error in: ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:1970, unhandled cuda error"),
    RuntimeError("GPU has fallen off the bus (Xid 79)"),
]


def test_device_faults_are_told_from_out_of_memory_and_from_ordinary_errors():
    wrapped = RowError("video x: decoding failed")
    wrapped.__cause__ = DEVICE_FAULTS[0]
    assert [classify(e) for e in DEVICE_FAULTS + [wrapped]] == ["device"] * (len(DEVICE_FAULTS) + 1)
    oom = [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
           RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 79.15 GiB total capacity)")]
    assert all(is_out_of_memory(e) and not is_device_fault(e) for e in oom)
    for e in [RuntimeError("shape mismatch"), RuntimeError("oxide layer"), ValueError("CUDA error: an illegal memory access")]:
        assert classify(e) == "other", e  # a ValueError's words are not the driver's
    assert classify(ConnectionResetError(errno.ECONNRESET, "reset")) == "transient"
    assert classify(FileNotFoundError("x")) == "input"


def test_a_device_fault_ends_the_process_instead_of_failing_the_row():
    failed = []
    Op, pauses, exits = _step(stage="complete", on_failed=lambda op, row: failed.append(row))
    op = Op(DEVICE_FAULTS[0])
    # The injected exit returns, so the fault is raised again: no row comes back at all.
    with pytest.raises(RuntimeError, match="illegal memory access"):
        op(_segment_row())
    assert exits == [1] and op.calls == 1 and pauses == [] and failed == []


# --------------------------------------------------------------------------- out of memory


class _OOMAbove(torch.nn.Module):
    """The IMC-UNet, except that a batch of more than `limit` frames runs out of memory."""

    def __init__(self, unet, limit):
        super().__init__()
        self.unet, self.limit, self.batches = unet, limit, []

    def forward(self, masked, motion, reference):
        self.batches.append(len(masked))
        if len(masked) > self.limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(masked)} frames")
        return self.unet(masked, motion, reference)


@pytest.fixture(scope="module")
def completion():
    torch.manual_seed(2)
    vae, unet = LatentVAE.from_config(tiny_vae_config()), IMCUNet(IMCUNetConfig.tiny())
    rng = np.random.default_rng(3)
    n = 9
    inputs = dict(
        crops=rng.integers(0, 256, (n, 256, 256, 3), dtype=np.uint8),
        has_face=np.array([True] * 4 + [False] + [True] * 4),  # 8 face frames, one no-face frame between
        driving=rng.normal(scale=0.05, size=(n, 21, 3)).astype(np.float32),
        ref_index=rng.integers(0, 2, n),
        ref_crops=rng.integers(0, 256, (2, 256, 256, 3), dtype=np.uint8),
    )

    def stage(batch_frames, oom_above=None):
        s = CompletionStage(vae, unet, MouthMask().array(), batch_frames=batch_frames, device="cpu")
        if oom_above is not None:
            s.unet = _OOMAbove(unet, oom_above)
        return s

    return stage, inputs


def test_out_of_memory_retries_the_batch_in_halves_with_the_same_pixels(completion):
    stage, x = completion
    halving = stage(batch_frames=8, oom_above=2)
    out = halving("v", **x)
    assert halving.unet.batches == [8, 4, 2, 2, 4, 2, 2]  # 8 -> 4 + 4 -> four batches of 2
    # The known answer: batches of 2 from the start, which is what the halves ran.
    np.testing.assert_array_equal(out, stage(batch_frames=2)("v", **x))
    np.testing.assert_array_equal(out[4], x["crops"][4])  # the no-face frame stays as given
    unsplit = stage(batch_frames=8)("v", **x)
    assert np.abs(out.astype(int) - unsplit.astype(int)).max() <= 1  # per-frame networks: batching is float noise only


def test_out_of_memory_on_a_single_frame_is_raised(completion):
    stage, x = completion
    hopeless = stage(batch_frames=4, oom_above=0)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        hopeless("v", **x)
    assert hopeless.unet.batches == [4, 2, 1]  # halved down to one frame, then given up

    class Broken(_OOMAbove):
        def forward(self, masked, motion, reference):
            self.batches.append(len(masked))
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    other = stage(batch_frames=4)
    other.unet = Broken(other.unet, 0)
    with pytest.raises(RuntimeError, match="shapes"):
        other("v", **x)
    assert other.unet.batches == [4]  # only out-of-memory is split


# --------------------------------------------------------------------------- a failed video's other segments


def test_a_failed_segment_skips_the_rest_of_its_video_in_this_job_only(tmp_path):
    from pipeline.dub.operators import _Op, _segment, row_step
    from pipeline.workarea import failed_video_uri

    config = JobConfig(cache_uri=str(tmp_path))

    def op_at(stage, *script):
        class Op(_Op):
            @row_step(stage, _segment)
            def __call__(self, row):
                return self.probe.run(row)

        op = Op(config.model_dump())
        op.probe = _Probe(*script)
        return op

    complete = op_at("complete", RowError("video /in/v.mp4 segment 1: broken"), {"generated": b"g"})
    out = complete(_segment_row(seg_idx=1))
    assert out["error"] == "video /in/v.mp4 segment 1: broken"
    assert os.path.exists(failed_video_uri(config, out))

    face = op_at("face", {"face_frames": 3})
    skipped = face(_segment_row(seg_idx=2))
    assert face.probe.calls == 0  # nothing computed
    assert (skipped["error_stage"], skipped["error"]) == ("face", "video /in/v.mp4 segment 2: skipped: segment 1 of this video failed")
    assert complete(_segment_row(seg_idx=0))["error"].endswith("skipped: segment 1 of this video failed")
    assert complete.probe.calls == 1

    # The failed segment itself may be tried again (Ray resubmits it after an actor died).
    assert complete(_segment_row(seg_idx=1))["error"] == "" and complete.probe.calls == 2
    # A rerun is a new job: an earlier job's failure does not hold it back.
    assert face(_segment_row(seg_idx=2, job_id="job-b"))["error"] == "" and face.probe.calls == 1
    # Nor does it touch other videos of the same job.
    assert face(_segment_row(seg_idx=2, video_id="other"))["error"] == "" and face.probe.calls == 2


def test_a_segment_that_faults_the_gpu_again_and_again_is_failed_at_last(tmp_path):
    from pipeline.dub import operators
    from pipeline.dub.operators import _Op, _segment

    config = JobConfig(cache_uri=str(tmp_path), retries={"device_faults": 2})
    exits = []
    # The dub job's row step, its exit recorded instead of done.
    row_step = make_row_step(normalise, operators._skip, fail, retries=lambda op: op.config.retries,
                             abandoned=operators._abandoned, on_failed=operators._record_video_failed,
                             on_device_fault=operators._record_device_fault, exit_process=exits.append)

    class Complete(_Op):
        @row_step("complete", _segment)
        def __call__(self, row):
            return self.probe.run(row)

    op = Complete(config.model_dump())
    op.probe = _Probe(DEVICE_FAULTS[1])
    for _ in range(2):  # each try ends its actor; Ray would resubmit the segment to a fresh one
        with pytest.raises(RuntimeError, match="launch failure"):
            op(_segment_row(seg_idx=1))
    assert exits == [1, 1] and op.probe.calls == 2
    out = op(_segment_row(seg_idx=1))
    assert op.probe.calls == 2  # not tried a third time
    assert (out["error_stage"], out["error"]) == (
        "complete", "video /in/v.mp4 segment 1: the GPU faulted 2 times on this segment; not tried again")
    # and its video's other segments are skipped
    assert op(_segment_row(seg_idx=2))["error"].endswith("skipped: segment 1 of this video failed")
    # A new job starts counting afresh.
    with pytest.raises(RuntimeError):
        op(_segment_row(seg_idx=1, job_id="job-b"))
    assert op.probe.calls == 3


def test_every_stage_that_runs_a_network_bounds_its_gpu_faults_per_video_or_segment(tmp_path):
    """analyse and audio work per video, motion per segment: a row that faults the GPU
    `retries.device_faults` times there is failed too, counted per stage and per row."""
    from pipeline.dub import operators
    from pipeline.dub.operators import _Op, _segment
    from pipeline.steps import video_subject

    config = JobConfig(cache_uri=str(tmp_path), retries={"device_faults": 2})
    row_step = make_row_step(normalise, operators._skip, fail, retries=lambda op: op.config.retries,
                             abandoned=operators._abandoned, on_failed=operators._record_video_failed,
                             on_device_fault=operators._record_device_fault, exit_process=lambda code: None)

    class Analyse(_Op):
        @row_step("analyse", video_subject)
        def __call__(self, row):
            return self.probe.run(row)

    class Motion(_Op):
        @row_step("motion", _segment)
        def __call__(self, row):
            return self.probe.run(row)

    video_row = _segment_row(seg_idx=-1, n_segments=0, frame_start=0, frame_end=0)
    analyse, motion = Analyse(config.model_dump()), Motion(config.model_dump())
    analyse.probe, motion.probe = _Probe(DEVICE_FAULTS[0]), _Probe(DEVICE_FAULTS[0])
    for _ in range(2):
        with pytest.raises(RuntimeError):
            analyse(video_row)
    out = analyse(video_row)
    assert analyse.probe.calls == 2
    assert (out["error_stage"], out["error"]) == (
        "analyse", "video /in/v.mp4: the GPU faulted 2 times on this video; not tried again")
    # The video's count is not a segment's, nor another stage's: motion starts at none.
    for _ in range(2):
        with pytest.raises(RuntimeError):
            motion(_segment_row(seg_idx=0))
    assert motion(_segment_row(seg_idx=0))["error"].endswith("the GPU faulted 2 times on this segment; not tried again")
    assert motion.probe.calls == 2
    with pytest.raises(RuntimeError):  # another video's segment is tried
        motion(_segment_row(seg_idx=0, video_id="other", video_uri="/in/other.mp4"))
    assert motion.probe.calls == 3


# --------------------------------------------------------------------------- on Ray: retried, replaced, ok

FAULTS_ENV = "IMGTALK_TEST_FAULTS"


def _inject_faults():
    """Runs in every Ray worker as it starts (worker_process_setup_hook): patch the stages
    so that each fault whose flag file exists in $IMGTALK_TEST_FAULTS fires once."""
    import errno
    import os

    folder = os.environ.get("IMGTALK_TEST_FAULTS")
    if not folder:
        return
    from stages.audio.cache import FeatureCache
    from stages.completion.stage import CompletionStage

    def first_sight(flag):
        try:
            os.remove(os.path.join(folder, flag))  # atomic: of racing workers exactly one fires
            return True
        except FileNotFoundError:
            return False

    def note(name, line):
        with open(os.path.join(folder, name), "a") as f:
            f.write(f"{line}\n")

    read_window = FeatureCache.read_window

    def flaky_read_window(self, *args, **kwargs):
        if first_sight("transient"):
            note("transient_fired", os.getpid())
            raise ConnectionResetError(errno.ECONNRESET, "connection reset by peer (injected)")
        return read_window(self, *args, **kwargs)

    complete = CompletionStage.__call__

    def faulty_complete(self, *args, **kwargs):
        if first_sight("device_fault"):
            note("faulted_by", os.getpid())
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
        out = complete(self, *args, **kwargs)
        note("completed_by", os.getpid())
        return out

    FeatureCache.read_window = flaky_read_window
    CompletionStage.__call__ = faulty_complete


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def ray_with_faults(faults):
    import ray

    os.environ.update({"RAY_USAGE_STATS_ENABLED": "0", FAULTS_ENV: str(faults)})  # workers inherit it
    # The hook travels by value: the workers cannot import this test module.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": _inject_faults})
    yield ray
    ray.shutdown()
    os.environ.pop(FAULTS_ENV, None)


def test_a_transient_error_is_retried_and_a_device_fault_replaces_the_actor(ray_with_faults, tiny_bundle, faults, tmp_path):
    from pipeline.dub.job import run_dub
    from pipeline.dub.schemas import read_report, write_manifest
    from pipeline.sample_catalogue import SampleVideo, speak, write_video
    from pipeline.storage import Storage

    rows = []
    for name, seconds in (("v0", 1.0), ("v1", 0.5)):
        write_video(str(tmp_path / f"{name}.mp4"), SampleVideo(name, Fraction(25), seconds, "", size=SMALL))
        speak("Hi.", str(tmp_path / f"{name}.wav"))
        rows.append({"video_uri": str(tmp_path / f"{name}.mp4"), "audio_uri": str(tmp_path / f"{name}.wav"),
                     "output_uri": str(tmp_path / "out" / f"{name}.mp4")})
    write_manifest(rows, str(tmp_path / "manifest.parquet"), Storage())
    (faults / "transient").touch()
    (faults / "device_fault").touch()

    config = JobConfig(segment_seconds=0.5, cache_uri=str(tmp_path / "cache"), retries={"segment_attempts": 3, "backoff_s": 0.0})
    result = run_dub(str(tmp_path / "manifest.parquet"), tiny_bundle, str(tmp_path / "report.parquet"), config)

    assert result.counts == {"ok": 2, "failed": 0, "skipped": 0}, [r.error for r in result.rows]
    assert [r.status for r in read_report(str(tmp_path / "report.parquet"), Storage())] == ["ok", "ok"]
    # Both faults really fired, once each.
    assert not (faults / "transient").exists() and len((faults / "transient_fired").read_text().split()) == 1
    assert not (faults / "device_fault").exists()
    faulted = (faults / "faulted_by").read_text().split()
    completed = set((faults / "completed_by").read_text().split())
    # The fault met the first segment sent to completion, so every segment was completed by
    # another process: the faulted actor ended and Ray started a replacement.
    assert len(faulted) == 1 and completed and faulted[0] not in completed
    assert sorted(os.listdir(tmp_path / "out")) == ["v0.mp4", "v1.mp4"]
