"""IMGTalk Stage 1: audio -> implicit motion (the paper's "Audio to Implicit Motion Encoding").

A Transformer decoder maps HuBERT features (k steps per 25 Hz video frame; k=2 is HuBERT's
native 50 Hz) to per-frame LivePortrait expression offsets Δδ_t on the DRIVEN keypoints D
only (|D| x 3 values per frame), relative to the subject's own neutral silent state
(x_c, δ_neutral) taken from a closed-mouth frame. The driving expression for a frame is
δ_neutral + Δδ_t on D and δ_neutral everywhere else (`driving_expression`; Eq. 1 turns it
into keypoints). Only what the loss trains is predicted and fed back: keypoints outside D
get no supervision, so a model that also predicted them would emit untrained values there.

Normalisation. LivePortrait's x_c, δ and Δδ live on very different scales (Δδ has a std of
about 1e-2), so raw values would barely move a freshly initialised embedding. The config
stores corpus statistics (`with_statistics`); x_c and δ_neutral are standardised before
`neutral_embed`, previous offsets before `offset_embed`, and the head predicts standardised
offsets that forward/generate turn back into RAW Δδ. The statistics live in the config (so in
config.json) and become non-persistent buffers: the safetensors layout never depends on them.
Without statistics (None) every normalisation is the identity.

Motion tokens. The motion embedding starts from the neutral state,
e0 = Linear([norm(x_c), norm(δ_neutral)]); the query token of frame t is
Linear(norm(Δδ_{t-1})) + e0 + sinusoid(t). Frame 0 sees Δδ_{-1} = 0: the mouth at rest.
Training is teacher-forced (ground-truth Δδ shifted right by one frame); inference
decodes autoregressively with a self-attention KV cache, chunk by chunk if wanted.

Each decoder layer (pre-LN): causal self-attention over motion tokens, cross-modal
attention (Eq. 2) with motion queries and audio keys/values, then an MLP. Dropout sits on
the residual branches; the cross-attention has no attention-probability dropout, since
with few keys per frame dropping attention weights would drop the frame's audio outright.

Alignment bias B^A (Eq. 3), generalised to a window. With k audio steps per video frame,
`before` and `after` frames of context, frame i may attend audio steps j with
k*(i-before) <= j < k*(i+1+after) (clipped to the available steps); all other logits get
-inf. With before=after=0 (the paper's B^A) each frame sees only its own k steps. Through
the autoregressive chain (causal self-attention, Δδ_{t-1} fed back) a frame's output may
depend on any EARLIER audio; on LATER audio it depends only through the `after` look-ahead:
frame i never sees audio past frame i+after. With after=0 the model is strictly causal and
`generate` streams chunk by chunk exactly; with after>0 the look-ahead is clipped at the end
of each call's audio, so chunked decoding equals one call only if the whole audio is given
at once (latency = after x 40 ms for a streaming caller that delays its decoding).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from stages.common.standardise import STD_FLOOR, destandardise, standardise
from stages.common.checkpoint import load_pretrained, save_pretrained
from stages.motion.extractor import NUM_KEYPOINTS, driven_keypoints

# The keypoints Stage 1 drives. LivePortrait's "lip" set (6, 12, 14, 17, 19, 20) -- the
# paper's S -- plus 3 and 7: LivePortrait's own lip-variation and smile retargeting sliders
# also move keypoints 3 and 7 (mouth corners / cheeks), so a talking mouth that keeps them
# at neutral looks pasted on. Everything outside this set stays at δ_neutral.
DRIVEN_KEYPOINTS: tuple[int, ...] = (3, 6, 7, 12, 14, 17, 19, 20)

Stats = tuple[tuple[float, ...], ...]


@dataclass
class Audio2MotionConfig:
    audio_dim: int = 1024  # HuBERT-large hidden size
    d_model: int = 512
    n_heads: int = 8
    n_layers: int = 6
    ffn_mult: int = 4
    dropout: float = 0.1
    num_kp: int = NUM_KEYPOINTS
    driven_keypoints: tuple[int, ...] = DRIVEN_KEYPOINTS
    # k in Eq. 3: audio steps per 25 Hz video frame. 2 = HuBERT's native 50 Hz, so each
    # frame attends over two steps and the cross-attention's Q/K weights are trained (with
    # a one-step window the softmax is always 1 and Q/K get no gradient).
    audio_steps_per_frame: int = 2
    audio_window_before: int = 0  # frames of earlier audio each frame may attend
    audio_window_after: int = 0  # frames of look-ahead (latency after x 40 ms)
    # The longest sequence it was trained on (the training clip's frames; 0 = unbounded). Past
    # it the positions and the history are ones it never saw, and its free-running output
    # drifts (the demo bundle, trained on 25-frame clips: +0.27 along the lips' opening after
    # frame 25), so `generate` works in overlapping windows of this length (generate_windows).
    max_frames: int = 0
    # Corpus statistics (see with_statistics); None = identity. Offsets: (|D|, 3); the
    # neutral expression and canonical keypoints: (num_kp, 3). Nested tuples for JSON.
    offset_mean: Stats | None = None
    offset_std: Stats | None = None
    exp_mean: Stats | None = None
    exp_std: Stats | None = None
    x_c_mean: Stats | None = None
    x_c_std: Stats | None = None

    @classmethod
    def tiny(cls, audio_dim: int = 32) -> "Audio2MotionConfig":
        return cls(audio_dim=audio_dim, d_model=32, n_heads=2, n_layers=2)

    def with_statistics(self, offset_mean, offset_std, exp_mean, exp_std, x_c_mean, x_c_std) -> "Audio2MotionConfig":
        """A copy holding corpus statistics (numpy arrays): offsets (|D|, 3), exp and x_c
        (num_kp, 3). Standard deviations are floored at STD_FLOOR; a coordinate at the floor
        is constant and standardises to 0 (stages/common/standardise.py)."""
        driven, kp = (len(self.driven_keypoints), 3), (self.num_kp, 3)
        values = {}
        for name, value, shape in (("offset_mean", offset_mean, driven), ("offset_std", offset_std, driven),
                                   ("exp_mean", exp_mean, kp), ("exp_std", exp_std, kp),
                                   ("x_c_mean", x_c_mean, kp), ("x_c_std", x_c_std, kp)):
            array = np.asarray(value, dtype=np.float64)
            if array.shape != shape:
                raise ValueError(f"audio2motion.py with_statistics: {name} has shape {array.shape}, expected {shape}")
            if not np.isfinite(array).all():
                raise ValueError(f"audio2motion.py with_statistics: {name} holds NaN or Inf")
            if name.endswith("std"):
                array = np.maximum(array, STD_FLOOR)
            values[name] = tuple(tuple(float(v) for v in row) for row in array)
        return dataclasses.replace(self, **values)


@dataclass
class GenerationState:
    """Where `generate` stopped, so the next call continues the same sequence."""

    num_frames: int  # frames decoded so far (= position of the next frame)
    last_offsets: Tensor  # (B, |D|, 3) raw Δδ of the last decoded frame, the next frame's input
    kv_cache: list[tuple[Tensor, Tensor] | None]  # per layer: self-attention K, V (B, heads, num_frames, head_dim)
    audio_tail: Tensor | None = None  # (B, <= k*before, d) encoded audio the next frames' windows reach back to


# ----------------------------------------------------------------------------- helpers


def sinusoidal_positions(positions: Tensor, dim: int) -> Tensor:
    """Fixed sin/cos encodings (len, dim) for integer positions; fixed so any sequence length works."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device) / half)
    angles = positions.float()[:, None] * freqs[None, :]  # (len, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (len, dim)


