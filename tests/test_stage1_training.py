"""Stage 1 training step: clip sampling from a prepared chunk, overfitting one clip, exact resume."""
import copy
import dataclasses

import numpy as np
import pytest
import torch

from stages.motion.audio2motion import DRIVEN_KEYPOINTS, Audio2Motion, Audio2MotionConfig, stage1_loss
from stages.motion.extractor import driven_keypoints, rotation_matrix
from stages.motion.training import Stage1TrainConfig, Stage1Trainer, sample_clips

A = 16  # audio feature size
D = list(DRIVEN_KEYPOINTS)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is fastest, and fair to a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_chunk(rng):
    """60 frames: shot 0 on 0-19, no face on 20-24, shot 1 on 25-49 with a face dropout at 40,
    shot 2 on 50-59. audio[i, r] starts with 10 i + r so a clip's frames can be read back."""
    n = 60
    shot = np.full(n, -1, np.int32)
    shot[:20], shot[25:50], shot[50:] = 0, 1, 2
    has_face = shot >= 0
    has_face[40] = False
    audio = rng.normal(size=(n, 2, A)).astype(np.float32)
    audio[:, :, 0] = 10 * np.arange(n)[:, None] + np.arange(2)[None]
    angles = torch.from_numpy(rng.uniform(-20, 20, size=(3, n)).astype(np.float32))
    return {
        "n": n, "has_face": has_face, "shot": shot,
        "x_c": (0.3 * rng.normal(size=(n, 21, 3))).astype(np.float32),
        "exp": (0.03 * rng.normal(size=(n, 21, 3))).astype(np.float32),
        "R": rotation_matrix(*angles).numpy(),
        "t": (0.05 * rng.normal(size=(n, 3))).astype(np.float32),
        "scale": (1.5 + 0.1 * rng.normal(size=(n, 1))).astype(np.float32),
        "audio": audio,
    }


def make_video(rng):
    return {"neutral_x_c": (0.3 * rng.normal(size=(21, 3))).astype(np.float32),
            "neutral_exp": (0.03 * rng.normal(size=(21, 3))).astype(np.float32)}


def clip_start(clip, k):
    return int(round(float(clip["audio"][0, 0]) / 10)) if k == 2 else int(round((float(clip["audio"][0, 0]) - 0.5) / 10))


@pytest.mark.parametrize("k", [1, 2])
def test_sample_clips_stay_inside_one_shot_with_a_face(k):
    rng = np.random.default_rng(0)
    chunk, video = make_chunk(rng), make_video(rng)
    T = 6
    seen_starts = set()
    for seed in range(8):
        clips = sample_clips(chunk, video, T, k, DRIVEN_KEYPOINTS, np.random.default_rng(seed))
        # Runs [0,20), [25,40), [41,50), [50,60) hold 3 + 2 + 1 + 1 whole clips.
        assert len(clips) == 7
        starts = sorted(clip_start(c, k) for c in clips)
        seen_starts.update(starts)
        assert all(b - a >= T for a, b in zip(starts[:-1], starts[1:]))  # non-overlapping
        for clip in clips:
            s = clip_start(clip, k)
            frames = np.arange(s, s + T)
            assert chunk["has_face"][frames].all() and len(set(chunk["shot"][frames])) == 1
            assert {key: v.shape for key, v in clip.items()} == {
                "audio": (T * k, A), "x_c": (21, 3), "delta_neutral": (21, 3), "offsets": (T, len(D), 3),
                "R": (T, 3, 3), "scale": (T, 1), "t": (T, 3), "x_gt": (T, len(D), 3)}
            assert all(v.dtype == np.float32 for v in clip.values())
            rows = chunk["audio"][frames]
            expected_audio = rows.reshape(T * 2, A) if k == 2 else rows.mean(axis=1)
            np.testing.assert_array_equal(clip["audio"], expected_audio)
            np.testing.assert_array_equal(clip["x_c"], video["neutral_x_c"])
            np.testing.assert_array_equal(clip["delta_neutral"], video["neutral_exp"])
            np.testing.assert_array_equal(clip["offsets"], chunk["exp"][frames][:, D] - video["neutral_exp"][D])
            np.testing.assert_array_equal(clip["R"], chunk["R"][frames])
            # x_gt: the frame's own driven keypoints (its own x_c, expression and pose), on D.
            x_d = driven_keypoints(*(torch.from_numpy(chunk[key][frames]) for key in ("x_c", "R", "exp", "scale", "t")))
            np.testing.assert_allclose(clip["x_gt"], x_d[:, D].numpy(), rtol=0, atol=1e-6)
    assert len(seen_starts) > 7  # the starts are random, not a fixed grid
    limited = sample_clips(chunk, video, T, k, DRIVEN_KEYPOINTS, np.random.default_rng(0), max_clips=3)
    assert len(limited) == 3
    assert sample_clips(chunk, video, 30, k, DRIVEN_KEYPOINTS, np.random.default_rng(0)) == []  # no run is that long


