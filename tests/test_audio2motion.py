import pytest
import torch
import torch.nn as nn

from stages.motion.audio2motion import (
    Audio2Motion,
    Audio2MotionConfig,
    DecoderLayer,
    alignment_bias,
    driving_expression,
    stage1_loss,
)
from stages.motion.extractor import LIP_KEYPOINTS, NUM_KEYPOINTS, driven_keypoints

AUDIO_DIM = 16
K = NUM_KEYPOINTS
NON_LIP = [i for i in range(K) if i not in LIP_KEYPOINTS]


def tiny_model(k: int = 1, random_head: bool = True) -> Audio2Motion:
    cfg = Audio2MotionConfig.tiny(audio_dim=AUDIO_DIM)
    cfg.audio_steps_per_frame = k
    model = Audio2Motion(cfg).eval()
    if random_head:  # the real init is zero, which would make every output-level test trivially pass
        nn.init.normal_(model.head.weight, std=0.5)
        nn.init.normal_(model.head.bias, std=0.1)
    return model


def tiny_inputs(batch: int, frames: int, k: int, audio_dim: int = AUDIO_DIM):
    audio = torch.randn(batch, frames * k, audio_dim)
    x_c = 0.3 * torch.randn(batch, K, 3)
    delta_neutral = 0.03 * torch.randn(batch, K, 3)
    prev_offsets = 0.05 * torch.randn(batch, frames, K, 3)
    return audio, x_c, delta_neutral, prev_offsets


# ----------------------------------------------------------------------------- alignment bias B^A


@pytest.mark.parametrize("k", [1, 2])
def test_alignment_bias_restricts_cross_attention_to_own_window(k):
    cfg = Audio2MotionConfig.tiny(audio_dim=AUDIO_DIM)
    attention = DecoderLayer(cfg).eval().cross_attn
    frames = 5
    queries = torch.randn(2, frames, cfg.d_model)
    audio = torch.randn(2, frames * k, cfg.d_model)
    bias = alignment_bias(frames, k)
    assert bias.shape == (frames, frames * k)
    reference = attention(queries, audio, mask=bias)[0]
    for i in range(frames):
        window = torch.zeros(frames * k, dtype=torch.bool)
        window[k * i: k * (i + 1)] = True

        outside = audio.clone()
        outside[:, ~window] += 3.0 * torch.randn_like(outside[:, ~window])
        moved = attention(queries, outside, mask=bias)[0]
        assert torch.equal(moved[:, i], reference[:, i])
        others = [j for j in range(frames) if j != i]
        assert not torch.allclose(moved[:, others], reference[:, others])

        inside = audio.clone()
        inside[:, window] += torch.randn_like(inside[:, window])
        moved = attention(queries, inside, mask=bias)[0]
        assert not torch.allclose(moved[:, i], reference[:, i])
        assert torch.equal(moved[:, others], reference[:, others])


# ----------------------------------------------------------------------------- causality of the model


@pytest.mark.parametrize("k", [1, 2])
def test_outputs_never_depend_on_later_audio(k):
    model = tiny_model(k)
    frames = 6
    audio, x_c, neutral, prev = tiny_inputs(2, frames, k)
    reference = model(audio, x_c, neutral, prev)
    for i in range(frames):
        later = audio.clone()
        later[:, k * (i + 1):] += 2.0 * torch.randn_like(later[:, k * (i + 1):])
        moved = model(later, x_c, neutral, prev)
        assert torch.equal(moved[:, : i + 1], reference[:, : i + 1])
        if i + 1 < frames:
            assert not torch.allclose(moved[:, i + 1:], reference[:, i + 1:])

        own = audio.clone()
        own[:, k * i: k * (i + 1)] += 2.0 * torch.randn_like(own[:, k * i: k * (i + 1)])
        moved = model(own, x_c, neutral, prev)
        assert torch.equal(moved[:, :i], reference[:, :i])
        assert not torch.allclose(moved[:, i], reference[:, i])