def window_starts(total: int, window: int, overlap: int) -> list[int]:
    """First frames of the windows generate_windows decodes a `total`-frame sequence in: every
    `window - overlap` frames, and the last window ends with the sequence, full length."""
    if not 0 <= overlap < window:
        raise ValueError(f"audio2motion.py generate_windows: overlap {overlap} must be in [0, window {window})")
    starts = list(range(0, max(1, total - window), window - overlap))
    if starts[-1] + window < total:
        starts.append(total - window)
    return starts


def alignment_bias(num_frames: int, steps_per_frame: int, before: int = 0, after: int = 0,
                   num_steps: int | None = None, device=None, dtype=torch.float32) -> Tensor:
    """Eq. 3 with a window: additive bias (T, S), S = num_steps (default T*k); 0 where
    k*(i-before) <= j < k*(i+1+after), -inf elsewhere."""
    k = steps_per_frame
    num_steps = num_frames * k if num_steps is None else num_steps
    frame = torch.arange(num_frames, device=device)[:, None]
    step = torch.arange(num_steps, device=device)[None, :]
    allowed = (step >= k * (frame - before)) & (step < k * (frame + 1 + after))
    bias = torch.zeros(allowed.shape, device=device, dtype=dtype)
    return bias.masked_fill(~allowed, float("-inf"))


