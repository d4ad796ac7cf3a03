"""The silence gate through the dub job's own operators (plan, analyse, audio, split, face,
motion; no Ray): the audio operator caches the dubbed track's speech level, and the motion
operator shows the analysed neutral frame's mouth over the track's long silences (its own
crop, by default; or Stage 2's drawing of it; or, in the "stage1" mode, Stage 1 decoded
afresh there; stages/motion/stage.py has the exact values). Turned off, neither happens."""
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


@pytest.fixture(scope="module")
def moving_bundle(tiny_bundle, tmp_path_factory):
    """The tiny bundle with Stage 1's head randomised: its zero-initialised head predicts
    Δδ = 0 everywhere, where no gate could change anything."""
    import shutil

    import torch

    from stages.motion.audio2motion import Audio2Motion

    root = str(tmp_path_factory.mktemp("moving") / "bundle")
    shutil.copytree(tiny_bundle, root)
    stage1 = Audio2Motion.from_pretrained(f"{root}/stage1")
    torch.manual_seed(0)
    torch.nn.init.normal_(stage1.head.weight, std=0.05)
    torch.nn.init.normal_(stage1.head.bias, std=0.05)
    stage1.save_pretrained(f"{root}/stage1")
    return root


def test_the_dub_job_gates_the_dubbed_tracks_silence_and_nothing_else(media, moving_bundle):
    """Through the job's operators, the "stage1" mode: the audio operator caches the track's
    speech level; the motion operator's driving expression changes in the track's long
    silence only (Stage 1 decoded afresh there) and is the ungated one over the speech; off,
    no level is made."""
    import fsspec

    from stages.audio import load_audio
    from stages.audio.cache import CachedFeatures, FeatureCache
    from stages.audio.speech_level import speech_level_db_25hz

    gated_video, gated = _motion_rows(media, moving_bundle, JobConfig(motion={"silence_gate_mode": "stage1"}), "on")
    level = FeatureCache(fsspec.filesystem("file"), "/").read_window(
        CachedFeatures(gated_video["speech_level_path"], gated_video["feature_frames"], 0.0, 1), 0, 1000)[::2, 0]
    np.testing.assert_array_equal(level, speech_level_db_25hz(load_audio(media["audio"])))
    off_video, off = _motion_rows(media, moving_bundle, JobConfig(motion={"silence_gate_db": None}), "off")
    assert off_video["speech_level_path"] == ""

    silent_from = int(SPEECH_S * 25) + 1  # the filter's ring-down past the last voiced frame
    on_driving = np.concatenate([unpack(s["driving"]) for s in gated])
    off_driving = np.concatenate([unpack(s["driving"]) for s in off])
    assert len(on_driving) == int((SPEECH_S + SILENCE_S) * 25)
    speech = slice(0, silent_from - 2)
    np.testing.assert_array_equal(on_driving[speech], off_driving[speech])
    assert np.abs(off_driving[speech] - unpack(off_video["neutral_exp"])).max() > 1e-3  # Stage 1 moves the mouth
    assert np.abs(on_driving[silent_from:] - off_driving[silent_from:]).max() > 1e-3
    np.testing.assert_array_equal(np.concatenate([unpack(s["ref_index"]) for s in gated]),
                                  np.concatenate([unpack(s["ref_index"]) for s in off]))


