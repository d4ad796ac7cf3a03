"""IMGTalk Stage 1: audio -> implicit motion (the paper's "Audio to Implicit Motion Encoding").

A Transformer decoder maps HuBERT features (25 Hz, 1024-d) to per-frame LivePortrait
expression offsets Δδ_t (K=21 keypoints x 3), relative to the subject's own neutral silent
state (x_c, δ_neutral) taken from a closed-mouth frame. The driving expression for a frame
is δ_neutral + Δδ_t on the lip keypoints (Eq. 1 turns it into keypoints).

Motion tokens. The motion embedding starts from the neutral state,
e0 = Linear([x_c, δ_neutral]); the query token of frame t is
Linear(Δδ_{t-1}) + e0 + sinusoid(t). Frame 0 sees Δδ_{-1} = 0: the mouth at rest.
Training is teacher-forced (ground-truth Δδ shifted right by one frame); inference
decodes autoregressively with a self-attention KV cache, chunk by chunk if wanted.

Each decoder layer (pre-LN): causal self-attention over motion tokens, cross-modal
attention (Eq. 2) with motion queries and audio keys/values, then an MLP.

Alignment bias B^A (Eq. 3). With k audio steps per video frame, frame i may attend only
audio steps j with k*i <= j < k*(i+1); all other logits get -inf. So each frame's
cross-attention sees only its own audio window: no neighbouring audio leaks in through
attention. Through the autoregressive chain (causal self-attention over earlier motion
tokens, and Δδ_{t-1} fed back as input) a frame's output can still depend on EARLIER
audio, by way of the previous frames; it can never depend on LATER audio. The model is
therefore strictly causal in time, which is what lets `generate` stream chunk by chunk.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from stages.common.checkpoint import load_pretrained, save_pretrained
from stages.motion.extractor import LIP_KEYPOINTS, NUM_KEYPOINTS, driven_keypoints


@dataclass
class Audio2MotionConfig:
    audio_dim: int = 1024  # HuBERT-large hidden size
    d_model: int = 512
    n_heads: int = 8
    n_layers: int = 6
    ffn_mult: int = 4
    dropout: float = 0.1
    num_kp: int = NUM_KEYPOINTS
    # k in Eq. 3. HuBERT features are resampled to 25 Hz = the video rate, so one per frame.
    # With k=1 each window is a single step: the cross-attention softmax is always 1, so it
    # reduces to a projection of that step's values (its Q/K weights get no gradient).
    audio_steps_per_frame: int = 1

    @classmethod
    def tiny(cls, audio_dim: int = 32) -> "Audio2MotionConfig":
        return cls(audio_dim=audio_dim, d_model=32, n_heads=2, n_layers=2)


@dataclass
class GenerationState:
    """Where `generate` stopped, so the next call continues the same sequence."""

    num_frames: int  # frames decoded so far (= position of the next frame)
    last_offsets: Tensor  # (B, K, 3) Δδ of the last decoded frame, the next frame's input
    kv_cache: list[tuple[Tensor, Tensor] | None]  # per layer: self-attention K, V (B, heads, num_frames, head_dim)


# ----------------------------------------------------------------------------- helpers


def sinusoidal_positions(positions: Tensor, dim: int) -> Tensor:
    """Fixed sin/cos encodings (len, dim) for integer positions; fixed so any sequence length works."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device) / half)
    angles = positions.float()[:, None] * freqs[None, :]  # (len, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (len, dim)


def alignment_bias(num_frames: int, steps_per_frame: int, device=None, dtype=torch.float32) -> Tensor:
    """Eq. 3: additive bias (T, T*k), 0 where k*i <= j < k*(i+1), -inf elsewhere."""
    frame = torch.arange(num_frames, device=device)[:, None]
    step = torch.arange(num_frames * steps_per_frame, device=device)[None, :]
    allowed = (step >= steps_per_frame * frame) & (step < steps_per_frame * (frame + 1))
    bias = torch.zeros(allowed.shape, device=device, dtype=dtype)
    return bias.masked_fill(~allowed, float("-inf"))


def causal_mask(num_frames: int, device=None) -> Tensor:
    """(T, T) boolean, True where frame i may attend frame j (j <= i)."""
    return torch.ones(num_frames, num_frames, dtype=torch.bool, device=device).tril()


# ----------------------------------------------------------------------------- blocks


