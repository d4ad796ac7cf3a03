"""The silence gate through the dub job's own operators (plan, analyse, audio, split, face,
motion; no Ray): the audio operator caches the dubbed track's speech level, and the motion
operator gives the frames in a long silence the neutral expression and the neutral frame as
their reference. Turned off, neither happens."""
from fractions import Fraction

import numpy as np
import pytest

from pipeline.arrays import unpack
from pipeline.config import JobConfig
from pipeline.dub import operators as ops
from pipeline.dub.rows import new_row
from pipeline.sample_catalogue import SampleVideo, write_video
from stages.synth.speaker import write_wav

SPEECH_S, SILENCE_S = 1.0, 1.4


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    video = root / "v.mp4"
    write_video(str(video), SampleVideo("v", Fraction(25), SPEECH_S + SILENCE_S, "", size=(192, 144)))
    rng = np.random.default_rng(0)
    t = np.arange(int(16000 * SPEECH_S)) / 16000.0
    voiced = 0.4 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 4 * t)) + 0.05 * rng.normal(size=t.size)
    audio = root / "dub.wav"
    write_wav(str(audio), np.concatenate([voiced, np.zeros(int(16000 * SILENCE_S))]).astype(np.float32))
    return {"video": str(video), "audio": str(audio), "root": root}


def _motion_rows(media, bundle, config: JobConfig, tag: str) -> tuple[dict, list[dict]]:
    cfg = config.model_copy(update={"cache_uri": str(media["root"] / f"cache-{tag}"),
                                     "work_uri": str(media["root"] / f"work-{tag}")}).model_dump()
    row = new_row(job_id=tag, row_index=0, video_id="v", video_uri=media["video"], audio_uri=media["audio"],
                  output_uri=str(media["root"] / f"out-{tag}.mp4"), segment_seconds=1.2, face="largest")
    video = ops.AudioOp(cfg, bundle)(ops.AnalyseOp(cfg, bundle)(ops.PlanOp(cfg)(row)))
    face, motion = ops.FaceOp(cfg), ops.MotionOp(cfg, bundle)
    segments = [motion(face(seg)) for seg in ops.split_segments(video)]
    assert video["error"] == "" and all(s["error"] == "" for s in segments), [s["error"] for s in segments]
    return video, segments


def test_frames_in_the_dubbed_tracks_silence_get_the_neutral_mouth_and_reference(media, tiny_bundle):
    from stages.audio import load_audio
    from stages.audio.cache import CachedFeatures, FeatureCache
    from stages.audio.speech_level import speech_level_db_25hz

    import fsspec

    gated_video, gated = _motion_rows(media, tiny_bundle, JobConfig(), "on")
    level = FeatureCache(fsspec.filesystem("file"), "/").read_window(
        CachedFeatures(gated_video["speech_level_path"], gated_video["feature_frames"], 0.0, 1), 0, 1000)[::2, 0]
    np.testing.assert_array_equal(level, speech_level_db_25hz(load_audio(media["audio"])))

    neutral_exp = unpack(gated_video["neutral_exp"])
    ref_frames = unpack(gated_video["ref_frames"])
    neutral_ref = int(np.flatnonzero(ref_frames == gated_video["neutral_frame"])[0])
    silent_from = int(SPEECH_S * 25) + 1  # the filter's ring-down past the last voiced frame
    driving = np.concatenate([unpack(s["driving"]) for s in gated])
    refs = np.concatenate([unpack(s["ref_index"]) for s in gated])
    has_face = np.concatenate([unpack(s["has_face"]) for s in gated])
    assert len(driving) == int((SPEECH_S + SILENCE_S) * 25) and has_face[silent_from:].all()
    np.testing.assert_array_equal(driving[silent_from:], np.broadcast_to(neutral_exp, driving[silent_from:].shape))
    assert (refs[silent_from:] == neutral_ref).all()

    off_video, off = _motion_rows(media, tiny_bundle, JobConfig(motion={"silence_gate_db": None}), "off")
    assert off_video["speech_level_path"] == ""
    refs_off = np.concatenate([unpack(s["ref_index"]) for s in off])
    assert (refs_off[silent_from:] != neutral_ref).any()  # the pose and gap rule chose others
    np.testing.assert_array_equal(refs_off[:silent_from - 2], refs[:silent_from - 2])  # speech: the same choice