def causal_mask(num_frames: int, device=None) -> Tensor:
    """(T, T) boolean, True where frame i may attend frame j (j <= i)."""
    return torch.ones(num_frames, num_frames, dtype=torch.bool, device=device).tril()


def _stat_buffer(values: Stats | None, shape: tuple[int, int], fill: float) -> Tensor:
    if values is None:
        return torch.full(shape, fill)
    tensor = torch.tensor(values, dtype=torch.float32)
    if tuple(tensor.shape) != shape:
        raise ValueError(f"audio2motion.py: statistics of shape {tuple(tensor.shape)}, expected {shape}")
    return tensor


# ----------------------------------------------------------------------------- blocks


class Attention(nn.Module):
    """Multi-head attention: queries from `x`, keys/values from `context`, optional cached K/V in front.
    `attn_dropout` drops attention probabilities; residual dropout is the caller's."""

    def __init__(self, d_model: int, n_heads: int, attn_dropout: float):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"audio2motion.py: d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.attn_dropout = attn_dropout
        self.to_q = nn.Linear(d_model, d_model)
        self.to_kv = nn.Linear(d_model, 2 * d_model)
        self.to_out = nn.Linear(d_model, d_model)

    def split_heads(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, self.n_heads, width // self.n_heads).transpose(1, 2)  # (B, h, L, dh)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None, past: tuple[Tensor, Tensor] | None = None):
        batch, length, width = x.shape
        q = self.split_heads(self.to_q(x))
        k, v = (self.split_heads(z) for z in self.to_kv(context).chunk(2, dim=-1))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        dropout = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(batch, length, width)  # (B, L, d)
        return self.to_out(y), (k, v)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Audio2MotionConfig):
        super().__init__()
        d = cfg.d_model
        self.norm_self = nn.LayerNorm(d)
        self.self_attn = Attention(d, cfg.n_heads, cfg.dropout)
        self.norm_cross = nn.LayerNorm(d)
        self.cross_attn = Attention(d, cfg.n_heads, 0.0)  # no attention dropout: see the module docstring
        self.norm_mlp = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.ffn_mult * d), nn.GELU(), nn.Linear(cfg.ffn_mult * d, d))
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x, audio, self_mask=None, cross_bias=None, past=None):
        """x (B, L, d) motion tokens; audio (B, S, d). Returns x and this layer's self-attention K/V."""
        h = self.norm_self(x)
        attended, kv = self.self_attn(h, h, mask=self_mask, past=past)
        x = x + self.resid_drop(attended)
        x = x + self.resid_drop(self.cross_attn(self.norm_cross(x), audio, mask=cross_bias)[0])
        x = x + self.resid_drop(self.mlp(self.norm_mlp(x)))
        return x, kv


# ----------------------------------------------------------------------------- model


