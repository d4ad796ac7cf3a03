"""The per-segment stage classes without Ray: MotionStage, CompletionStage, ComposeStage.

Tiny randomly initialised networks; a 320x240 clip of the astronaut made by the sample
catalogue generator (30 frames at 25 fps, frames 10-14 a face-free cutaway), tracked and
cropped by the face stage, so the stages see the inputs the pipeline gives them.
"""
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest
import torch

from pipeline.sample_catalogue import SampleVideo, write_video
from stages.completion.imc_unet import IMCUNet, IMCUNetConfig
from stages.completion.stage import CompletionStage
from stages.completion.vae import LatentVAE, tiny_vae_config
from stages.compose import ComposeStage
from stages.face import FaceTracker, MouthMask, crop_faces
from stages.media import MediaError, decode_frames, frame_to_rgb, probe_video
from stages.motion.audio2motion import DRIVEN_KEYPOINTS, Audio2Motion, Audio2MotionConfig
from stages.motion.extractor import MotionExtractor, MotionExtractorConfig, extract_motion
from stages.motion.stage import MotionStage

FPS = Fraction(25)
N_FRAMES = 30
NO_FACE = list(range(10, 15))  # frames of the cutaway (0.4 s to 0.6 s)
AUDIO_DIM = 16
K_STEPS = 2  # Stage 1 audio steps per 25 Hz frame (HuBERT 50 Hz)
DRIVEN = list(DRIVEN_KEYPOINTS)
NON_DRIVEN = [k for k in range(21) if k not in DRIVEN_KEYPOINTS]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """The source video and the face stage's view of it."""
    path = str(tmp_path_factory.mktemp("clip") / "astronaut.mp4")
    write_video(path, SampleVideo("astronaut", FPS, N_FRAMES / FPS, "", no_face=(0.4, 0.6), size=(320, 240)))
    frames = np.stack([frame for _, frame in decode_frames(path, 0, N_FRAMES)])
    with FaceTracker() as tracker:
        track = tracker(list(frames))
    expected = np.ones(N_FRAMES, bool)
    expected[NO_FACE] = False
    np.testing.assert_array_equal(track.has_face, expected)  # the premise of every test below
    crops, affines = crop_faces(frames, track)
    return {"path": path, "frames": frames, "crops": crops, "affines": affines, "has_face": track.has_face}


def test_streamed_decode_tracks_and_crops_like_the_decoded_list(clip):
    """FaceOp's path: two decodes of the segment streamed through tracking, then cropping,
    give the crops, affines and has_face of the list the clip fixture held in memory."""
    from stages.face import track_and_crop

    def decode():
        return (frame for _, frame in decode_frames(clip["path"], 0, N_FRAMES, threads=1))

    with FaceTracker() as tracker:
        track, crops, affines = track_and_crop(tracker, decode)
    np.testing.assert_array_equal(track.has_face, clip["has_face"])
    np.testing.assert_array_equal(crops, clip["crops"])
    np.testing.assert_array_equal(affines, clip["affines"])


# ----------------------------------------------------------------------------- motion


@pytest.fixture(scope="module")
def motion_models():
    torch.manual_seed(1)
    extractor = MotionExtractor(MotionExtractorConfig.tiny()).eval()
    stage1 = Audio2Motion(Audio2MotionConfig.tiny(audio_dim=AUDIO_DIM)).eval()
    # Stage 1's head is zero-initialised (Δδ = 0); randomise it so offsets are non-zero and
    # "driven = neutral + offset" and "driven = neutral" can be told apart. k = 2 rows per frame.
    assert stage1.cfg.audio_steps_per_frame == K_STEPS
    torch.nn.init.normal_(stage1.head.weight, std=0.05)
    torch.nn.init.normal_(stage1.head.bias, std=0.05)
    return extractor, stage1


class CountingExtractor(MotionExtractor):
    """The motion extractor, recording every batch it is given."""

    def __init__(self, model: MotionExtractor):
        super().__init__(MotionExtractorConfig.tiny())
        self.load_state_dict(model.state_dict())
        self.seen: list[np.ndarray] = []

    def forward(self, x):
        self.seen.append(x.detach().numpy().copy())
        return super().forward(x)


def motion_segment(clip, extractor, first=10, end=30, warmup_rows=4, seed=0):
    """Inputs for the segment [first, end) as MotionOp builds them: frame times i/fps, 25 Hz
    features (K_STEPS rows per frame) starting `warmup_rows` frames before the segment, neutral state and reference
    bank from face frames of the clip."""
    rng = np.random.default_rng(seed)
    frame_indices = np.arange(first, end)
    first_feature = first - warmup_rows
    num_rows = end - first_feature + 2
    neutral = extract_motion(extractor, clip["crops"][[0]])
    ref_frames = np.array([2, 8, 16, 22, 28])
    ref_motion = extract_motion(extractor, clip["crops"][ref_frames])
    return dict(
        crops=clip["crops"][first:end],
        has_face=clip["has_face"][first:end],
        frame_indices=frame_indices,
        frame_times=frame_indices / 25.0,
        features=rng.normal(size=(num_rows * K_STEPS, AUDIO_DIM)).astype(np.float32),
        first_feature=first_feature,
        audio_duration_s=0.95,  # frames 24..29 (t >= 0.96 s) lie past the dubbed track
        neutral_x_c=neutral["x_c"][0],
        neutral_exp=neutral["exp"][0],
        ref_frames=ref_frames,
        ref_pose=np.stack([ref_motion["pitch"], ref_motion["yaw"], ref_motion["roll"]], -1),
    )


