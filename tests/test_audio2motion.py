import dataclasses

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from stages.motion.audio2motion import (
    DRIVEN_KEYPOINTS,
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
D = list(DRIVEN_KEYPOINTS)
ND = len(D)
NON_DRIVEN = [i for i in range(K) if i not in DRIVEN_KEYPOINTS]


def tiny_model(k: int = 1, random_head: bool = True, **overrides) -> Audio2Motion:
    cfg = dataclasses.replace(Audio2MotionConfig.tiny(audio_dim=AUDIO_DIM), audio_steps_per_frame=k, **overrides)
    model = Audio2Motion(cfg).eval()
    if random_head:  # the real init is zero, which would make every output-level test trivially pass
        nn.init.normal_(model.head.weight, std=0.5)
        nn.init.normal_(model.head.bias, std=0.1)
    return model


def tiny_inputs(batch: int, frames: int, k: int, audio_dim: int = AUDIO_DIM):
    audio = torch.randn(batch, frames * k, audio_dim)
    x_c = 0.3 * torch.randn(batch, K, 3)
    delta_neutral = 0.03 * torch.randn(batch, K, 3)
    prev_offsets = 0.05 * torch.randn(batch, frames, ND, 3)
    return audio, x_c, delta_neutral, prev_offsets


def test_driven_set_is_the_lip_set_plus_corners():
    assert set(LIP_KEYPOINTS) < set(DRIVEN_KEYPOINTS)
    assert set(DRIVEN_KEYPOINTS) - set(LIP_KEYPOINTS) == {3, 7}
    assert Audio2MotionConfig().driven_keypoints == DRIVEN_KEYPOINTS


# ----------------------------------------------------------------------------- alignment bias B^A


@pytest.mark.parametrize("k,before,after", [(1, 0, 0), (2, 0, 0), (2, 1, 0), (2, 0, 1), (1, 2, 1)])
def test_alignment_bias_restricts_cross_attention_to_its_window(k, before, after):
    cfg = Audio2MotionConfig.tiny(audio_dim=AUDIO_DIM)
    attention = DecoderLayer(cfg).eval().cross_attn
    frames = 5
    queries = torch.randn(2, frames, cfg.d_model)
    audio = torch.randn(2, frames * k, cfg.d_model)
    bias = alignment_bias(frames, k, before, after)
    assert bias.shape == (frames, frames * k)
    reference = attention(queries, audio, mask=bias)[0]
    for i in range(frames):
        window = torch.zeros(frames * k, dtype=torch.bool)
        window[max(0, k * (i - before)): k * (i + 1 + after)] = True
        assert torch.equal(bias[i] == 0, window)

        outside = audio.clone()
        outside[:, ~window] += 3.0 * torch.randn_like(outside[:, ~window])
        moved = attention(queries, outside, mask=bias)[0]
        assert torch.equal(moved[:, i], reference[:, i])

        inside = audio.clone()
        inside[:, window] += torch.randn_like(inside[:, window])
        moved = attention(queries, inside, mask=bias)[0]
        assert not torch.allclose(moved[:, i], reference[:, i])


def test_alignment_bias_clips_to_the_available_steps():
    bias = alignment_bias(3, 2, before=1, after=1, num_steps=5)
    assert bias.shape == (3, 5)
    assert torch.equal(bias == 0, torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool))


# ----------------------------------------------------------------------------- causality of the model


@pytest.mark.parametrize("k,after", [(1, 0), (2, 0), (2, 1)])
def test_outputs_depend_on_later_audio_only_through_the_look_ahead(k, after):
    model = tiny_model(k, audio_window_after=after)
    frames = 6
    audio, x_c, neutral, prev = tiny_inputs(2, frames, k)
    reference = model(audio, x_c, neutral, prev)
    for i in range(frames):
        later = audio.clone()
        later[:, k * (i + 1):] += 2.0 * torch.randn_like(later[:, k * (i + 1):])
        moved = model(later, x_c, neutral, prev)
        fixed = max(0, i + 1 - after)  # frames < fixed never see audio past frame i
        assert torch.equal(moved[:, :fixed], reference[:, :fixed])
        if i + 1 < frames:
            assert not torch.allclose(moved[:, fixed:], reference[:, fixed:])

        own = audio.clone()
        own[:, k * i: k * (i + 1)] += 2.0 * torch.randn_like(own[:, k * i: k * (i + 1)])
        moved = model(own, x_c, neutral, prev)
        assert torch.equal(moved[:, : max(0, i - after)], reference[:, : max(0, i - after)])
        assert not torch.allclose(moved[:, i], reference[:, i])