class Audio2Motion(nn.Module):
    def __init__(self, cfg: Audio2MotionConfig):
        super().__init__()
        if cfg.d_model % 2:
            raise ValueError(f"audio2motion.py: d_model must be even for sinusoidal positions, got {cfg.d_model}")
        driven = tuple(cfg.driven_keypoints)
        if not driven or len(set(driven)) != len(driven) or not all(0 <= i < cfg.num_kp for i in driven):
            raise ValueError(f"audio2motion.py: driven_keypoints {driven} must be distinct indices in [0, {cfg.num_kp})")
        if cfg.audio_steps_per_frame < 1 or cfg.audio_window_before < 0 or cfg.audio_window_after < 0:
            raise ValueError("audio2motion.py: audio_steps_per_frame must be >= 1 and the audio window >= 0")
        self.cfg = cfg
        d, neutral_dim, offset_dim = cfg.d_model, cfg.num_kp * 3, len(driven) * 3
        self.reset_buffers()
        self.audio_proj = nn.Linear(cfg.audio_dim, d)
        self.audio_norm = nn.LayerNorm(d)
        self.neutral_embed = nn.Linear(2 * neutral_dim, d)  # [x_c, δ_neutral] -> e0
        self.offset_embed = nn.Linear(offset_dim, d)  # Δδ_{t-1} on D -> token
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm_out = nn.LayerNorm(d)
        self.head = nn.Linear(d, offset_dim)
        # Zero-init so an untrained model predicts the mean offset (Δδ = 0 without statistics),
        # i.e. the subject's neutral closed mouth: training starts from the identity baseline,
        # and early outputs (or a model loaded for a smoke test) never drive the face with jitter.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def reset_buffers(self) -> None:
        """(Re)create the corpus statistics from the config: buffers so they follow .to(device),
        non-persistent so the safetensors layout is the same with or without them (they live in
        config.json). The meta-device loader calls this after assigning the file's tensors."""
        cfg = self.cfg
        kp, dr = (cfg.num_kp, 3), (len(cfg.driven_keypoints), 3)
        for name, values, shape, fill in (("offset_mean", cfg.offset_mean, dr, 0.0), ("offset_std", cfg.offset_std, dr, 1.0),
                                          ("exp_mean", cfg.exp_mean, kp, 0.0), ("exp_std", cfg.exp_std, kp, 1.0),
                                          ("x_c_mean", cfg.x_c_mean, kp, 0.0), ("x_c_std", cfg.x_c_std, kp, 1.0)):
            self.register_buffer(name, _stat_buffer(values, shape, fill), persistent=False)

    # --- shared pieces

    @property
    def num_driven(self) -> int:
        return len(self.cfg.driven_keypoints)

    def encode_audio(self, audio: Tensor, first_step: int = 0) -> Tensor:
        """(B, S, audio_dim) -> (B, S, d); positions count from `first_step` so chunks line up."""
        positions = torch.arange(first_step, first_step + audio.shape[1], device=audio.device)
        x = self.audio_proj(audio) + sinusoidal_positions(positions, self.cfg.d_model).to(audio.dtype)
        return self.audio_norm(x)

    def neutral_embedding(self, x_c: Tensor, delta_neutral: Tensor) -> Tensor:
        x_c = standardise(x_c, self.x_c_mean, self.x_c_std)
        delta_neutral = standardise(delta_neutral, self.exp_mean, self.exp_std)
        return self.neutral_embed(torch.cat([x_c.flatten(1), delta_neutral.flatten(1)], dim=-1))  # (B, d)

    def embed_offsets(self, offsets: Tensor) -> Tensor:
        """Raw Δδ (..., |D|, 3) -> tokens (..., d), standardised first."""
        return self.offset_embed(standardise(offsets, self.offset_mean, self.offset_std).flatten(-2))

    def predict_offsets(self, x: Tensor) -> Tensor:
        """Decoder states (..., d) -> raw Δδ (..., |D|, 3): the head predicts standardised offsets."""
        normalised = self.head(self.norm_out(x)).unflatten(-1, (self.num_driven, 3))
        return destandardise(normalised, self.offset_mean, self.offset_std)

    def num_frames(self, audio: Tensor) -> int:
        k = self.cfg.audio_steps_per_frame
        if audio.dim() != 3 or audio.shape[-1] != self.cfg.audio_dim:
            raise ValueError(
                f"audio2motion.py: audio must be (B, T*k, {self.cfg.audio_dim}), got {tuple(audio.shape)}"
            )
        if audio.shape[1] % k:
            raise ValueError(f"audio2motion.py: {audio.shape[1]} audio steps is not a multiple of k={k}")
        return audio.shape[1] // k

    # --- training

    def forward(self, audio: Tensor, x_c: Tensor, delta_neutral: Tensor, prev_offsets: Tensor) -> Tensor:
        """Teacher-forced. audio (B, T*k, A); x_c, delta_neutral (B, K, 3); prev_offsets (B, T, |D|, 3)
        = raw ground-truth Δδ of frames 0..T-1 on D (shifted right here). Returns raw Δδ (B, T, |D|, 3)."""
        cfg = self.cfg
        batch, num_frames = prev_offsets.shape[:2]
        if tuple(prev_offsets.shape[2:]) != (self.num_driven, 3):
            raise ValueError(f"audio2motion.py: prev_offsets must be (B, T, {self.num_driven}, 3), got {tuple(prev_offsets.shape)}")
        if self.num_frames(audio) != num_frames:
            raise ValueError(
                f"audio2motion.py: {audio.shape[1]} audio steps do not cover {num_frames} frames "
                f"at k={cfg.audio_steps_per_frame}"
            )
        tokens = self.embed_offsets(prev_offsets)  # (B, T, d)
        rest = self.embed_offsets(prev_offsets.new_zeros(batch, 1, self.num_driven, 3))  # Δδ_{-1} = 0
        shifted = torch.cat([rest, tokens[:, :-1]], dim=1)  # frame t sees Δδ_{t-1}
        positions = sinusoidal_positions(torch.arange(num_frames, device=audio.device), cfg.d_model)
        x = self.drop(shifted + self.neutral_embedding(x_c, delta_neutral)[:, None] + positions)  # (B, T, d)
        memory = self.encode_audio(audio)  # (B, T*k, d)
        self_mask = causal_mask(num_frames, audio.device)
        cross_bias = alignment_bias(num_frames, cfg.audio_steps_per_frame, cfg.audio_window_before,
                                    cfg.audio_window_after, device=audio.device, dtype=x.dtype)
        for layer in self.layers:
            x, _ = layer(x, memory, self_mask, cross_bias)
        return self.predict_offsets(x)

    # --- inference

    @torch.no_grad()
    def generate(self, audio: Tensor, x_c: Tensor, delta_neutral: Tensor, state: GenerationState | None = None,
                 return_state: bool = False):
        """Autoregressive decoding of T = steps // k frames, one at a time with a self-attention KV
        cache. Call in eval mode. Returns raw Δδ (B, T, |D|, 3). Passing the returned `state` back
        continues the sequence; chunked calls equal one call when audio_window_after = 0.
        A sequence longer than cfg.max_frames, started afresh, is decoded by generate_windows."""
        if state is None and not return_state and 0 < self.cfg.max_frames < self.num_frames(audio):
            return self.generate_windows(audio, x_c, delta_neutral, self.cfg.max_frames)
        return self._generate(audio, x_c, delta_neutral, state, return_state)

    @torch.no_grad()
    def generate_windows(self, audio: Tensor, x_c: Tensor, delta_neutral: Tensor, window: int,
                         overlap: int | None = None) -> Tensor:
        """Free-running decoding in windows of `window` frames, each started afresh as a training
        clip starts (positions from 0, the rest token), so no frame sits at a position or behind a
        history longer than training's. Windows overlap by `overlap` frames (default a quarter,
        at least the look-ahead + 1) and are cross-faded linearly there; each window is given its
        look-ahead audio where the sequence has it. Returns raw Δδ (B, T, |D|, 3)."""
        k, after = self.cfg.audio_steps_per_frame, self.cfg.audio_window_after
        total = self.num_frames(audio)
        overlap = max(window // 4, after + 1) if overlap is None else overlap
        starts = window_starts(total, window, overlap)
        batch = audio.shape[0]
        out = audio.new_zeros(batch, total, self.num_driven, 3)
        weight = audio.new_zeros(total)
        fade = torch.arange(1, overlap + 1, dtype=audio.dtype, device=audio.device) / (overlap + 1)
        # Windows are independent sequences, so those with audio of one length (all but the
        # ones whose look-ahead the sequence's end cuts short) decode as one batch: one
        # frame-by-frame loop for the whole sequence instead of one per window.
        spans = [(start, min(total, start + window), k * min(total, start + window + after)) for start in starts]
        decoded = {}
        for length in dict.fromkeys(stop - k * start for start, _, stop in spans):
            group = [i for i, (start, _, stop) in enumerate(spans) if stop - k * start == length]
            clips = torch.cat([audio[:, k * spans[i][0]: spans[i][2]] for i in group])  # (len(group)*B, length, D)
            frames = self._generate(clips, x_c.repeat(len(group), 1, 1), delta_neutral.repeat(len(group), 1, 1))
            for j, i in enumerate(group):
                decoded[i] = frames[j * batch: (j + 1) * batch]
        for i, (start, end, _) in enumerate(spans):
            frames = decoded[i][:, : end - start]
            ramp = torch.ones(end - start, dtype=audio.dtype, device=audio.device)
            if i > 0 and overlap:  # fade in over the overlap with the previous window
                ramp[:overlap] = fade
            if i < len(starts) - 1 and overlap:  # fade out towards the next one
                ramp[-overlap:] = torch.minimum(ramp[-overlap:], fade.flip(0))
            out[:, start:end] += ramp[None, :, None, None] * frames
            weight[start:end] += ramp
        return out / weight[None, :, None, None]

    def _generate(self, audio: Tensor, x_c: Tensor, delta_neutral: Tensor, state: GenerationState | None = None,
                  return_state: bool = False):
        cfg = self.cfg
        batch, k = x_c.shape[0], cfg.audio_steps_per_frame
        before, after = cfg.audio_window_before, cfg.audio_window_after
        num_frames = self.num_frames(audio)
        if state is None:
            state = GenerationState(0, x_c.new_zeros(batch, self.num_driven, 3), [None] * len(self.layers))
        e0 = self.neutral_embedding(x_c, delta_neutral)  # (B, d)
        memory = self.encode_audio(audio, first_step=state.num_frames * k)  # (B, T*k, d)
        tail = 0
        if state.audio_tail is not None:  # earlier audio the first frames' windows still reach
            tail = state.audio_tail.shape[1]
            memory = torch.cat([state.audio_tail, memory], dim=1)
        steps = memory.shape[1]
        positions = sinusoidal_positions(
            torch.arange(state.num_frames, state.num_frames + num_frames, device=audio.device), cfg.d_model
        ).to(e0.dtype)  # (T, d), once
        prev, cache = state.last_offsets, list(state.kv_cache)
        outputs = []
        for i in range(num_frames):
            x = (self.embed_offsets(prev) + e0 + positions[i])[:, None]  # (B, 1, d)
            # B^A leaves frame i exactly this slice, so attend it with no bias.
            window = memory[:, max(0, tail + k * (i - before)): min(steps, tail + k * (i + 1 + after))]
            for index, layer in enumerate(self.layers):
                x, cache[index] = layer(x, window, past=cache[index])
            prev = self.predict_offsets(x[:, 0])  # (B, |D|, 3)
            outputs.append(prev)
        offsets = torch.stack(outputs, dim=1) if outputs else x_c.new_zeros(batch, 0, self.num_driven, 3)
        if return_state:
            keep = min(steps, k * before)
            audio_tail = memory[:, steps - keep:] if keep else None
            return offsets, GenerationState(state.num_frames + num_frames, prev, cache, audio_tail)
        return offsets

    # --- weights

    @classmethod
    def from_pretrained(cls, folder: str) -> "Audio2Motion":
        return load_pretrained(cls, Audio2MotionConfig, folder)

    def save_pretrained(self, folder: str) -> None:
        save_pretrained(self, self.cfg, folder)


# ----------------------------------------------------------------------------- losses


def stage1_loss(pred_offsets: Tensor, x_c: Tensor, delta_neutral: Tensor, R: Tensor, scale: Tensor, t: Tensor,
                x_gt: Tensor, lip: tuple = DRIVEN_KEYPOINTS, lam: float = 0.1) -> tuple[Tensor, dict[str, Tensor]]:
    """Eq. 4-6 on the driven set S = `lip` (pass the model's cfg.driven_keypoints).
    pred_offsets (B, T, |S|, 3) raw Δδ on S; x_gt (B, T, |S|, 3) the frames' own driven keypoints
    on S; x_c, delta_neutral (B, K, 3) the neutral state; per-frame pose R (B, T, 3, 3),
    scale (B, T, 1), t (B, T, 3). x_k = s * (x_c[k] @ R + δ_neutral[k] + Δδ[k]) + (t_x, t_y, 0).
    Returns (loss, {"rec", "temp"} detached)."""
    lip = list(lip)
    batch, num_frames = pred_offsets.shape[:2]
    num_kp = x_c.shape[1] if x_c.dim() == 3 else -1
    for name, value, shape in (("pred_offsets", pred_offsets, (batch, num_frames, len(lip), 3)),
                               ("x_gt", x_gt, (batch, num_frames, len(lip), 3)), ("R", R, (batch, num_frames, 3, 3)),
                               ("scale", scale, (batch, num_frames, 1)), ("t", t, (batch, num_frames, 3)),
                               ("x_c", x_c, (batch, num_kp, 3)), ("delta_neutral", delta_neutral, (batch, num_kp, 3))):
        if tuple(value.shape) != shape:
            raise ValueError(f"audio2motion.py stage1_loss: {name} has shape {tuple(value.shape)}, expected {shape}")
    frames, size = batch * num_frames, len(lip)
    expression = delta_neutral[:, None, lip] + pred_offsets  # (B, T, |S|, 3)
    driven = driven_keypoints(
        x_c[:, None, lip].expand(-1, num_frames, -1, -1).reshape(frames, size, 3),
        R.reshape(frames, 3, 3), expression.reshape(frames, size, 3),
        scale.reshape(frames, 1), t.reshape(frames, 3),
    ).view(batch, num_frames, size, 3)
    # Eq. 4: per-keypoint L1 norm, summed over S, averaged over frames; then over the batch.
    rec = (driven - x_gt).abs().sum(dim=(-1, -2)).mean()
    if num_frames > 1:
        # Eq. 5: squared L2 of the frame-to-frame change of Δδ, summed over S, averaged over T-1 pairs.
        velocity = pred_offsets[:, 1:] - pred_offsets[:, :-1]
        temp = velocity.pow(2).sum(dim=(-1, -2)).mean()
    else:
        temp = pred_offsets.new_zeros(())
    loss = rec + lam * temp  # Eq. 6
    return loss, {"rec": rec.detach(), "temp": temp.detach()}


def driving_expression(delta_neutral: Tensor, offsets: Tensor, driven: tuple = DRIVEN_KEYPOINTS) -> Tensor:
    """The driving δ for Stage 2 (..., K, 3), built from the neutral frame only: driven keypoints
    = δ_neutral + Δδ, every other keypoint = δ_neutral. The source frame's own expression never
    enters, so its mouth cannot steer the dub. offsets (..., |D|, 3); a per-clip delta_neutral
    (B, K, 3) is broadcast over the frames of (B, T, |D|, 3) offsets."""
    if delta_neutral.dim() == offsets.dim() - 1:
        delta_neutral = delta_neutral.unsqueeze(-3)
    if offsets.shape[-2:] != (len(driven), 3):
        raise ValueError(f"audio2motion.py driving_expression: offsets {tuple(offsets.shape)} do not match "
                         f"{len(driven)} driven keypoints")
    full = offsets.new_zeros(*offsets.shape[:-2], delta_neutral.shape[-2], 3)
    full[..., list(driven), :] = offsets
    return delta_neutral + full