def stage1_rows(stage1, features, neutral_x_c, neutral_exp):
    """Stage 1 run directly over the window: Δδ per 25 Hz frame, (F, |D|, 3)."""
    with torch.no_grad():
        out = stage1.generate(
            torch.from_numpy(features)[None], torch.from_numpy(neutral_x_c)[None], torch.from_numpy(neutral_exp)[None]
        )
    return out[0].numpy()


def test_motion_driving_is_neutral_with_stage1_offsets(clip, motion_models):
    extractor, stage1 = motion_models
    counting = CountingExtractor(extractor)
    stage = MotionStage(counting, stage1, batch_frames=4, min_reference_gap_frames=12)
    seg = motion_segment(clip, extractor)
    out = stage(**seg)

    n = len(seg["crops"])
    assert out["driving"].shape == (n, 21, 3) and out["driving"].dtype == np.float32
    assert out["ref_index"].shape == (n,) and out["pose"].shape == (n, 3)
    face = np.flatnonzero(seg["has_face"])
    empty = np.flatnonzero(~seg["has_face"])
    assert len(face) == 15 and len(empty) == 5

    # Only face crops reach the extractor, in batches of at most batch_frames.
    seen = np.concatenate(counting.seen)
    assert all(len(b) <= 4 for b in counting.seen)
    np.testing.assert_array_equal(seen, seg["crops"][face].transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    # Frames without a face: all zeros.
    assert not out["driving"][empty].any() and not out["pose"][empty].any() and not out["ref_index"][empty].any()

    source = extract_motion(extractor, seg["crops"][face], batch_size=4)
    np.testing.assert_allclose(out["pose"][face], np.stack([source["pitch"], source["yaw"], source["roll"]], -1), atol=1e-5)
    # Eyes, brows, the rest of the face: the neutral frame's expression, exactly (not the source's).
    np.testing.assert_array_equal(
        out["driving"][face][:, NON_DRIVEN], np.broadcast_to(seg["neutral_exp"][NON_DRIVEN], (len(face), len(NON_DRIVEN), 3))
    )
    assert np.abs(source["exp"][:, NON_DRIVEN] - seg["neutral_exp"][NON_DRIVEN]).max() > 1e-4  # they would differ

    # Driven keypoints: neutral + Stage 1's offset for the frame. At 25 fps the mapping is one
    # to one: frame i takes 25 Hz frame i of the audio, i.e. rows k*(i - first_feature) ... of the window.
    rows = stage1_rows(stage1, seg["features"], seg["neutral_x_c"], seg["neutral_exp"])
    assert rows.shape == (len(seg["features"]) // K_STEPS, len(DRIVEN), 3)
    frames = seg["frame_indices"][face]
    expected_offsets = rows[frames - seg["first_feature"]]
    lips = out["driving"][face][:, DRIVEN]
    in_audio = seg["frame_times"][face] < seg["audio_duration_s"]
    assert in_audio.sum() == 9 and (~in_audio).sum() == 6
    expected_lips = seg["neutral_exp"][DRIVEN] + expected_offsets
    np.testing.assert_allclose(lips[in_audio], expected_lips[in_audio], rtol=0, atol=1e-5)
    assert np.abs(expected_offsets).max() > 1e-2  # the offsets are really there
    # Past the end of the dubbed track: the neutral (closed) mouth, exactly.
    np.testing.assert_array_equal(lips[~in_audio], np.broadcast_to(seg["neutral_exp"][DRIVEN], lips[~in_audio].shape))


def test_motion_silence_gate_decodes_each_long_quiet_run_afresh(clip, motion_models):
    """silence_gate_mode "stage1": on a quiet run of at least silence_gate_frames (level below silence_gate_db) the driven
    keypoints are Stage 1 decoded from a fresh start over that run's audio alone (no motion
    fed back from the speech before it); a shorter quiet run, a frame above the threshold and
    every frame outside the runs keep the continuous decoding's motion, and no reference
    choice changes."""
    extractor, stage1 = motion_models
    seg = motion_segment(clip, extractor)  # window frames 6..31, the segment 10..29
    level = np.zeros(26, np.float32)  # dB per window frame
    level[8:12] = -50.0  # frames 14..17: a long quiet run
    level[14:16] = -50.0  # frames 20..21: two frames, a stop consonant
    level[17] = -30.0  # frame 23: quiet, but above the threshold
    ungated = MotionStage(extractor, stage1, batch_frames=8)(**seg)
    gate = MotionStage(extractor, stage1, batch_frames=8, silence_gate_db=-35.0, silence_gate_frames=3,
                       silence_gate_mode="stage1")
    gated = gate(**seg, speech_level_db=level)

    face = seg["has_face"]
    in_run = np.isin(seg["frame_indices"], [14, 15, 16, 17])
    assert (in_run & face).sum() >= 2
    afresh = stage1_rows(stage1, seg["features"][8 * K_STEPS:12 * K_STEPS], seg["neutral_x_c"], seg["neutral_exp"])
    expected = seg["neutral_exp"][DRIVEN] + afresh[seg["frame_indices"][in_run & face] - 14]
    np.testing.assert_allclose(gated["driving"][in_run & face][:, DRIVEN], expected, rtol=0, atol=1e-5)
    assert np.abs(gated["driving"][in_run & face] - ungated["driving"][in_run & face]).max() > 1e-3
    np.testing.assert_array_equal(gated["driving"][~in_run], ungated["driving"][~in_run])
    np.testing.assert_array_equal(gated["ref_index"], ungated["ref_index"])
    # Off (None), or no level given: the continuous decoding everywhere.
    np.testing.assert_array_equal(MotionStage(extractor, stage1, batch_frames=8)(**seg, speech_level_db=level)["driving"],
                                  ungated["driving"])
    np.testing.assert_array_equal(gate(**seg)["driving"], ungated["driving"])


def test_motion_silence_gate_in_neutral_mode_shows_the_neutral_frame_there(clip, motion_models):
    """silence_gate_mode "neutral": a gated run's frames take the neutral expression exactly
    (Δδ = 0) and the neutral frame as their RSCA reference, whatever its time gap; every
    other frame keeps its motion and its pose-matched reference."""
    extractor, stage1 = motion_models
    seg = motion_segment(clip, extractor)  # window frames 6..31, the segment 10..29
    level = np.zeros(26, np.float32)
    level[8:12] = -50.0  # frames 14..17: a long quiet run
    level[14:16] = -50.0  # frames 20..21: too short to gate
    ungated = MotionStage(extractor, stage1, batch_frames=8)(**seg)
    neutral_at = len(seg["ref_frames"]) - 1
    neutral_frame = int(seg["ref_frames"][neutral_at])
    gate = MotionStage(extractor, stage1, batch_frames=8, silence_gate_db=-35.0, silence_gate_frames=3,
                       silence_gate_mode="neutral")
    gated = gate(**seg, speech_level_db=level, neutral_frame=neutral_frame)

    face = seg["has_face"]
    in_run = np.isin(seg["frame_indices"], [14, 15, 16, 17]) & face
    assert in_run.sum() >= 2
    np.testing.assert_array_equal(gated["driving"][in_run],
                                  np.broadcast_to(seg["neutral_exp"], gated["driving"][in_run].shape))
    assert np.abs(ungated["driving"][in_run] - seg["neutral_exp"]).max() > 1e-3  # Stage 1 moved them
    assert (gated["ref_index"][in_run] == neutral_at).all() and (ungated["ref_index"][in_run] != neutral_at).any()
    np.testing.assert_array_equal(gated["driving"][~in_run], ungated["driving"][~in_run])
    np.testing.assert_array_equal(gated["ref_index"][~in_run], ungated["ref_index"][~in_run])
    # A neutral frame posed far from the gated frames (another shot, a turned head): they
    # keep the neutral mouth but their pose-matched references.
    far_pose = seg["ref_pose"].copy()
    far_pose[neutral_at] += np.array([0.0, 25.0, 0.0], np.float32)
    turned = gate(**dict(seg, ref_pose=far_pose), speech_level_db=level, neutral_frame=neutral_frame)
    unturned = MotionStage(extractor, stage1, batch_frames=8)(**dict(seg, ref_pose=far_pose))
    np.testing.assert_array_equal(turned["ref_index"], unturned["ref_index"])
    np.testing.assert_array_equal(turned["driving"][in_run], gated["driving"][in_run])
    assert not gated["shows_reference"].any() and not turned["shows_reference"].any()  # Stage 2 draws them
    with pytest.raises(ValueError, match="silence_gate_mode"):
        MotionStage(extractor, stage1, silence_gate_mode="closed")


def test_motion_silence_gate_in_neutral_pixels_mode_shows_the_neutral_crop_itself(clip, motion_models):
    """silence_gate_mode "neutral-pixels" (the default): the motion and references of "neutral", and the
    gated frames, with the frames past the dubbed track's end, marked to show their
    (neutral) reference crop as it is; a head posed far from the neutral frame is not."""
    extractor, stage1 = motion_models
    seg = motion_segment(clip, extractor)  # the segment 10..29; frames 24..29 lie past the track
    level = np.zeros(26, np.float32)
    level[8:12] = -50.0  # frames 14..17: a long quiet run
    level[14:16] = -50.0  # frames 20..21: too short to gate
    neutral_at = len(seg["ref_frames"]) - 1
    neutral_frame = int(seg["ref_frames"][neutral_at])
    run = dict(speech_level_db=level, neutral_frame=neutral_frame)
    drawn = MotionStage(extractor, stage1, batch_frames=8, silence_gate_db=-35.0, silence_gate_mode="neutral")(**seg, **run)
    shown = MotionStage(extractor, stage1, batch_frames=8, silence_gate_db=-35.0)(**seg, **run)

    face = seg["has_face"]
    marked = (np.isin(seg["frame_indices"], [14, 15, 16, 17]) | (seg["frame_indices"] >= 24)) & face
    assert marked.sum() >= 4 and (face & ~marked).sum() >= 4
    np.testing.assert_array_equal(shown["shows_reference"], marked)
    np.testing.assert_array_equal(shown["driving"], drawn["driving"])
    assert (shown["ref_index"][marked] == neutral_at).all()
    in_track = ~(seg["frame_indices"] >= 24)
    np.testing.assert_array_equal(shown["ref_index"][in_track], drawn["ref_index"][in_track])
    far_pose = seg["ref_pose"].copy()
    far_pose[neutral_at] += np.array([0.0, 25.0, 0.0], np.float32)
    turned = MotionStage(extractor, stage1, batch_frames=8, silence_gate_db=-35.0,
                         silence_gate_mode="neutral-pixels")(**dict(seg, ref_pose=far_pose), **run)
    assert not turned["shows_reference"].any()


def test_motion_driving_never_sees_the_source_expression(clip, motion_models):
    """Two different source crops at the same face positions: the same driving expression.
    The source frames only give the pose; their mouth cannot leak into the dub."""
    extractor, stage1 = motion_models
    stage = MotionStage(extractor, stage1, batch_frames=8)
    seg = motion_segment(clip, extractor)
    base = stage(**seg)
    other_crops = seg["crops"].copy()
    face = seg["has_face"]
    other_crops[face] = clip["crops"][[0, 2, 4, 6, 8] * 3][: face.sum()]  # other frames, other expressions
    assert not np.array_equal(other_crops, seg["crops"])
    other = stage(**dict(seg, crops=other_crops))
    assert not np.allclose(other["pose"][face], base["pose"][face])  # the extractor saw other crops
    np.testing.assert_array_equal(other["driving"], base["driving"])


def test_motion_features_must_come_k_rows_per_frame(clip, motion_models):
    extractor, stage1 = motion_models
    seg = motion_segment(clip, extractor)
    with pytest.raises(ValueError, match=r"not a multiple of 2"):
        MotionStage(extractor, stage1)(**dict(seg, features=seg["features"][:-1]))


def test_motion_offsets_at_2997_fps_interpolate_between_rows(clip, motion_models):
    """At 29.97 fps a frame's offset is Stage 1's 25 Hz track linearly interpolated at the
    frame's centre ((i + 0.5) / fps), row j being centred at (j + 0.5) / 25 s."""
    extractor, stage1 = motion_models
    stage = MotionStage(extractor, stage1, batch_frames=8)
    fps = 30000 / 1001
    seg = motion_segment(clip, extractor, first=15, end=30, warmup_rows=0)
    seg["frame_times"] = seg["frame_indices"] / fps
    seg["first_feature"] = 9  # the window starts at 0.36 s
    seg["audio_duration_s"] = 10.0
    out = stage(**seg)
    rows = stage1_rows(stage1, seg["features"], seg["neutral_x_c"], seg["neutral_exp"])  # (F, |D|, 3)
    row_centres = (seg["first_feature"] + np.arange(len(rows)) + 0.5) / 25.0
    frame_centres = (seg["frame_indices"] + 0.5) / fps
    expected = np.stack(
        [np.interp(frame_centres, row_centres, rows[:, slot, c]) for slot in range(len(DRIVEN)) for c in range(3)], axis=-1
    ).reshape(-1, len(DRIVEN), 3)
    np.testing.assert_allclose(out["driving"][:, DRIVEN], seg["neutral_exp"][DRIVEN] + expected, rtol=0, atol=1e-5)


def test_motion_audio_changes_driven_keypoints_only_and_never_earlier_frames(clip, motion_models):
    extractor, stage1 = motion_models
    stage = MotionStage(extractor, stage1, batch_frames=8)
    seg = motion_segment(clip, extractor)
    base = stage(**seg)
    changed = dict(seg, features=seg["features"].copy())
    # Replace the audio from 25 Hz frame 10 of the window on (absolute feature frame 16 = 0.64 s onwards).
    changed["features"][10 * K_STEPS:] = np.random.default_rng(5).normal(size=changed["features"][10 * K_STEPS:].shape)
    out = stage(**changed)

    lip = DRIVEN
    face = seg["has_face"]
    np.testing.assert_array_equal(out["driving"][:, NON_DRIVEN], base["driving"][:, NON_DRIVEN])
    np.testing.assert_array_equal(out["ref_index"], base["ref_index"])
    # Frame i reads row i-6: frame 15 reads row 9, and Stage 1 is causal, so it is
    # unchanged; frames 16..23 (inside the dubbed track) change.
    frames = seg["frame_indices"]
    before = face & (frames < 16)
    after = face & (frames >= 16) & (seg["frame_times"] < seg["audio_duration_s"])
    assert before.sum() == 1 and after.sum() == 8
    np.testing.assert_allclose(out["driving"][before][:, lip], base["driving"][before][:, lip], rtol=0, atol=1e-6)
    diff = np.abs(out["driving"][after][:, lip] - base["driving"][after][:, lip]).max(axis=(1, 2))
    assert (diff > 1e-3).all()
    # Past the dubbed track the audio does not matter at all.
    past = face & (seg["frame_times"] >= seg["audio_duration_s"])
    np.testing.assert_array_equal(out["driving"][past], base["driving"][past])


def test_motion_reference_is_never_near_its_target(clip, motion_models):
    extractor, stage1 = motion_models
    seg = motion_segment(clip, extractor, first=0, end=30, warmup_rows=0)
    # Reference poses: the exact poses of the bank's frames, so a target that is itself in
    # the bank (2, 8, 16, 22, 28) has a distance-0 reference right on top of it, the
    # MuseTalk leak the stage must avoid.
    out = MotionStage(extractor, stage1, batch_frames=8, min_reference_gap_frames=12)(**seg)
    face = np.flatnonzero(seg["has_face"])
    gap = np.abs(seg["frame_indices"][face, None] - seg["ref_frames"][None])  # (n, R)
    dist = np.linalg.norm(out["pose"][face, None] - seg["ref_pose"][None], axis=-1)
    chosen = out["ref_index"][face]
    rows = np.arange(len(face))
    assert (gap >= 12).any(axis=1).all()  # every target has an allowed reference here
    assert (gap[rows, chosen] >= 12).all()
    np.testing.assert_allclose(dist[rows, chosen], np.where(gap >= 12, dist, np.inf).min(axis=1), rtol=1e-6)
    assert (dist[rows, chosen] > dist.min(axis=1)).any()  # the gap rule really overrode a closer pose
    # With a gap nothing satisfies, the farthest reference in time is used.
    out = MotionStage(extractor, stage1, batch_frames=8, min_reference_gap_frames=100)(**seg)
    np.testing.assert_array_equal(gap[rows, out["ref_index"][face]], gap.max(axis=1))


def test_motion_without_any_face_skips_the_extractor(clip, motion_models):
    extractor, stage1 = motion_models
    counting = CountingExtractor(extractor)
    seg = motion_segment(clip, extractor, first=10, end=15)
    assert not seg["has_face"].any()
    out = MotionStage(counting, stage1)(**seg)
    assert counting.seen == []
    assert out["driving"].shape == (5, 21, 3) and not out["driving"].any()
    assert not out["ref_index"].any() and not out["pose"].any()


# ----------------------------------------------------------------------------- completion


@pytest.fixture(scope="module")
def completion_models():
    torch.manual_seed(2)
    return LatentVAE.from_config(tiny_vae_config()), IMCUNet(IMCUNetConfig.tiny())


@pytest.fixture(scope="module")
def completion_inputs(clip):
    rng = np.random.default_rng(3)
    crops = clip["crops"][[0, 5, 12, 18, 26]].copy()
    # A no-face frame carries noise (not the zeros crop_faces leaves) so "returned as given"
    # is a real check.
    crops[2] = rng.integers(0, 256, crops[2].shape, dtype=np.uint8)
    return dict(
        crops=crops,
        has_face=np.array([True, True, False, True, True]),
        driving=rng.normal(scale=0.05, size=(5, 21, 3)).astype(np.float32),
        ref_index=np.array([1, 0, 0, 1, 0]),
        ref_crops=clip["crops"][[2, 24]].copy(),
    )


def completion_stage(models, **kwargs):
    vae, unet = models
    return CompletionStage(vae, unet, MouthMask().array(), device="cpu", **kwargs)


def test_completion_shapes_passthrough_determinism_and_reference_cache(completion_models, completion_inputs):
    stage = completion_stage(completion_models, batch_frames=3)
    x = completion_inputs
    out = stage("video-a", **x)
    assert out.shape == (5, 256, 256, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[2], x["crops"][2])  # no face: the input crop, byte for byte
    assert not np.array_equal(out[[0, 1, 3, 4]], x["crops"][[0, 1, 3, 4]])  # face frames were re-rendered
    assert stage.reference_encodes == 1

    again = stage("video-a", **x)
    np.testing.assert_array_equal(again, out)
    assert stage.reference_encodes == 1  # the bank of a video is encoded once
    stage("video-b", **x)
    assert stage.reference_encodes == 2
    stage("video-a", **x)
    assert stage.reference_encodes == 2
    stage("video-c", **dict(x, has_face=np.zeros(5, bool)))
    assert stage.reference_encodes == 2  # nothing to complete, nothing encoded

    # A cache of one video: switching videos re-encodes.
    small = completion_stage(completion_models, reference_cache_videos=1)
    for video in ("a", "b", "a"):
        small(video, **x)
    assert small.reference_encodes == 3

    # Batching does not change a frame's result.
    whole = completion_stage(completion_models, batch_frames=16)("video-a", **x)
    assert np.abs(whole.astype(int) - out.astype(int)).max() <= 1


def test_bf16_precision_stores_the_weights_in_bf16_and_renders_close_to_fp32(completion_models, completion_inputs):
    import copy

    x = completion_inputs
    fp32 = completion_stage(completion_models)("video-a", **x)  # precision auto: fp32 on the CPU
    assert next(completion_models[1].parameters()).dtype == torch.float32
    models = tuple(copy.deepcopy(m) for m in completion_models)
    stage = completion_stage(models, precision="bf16")
    assert {p.dtype for m in models for p in m.parameters()} == {torch.bfloat16}  # stored, not autocast
    out = stage("video-a", **x)
    np.testing.assert_array_equal(out[2], x["crops"][2])
    diff = (out.astype(float) - fp32.astype(float))[[0, 1, 3, 4]]
    psnr = 10 * np.log10(255.0**2 / np.mean(diff**2))
    assert np.abs(diff).mean() > 0 and psnr > 33  # bf16's rounding (random tiny nets amplify it), not another image
    assert stage.reference_latents("video-a", x["ref_crops"]).dtype == torch.bfloat16
    fp32_again = completion_stage(tuple(copy.deepcopy(m) for m in completion_models), precision="fp32")
    np.testing.assert_array_equal(fp32_again("video-a", **x), fp32)


def test_latent_window_covers_the_pasted_mouth_with_its_margin():
    from stages.completion.stage import latent_window

    alpha = MouthMask().feathered(6.0)  # pasted rows 158-243, columns 65-191
    assert latent_window(alpha, 8, 0) == ((19, 31), (8, 24))  # the latents holding those pixels
    assert latent_window(alpha, 8, 4) == ((15, 32), (4, 28))  # 4 more each side, cut at the crop's bottom
    assert latent_window(alpha, 8, 100) == ((0, 32), (0, 32))
    assert latent_window(np.zeros((256, 256)), 8, 4) == ((0, 32), (0, 32))


def test_a_decode_region_of_another_size_than_the_crop_is_refused(completion_models):
    with pytest.raises(ValueError, match=r"decode_region is \(128, 128\)"):
        completion_stage(completion_models, decode_region=np.ones((128, 128)))


def test_mouth_window_decode_keeps_the_source_outside_and_the_full_decode_inside(completion_models, completion_inputs):
    x = completion_inputs
    face = x["has_face"]
    alpha = MouthMask().feathered(6.0)
    pasted = alpha > 0
    full = completion_stage(completion_models)("v", **x)
    stage = completion_stage(completion_models, decode_region=alpha, decode_margin=4)
    windowed = stage("v", **x)
    (r0, r1), (c0, c1) = stage.window
    outside = np.ones((256, 256), bool)
    outside[r0 * 8 : r1 * 8, c0 * 8 : c1 * 8] = False
    assert outside.mean() > 0.5  # most of the crop is never decoded
    np.testing.assert_array_equal(windowed[face][:, outside], x["crops"][face][:, outside])
    np.testing.assert_array_equal(windowed[~face], x["crops"][~face])
    assert not np.array_equal(windowed[face][:, pasted], x["crops"][face][:, pasted])  # the mouth was rendered
    # What compose pastes is the full decode's, up to the window's edges and the batch's
    # borrowed statistics (the random tiny VAE here; the demo VAE's figures are
    # benchmarks/decode_window.py's).
    mse = np.mean((windowed[face][:, pasted].astype(float) - full[face][:, pasted].astype(float)) ** 2)
    assert 10 * np.log10(255**2 / mse) > 35


def test_mouth_window_decode_does_not_depend_on_the_batching(completion_models, completion_inputs):
    # The GroupNorm statistics outside the window are the segment's first face frame's, so
    # a smaller batch (or an out-of-memory halving) gives the same pixels.
    x = completion_inputs
    alpha = MouthMask().feathered(6.0)
    outputs = [completion_stage(completion_models, decode_region=alpha, batch_frames=b)("v", **x) for b in (1, 2, 16)]
    for out in outputs[1:]:
        # Up to float rounding: the CPU's convolutions pick kernels by batch size (on an AMD
        # EPYC, 1% of values moved by 1 and one by 2); another frame's statistics move them
        # by tens (test_mouth_window_decode_keeps_the_source_outside_...'s 35 dB).
        diff = np.abs(out.astype(int) - outputs[0].astype(int))
        assert diff.max() <= 2 and (diff > 0).mean() < 0.05


def test_complete_operator_decodes_the_window_over_what_compose_pastes(tiny_bundle, tmp_path):
    from pipeline.config import JobConfig
    from pipeline.dub.operators import CompleteOp
    from stages.completion.stage import latent_window

    assert CompleteOp(JobConfig(cache_uri=str(tmp_path)).model_dump(), tiny_bundle).stage.window is None
    config = JobConfig(cache_uri=str(tmp_path), complete={"decode": "mouth", "decode_margin_latents": 2}, face={"feather_px": 10})
    op = CompleteOp(config.model_dump(), tiny_bundle)
    assert op.stage.window == latent_window(MouthMask().feathered(10), 8, 2) == ((17, 32), (5, 27))


def test_completion_depends_on_motion_and_on_references_only_through_alpha(completion_models, completion_inputs):
    vae, unet = completion_models
    x = completion_inputs
    face = x["has_face"]
    other_refs = np.random.default_rng(4).integers(0, 256, x["ref_crops"].shape, dtype=np.uint8)

    assert all(a.item() == 0.0 for a in unet.rsca_alphas())  # untrained init: RSCA is off
    stage = completion_stage(completion_models)
    base = stage("refs-1", **x)
    # α = 0: the reference crops cannot matter, bit for bit.
    np.testing.assert_array_equal(stage("refs-2", **dict(x, ref_crops=other_refs)), base)
    np.testing.assert_array_equal(stage("refs-3", **dict(x, ref_index=1 - x["ref_index"])), base)
    # The driving motion always enters (motion cross-attention has no gate).
    moved = stage("refs-1", **dict(x, driving=x["driving"] + 0.5))
    assert (np.abs(moved[face].astype(int) - base[face].astype(int)).max(axis=(1, 2, 3)) > 0).all()

    trained = IMCUNet(unet.config)
    trained.load_state_dict(unet.state_dict())
    with torch.no_grad():
        for alpha in trained.rsca_alphas():
            alpha.fill_(1.0)
    stage = completion_stage((vae, trained))
    with_refs = stage("refs-1", **x)
    assert not np.array_equal(with_refs[face], base[face])
    changed = stage("refs-2", **dict(x, ref_crops=other_refs))
    assert (np.abs(changed[face].astype(int) - with_refs[face].astype(int)).max(axis=(1, 2, 3)) > 0).all()
    np.testing.assert_array_equal(changed[~face], x["crops"][~face])


def test_colour_matched_references_take_the_crops_light_on_the_ring_around_the_hole(clip):
    from stages.completion.stage import colour_matched, colour_ring

    mask = MouthMask().array()
    ring = colour_ring(mask, width=12)
    hole = mask > 0.5
    assert not (ring & hole).any() and ring.sum() > 1000
    assert ring[int(np.flatnonzero(hole.any(axis=1))[0]) - 12].any() and not ring[:100].any()
    crops = clip["crops"][[4, 20]]
    refs = clip["crops"][[2, 2]]
    # The same light: the bytes as they are, where the gain is exactly 1.
    np.testing.assert_array_equal(colour_matched(crops, crops, ring), crops)
    # The reference exposed darker, one channel more than the others: brought to the crop's light.
    dim = np.clip(refs.astype(np.float32) * np.array([0.6, 0.7, 0.8]), 0, 255).astype(np.uint8)
    matched = colour_matched(dim, crops, ring)
    np.testing.assert_allclose(matched[:, ring].astype(float).mean(axis=1), crops[:, ring].astype(float).mean(axis=1), atol=1.0)
    before = np.abs(dim[:, hole].astype(float) - refs[:, hole]).mean()
    assert np.abs(matched[:, hole].astype(float) - refs[:, hole]).mean() < before / 5
    # A wild difference (another shot entirely) is matched at most by a factor of 2.
    black = np.full_like(refs, 10)
    assert colour_matched(black, crops, ring).max() <= 20


def test_completion_shows_the_reference_crop_itself_where_asked_and_draws_the_rest_unchanged(completion_models, completion_inputs):
    """shows_reference (the silence gate's "neutral-pixels"): those face frames are their
    reference crop, colour-matched to their own crop, no VAE or UNet; every other frame has
    the pixels it has without the mask, bit for bit, including under the mouth-window
    decode (one frame's statistics)."""
    from stages.completion.stage import colour_matched, colour_ring

    x = completion_inputs
    face = x["has_face"]
    n = len(face)
    shows = np.zeros(n, bool)
    shows[np.flatnonzero(face)[[0, 2]]] = True
    shows[np.flatnonzero(~face)[:1]] = True  # no face: stays the source crop
    assert (~face).any()
    for region in (None, MouthMask().feathered(10)):
        stage = completion_stage(completion_models, decode_region=region)
        base = stage("refs-1", **x)
        out = stage("refs-1", **x, shows_reference=shows)
        np.testing.assert_array_equal(out[shows & face], colour_matched(
            x["ref_crops"][x["ref_index"][shows & face]], x["crops"][shows & face], colour_ring(MouthMask().array())))
        assert np.abs(out[shows & face].astype(int) - x["ref_crops"][x["ref_index"][shows & face]]).mean() < 3
        np.testing.assert_array_equal(out[~shows], base[~shows])
        np.testing.assert_array_equal(out[~face], x["crops"][~face])
        assert not np.array_equal(base[shows & face], out[shows & face])


# ----------------------------------------------------------------------------- compose


def read_all(path):
    with av.open(path) as container:
        return np.stack([frame_to_rgb(f) for f in container.decode(video=0)])


def mouth_footprint(affine, alpha, threshold):
    """Frame pixels (240, 320) bool where the warped blend mask exceeds `threshold`."""
    warped = cv2.warpAffine(alpha, cv2.invertAffineTransform(affine), (320, 240), flags=cv2.INTER_LINEAR)
    return warped > threshold


@pytest.fixture(scope="module")
def blend_mask():
    return MouthMask().feathered(6.0)


def compose(clip, blend_mask, tmp_path, generated_for, start=5, end=20, name="seg.mp4"):
    out_path = str(tmp_path / name)
    sl = slice(start, end)
    written = ComposeStage(blend_mask, preset="veryfast")(
        clip["path"], out_path, start, end, 320, 240, FPS,
        generated_for(clip["crops"][sl]), clip["affines"][sl], clip["has_face"][sl],
    )
    return out_path, written


def test_compose_identity_generation_reproduces_the_source(clip, blend_mask, tmp_path):
    out_path, written = compose(clip, blend_mask, tmp_path, lambda crops: crops)
    assert written == 15
    info = probe_video(out_path)
    assert (info.width, info.height, info.fps, info.n_frames) == (320, 240, FPS, 15)
    composed = read_all(out_path).astype(np.float32)
    source = clip["frames"][5:20].astype(np.float32)
    assert composed.shape == source.shape
    diff = np.abs(composed - source)
    assert diff.mean() < 2.0
    assert diff.mean(axis=(1, 2, 3)).max() < 3.0  # every frame, face or not
    # Inside the pasted mouth the crop went through two bilinear warps; still close.
    inside = mouth_footprint(clip["affines"][5], blend_mask, 0.99)
    assert inside.sum() > 500
    assert diff[0][inside].mean() < 6.0


def test_compose_pastes_only_the_mouth_of_face_frames(clip, blend_mask, tmp_path):
    red = lambda crops: np.broadcast_to(np.array([255, 0, 0], np.uint8), crops.shape).copy()  # noqa: E731
    out_path, written = compose(clip, blend_mask, tmp_path, red)
    assert written == 15
    composed = read_all(out_path).astype(np.float32)
    # The same segment re-encoded with identity generation: what codec loss alone does.
    identity = read_all(compose(clip, blend_mask, tmp_path, lambda crops: crops, name="id.mp4")[0]).astype(np.float32)
    source = clip["frames"][5:20].astype(np.float32)
    has_face = clip["has_face"][5:20]
    for i in range(15):
        diff = np.abs(composed[i] - source[i])
        codec_only = np.abs(composed[i] - identity[i])
        if not has_face[i]:
            assert diff.mean() < 2.0, f"frame {5 + i} has no face and must be unchanged"
            assert codec_only.mean() < 0.5
            continue
        alpha = blend_mask
        inside = cv2.erode(mouth_footprint(clip["affines"][5 + i], alpha, 0.99).astype(np.uint8), np.ones((5, 5)))
        near = cv2.dilate(mouth_footprint(clip["affines"][5 + i], alpha, 0.0).astype(np.uint8), np.ones((17, 17)))
        inside, far = inside.astype(bool), ~near.astype(bool)
        assert inside.sum() > 300 and far.sum() > 0.6 * far.size
        r, g, b = (composed[i][inside][:, c] for c in range(3))
        assert r.mean() > 200 and g.mean() < 50 and b.mean() < 50, f"frame {5 + i}: mouth is not red"
        assert diff[far].mean() < 3.0, f"frame {5 + i}: pixels far from the mouth changed"
        assert codec_only[far].mean() < 1.0, f"frame {5 + i}: pixels far from the mouth changed"
        # And the source there was not red to begin with.
        assert source[i][inside][:, 1].mean() > 80


def test_compose_range_beyond_the_video_names_the_file(clip, blend_mask, tmp_path):
    out_path = str(tmp_path / "beyond.mp4")
    n = 10
    with pytest.raises(MediaError, match="astronaut.mp4"):
        ComposeStage(blend_mask, preset="veryfast")(
            clip["path"], out_path, 25, 25 + n, 320, 240, FPS,
            np.zeros((n, 256, 256, 3), np.uint8), np.full((n, 2, 3), np.nan), np.zeros(n, bool),
        )
    assert not (tmp_path / "beyond.mp4").exists()  # no partial segment is left behind
    with pytest.raises(MediaError, match="astronaut.mp4"):
        ComposeStage(blend_mask, preset="veryfast")(
            clip["path"], out_path, 40, 40 + n, 320, 240, FPS,
            np.zeros((n, 256, 256, 3), np.uint8), np.full((n, 2, 3), np.nan), np.zeros(n, bool),
        )
    assert not (tmp_path / "beyond.mp4").exists()


def test_compose_with_one_thread_writes_the_same_frames_on_one_thread(clip, blend_mask, tmp_path, monkeypatch):
    import stages.compose.stage as compose_module
    import stages.media.decode as decode_module
    from stages.media import SegmentWriter
    from stages.media.probe import open_media

    encoder_threads, decoder_contexts = [], []

    class RecordingWriter(SegmentWriter):
        def close(self):
            encoder_threads.append(self.threads)
            super().close()

    def recording_open_media(path, role="file", threads=None):
        container = open_media(path, role, threads)
        decoder_contexts.append(container.streams.video[0].codec_context)
        return container

    monkeypatch.setattr(compose_module, "SegmentWriter", RecordingWriter)
    monkeypatch.setattr(decode_module, "open_media", recording_open_media)
    composed = {}
    for threads in (None, 1):
        out_path = str(tmp_path / f"threads-{threads}.mp4")
        # crf 0 is lossless, so a difference made by the thread count would show in the pixels.
        ComposeStage(blend_mask, preset="veryfast", threads=threads)(
            clip["path"], out_path, 5, 20, 320, 240, FPS,
            clip["crops"][5:20], clip["affines"][5:20], clip["has_face"][5:20], crf=0,
        )
        composed[threads] = read_all(out_path)
    np.testing.assert_array_equal(composed[1], composed[None])
    assert encoder_threads == [0, 1]  # 0: x264 picks a count from the node's cores
    # The decoders that produced frames (a seek retry may open more than one).
    assert decoder_contexts[-1].thread_count == 1


def test_plan_operator_probes_with_the_plan_pools_decoder_threads(clip, tmp_path, monkeypatch):
    """PlanOp's probe decodes a frame: its decoder gets the plan pool's cores (1.5 -> 2
    threads), not FFmpeg's automatic count from the node's."""
    import stages.media.probe as probe_module
    from pipeline.config import JobConfig, PoolConfig
    from pipeline.dub.operators import PlanOp
    from pipeline.dub.rows import new_row

    thread_counts, open_media = [], probe_module.open_media

    def recording_open_media(path, role="file", threads=None):
        container = open_media(path, role, threads)
        thread_counts.append(container.streams.video[0].codec_context.thread_count)
        return container

    monkeypatch.setattr(probe_module, "open_media", recording_open_media)
    audio = tmp_path / "dub.wav"
    audio.write_bytes(b"not read by plan")
    config = JobConfig(cache_uri=str(tmp_path), pools={"plan": PoolConfig(num_cpus=1.5)})
    row = new_row(job_id="job", row_index=0, video_id="astronaut", video_uri=clip["path"], audio_uri=str(audio),
                  output_uri=str(tmp_path / "out.mp4"), segment_seconds=1.2, work_key="wk")
    planned = PlanOp(config.model_dump())(row)
    assert planned["error"] == "", planned["error"]
    assert (planned["n_frames"], planned["width"], planned["height"]) == (N_FRAMES, 320, 240)
    assert thread_counts == [2]


def test_face_operator_streams_the_segment_to_the_crops_of_the_decoded_list(clip, tmp_path):
    """FaceOp outside Ray on the clip: the crops, affines and has_face of the list-based
    fixture, with decoder threads taken from the face pool's reservation."""
    from pipeline.config import JobConfig, PoolConfig
    from pipeline.dub.operators import FaceOp
    from pipeline.dub.rows import new_row, unpack

    config = JobConfig(cache_uri=str(tmp_path), pools={"face": PoolConfig(num_cpus=1.5)})
    op = FaceOp(config.model_dump())
    assert op.threads == 2
    row = new_row(
        job_id="job", row_index=0, video_id="astronaut", video_uri=clip["path"], audio_uri="unused.wav",
        output_uri=str(tmp_path / "out.mp4"), segment_seconds=1.2, work_key="wk", audio_sha256="sha",
        seg_idx=0, n_segments=1, frame_start=0, frame_end=N_FRAMES,
    )
    out = op(row)
    assert out["error"] == "", out["error"]
    np.testing.assert_array_equal(unpack(out["crops"]), clip["crops"])
    np.testing.assert_array_equal(unpack(out["affines"]), clip["affines"])
    np.testing.assert_array_equal(unpack(out["has_face"]), clip["has_face"])
    assert out["face_frames"] == N_FRAMES - len(NO_FACE)
