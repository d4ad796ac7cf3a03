"""IMC-UNet: the Implicit Motion-Conditioned U-Net of IMGTalk Stage 2 (paper Eq. 7-10).

One forward pass, no diffusion loop and no timestep: the U-Net maps the VAE latent of the
mouth-masked source face to the completed latent. Layout of the Latent Diffusion / SD-1.x
U-Net (levels of 320, 640, 1280, 1280 channels, two resnets per level going down and three
coming up, skip connections, a resnet-attention-resnet bottleneck), built from diffusers'
ResnetBlock2D / Downsample2D / Upsample2D / Attention. Every resnet (down, mid, up) is
followed by an IMCTransformerLayer that carries the two conditions:

- motion (Eq. 8-9): each keypoint's expression offset delta_k (3-d) goes through one shared
  Linear to a d_m-d token, plus a learnable per-keypoint positional encoding; the K tokens
  are keys/values of a cross-attention in every layer. They are the only driving signal.
- reference (RSCA, Eq. 10): the reference latent z_r is flattened to h*w tokens at latent
  resolution and every layer projects them with its own K/V projections; the layer's
  feature map gives the queries and the result is added as h + alpha_l * CrossAttn, with
  alpha_l a per-layer scalar initialised to zero, so training starts from a network that
  ignores the reference and opens each layer's path as it learns to use it.

`use_rsca=False` is the paper's "w/o RSCA" ablation (MuseTalk's input): the reference
latent is concatenated to the masked latent on the channel axis and no RSCA exists.

`condition="audio"` is the "audio-conditioned IMC-UNet" ablation (MuseTalk's conditioning:
audio features by cross-attention, no implicit motion): the cross-attention keys/values are
2 * (2 * audio_window_frames + 1) HuBERT rows (two 50 Hz rows per 25 fps frame, the target
frame and audio_window_frames frames each side), each through one shared Linear(audio_dim,
d_m) plus a learnable per-token positional encoding (AudioTokens), instead of the 21
motion tokens. The forward's second argument is then (B, audio_tokens, audio_dim).

Untrained, the network is a randomly initialised regression: its output is a noise-like
latent (std about 0.3 at both sizes) that depends on the masked latent and the motion, not
on the reference (all alpha_l = 0), and is not the masked input passed through. conv_out is
not zero-initialised, so every alpha_l gets a gradient from the first step.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import Tensor, nn

from stages.common.checkpoint import load_pretrained, save_pretrained
from stages.common.standardise import STD_FLOOR, standardise

CONDITIONS = ("motion", "audio")


@dataclass
class IMCUNetConfig:
    latent_channels: int = 4  # C of Eq. 7 (SD VAE)
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # SD-1.x sized
    layers_per_block: int = 2
    # Heads per attention, head width = channels // heads. SD-1.x's UNet config calls this
    # "attention_head_dim: 8" but uses it as the number of heads; we name it for what it is.
    num_attention_heads: int = 8
    motion_dim: int = 768  # d_m of Eq. 8
    num_kp: int = 21  # K, LivePortrait implicit keypoints
    norm_num_groups: int = 32
    use_rsca: bool = True  # False = "w/o RSCA" ablation: reference concatenated to the input
    # Self-attention per level, as in SD; the deepest level (4x4 at 256^2) has none.
    self_attention: tuple[bool, ...] = (True, True, True, False)
    # Sinusoidal frequencies per axis of the 2-D position code given to RSCA keys and queries.
    reference_position_frequencies: int = 6
    # Per-keypoint statistics of the motion condition δ, (num_kp, 3) nested tuples; None =
    # identity. LivePortrait's δ is ~1e-2, so without them the shared Linear's bias dominates
    # every motion token (at init: token norm 8.96, bias 8.94, δ-driven part 0.23 at d_m 768).
    # MotionTokens feeds (δ - mean) / std. Set them with `with_motion_statistics`.
    motion_mean: tuple[tuple[float, ...], ...] | None = None
    motion_std: tuple[tuple[float, ...], ...] | None = None
    # What the cross-attention reads: "motion" (the paper's 21 δ tokens) or "audio" (the
    # "audio-conditioned IMC-UNet" ablation: HuBERT rows of frames t-w..t+w, w below).
    condition: str = "motion"
    audio_dim: int = 1024  # width of a HuBERT row (hidden_size; 1024 for HuBERT-large)
    audio_window_frames: int = 2  # 25 fps frames of audio each side of the target frame

    def __post_init__(self):
        if self.condition not in CONDITIONS:
            raise ValueError(f"IMCUNetConfig: condition must be one of {CONDITIONS}, got {self.condition!r}")
        if self.audio_dim < 1 or self.audio_window_frames < 0:
            raise ValueError(
                f"IMCUNetConfig: audio_dim must be >= 1 and audio_window_frames >= 0, "
                f"got {self.audio_dim} and {self.audio_window_frames}"
            )
        self.block_out_channels = tuple(self.block_out_channels)
        self.self_attention = tuple(bool(s) for s in self.self_attention)
        for name in ("motion_mean", "motion_std"):
            value = getattr(self, name)
            if value is None:
                continue
            array = np.asarray(value, dtype=np.float64)
            if array.shape != (self.num_kp, 3) or not np.isfinite(array).all():
                raise ValueError(
                    f"IMCUNetConfig: {name} must be finite ({self.num_kp}, 3) values or None, got shape {array.shape}"
                )
            setattr(self, name, tuple(tuple(float(v) for v in row) for row in array))
        if (self.motion_mean is None) != (self.motion_std is None):
            raise ValueError("IMCUNetConfig: motion_mean and motion_std must be given together")
        if self.motion_std is not None and min(min(row) for row in self.motion_std) <= 0:
            raise ValueError("IMCUNetConfig: motion_std must be > 0 (with_motion_statistics floors it at STD_FLOOR)")
        if len(self.self_attention) != len(self.block_out_channels):
            raise ValueError(
                f"IMCUNetConfig: self_attention has {len(self.self_attention)} entries, "
                f"block_out_channels has {len(self.block_out_channels)} levels"
            )
        for channels in self.block_out_channels:
            if channels % self.num_attention_heads or channels % self.norm_num_groups:
                raise ValueError(
                    f"IMCUNetConfig: {channels} channels are not divisible by num_attention_heads "
                    f"{self.num_attention_heads} and norm_num_groups {self.norm_num_groups}"
                )

    def with_motion_statistics(self, mean, std) -> "IMCUNetConfig":
        """A new config whose motion tokens normalise δ per keypoint: mean, std (num_kp, 3)
        array-likes (numpy), e.g. over the training set's Stage 2 conditions. std is floored
        at STD_FLOOR; a coordinate at the floor never moved and standardises to 0
        (stages/common/standardise.py)."""
        mean = np.asarray(mean, dtype=np.float64)
        std = np.maximum(np.asarray(std, dtype=np.float64), STD_FLOOR)
        for name, array in (("mean", mean), ("std", std)):
            if array.shape != (self.num_kp, 3):
                raise ValueError(f"with_motion_statistics: {name} must be ({self.num_kp}, 3), got {array.shape}")
        as_tuples = lambda a: tuple(tuple(float(v) for v in row) for row in a)  # noqa: E731
        return dataclasses.replace(self, motion_mean=as_tuples(mean), motion_std=as_tuples(std))

    @property
    def audio_tokens(self) -> int:
        """Tokens of the audio condition: two 50 Hz HuBERT rows per frame, frames t-w..t+w."""
        return 2 * (2 * self.audio_window_frames + 1)

    @property
    def position_dim(self) -> int:
        return 4 * self.reference_position_frequencies  # (sin, cos) x (y, x) x frequencies

    @classmethod
    def tiny(cls, **overrides) -> "IMCUNetConfig":
        fields = dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            num_attention_heads=2,
            motion_dim=32,
            norm_num_groups=8,
            self_attention=(True, False),
            reference_position_frequencies=4,
        )
        fields.update(overrides)
        return cls(**fields)


def grid_position_code(height: int, width: int, num_frequencies: int, device=None, dtype=None) -> Tensor:
    """(height*width, 4*num_frequencies) sinusoidal code of each cell's centre, row-major.

    Coordinates are normalised to (0, 1), so a 4x4 feature map and the 32x32 reference latent
    agree on where in the face a token sits; the lowest frequency (pi) is injective on (0, 1),
    the highest resolves about one latent pixel at 32x32 with the default 6 frequencies.
    """
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2, 1)  # (HW,2,1)
    freqs = math.pi * 2.0 ** torch.arange(num_frequencies, device=device, dtype=torch.float32)  # (F,)
    angles = grid * freqs  # (HW,2,F)
    code = torch.cat([angles.sin(), angles.cos()], dim=-1).reshape(height * width, -1)  # (HW,4F)
    return code.to(dtype) if dtype is not None else code


class MotionTokens(nn.Module):
    """Eq. 8: T_pe = Linear(delta_k) + PE, one token per keypoint (never a flattened vector).

    delta_k is first normalised per keypoint and coordinate, (delta - mean) / std, with the
    config's motion statistics (identity when none are given). They are non-persistent
    buffers: they come from the config, so the weights file keeps its key layout."""

    def __init__(self, num_kp: int, motion_dim: int, mean=None, std=None):
        super().__init__()
        self.project = nn.Linear(3, motion_dim)  # shared by all keypoints
        # Random, not zero: with PE = 0 the tokens are an unordered set to the attention, and
        # the keypoints' distinct roles (lips vs. brows) would have to be learned from nothing.
        self.positional_encoding = nn.Parameter(torch.randn(num_kp, motion_dim) * 0.02)
        mean = torch.zeros(num_kp, 3) if mean is None else torch.tensor(mean, dtype=torch.float32)
        std = torch.ones(num_kp, 3) if std is None else torch.tensor(std, dtype=torch.float32)
        self.register_buffer("motion_mean", mean, persistent=False)
        self.register_buffer("motion_std", std, persistent=False)

    def normalise(self, motion: Tensor) -> Tensor:
        # In float32 whatever the weights' dtype: δ ~ 1e-2 minus a mean of the same size would
        # lose most of its digits in bfloat16.
        normalised = standardise(motion.float(), self.motion_mean.float(), self.motion_std.float())  # (B,K,3)
        return normalised.to(self.project.weight.dtype)

    def forward(self, motion: Tensor) -> Tensor:
        return self.project(self.normalise(motion)) + self.positional_encoding  # (B,K,3) -> (B,K,d_m)


class AudioTokens(nn.Module):
    """The audio-conditioned ablation's tokens (MuseTalk's conditioning): each HuBERT row of
    the window through one shared Linear(audio_dim, d_m), plus a learnable positional
    encoding per token (the row's place in the window), as MotionTokens does for keypoints."""

    def __init__(self, num_tokens: int, audio_dim: int, motion_dim: int):
        super().__init__()
        self.project = nn.Linear(audio_dim, motion_dim)  # shared by all rows
        self.positional_encoding = nn.Parameter(torch.randn(num_tokens, motion_dim) * 0.02)

    def forward(self, audio: Tensor) -> Tensor:
        # (B,N,A) -> (B,N,d_m)
        return self.project(audio.to(self.project.weight.dtype)) + self.positional_encoding


class ReferenceSpatialCrossAttention(nn.Module):
    """Eq. 10: h' = h + alpha_l * CrossAttn(Q = h, K = K_r^l, V = V_r^l), this layer's own K/V.

    Position: a plain flattened z_r is a bag of 4-d colours to the attention, so a query could
    not ask for "the reference at my location". Each reference token therefore carries the
    fixed 2-D sinusoidal code of its cell ([z_r ; code], projected by this layer's to_k/to_v),
    and the queries get the same code at the layer's resolution through a learned linear map,
    so q.k can learn any mix of "same place" and "same content".
    """

    def __init__(self, channels: int, reference_dim: int, position_dim: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.query_position = nn.Linear(position_dim, channels, bias=False)
        self.attention = Attention(
            query_dim=channels, cross_attention_dim=reference_dim, heads=heads, dim_head=channels // heads
        )
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, tokens: Tensor, query_code: Tensor, reference_tokens: Tensor) -> Tensor:
        # tokens (B,HW,C); query_code (HW,P); reference_tokens (B,hw,C_lat+P)
        queries = self.norm(tokens) + self.query_position(query_code)  # (B,HW,C)
        return tokens + self.alpha * self.attention(queries, encoder_hidden_states=reference_tokens)


class IMCTransformerLayer(nn.Module):
    """The attention layer after every resnet: GroupNorm + proj_in -> [self-attention] ->
    motion cross-attention -> RSCA -> GEGLU feed-forward -> proj_out, residual to the input.
    Pre-LayerNorm residual sub-blocks, as SD's BasicTransformerBlock."""

    def __init__(self, channels: int, config: IMCUNetConfig, self_attention: bool):
        super().__init__()
        heads = config.num_attention_heads
        self.position_frequencies = config.reference_position_frequencies
        self.norm_in = nn.GroupNorm(config.norm_num_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.norm_self = nn.LayerNorm(channels) if self_attention else None
        self.self_attention = (
            Attention(query_dim=channels, heads=heads, dim_head=channels // heads) if self_attention else None
        )
        self.norm_motion = nn.LayerNorm(channels)
        self.motion_attention = Attention(
            query_dim=channels, cross_attention_dim=config.motion_dim, heads=heads, dim_head=channels // heads
        )
        self.rsca = (
            ReferenceSpatialCrossAttention(
                channels, config.latent_channels + config.position_dim, config.position_dim, heads
            )
            if config.use_rsca
            else None
        )
        self.norm_ff = nn.LayerNorm(channels)
        self.feed_forward = FeedForward(channels, activation_fn="geglu")
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: Tensor, motion_tokens: Tensor, reference_tokens: Tensor | None) -> Tensor:
        batch, channels, height, width = x.shape
        h = self.norm_in(x).flatten(2).transpose(1, 2)  # (B,C,H,W) -> (B,HW,C)
        h = self.proj_in(h)
        if self.self_attention is not None:
            h = h + self.self_attention(self.norm_self(h))
        h = h + self.motion_attention(self.norm_motion(h), encoder_hidden_states=motion_tokens)  # Eq. 9
        if self.rsca is not None:
            query_code = grid_position_code(height, width, self.position_frequencies, h.device, h.dtype)
            h = self.rsca(h, query_code, reference_tokens)  # Eq. 10
        h = h + self.feed_forward(self.norm_ff(h))
        h = self.proj_out(h).transpose(1, 2).reshape(batch, channels, height, width)  # -> (B,C,H,W)
        return x + h


class _Checkpointed(nn.Module):
    """Base of the levels: `_run` calls a resnet or transformer layer through
    torch.utils.checkpoint (non-reentrant) when gradient checkpointing is on, the module is
    training and autograd records; otherwise directly. Same values and gradients either way,
    the activations inside the call are recomputed during backward instead of stored."""

    gradient_checkpointing: bool = False

    def _run(self, module: nn.Module, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)
        return module(*args)


def _resnet(in_channels: int, out_channels: int, config: IMCUNetConfig) -> ResnetBlock2D:
    # No timestep: a single regression pass, so no time embedding enters the resnets.
    return ResnetBlock2D(
        in_channels=in_channels, out_channels=out_channels, temb_channels=None, groups=config.norm_num_groups, eps=1e-5
    )


class DownLevel(_Checkpointed):
    def __init__(self, in_channels: int, out_channels: int, config: IMCUNetConfig, self_attention: bool, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            _resnet(in_channels if i == 0 else out_channels, out_channels, config) for i in range(config.layers_per_block)
        )
        self.attentions = nn.ModuleList(
            IMCTransformerLayer(out_channels, config, self_attention) for _ in range(config.layers_per_block)
        )
        # name="op": diffusers' default name registers the conv twice, which safetensors refuses.
        self.downsample = Downsample2D(out_channels, use_conv=True, padding=1, name="op") if downsample else None

    def forward(self, h: Tensor, skips: list[Tensor], motion_tokens: Tensor, reference_tokens: Tensor | None) -> Tensor:
        for resnet, attention in zip(self.resnets, self.attentions):
            h = self._run(attention, self._run(resnet, h, None), motion_tokens, reference_tokens)
            skips.append(h)
        if self.downsample is not None:
            h = self.downsample(h)  # (B,C,H,W) -> (B,C,ceil(H/2),ceil(W/2))
            skips.append(h)
        return h


class MidBlock(_Checkpointed):
    def __init__(self, channels: int, config: IMCUNetConfig, self_attention: bool):
        super().__init__()
        self.resnet_in = _resnet(channels, channels, config)
        self.attention = IMCTransformerLayer(channels, config, self_attention)
        self.resnet_out = _resnet(channels, channels, config)

    def forward(self, h: Tensor, motion_tokens: Tensor, reference_tokens: Tensor | None) -> Tensor:
        h = self._run(self.attention, self._run(self.resnet_in, h, None), motion_tokens, reference_tokens)
        return self._run(self.resnet_out, h, None)


class UpLevel(_Checkpointed):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        skip_channels: list[int],
        config: IMCUNetConfig,
        self_attention: bool,
        upsample: bool,
    ):
        super().__init__()
        # skip_channels: channels of the skips this level consumes, in the order it pops them.
        self.resnets = nn.ModuleList(
            _resnet((in_channels if i == 0 else out_channels) + skip, out_channels, config)
            for i, skip in enumerate(skip_channels)
        )
        self.attentions = nn.ModuleList(
            IMCTransformerLayer(out_channels, config, self_attention) for _ in skip_channels
        )
        self.upsample = Upsample2D(out_channels, use_conv=True) if upsample else None

    def forward(self, h: Tensor, skips: list[Tensor], motion_tokens: Tensor, reference_tokens: Tensor | None) -> Tensor:
        for resnet, attention in zip(self.resnets, self.attentions):
            h = torch.cat([h, skips.pop()], dim=1)  # (B,C+C_skip,H,W)
            h = self._run(attention, self._run(resnet, h, None), motion_tokens, reference_tokens)
        if self.upsample is not None:
            # To the next skip's size, not x2, so odd sizes (ceil in the way down) come back exactly.
            h = self.upsample(h, output_size=skips[-1].shape[-2:])
        return h


class IMCUNet(nn.Module):
    def __init__(self, config: IMCUNetConfig):
        super().__init__()
        self.config = config
        channels = config.block_out_channels
        levels = len(channels)
        in_channels = config.latent_channels if config.use_rsca else 2 * config.latent_channels

        if config.condition == "audio":
            self.audio_tokens = AudioTokens(config.audio_tokens, config.audio_dim, config.motion_dim)
        else:
            self.motion_tokens = MotionTokens(config.num_kp, config.motion_dim, config.motion_mean, config.motion_std)
        self.conv_in = nn.Conv2d(in_channels, channels[0], kernel_size=3, padding=1)

        skip_channels = [channels[0]]  # what the down path leaves for the up path, in push order
        self.down_levels = nn.ModuleList()
        for i, out_channels in enumerate(channels):
            last = i == levels - 1
            in_ch = channels[max(i - 1, 0)]
            self.down_levels.append(DownLevel(in_ch, out_channels, config, config.self_attention[i], downsample=not last))
            skip_channels += [out_channels] * (config.layers_per_block + (0 if last else 1))

        self.mid = MidBlock(channels[-1], config, config.self_attention[-1])

        self.up_levels = nn.ModuleList()
        in_ch = channels[-1]
        for i, out_channels in reversed(list(enumerate(channels))):
            consumed = [skip_channels.pop() for _ in range(config.layers_per_block + 1)]
            self.up_levels.append(
                UpLevel(in_ch, out_channels, consumed, config, config.self_attention[i], upsample=i > 0)
            )
            in_ch = out_channels
        assert not skip_channels, "every skip is consumed exactly once"

        self.norm_out = nn.GroupNorm(config.norm_num_groups, channels[0], eps=1e-5)
        self.conv_out = nn.Conv2d(channels[0], config.latent_channels, kernel_size=3, padding=1)

    def forward(self, masked_latent: Tensor, motion: Tensor, reference_latent: Tensor) -> Tensor:
        # masked_latent (B,4,h,w): E(mouth-masked source); motion (B,K,3): driving delta per
        # keypoint, or with condition="audio" (B,N,A): the audio window's HuBERT rows;
        # reference_latent (B,4,h,w): E(reference). Returns z_hat (B,4,h,w).
        self._check_inputs(masked_latent, motion, reference_latent)
        if self.config.condition == "audio":
            motion_tokens = self.audio_tokens(motion)  # (B,N,d_m): the cross-attention's condition
        else:
            motion_tokens = self.motion_tokens(motion)  # (B,K,d_m)
        if self.config.use_rsca:
            x = masked_latent
            reference_tokens = self.reference_tokens(reference_latent)  # (B,hw,4+P)
        else:
            x = torch.cat([masked_latent, reference_latent], dim=1)  # (B,8,h,w)
            reference_tokens = None

        h = self.conv_in(x)  # (B,C0,h,w)
        skips = [h]
        for level in self.down_levels:
            h = level(h, skips, motion_tokens, reference_tokens)
        h = self.mid(h, motion_tokens, reference_tokens)  # (B,C_last,h/2^(L-1),w/2^(L-1))
        for level in self.up_levels:
            h = level(h, skips, motion_tokens, reference_tokens)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B,C0,h,w) -> (B,4,h,w)

    def reference_tokens(self, reference_latent: Tensor) -> Tensor:
        """z_r flattened to h*w tokens at latent resolution, each with its cell's position code.
        Computed once per forward; every layer projects them with its own K/V."""
        batch, _, height, width = reference_latent.shape
        tokens = reference_latent.flatten(2).transpose(1, 2)  # (B,4,h,w) -> (B,hw,4)
        code = grid_position_code(
            height, width, self.config.reference_position_frequencies, tokens.device, tokens.dtype
        )  # (hw,P)
        return torch.cat([tokens, code.expand(batch, -1, -1)], dim=-1)  # (B,hw,4+P)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each resnet / IMCTransformerLayer call in backward instead of storing its
        activations (torch.utils.checkpoint, use_reentrant=False); active only in training mode
        with autograd on. Loss and gradients are unchanged."""
        for module in self.modules():
            if isinstance(module, _Checkpointed):
                module.gradient_checkpointing = bool(enabled)

    @property
    def gradient_checkpointing(self) -> bool:
        return any(m.gradient_checkpointing for m in self.modules() if isinstance(m, _Checkpointed))

    def rsca_alphas(self) -> list[nn.Parameter]:
        """alpha_l of every layer, in forward order (down, mid, up); empty for the concat ablation."""
        return [m.alpha for m in self.modules() if isinstance(m, ReferenceSpatialCrossAttention)]

    def transformer_layers(self) -> list[IMCTransformerLayer]:
        return [m for m in self.modules() if isinstance(m, IMCTransformerLayer)]

    @classmethod
    def from_pretrained(cls, folder: str) -> "IMCUNet":
        return load_pretrained(cls, IMCUNetConfig, folder)

    def save_pretrained(self, folder: str) -> None:
        save_pretrained(self, self.config, folder)

    def _check_inputs(self, masked_latent: Tensor, motion: Tensor, reference_latent: Tensor) -> None:
        c, k = self.config.latent_channels, self.config.num_kp
        if masked_latent.ndim != 4 or masked_latent.shape[1] != c:
            raise ValueError(f"IMCUNet: masked_latent must be (B,{c},h,w), got {tuple(masked_latent.shape)}")
        if reference_latent.shape != masked_latent.shape:
            raise ValueError(
                f"IMCUNet: reference_latent {tuple(reference_latent.shape)} must match "
                f"masked_latent {tuple(masked_latent.shape)}"
            )
        batch = masked_latent.shape[0]
        if self.config.condition == "audio":
            n, a = self.config.audio_tokens, self.config.audio_dim
            if motion.shape != (batch, n, a):
                raise ValueError(
                    f"IMCUNet (condition='audio'): the condition must be audio rows (B={batch},{n},{a}) "
                    f"(2 rows per frame, {self.config.audio_window_frames} frames each side), got {tuple(motion.shape)}"
                )
        elif motion.shape != (batch, k, 3):
            raise ValueError(
                f"IMCUNet (condition='motion'): motion must be (B={batch},{k},3), got {tuple(motion.shape)}"
            )