def tiny_config(**overrides):
    return dataclasses.replace(Audio2MotionConfig.tiny(audio_dim=A), **overrides)


def batch_of(clips):
    return {key: torch.from_numpy(np.stack([c[key] for c in clips])) for key in clips[0]}


def learnable_clip(rng, T=8, k=2):
    """One clip whose offsets are a clear function of its audio, targets built from the neutral state."""
    audio = rng.normal(size=(T * k, A)).astype(np.float32)
    mix = rng.normal(size=(A, len(D) * 3)).astype(np.float32) / np.sqrt(A)
    offsets = (0.02 * np.tanh(audio.reshape(T, k, A).mean(1) @ mix)).reshape(T, len(D), 3).astype(np.float32)
    video = make_video(rng)
    angles = torch.from_numpy(rng.uniform(-15, 15, size=(3, T)).astype(np.float32))
    R = rotation_matrix(*angles)
    scale = torch.from_numpy((1.5 + 0.05 * rng.normal(size=(T, 1))).astype(np.float32))
    t = torch.from_numpy((0.03 * rng.normal(size=(T, 3))).astype(np.float32))
    exp = torch.from_numpy(video["neutral_exp"]).repeat(T, 1, 1)
    exp[:, D] += torch.from_numpy(offsets)
    x_c = torch.from_numpy(video["neutral_x_c"]).repeat(T, 1, 1)
    x_gt = driven_keypoints(x_c, R, exp, scale, t)[:, D].numpy()
    return {"audio": audio, "x_c": video["neutral_x_c"], "delta_neutral": video["neutral_exp"], "offsets": offsets,
            "R": R.numpy(), "scale": scale.numpy(), "t": t.numpy(), "x_gt": x_gt}


def test_overfitting_one_clip_cuts_the_reconstruction_loss_tenfold():
    rng = np.random.default_rng(3)
    clip = learnable_clip(rng)
    o = clip["offsets"].reshape(-1, len(D), 3)
    stats = (o.mean(0), o.std(0), np.zeros((21, 3)), np.full((21, 3), 0.03), np.zeros((21, 3)), np.full((21, 3), 0.3))
    torch.manual_seed(0)
    model = Audio2Motion(tiny_config(dropout=0.0).with_statistics(*stats))
    cfg = Stage1TrainConfig(lr=1e-2, warmup_steps=5, total_steps=60, prev_noise_std=0.0, scheduled_sampling=0.0)
    trainer = Stage1Trainer(model, cfg)
    batch = batch_of([clip])
    before = trainer.evaluate(batch)
    for step in range(cfg.total_steps):
        trainer.step(batch, step)
    after = trainer.evaluate(batch)
    assert before["rec"] > 0
    assert after["rec"] < before["rec"] / 10, (before, after)
    assert after["rec_free"] < before["rec_free"] / 10, (before, after)