@pytest.mark.parametrize("after", [0, 1])
def test_frame_sees_next_frames_audio_only_with_look_ahead(after):
    k, frames, i = 2, 5, 2
    model = tiny_model(k, audio_window_after=after)
    audio, x_c, neutral, prev = tiny_inputs(2, frames, k)
    reference = model(audio, x_c, neutral, prev)
    changed = audio.clone()
    changed[:, k * (i + 1): k * (i + 2)] += 2.0 * torch.randn_like(changed[:, k * (i + 1): k * (i + 2)])
    moved = model(changed, x_c, neutral, prev)
    assert torch.allclose(moved[:, i], reference[:, i]) == (after == 0)


def test_cross_attention_query_key_weights_train_only_with_a_wider_window():
    def qk_grads(k, after):
        model = tiny_model(k, audio_window_after=after).train()
        audio, x_c, neutral, prev = tiny_inputs(2, 4, k)
        # The math kernel computes the softmax gradient as p * (g - Σ p g): exactly 0 for a
        # one-key window (fused kernels leave ~1e-6 of rounding).
        with sdpa_kernel(SDPBackend.MATH):
            model(audio, x_c, neutral, prev).pow(2).sum().backward()
        attn = model.layers[0].cross_attn
        d = model.cfg.d_model
        return attn.to_q.weight.grad, attn.to_kv.weight.grad[:d], attn.to_kv.weight.grad[d:]

    q, key, value = qk_grads(1, 0)
    assert torch.count_nonzero(q) == 0 and torch.count_nonzero(key) == 0  # one-step windows: softmax is 1
    assert value.abs().sum() > 0
    q, key, value = qk_grads(2, 1)
    assert q.abs().sum() > 0 and key.abs().sum() > 0 and value.abs().sum() > 0


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


# ----------------------------------------------------------------------------- dropout


def test_cross_attention_never_drops_attention_weights():
    cfg = dataclasses.replace(Audio2MotionConfig.tiny(audio_dim=AUDIO_DIM), dropout=0.5)
    layer = DecoderLayer(cfg)
    queries, audio = torch.randn(2, 6, cfg.d_model), torch.randn(2, 12, cfg.d_model)
    bias = alignment_bias(6, 2)
    layer.eval()
    cross_eval = layer.cross_attn(queries, audio, mask=bias)[0]
    self_eval = layer.self_attn(queries, queries)[0]
    layer_eval = layer(queries, audio, cross_bias=bias)[0]
    layer.train()
    torch.manual_seed(0)
    assert torch.equal(layer.cross_attn(queries, audio, mask=bias)[0], cross_eval)
    # The check can see dropout: self-attention does drop weights, and the residual dropout stays.
    assert not torch.allclose(layer.self_attn(queries, queries)[0], self_eval)
    assert not torch.allclose(layer(queries, audio, cross_bias=bias)[0], layer_eval)


# ----------------------------------------------------------------------------- normalisation


def corpus_statistics(rng, n=512):
    """Realistic raw magnitudes: x_c ~ 0.3, δ ~ 3e-2 around a mean, Δδ std ~ 1e-2 (per coordinate 0.3-1x)."""
    offset_std = 0.01 * rng.uniform(0.3, 1.0, size=(ND, 3))
    offsets = 0.02 + offset_std * rng.standard_normal((n, ND, 3))
    exps = 0.01 + 0.03 * rng.standard_normal((n, K, 3))
    x_cs = 0.3 * rng.standard_normal((1, K, 3)) + 0.02 * rng.standard_normal((n, K, 3))
    stats = (offsets.mean(0), offsets.std(0), exps.mean(0), exps.std(0), x_cs.mean(0), x_cs.std(0))
    return offsets.astype(np.float32), exps.astype(np.float32), x_cs.astype(np.float32), stats