def test_outputs_never_depend_on_future_teacher_offsets():
    model = tiny_model()
    frames = 6
    audio, x_c, neutral, prev = tiny_inputs(2, frames, 1)
    reference = model(audio, x_c, neutral, prev)
    for i in range(frames):
        changed = prev.clone()
        changed[:, i] += 0.5 * torch.randn_like(changed[:, i])
        moved = model(audio, x_c, neutral, changed)
        # Δδ_i is the input of frame i+1 only: frames <= i must not move.
        assert torch.equal(moved[:, : i + 1], reference[:, : i + 1])
        if i + 1 < frames:
            assert not torch.allclose(moved[:, i + 1], reference[:, i + 1])


def test_neutral_state_conditions_every_frame():
    model = tiny_model()
    audio, x_c, neutral, prev = tiny_inputs(1, 4, 1)
    reference = model(audio, x_c, neutral, prev)
    other_subject = model(audio, x_c + 0.1 * torch.randn_like(x_c), neutral, prev)
    for t in range(4):
        assert not torch.allclose(other_subject[:, t], reference[:, t])


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("k", [1, 2])
def test_generate_equals_teacher_forcing_on_its_own_outputs(k):
    model = tiny_model(k)
    frames = 7
    audio, x_c, neutral, _ = tiny_inputs(2, frames, k)
    generated = model.generate(audio, x_c, neutral)
    assert generated.shape == (2, frames, K, 3)
    assert generated.abs().max() > 0.1  # non-trivial: the head is random
    assert not torch.allclose(generated[:, 0], generated[:, 1])
    teacher_forced = model(audio, x_c, neutral, generated)
    torch.testing.assert_close(teacher_forced, generated, atol=1e-5, rtol=1e-5)


def test_generate_in_chunks_equals_one_call():
    k = 2
    model = tiny_model(k)
    frames = 7
    audio, x_c, neutral, _ = tiny_inputs(2, frames, k)
    whole = model.generate(audio, x_c, neutral)
    first, state = model.generate(audio[:, : 3 * k], x_c, neutral, return_state=True)
    assert state.num_frames == 3
    second, state = model.generate(audio[:, 3 * k: 4 * k], x_c, neutral, state=state, return_state=True)
    third, state = model.generate(audio[:, 4 * k:], x_c, neutral, state=state, return_state=True)
    assert state.num_frames == frames
    torch.testing.assert_close(torch.cat([first, second, third], dim=1), whole, atol=1e-6, rtol=1e-6)


def test_generate_decodes_one_query_per_step_with_a_growing_cache():
    model = tiny_model()
    frames = 5
    audio, x_c, neutral, _ = tiny_inputs(1, frames, 1)
    query_lengths = []
    hook = model.layers[0].self_attn.to_q.register_forward_hook(lambda m, i, o: query_lengths.append(i[0].shape[1]))
    try:
        _, state = model.generate(audio, x_c, neutral, return_state=True)
    finally:
        hook.remove()
    assert query_lengths == [1] * frames  # the prefix is never re-run
    for keys, values in state.kv_cache:
        assert keys.shape[2] == frames and values.shape[2] == frames


def test_untrained_model_predicts_exactly_neutral():
    model = tiny_model(random_head=False)
    audio, x_c, neutral, prev = tiny_inputs(2, 5, 1)
    assert torch.equal(model(audio, x_c, neutral, prev), torch.zeros(2, 5, K, 3))
    assert torch.equal(model.generate(audio, x_c, neutral), torch.zeros(2, 5, K, 3))


def test_mismatched_audio_length_is_rejected():
    model = tiny_model(k=2)
    audio, x_c, neutral, prev = tiny_inputs(1, 4, 2)
    with pytest.raises(ValueError, match="audio2motion.py"):
        model(audio[:, :-2], x_c, neutral, prev)
    with pytest.raises(ValueError, match="multiple of k=2"):
        model.generate(audio[:, :-1], x_c, neutral)


# ----------------------------------------------------------------------------- losses


def random_pose(batch, frames):
    R = torch.linalg.qr(torch.randn(batch, frames, 3, 3))[0]
    scale = 1.5 + 0.1 * torch.randn(batch, frames, 1)
    t = 0.03 * torch.randn(batch, frames, 3)
    return R, scale, t