@pytest.mark.parametrize("mode", ["neutral-pixels", "neutral"])
def test_the_neutral_gate_modes_show_the_analysed_neutral_frame_in_the_silence(media, moving_bundle, mode):
    """The default mode ("neutral-pixels") and "neutral" through the operators: in the track's
    long silence the driving expression is the neutral frame's and the reference is the
    neutral frame the analysis chose (the motion operator passes it on); over the speech
    nothing changes. "neutral-pixels" marks those frames, and the complete operator hands on
    the neutral frame's own crop for them (colour-matched to theirs); "neutral" has Stage 2
    draw them."""
    assert JobConfig().motion.silence_gate_mode == "neutral-pixels"
    video, neutral = _motion_rows(media, moving_bundle, JobConfig(motion={"silence_gate_mode": mode}), mode)
    _, off = _motion_rows(media, moving_bundle, JobConfig(motion={"silence_gate_db": None}), "off-n")
    silent_from = int(SPEECH_S * 25) + 1
    driving = np.concatenate([unpack(s["driving"]) for s in neutral])
    ref_index = np.concatenate([unpack(s["ref_index"]) for s in neutral])
    neutral_at = int(np.flatnonzero(unpack(video["ref_frames"]) == video["neutral_frame"])[0])
    np.testing.assert_array_equal(driving[silent_from:],
                                  np.broadcast_to(unpack(video["neutral_exp"]), driving[silent_from:].shape))
    off_ref_index = np.concatenate([unpack(s["ref_index"]) for s in off])
    assert (ref_index[silent_from:] == neutral_at).all() and (off_ref_index[silent_from:] != neutral_at).any()
    speech = slice(0, silent_from - 2)
    np.testing.assert_array_equal(driving[speech], np.concatenate([unpack(s["driving"]) for s in off])[speech])
    np.testing.assert_array_equal(ref_index[speech], off_ref_index[speech])

    shows = np.concatenate([unpack(s["shows_reference"]) for s in neutral])
    assert (shows[silent_from:].all() if mode == "neutral-pixels" else not shows.any()) and not shows[speech].any()
    cfg = JobConfig(cache_uri=str(media["root"] / f"cache-{mode}"), work_uri=str(media["root"] / f"work-{mode}"))
    complete = ops.CompleteOp(cfg.model_dump(), moving_bundle)
    generated = np.concatenate([unpack(complete(dict(s))["generated"]) for s in neutral])
    bank = np.load(video["ref_crops_uri"])
    crops = np.concatenate([unpack(s["crops"]) for s in neutral])
    if mode == "neutral-pixels":
        from stages.completion.stage import colour_matched
        neutral_crop = np.broadcast_to(bank[neutral_at], generated[shows].shape)
        np.testing.assert_array_equal(generated[shows], colour_matched(neutral_crop, crops[shows], complete.stage.ring))
        assert np.abs(generated[shows].astype(int) - neutral_crop).mean() < 2  # the same light: all but the bytes
    else:
        assert (np.abs(generated[silent_from:].astype(int) - bank[neutral_at].astype(int)).max(axis=(1, 2, 3)) > 0).all()
    assert (np.abs(generated[speech].astype(int) - crops[speech].astype(int)).max(axis=(1, 2, 3)) > 0).all()


def test_the_analysed_neutral_frame_is_a_mouth_at_rest_not_a_closure_inside_speech(tiny_bundle, tmp_path, monkeypatch):
    """A speaker at rest for 15 frames, head turned 12 degrees, then talking to the camera,
    with one frame inside the speech where the lips meet. The closed-and-frontal score
    alone picks that closure (frontal, and as closed as lips in speech get); the analyse
    operator, looking two frames either side of each sampled one, picks a frame at rest."""
    from pipeline.synth_corpus import write_video as write_synth_video
    from stages.motion import extractor
    from stages.synth.speaker import SpeakerIdentity, render_frame

    n, rest, closure = 40, 15, 27
    jaw = np.r_[np.zeros(rest), 0.15 + 0.35 * np.abs(np.sin(np.arange(n - rest) * 0.9))]
    jaw[closure] = 0.0
    video = str(tmp_path / "talk.mp4")
    frames = (render_frame(None, SpeakerIdentity(sway_amp=0.0), jaw[i], 0.5, i / 25) for i in range(n))
    write_synth_video(video, frames, (320, 240))
    audio = str(tmp_path / "dub.wav")
    write_wav(audio, np.zeros(16000 * n // 25, np.float32))

    # The head's pose as told above (every frame is sampled, in order; the tiny bundle's
    # random extractor would read arbitrary poses off the crops).
    def posed(model, crops, batch_size=32):
        yaw = np.where(np.arange(len(crops)) < rest, 12.0, 0.0).astype(np.float32)
        zeros = np.zeros(len(crops), np.float32)
        return {"pitch": zeros, "yaw": yaw, "roll": zeros, "x_c": np.zeros((len(crops), 21, 3), np.float32),
                "exp": np.zeros((len(crops), 21, 3), np.float32)}

    monkeypatch.setattr(extractor, "extract_motion", posed)

    def neutral(window_s: float) -> int:
        cfg = JobConfig(cache_uri=str(tmp_path / "cache"), work_uri=str(tmp_path / "work"),
                        analyse={"sample_frames": n, "still_window_seconds": window_s}).model_dump()
        row = new_row(job_id="j", row_index=0, video_id="talk", video_uri=video, audio_uri=audio,
                      output_uri=str(tmp_path / "out.mp4"), segment_seconds=1.2, face="largest")
        row = ops.AnalyseOp(cfg, tiny_bundle)(ops.PlanOp(cfg)(row))
        assert row["error"] == "", row["error"]
        return int(row["neutral_frame"])

    assert neutral(0.0) == closure  # what "closed and frontal" alone chooses
    assert neutral(0.08) < rest - 2  # at rest, and still for two frames either side