def test_with_statistics_builds_a_json_ready_config():
    rng = np.random.default_rng(0)
    _, _, _, stats = corpus_statistics(rng)
    stats = list(stats)
    stats[1] = stats[1].copy()
    stats[1][0, 0] = 0.0  # a constant coordinate: floored, not a division by zero
    cfg = Audio2MotionConfig.tiny(audio_dim=AUDIO_DIM).with_statistics(*stats)
    assert isinstance(cfg.offset_std, tuple) and isinstance(cfg.offset_std[0], tuple)
    assert np.asarray(cfg.offset_std).shape == (ND, 3) and np.asarray(cfg.x_c_mean).shape == (K, 3)
    assert cfg.offset_std[0][0] == 1e-6
    np.testing.assert_allclose(np.asarray(cfg.exp_mean), stats[2])
    with pytest.raises(ValueError, match="offset_mean"):
        Audio2MotionConfig.tiny().with_statistics(np.zeros((K, 3)), *stats[1:])


def test_statistics_make_offsets_move_the_offset_embedding():
    rng = np.random.default_rng(0)
    offsets, exps, x_cs, stats = corpus_statistics(rng)
    torch.manual_seed(0)
    plain = tiny_model(random_head=False)
    torch.manual_seed(0)
    normalised = Audio2Motion(dataclasses.replace(plain.cfg).with_statistics(*stats)).eval()
    batch = torch.from_numpy(offsets[:64])

    def ratio(model):
        tokens = model.embed_offsets(batch)  # (64, d)
        variation = (tokens - tokens.mean(0)).pow(2).mean().sqrt()
        return (variation / model.offset_embed.bias.pow(2).mean().sqrt()).item()

    assert ratio(plain) < 0.05  # raw Δδ barely moves the embedding: the bias drowns it
    assert ratio(normalised) >= 0.3

    # Same for the neutral embedding: subjects differ in the normalised model's e0.
    x_c, exp = torch.from_numpy(x_cs[:64]), torch.from_numpy(exps[:64])

    def spread(model):
        e0 = model.neutral_embedding(x_c, exp)
        return ((e0 - e0.mean(0)).pow(2).mean().sqrt() / model.neutral_embed.bias.pow(2).mean().sqrt()).item()

    assert spread(normalised) > 5 * spread(plain)