def ground_truth_keypoints(x_c, neutral, offsets, R, scale, t):
    frames = offsets.shape[1]
    return torch.stack(
        [driven_keypoints(x_c, R[:, i], neutral + offsets[:, i], scale[:, i], t[:, i]) for i in range(frames)], dim=1
    )


def test_stage1_loss_is_zero_on_ground_truth_and_positive_otherwise():
    batch, frames = 2, 4
    _, x_c, neutral, _ = tiny_inputs(batch, frames, 1)
    R, scale, t = random_pose(batch, frames)
    still = (0.05 * torch.randn(batch, 1, K, 3)).expand(-1, frames, -1, -1)  # constant in time: no velocity
    x_gt = ground_truth_keypoints(x_c, neutral, still, R, scale, t)
    loss, parts = stage1_loss(still, x_c, neutral, R, scale, t, x_gt)
    assert loss.item() < 1e-6 and parts["temp"].item() == 0.0

    moving = still + 0.02 * torch.randn(batch, frames, K, 3)
    x_gt = ground_truth_keypoints(x_c, neutral, moving, R, scale, t)
    loss, parts = stage1_loss(moving, x_c, neutral, R, scale, t, x_gt)
    assert parts["rec"].item() < 1e-6 and parts["temp"].item() > 0
    wrong = moving.clone()
    wrong[:, :, LIP_KEYPOINTS[0]] += 0.01
    assert stage1_loss(wrong, x_c, neutral, R, scale, t, x_gt)[1]["rec"].item() > 1e-3


def test_stage1_loss_only_sees_lip_keypoints():
    batch, frames = 2, 4
    _, x_c, neutral, pred = tiny_inputs(batch, frames, 1)
    R, scale, t = random_pose(batch, frames)
    x_gt = ground_truth_keypoints(x_c, neutral, 0.05 * torch.randn_like(pred), R, scale, t)
    reference, _ = stage1_loss(pred, x_c, neutral, R, scale, t, x_gt)

    gt_moved = x_gt.clone()
    gt_moved[:, :, NON_LIP] += torch.randn_like(gt_moved[:, :, NON_LIP])
    pred_moved = pred.clone()
    pred_moved[:, :, NON_LIP] += torch.randn_like(pred_moved[:, :, NON_LIP])
    assert torch.equal(stage1_loss(pred_moved, x_c, neutral, R, scale, t, gt_moved)[0], reference)

    lip_moved = x_gt.clone()
    lip_moved[:, :, LIP_KEYPOINTS[-1]] += 1.0
    assert not torch.equal(stage1_loss(pred, x_c, neutral, R, scale, t, lip_moved)[0], reference)


def test_stage1_loss_matches_hand_computation():
    # Identity pose, zero identity: driven keypoints = Δδ, so both terms can be worked out by hand.
    batch, frames = 2, 3
    pred = torch.zeros(batch, frames, K, 3)
    pred[0, :, 6, 0] = torch.tensor([0.0, 1.0, 3.0])  # lip keypoint
    pred[0, :, 0, 1] = torch.tensor([5.0, -5.0, 9.0])  # non-lip keypoint: ignored by both terms
    pred[1, :, 12, 2] = torch.tensor([2.0, 2.0, 2.0])  # lip keypoint, still
    zeros = torch.zeros(batch, K, 3)
    R = torch.eye(3).expand(batch, frames, 3, 3)
    scale = torch.ones(batch, frames, 1)
    t = torch.zeros(batch, frames, 3)
    x_gt = torch.zeros(batch, frames, K, 3)
    loss, parts = stage1_loss(pred, zeros, zeros, R, scale, t, x_gt, lam=0.5)
    rec = ((0 + 1 + 3) / 3 + (2 + 2 + 2) / 3) / 2  # sample mean of 1/T Σ_t Σ_S |·|_1
    temp = ((1.0**2 + 2.0**2) / 2 + 0.0) / 2  # sample mean of 1/(T-1) Σ_t Σ_S ||Δδ_t - Δδ_{t-1}||²
    assert parts["rec"].item() == pytest.approx(rec)
    assert parts["temp"].item() == pytest.approx(temp)
    assert loss.item() == pytest.approx(rec + 0.5 * temp)