class Attention(nn.Module):
    """Multi-head attention: queries from `x`, keys/values from `context`, optional cached K/V in front."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"audio2motion.py: d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.dropout = dropout
        self.to_q = nn.Linear(d_model, d_model)
        self.to_kv = nn.Linear(d_model, 2 * d_model)
        self.to_out = nn.Linear(d_model, d_model)
        self.resid_drop = nn.Dropout(dropout)

    def split_heads(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, self.n_heads, width // self.n_heads).transpose(1, 2)  # (B, h, L, dh)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None, past: tuple[Tensor, Tensor] | None = None):
        batch, length, width = x.shape
        q = self.split_heads(self.to_q(x))
        k, v = (self.split_heads(z) for z in self.to_kv(context).chunk(2, dim=-1))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(batch, length, width)  # (B, L, d)
        return self.resid_drop(self.to_out(y)), (k, v)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Audio2MotionConfig):
        super().__init__()
        d = cfg.d_model
        self.norm_self = nn.LayerNorm(d)
        self.self_attn = Attention(d, cfg.n_heads, cfg.dropout)
        self.norm_cross = nn.LayerNorm(d)
        self.cross_attn = Attention(d, cfg.n_heads, cfg.dropout)
        self.norm_mlp = nn.LayerNorm(d)
        self.mlp = nn.Sequential(
            nn.Linear(d, cfg.ffn_mult * d), nn.GELU(), nn.Linear(cfg.ffn_mult * d, d), nn.Dropout(cfg.dropout)
        )

    def forward(self, x, audio, self_mask=None, cross_bias=None, past=None):
        """x (B, L, d) motion tokens; audio (B, S, d). Returns x and this layer's self-attention K/V."""
        h = self.norm_self(x)
        attended, kv = self.self_attn(h, h, mask=self_mask, past=past)
        x = x + attended
        x = x + self.cross_attn(self.norm_cross(x), audio, mask=cross_bias)[0]
        x = x + self.mlp(self.norm_mlp(x))
        return x, kv


# ----------------------------------------------------------------------------- model


class Audio2Motion(nn.Module):
    def __init__(self, cfg: Audio2MotionConfig):
        super().__init__()
        if cfg.d_model % 2:
            raise ValueError(f"audio2motion.py: d_model must be even for sinusoidal positions, got {cfg.d_model}")
        self.cfg = cfg
        d, motion_dim = cfg.d_model, cfg.num_kp * 3
        self.audio_proj = nn.Linear(cfg.audio_dim, d)
        self.audio_norm = nn.LayerNorm(d)
        self.neutral_embed = nn.Linear(2 * motion_dim, d)  # [x_c, δ_neutral] -> e0
        self.offset_embed = nn.Linear(motion_dim, d)  # Δδ_{t-1} -> token
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm_out = nn.LayerNorm(d)
        self.head = nn.Linear(d, motion_dim)
        # Zero-init so an untrained model predicts Δδ = 0, i.e. the subject's neutral closed
        # mouth: training starts from the identity baseline, and early outputs (or a model
        # loaded for a smoke test) never drive the face with random jitter.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    # --- shared pieces

    def encode_audio(self, audio: Tensor, first_step: int = 0) -> Tensor:
        """(B, S, audio_dim) -> (B, S, d); positions count from `first_step` so chunks line up."""
        positions = torch.arange(first_step, first_step + audio.shape[1], device=audio.device)
        x = self.audio_proj(audio) + sinusoidal_positions(positions, self.cfg.d_model).to(audio.dtype)
        return self.audio_norm(x)

    def neutral_embedding(self, x_c: Tensor, delta_neutral: Tensor) -> Tensor:
        return self.neutral_embed(torch.cat([x_c.flatten(1), delta_neutral.flatten(1)], dim=-1))  # (B, d)

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
        """Teacher-forced. audio (B, T*k, A); x_c, delta_neutral (B, K, 3); prev_offsets (B, T, K, 3)
        = ground-truth Δδ of frames 0..T-1 (shifted right here). Returns Δδ (B, T, K, 3)."""
        batch, num_frames, num_kp, _ = prev_offsets.shape
        if self.num_frames(audio) != num_frames:
            raise ValueError(
                f"audio2motion.py: {audio.shape[1]} audio steps do not cover {num_frames} frames "
                f"at k={self.cfg.audio_steps_per_frame}"
            )
        shifted = F.pad(prev_offsets[:, :-1], (0, 0, 0, 0, 1, 0))  # (B, T, K, 3): frame t sees Δδ_{t-1}, frame 0 zeros
        positions = sinusoidal_positions(torch.arange(num_frames, device=audio.device), self.cfg.d_model)
        x = self.offset_embed(shifted.flatten(2)) + self.neutral_embedding(x_c, delta_neutral)[:, None] + positions
        x = self.drop(x)  # (B, T, d)
        memory = self.encode_audio(audio)  # (B, T*k, d)
        self_mask = causal_mask(num_frames, audio.device)
        cross_bias = alignment_bias(num_frames, self.cfg.audio_steps_per_frame, audio.device, x.dtype)
        for layer in self.layers:
            x, _ = layer(x, memory, self_mask, cross_bias)
        return self.head(self.norm_out(x)).view(batch, num_frames, num_kp, 3)

    # --- inference

    @torch.no_grad()
    def generate(self, audio: Tensor, x_c: Tensor, delta_neutral: Tensor, state: GenerationState | None = None,
                 return_state: bool = False):
        """Autoregressive decoding, one frame at a time with a self-attention KV cache. Call in eval mode.
        Passing the returned `state` back continues the sequence: chunked calls equal one call."""
        batch, num_kp, k = x_c.shape[0], self.cfg.num_kp, self.cfg.audio_steps_per_frame
        num_frames = self.num_frames(audio)
        if state is None:
            state = GenerationState(0, x_c.new_zeros(batch, num_kp, 3), [None] * len(self.layers))
        e0 = self.neutral_embedding(x_c, delta_neutral)  # (B, d)
        memory = self.encode_audio(audio, first_step=state.num_frames * k)  # (B, T*k, d)
        prev, cache = state.last_offsets, list(state.kv_cache)
        outputs = []
        for i in range(num_frames):
            position = sinusoidal_positions(torch.tensor([state.num_frames + i], device=audio.device), self.cfg.d_model)
            x = (self.offset_embed(prev.flatten(1)) + e0 + position)[:, None]  # (B, 1, d)
            # B^A leaves frame i exactly its own window, so attend that slice with no bias.
            window = memory[:, k * i: k * (i + 1)]
            for index, layer in enumerate(self.layers):
                x, cache[index] = layer(x, window, past=cache[index])
            prev = self.head(self.norm_out(x)).view(batch, num_kp, 3)
            outputs.append(prev)
        offsets = torch.stack(outputs, dim=1) if outputs else x_c.new_zeros(batch, 0, num_kp, 3)
        if return_state:
            return offsets, GenerationState(state.num_frames + num_frames, prev, cache)
        return offsets

    # --- weights

    @classmethod
    def from_pretrained(cls, folder: str) -> "Audio2Motion":
        return load_pretrained(cls, Audio2MotionConfig, folder)

    def save_pretrained(self, folder: str) -> None:
        save_pretrained(self, self.cfg, folder)