def test_outputs_are_raw_offsets_and_statistics_are_not_weights(tmp_path):
    rng = np.random.default_rng(1)
    _, _, _, stats = corpus_statistics(rng)
    torch.manual_seed(0)
    plain = tiny_model(k=2, random_head=False)
    cfg = plain.cfg.with_statistics(*stats)
    model = Audio2Motion(cfg).eval()
    model.load_state_dict(plain.state_dict())  # same keys: statistics are non-persistent buffers
    assert model.state_dict().keys() == plain.state_dict().keys()
    audio, x_c, neutral, prev = tiny_inputs(2, 4, 2)
    # Zero head = zero normalised prediction = the corpus mean offset in raw units.
    mean = torch.tensor(stats[0], dtype=torch.float32).expand(2, 4, ND, 3)
    torch.testing.assert_close(model(audio, x_c, neutral, prev), mean, rtol=0, atol=1e-7)
    torch.testing.assert_close(model.generate(audio, x_c, neutral), mean, rtol=0, atol=1e-7)
    nn.init.normal_(model.head.weight, std=0.5)
    nn.init.normal_(model.head.bias, std=0.1)
    std = torch.tensor(stats[1], dtype=torch.float32)
    normalised = model.head(model.norm_out(torch.randn(3, cfg.d_model)))
    raw = model.predict_offsets(torch.randn(3, cfg.d_model))
    assert normalised.abs().mean() > 0.1 and raw.sub(mean[0, 0]).div(std).abs().mean() > 0.1
    assert (raw - mean[0, 0]).abs().max() < 1.0  # raw scale: std ~1e-2 times O(1) normalised values
    model.save_pretrained(str(tmp_path))
    loaded = Audio2Motion.from_pretrained(str(tmp_path))
    assert loaded.cfg == cfg
    assert torch.equal(loaded.offset_std, model.offset_std) and torch.equal(loaded.x_c_mean, model.x_c_mean)
    assert torch.equal(loaded(audio, x_c, neutral, prev), model(audio, x_c, neutral, prev))


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("k,before,after", [(1, 0, 0), (2, 0, 0), (2, 1, 1)])
def test_generate_equals_teacher_forcing_on_its_own_outputs(k, before, after):
    model = tiny_model(k, audio_window_before=before, audio_window_after=after)
    frames = 7
    audio, x_c, neutral, _ = tiny_inputs(2, frames, k)
    generated = model.generate(audio, x_c, neutral)
    assert generated.shape == (2, frames, ND, 3)
    assert generated.abs().max() > 0.1  # non-trivial: the head is random
    assert not torch.allclose(generated[:, 0], generated[:, 1])
    teacher_forced = model(audio, x_c, neutral, generated)
    torch.testing.assert_close(teacher_forced, generated, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("before", [0, 2])
def test_generate_in_chunks_equals_one_call(before):
    k = 2
    model = tiny_model(k, audio_window_before=before)
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
    assert torch.equal(model(audio, x_c, neutral, prev), torch.zeros(2, 5, ND, 3))
    assert torch.equal(model.generate(audio, x_c, neutral), torch.zeros(2, 5, ND, 3))


def test_mismatched_shapes_are_rejected():
    model = tiny_model(k=2)
    audio, x_c, neutral, prev = tiny_inputs(1, 4, 2)
    with pytest.raises(ValueError, match="audio2motion.py"):
        model(audio[:, :-2], x_c, neutral, prev)
    with pytest.raises(ValueError, match="multiple of k=2"):
        model.generate(audio[:, :-1], x_c, neutral)
    with pytest.raises(ValueError, match="prev_offsets"):
        model(audio, x_c, neutral, torch.zeros(1, 4, K, 3))


# ----------------------------------------------------------------------------- losses


def random_pose(batch, frames):
    R = torch.linalg.qr(torch.randn(batch, frames, 3, 3))[0]
    scale = 1.5 + 0.1 * torch.randn(batch, frames, 1)
    t = 0.03 * torch.randn(batch, frames, 3)
    return R, scale, t


def ground_truth_keypoints(x_c, neutral, offsets, R, scale, t):
    """Driven keypoints on D of frames whose expression is neutral + offsets (offsets on D)."""
    frames = offsets.shape[1]
    full = neutral[:, None].repeat(1, frames, 1, 1)
    full[:, :, D] += offsets
    x = torch.stack([driven_keypoints(x_c, R[:, i], full[:, i], scale[:, i], t[:, i]) for i in range(frames)], dim=1)
    return x[:, :, D]


def test_stage1_loss_is_zero_on_ground_truth_and_positive_otherwise():
    batch, frames = 2, 4
    _, x_c, neutral, _ = tiny_inputs(batch, frames, 1)
    R, scale, t = random_pose(batch, frames)
    still = (0.05 * torch.randn(batch, 1, ND, 3)).expand(-1, frames, -1, -1)  # constant in time: no velocity
    x_gt = ground_truth_keypoints(x_c, neutral, still, R, scale, t)
    loss, parts = stage1_loss(still, x_c, neutral, R, scale, t, x_gt)
    assert loss.item() < 1e-6 and parts["temp"].item() == 0.0

    moving = still + 0.02 * torch.randn(batch, frames, ND, 3)
    x_gt = ground_truth_keypoints(x_c, neutral, moving, R, scale, t)
    loss, parts = stage1_loss(moving, x_c, neutral, R, scale, t, x_gt)
    assert parts["rec"].item() < 1e-6 and parts["temp"].item() > 0
    for slot in range(ND):  # every driven keypoint counts, the corners 3 and 7 included
        wrong = moving.clone()
        wrong[:, :, slot] += 0.01
        assert stage1_loss(wrong, x_c, neutral, R, scale, t, x_gt)[1]["rec"].item() > 1e-3


def test_stage1_loss_only_sees_the_driven_keypoints_of_the_neutral_state():
    batch, frames = 2, 4
    _, x_c, neutral, pred = tiny_inputs(batch, frames, 1)
    R, scale, t = random_pose(batch, frames)
    x_gt = ground_truth_keypoints(x_c, neutral, 0.05 * torch.randn_like(pred), R, scale, t)
    reference, _ = stage1_loss(pred, x_c, neutral, R, scale, t, x_gt)
    x_c_moved, neutral_moved = x_c.clone(), neutral.clone()
    x_c_moved[:, NON_DRIVEN] += torch.randn_like(x_c_moved[:, NON_DRIVEN])
    neutral_moved[:, NON_DRIVEN] += torch.randn_like(neutral_moved[:, NON_DRIVEN])
    assert torch.equal(stage1_loss(pred, x_c_moved, neutral_moved, R, scale, t, x_gt)[0], reference)
    neutral_moved[:, DRIVEN_KEYPOINTS[0]] += 0.1
    assert not torch.equal(stage1_loss(pred, x_c_moved, neutral_moved, R, scale, t, x_gt)[0], reference)
    with pytest.raises(ValueError, match="pred_offsets"):
        stage1_loss(torch.zeros(batch, frames, K, 3), x_c, neutral, R, scale, t, x_gt)


def test_stage1_loss_matches_hand_computation():
    # Identity pose, zero identity: driven keypoints = Δδ, so both terms can be worked out by hand.
    batch, frames = 2, 3
    pred = torch.zeros(batch, frames, ND, 3)
    pred[0, :, D.index(6), 0] = torch.tensor([0.0, 1.0, 3.0])
    pred[1, :, D.index(3), 2] = torch.tensor([2.0, 2.0, 2.0])  # still
    zeros = torch.zeros(batch, K, 3)
    R = torch.eye(3).expand(batch, frames, 3, 3)
    scale = torch.ones(batch, frames, 1)
    t = torch.zeros(batch, frames, 3)
    x_gt = torch.zeros(batch, frames, ND, 3)
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


def test_driving_expression_is_neutral_plus_offsets_on_the_driven_set_only():
    batch, frames = 2, 3
    neutral = torch.randn(batch, K, 3)
    offsets = torch.randn(batch, frames, ND, 3)
    driving = driving_expression(neutral, offsets)
    assert driving.shape == (batch, frames, K, 3)
    assert torch.equal(driving[:, :, NON_DRIVEN], neutral[:, None, NON_DRIVEN].expand(-1, frames, -1, -1))
    assert torch.equal(driving[:, :, D], neutral[:, None, D] + offsets)
    per_frame = driving_expression(neutral, offsets[:, 1])
    assert torch.equal(per_frame, driving[:, 1])
    custom = driving_expression(neutral, offsets[..., :2, :], driven=(0, 5))
    assert torch.equal(custom[:, :, [0, 5]], neutral[:, None, [0, 5]] + offsets[..., :2, :])
    with pytest.raises(ValueError, match="driven"):
        driving_expression(neutral, torch.zeros(batch, frames, K, 3))


# ----------------------------------------------------------------------------- weights


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model(k=2, audio_window_before=1, audio_window_after=1)
    audio, x_c, neutral, prev = tiny_inputs(2, 4, 2)
    model.save_pretrained(str(tmp_path))
    loaded = Audio2Motion.from_pretrained(str(tmp_path))
    assert loaded.cfg == model.cfg and not loaded.training
    assert loaded.cfg.driven_keypoints == DRIVEN_KEYPOINTS
    assert torch.equal(loaded(audio, x_c, neutral, prev), model(audio, x_c, neutral, prev))
    assert torch.equal(loaded.generate(audio, x_c, neutral), model.generate(audio, x_c, neutral))


# ----------------------------------------------------------------------------- paper size


def expected_parameter_count(cfg: Audio2MotionConfig) -> int:
    d, neutral, offsets = cfg.d_model, 3 * cfg.num_kp, 3 * len(cfg.driven_keypoints)
    linear = lambda n_in, n_out: n_in * n_out + n_out  # noqa: E731
    attention = linear(d, d) + linear(d, 2 * d) + linear(d, d)
    layer = 3 * 2 * d + 2 * attention + linear(d, cfg.ffn_mult * d) + linear(cfg.ffn_mult * d, d)
    return (linear(cfg.audio_dim, d) + 2 * d + linear(2 * neutral, d) + linear(offsets, d)
            + cfg.n_layers * layer + 2 * d + linear(d, offsets))


def test_paper_size_forward():
    cfg = Audio2MotionConfig()
    assert (cfg.audio_dim, cfg.d_model, cfg.audio_steps_per_frame) == (1024, 512, 2)
    model = Audio2Motion(cfg).eval()
    count = sum(p.numel() for p in model.parameters())
    print(f"Audio2Motion default config: {count:,} parameters")
    assert count == expected_parameter_count(cfg)
    nn.init.normal_(model.head.weight, std=0.02)
    audio, x_c, neutral, _ = tiny_inputs(1, 25, 2, audio_dim=1024)
    generated = model.generate(audio, x_c, neutral)
    assert generated.shape == (1, 25, ND, 3) and torch.isfinite(generated).all()
    torch.testing.assert_close(model(audio, x_c, neutral, generated), generated, atol=1e-5, rtol=1e-5)


def test_a_coordinate_constant_in_the_corpus_is_neither_read_nor_predicted():
    # The demo's trained extractor moves the lips along y only: x and z of every offset are
    # constant in the corpus. Free-running, a fed-back 1e-5 there must not reach the network
    # as 10 standard deviations (the floor is 1e-6), and the prediction there is the constant.
    rng = np.random.default_rng(2)
    offsets, _, _, stats = corpus_statistics(rng)
    stats = list(stats)
    stats[1] = stats[1].copy()
    stats[1][:, [0, 2]] = 0.0
    model = Audio2Motion(tiny_model(random_head=True).cfg.with_statistics(*stats)).eval()
    nn.init.normal_(model.head.weight, std=0.5)
    batch = torch.from_numpy(offsets[:8])
    nudged = batch.clone()
    nudged[..., 0] += 1e-5
    nudged[..., 2] -= 3e-5
    torch.testing.assert_close(model.embed_offsets(nudged), model.embed_offsets(batch), rtol=0, atol=0)
    moved = batch.clone()
    moved[..., 1] += 1e-2  # one std of a coordinate that does vary
    assert (model.embed_offsets(moved) - model.embed_offsets(batch)).abs().max() > 1e-2
    raw = model.predict_offsets(torch.randn(5, model.cfg.d_model))
    mean = torch.tensor(stats[0], dtype=torch.float32)
    assert torch.equal(raw[..., [0, 2]], mean[:, [0, 2]].expand(5, ND, 2))
    assert (raw[..., 1] - mean[:, 1]).abs().mean() > 1e-3


@pytest.mark.parametrize("after", [0, 2])
def test_generate_past_max_frames_decodes_cross_faded_windows_of_training_length(after):
    k, window, frames = 2, 8, 21
    model = tiny_model(k, audio_window_after=after, max_frames=window)
    audio, x_c, neutral, _ = tiny_inputs(2, frames, k)
    out = model.generate(audio, x_c, neutral)
    assert out.shape == (2, frames, ND, 3)
    torch.testing.assert_close(out, model.generate_windows(audio, x_c, neutral, window))
    # overlap max(8 // 4, look-ahead + 1); the last window ends with the sequence (13..21)
    overlap = max(window // 4, after + 1)
    starts = [0, window - overlap, 2 * (window - overlap), frames - window]

    def alone(start):  # the window decoded on its own: positions from 0, its look-ahead audio included
        return model._generate(audio[:, k * start: k * min(frames, start + window + after)], x_c, neutral)[:, :window]

    # windows are decoded as batches, one frame-by-frame loop per audio length: one when
    # every window has its full look-ahead, two when the sequence's end cuts the last one's
    loops = []
    decode = model._generate
    model._generate = lambda clips, *a, **kw: loops.append(clips.shape[0]) or decode(clips, *a, **kw)
    torch.testing.assert_close(model.generate(audio, x_c, neutral), out)
    model._generate = decode
    assert loops == ([2 * len(starts)] if after == 0 else [2 * (len(starts) - 1), 2])
    first, second, last = alone(starts[0]), alone(starts[1]), alone(starts[-1])
    torch.testing.assert_close(out[:, : starts[1]], first[:, : starts[1]])  # only the first window reaches these
    torch.testing.assert_close(out[:, starts[-2] + window:], last[:, starts[-2] + window - starts[-1]:])
    # in the first overlap, a linear cross-fade: the second window weighs 1/(o+1) .. o/(o+1)
    for j, w_next in zip(range(starts[1], window), np.arange(1, overlap + 1) / (overlap + 1)):
        w_next = float(w_next)
        want = (1 - w_next) * first[:, j] + w_next * second[:, j - starts[1]]
        torch.testing.assert_close(out[:, j], want)
    # no longer than the windows: one ordinary call; without a limit (0) the old behaviour
    short = tiny_inputs(1, window, k)
    torch.testing.assert_close(model.generate(*short[:3]), model._generate(*short[:3]))
    unlimited = tiny_model(k, audio_window_after=after)
    unlimited.load_state_dict(model.state_dict())
    torch.testing.assert_close(unlimited.generate(audio, x_c, neutral), model._generate(audio, x_c, neutral))
    with pytest.raises(ValueError, match="overlap"):
        model.generate_windows(audio, x_c, neutral, window, overlap=window)