def test_stage1_loss_trains_every_parameter():
    batch, frames, k = 2, 4, 2  # k=2: with k=1 each frame's window is one step, softmax is 1, Q/K get no gradient
    model = tiny_model(k)
    model.train()
    audio, x_c, neutral, prev = tiny_inputs(batch, frames, k)
    R, scale, t = random_pose(batch, frames)
    x_gt = ground_truth_keypoints(x_c, neutral, prev, R, scale, t)
    loss, _ = stage1_loss(model(audio, x_c, neutral, prev), x_c, neutral, R, scale, t, x_gt)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_zero_initialised_head_still_learns():
    model = tiny_model(random_head=False).train()
    audio, x_c, neutral, prev = tiny_inputs(2, 4, 1)
    R, scale, t = random_pose(2, 4)
    x_gt = ground_truth_keypoints(x_c, neutral, prev, R, scale, t)
    stage1_loss(model(audio, x_c, neutral, prev), x_c, neutral, R, scale, t, x_gt)[0].backward()
    assert model.head.weight.grad.abs().sum() > 0


def test_driving_expression_takes_lips_from_prediction_and_the_rest_from_source():
    batch, frames = 2, 3
    source = torch.randn(batch, frames, K, 3)
    neutral = torch.randn(batch, K, 3)
    offsets = torch.randn(batch, frames, K, 3)
    driving = driving_expression(source, neutral, offsets)
    assert driving.shape == source.shape
    lips = list(LIP_KEYPOINTS)
    assert torch.equal(driving[:, :, NON_LIP], source[:, :, NON_LIP])
    assert torch.equal(driving[:, :, lips], neutral[:, None, lips] + offsets[:, :, lips])
    per_frame = driving_expression(source[:, 1], neutral, offsets[:, 1])
    assert torch.equal(per_frame, driving[:, 1])


# ----------------------------------------------------------------------------- weights


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model(k=2)
    audio, x_c, neutral, prev = tiny_inputs(2, 4, 2)
    model.save_pretrained(str(tmp_path))
    loaded = Audio2Motion.from_pretrained(str(tmp_path))
    assert loaded.cfg == model.cfg and not loaded.training
    assert torch.equal(loaded(audio, x_c, neutral, prev), model(audio, x_c, neutral, prev))
    assert torch.equal(loaded.generate(audio, x_c, neutral), model.generate(audio, x_c, neutral))


# ----------------------------------------------------------------------------- paper size


def expected_parameter_count(cfg: Audio2MotionConfig) -> int:
    d, motion = cfg.d_model, 3 * cfg.num_kp
    linear = lambda n_in, n_out: n_in * n_out + n_out  # noqa: E731
    attention = linear(d, d) + linear(d, 2 * d) + linear(d, d)
    layer = 3 * 2 * d + 2 * attention + linear(d, cfg.ffn_mult * d) + linear(cfg.ffn_mult * d, d)
    return (linear(cfg.audio_dim, d) + 2 * d + linear(2 * motion, d) + linear(motion, d)
            + cfg.n_layers * layer + 2 * d + linear(d, motion))


def test_paper_size_forward():
    cfg = Audio2MotionConfig()
    assert (cfg.audio_dim, cfg.d_model, cfg.audio_steps_per_frame) == (1024, 512, 1)
    model = Audio2Motion(cfg).eval()
    count = sum(p.numel() for p in model.parameters())
    print(f"Audio2Motion default config: {count:,} parameters")
    assert count == expected_parameter_count(cfg)
    nn.init.normal_(model.head.weight, std=0.02)
    audio, x_c, neutral, _ = tiny_inputs(1, 25, 1, audio_dim=1024)
    generated = model.generate(audio, x_c, neutral)
    assert generated.shape == (1, 25, K, 3) and torch.isfinite(generated).all()
    torch.testing.assert_close(model(audio, x_c, neutral, generated), generated, atol=1e-5, rtol=1e-5)