def test_step_reports_floats_and_follows_the_schedule():
    rng = np.random.default_rng(4)
    torch.manual_seed(0)
    trainer = Stage1Trainer(Audio2Motion(tiny_config()), Stage1TrainConfig(warmup_steps=4, total_steps=10))
    batch = batch_of([learnable_clip(rng, T=4), learnable_clip(rng, T=4)])
    logs = [trainer.step(batch, s) for s in range(5)]
    assert all(set(log) == {"loss", "rec", "temp", "lr"} and all(type(v) is float for v in log.values()) for log in logs)
    assert [log["lr"] for log in logs[:4]] == pytest.approx([3e-4 * (i + 1) / 4 for i in range(4)])
    # No weight decay on biases and LayerNorm gains.
    decay, no_decay = trainer.optimizer.param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert trainer.sampling_probability(0) == 0.0 and trainer.sampling_probability(10) == 0.25


def test_resumed_trainer_repeats_the_next_step_exactly():
    rng = np.random.default_rng(5)
    batch = batch_of([learnable_clip(rng, T=6), learnable_clip(rng, T=6)])
    cfg = Stage1TrainConfig(warmup_steps=2, total_steps=6, scheduled_sampling=0.5, prev_noise_std=0.1)
    torch.manual_seed(0)
    first = Stage1Trainer(Audio2Motion(tiny_config(dropout=0.2)), cfg, seed=7)
    for step in range(3):
        first.step(batch, step)
    saved = copy.deepcopy(first.state_dict())
    torch.randn(100)  # the global RNG moves on; the trainer must not depend on it
    expected = first.step(batch, 3)

    torch.manual_seed(1)  # another init and another trainer seed: everything comes from `saved`
    resumed = Stage1Trainer(Audio2Motion(tiny_config(dropout=0.2)), cfg, seed=8)
    torch.manual_seed(1)
    unloaded = Stage1Trainer(Audio2Motion(tiny_config(dropout=0.2)), cfg, seed=8)
    resumed.load_state_dict(saved)
    got = resumed.step(batch, 3)
    assert torch.equal(torch.tensor(got["loss"], dtype=torch.float64), torch.tensor(expected["loss"], dtype=torch.float64))
    assert got == expected
    for (name, a), b in zip(first.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    # The check can fail: without the saved state the same step gives another loss.
    assert unloaded.step(batch, 3)["loss"] != expected["loss"]


def test_free_running_sampling_feeds_back_what_generate_decodes():
    """At probability 1 the step trains on the inference loop's own output as the previous
    motion: its loss is L(model(prev=generate(...))) computed by hand, and not the loss of the
    teacher-forced source's one-step predictions."""
    rng = np.random.default_rng(6)
    batch = batch_of([learnable_clip(rng, T=6), learnable_clip(rng, T=6)])
    losses = {}
    for source in ("free_running", "teacher_forced"):
        cfg = Stage1TrainConfig(warmup_steps=1, total_steps=4, scheduled_sampling=1.0, prev_noise_std=0.0,
                                sampling_source=source)
        torch.manual_seed(0)
        trainer = Stage1Trainer(Audio2Motion(tiny_config(dropout=0.0)), cfg)
        torch.nn.init.normal_(trainer.model.head.weight, std=1.0)  # not the zero init: outputs follow the previous motion
        b = {key: value.float() for key, value in batch.items()}
        args = (b["audio"], b["x_c"], b["delta_neutral"])
        model = trainer.model
        with torch.no_grad():
            model.eval()
            expected_prev = model.generate(*args) if source == "free_running" else model(*args, b["offsets"])
            model.train()
            expected, _ = stage1_loss(model(*args, expected_prev), b["x_c"], b["delta_neutral"], b["R"], b["scale"],
                                      b["t"], b["x_gt"], lip=model.cfg.driven_keypoints, lam=cfg.lam_temp)
        losses[source] = trainer.step(batch, cfg.total_steps)["loss"]  # probability 1: every frame fed back
        assert losses[source] == pytest.approx(expected.item(), rel=1e-5)
        assert model.training
    assert losses["free_running"] != pytest.approx(losses["teacher_forced"], rel=1e-3)
    with pytest.raises(ValueError, match="sampling_source"):
        Stage1Trainer(Audio2Motion(tiny_config()), Stage1TrainConfig(sampling_source="free"))