# ----------------------------------------------------------------------------- losses


def stage1_loss(pred_offsets: Tensor, x_c: Tensor, delta_neutral: Tensor, R: Tensor, scale: Tensor, t: Tensor,
                x_gt: Tensor, lip: tuple = LIP_KEYPOINTS, lam: float = 0.1) -> tuple[Tensor, dict[str, Tensor]]:
    """Eq. 4-6 on the lip set S. pred_offsets, x_gt (B, T, K, 3); x_c, delta_neutral (B, K, 3);
    per-frame pose R (B, T, 3, 3), scale (B, T, 1), t (B, T, 3). Returns (loss, {"rec", "temp"} detached)."""
    batch, num_frames, num_kp, _ = pred_offsets.shape
    for name, value, shape in (("x_gt", x_gt, (batch, num_frames, num_kp, 3)), ("R", R, (batch, num_frames, 3, 3)),
                               ("scale", scale, (batch, num_frames, 1)), ("t", t, (batch, num_frames, 3)),
                               ("x_c", x_c, (batch, num_kp, 3)), ("delta_neutral", delta_neutral, (batch, num_kp, 3))):
        if tuple(value.shape) != shape:
            raise ValueError(f"audio2motion.py stage1_loss: {name} has shape {tuple(value.shape)}, expected {shape}")
    lip = list(lip)
    frames = batch * num_frames
    expression = delta_neutral[:, None] + pred_offsets  # (B, T, K, 3)
    driven = driven_keypoints(
        x_c[:, None].expand(-1, num_frames, -1, -1).reshape(frames, num_kp, 3),
        R.reshape(frames, 3, 3), expression.reshape(frames, num_kp, 3),
        scale.reshape(frames, 1), t.reshape(frames, 3),
    ).view(batch, num_frames, num_kp, 3)
    # Eq. 4: per-keypoint L1 norm, summed over S, averaged over frames; then over the batch.
    rec = (driven[:, :, lip] - x_gt[:, :, lip]).abs().sum(dim=(-1, -2)).mean()
    if num_frames > 1:
        # Eq. 5: squared L2 of the frame-to-frame change of Δδ, summed over S, averaged over T-1 pairs.
        velocity = pred_offsets[:, 1:, lip] - pred_offsets[:, :-1, lip]
        temp = velocity.pow(2).sum(dim=(-1, -2)).mean()
    else:
        temp = pred_offsets.new_zeros(())
    loss = rec + lam * temp  # Eq. 6
    return loss, {"rec": rec.detach(), "temp": temp.detach()}


def driving_expression(source_exp: Tensor, delta_neutral: Tensor, offsets: Tensor, lip: tuple = LIP_KEYPOINTS) -> Tensor:
    """The driving δ for Stage 2 (..., K, 3): lip keypoints = δ_neutral + Δδ, all others from the source frame
    (so eyes, brows and the rest of the face keep the source's own expression). A per-clip
    delta_neutral (B, K, 3) is broadcast over the frames of (B, T, K, 3) offsets."""
    if delta_neutral.dim() == offsets.dim() - 1:
        delta_neutral = delta_neutral.unsqueeze(-3)
    is_lip = torch.zeros(source_exp.shape[-2], dtype=torch.bool, device=source_exp.device)
    is_lip[list(lip)] = True
    return torch.where(is_lip[:, None], delta_neutral + offsets, source_exp)
