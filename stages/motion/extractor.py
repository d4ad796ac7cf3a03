"""LivePortrait-compatible motion extractor M (ConvNeXtV2-Tiny + seven linear heads).

It loads LivePortrait's released `motion_extractor.pth` strictly (212 tensors, 28,118,728
params, every key prefixed `detector.`) and reproduces its outputs in fp32. LivePortrait
itself runs M under fp16 autocast by default, so our outputs match its default pipeline
only to fp16 tolerance.

Input crop. M was trained on LivePortrait's face crop, so feed it that crop:
  - similarity crop from 106/203 face landmarks with scale 2.3, vy_ratio -0.125 (shifted
    toward the forehead), vx 0, rotated so the eye line is horizontal (eye-to-lip
    direction points down), warped to 512² then resized to 256² (INTER_AREA);
  - RGB (not BGR), float32 = uint8 / 255 clipped to [0, 1], NCHW, no mean/std.
A different crop scale or centre shifts every pose, scale and translation estimate.

Outputs. `forward` returns the raw heads, exactly LivePortrait's dict:
  pitch, yaw, roll (B, 66) bin logits; t (B, 3); exp (B, 63); scale (B, 1); kp (B, 63).
`motion_info` turns them into the quantities of the paper's Eq. 1:
  - angles in degrees: sum_i softmax(logits)_i * 3i - 97.5, range [-97.5, 97.5];
  - x_c = kp and exp reshaped row-major to (B, 21, 3), keypoint k = elements [3k:3k+3];
  - R = (Rz(roll) @ Ry(yaw) @ Rx(pitch))^T, applied to row vectors (kp @ R);
  - x_d = scale * (x_c @ R + exp) + (t_x, t_y, 0)  -- LivePortrait drops t_z.
Coordinates follow LivePortrait: x right, y down, z into the image, roughly in [-1, 1].

Everything from pixels to x_d is differentiable: Stage 2's motion loss backpropagates
through M into the generated image.
"""
from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from stages.common.checkpoint import CheckpointError, config_from_dict, config_to_dict, load_state_dict_strict

NUM_KEYPOINTS = 21
LIP_KEYPOINTS: tuple[int, ...] = (6, 12, 14, 17, 19, 20)  # the paper's lip set S (LivePortrait "lip" region)
NUM_BINS = 66

WEIGHTS_NAME = "motion_extractor.pth"
CONFIG_NAME = "motion_extractor_config.json"


@dataclass
class MotionExtractorConfig:
    num_kp: int = NUM_KEYPOINTS
    num_bins: int = NUM_BINS
    in_chans: int = 3
    depths: tuple[int, ...] = (3, 3, 9, 3)
    dims: tuple[int, ...] = (96, 192, 384, 768)

    @classmethod
    def tiny(cls) -> "MotionExtractorConfig":
        return cls(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))


PAPER_CONFIG = MotionExtractorConfig()  # LivePortrait's released size; needs no config file beside the .pth


# ----------------------------------------------------------------------------- blocks


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of an NCHW tensor (LivePortrait's channels_first LayerNorm)."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W)
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)  # biased, as in the reference
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class GRN(nn.Module):
    """Global Response Normalization on NHWC tensors; zero-init makes it the identity at start."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: Tensor) -> Tensor:  # (B, H, W, C)
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)  # (B, 1, 1, C)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class Block(nn.Module):
    """ConvNeXtV2 block: depthwise 7x7 -> LN -> MLP(4x, GELU, GRN) -> residual. No layer scale, no drop path."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)  # channels_last: same math and keys as the reference's
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = GRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W)
        residual = x
        x = self.dwconv(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        x = self.pwconv2(self.grn(self.act(self.pwconv1(self.norm(x)))))
        return residual + x.permute(0, 3, 1, 2)  # (B, C, H, W)


class ConvNeXtV2(nn.Module):
    """LivePortrait's `detector`: ConvNeXtV2 trunk, pooled, then one linear head per motion quantity."""

    def __init__(self, config: MotionExtractorConfig):
        super().__init__()
        dims, depths = config.dims, config.depths
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(config.in_chans, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0]))]
            + [
                nn.Sequential(LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], dims[i], kernel_size=2, stride=2))
                for i in range(1, len(dims))
            ]
        )
        self.stages = nn.ModuleList(
            [nn.Sequential(*[Block(dim) for _ in range(depth)]) for dim, depth in zip(dims, depths)]
        )
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        # Registration order fixes the state-dict order of LivePortrait's .pth.
        self.fc_kp = nn.Linear(dims[-1], 3 * config.num_kp)
        self.fc_scale = nn.Linear(dims[-1], 1)
        self.fc_pitch = nn.Linear(dims[-1], config.num_bins)
        self.fc_yaw = nn.Linear(dims[-1], config.num_bins)
        self.fc_roll = nn.Linear(dims[-1], config.num_bins)
        self.fc_t = nn.Linear(dims[-1], 3)
        self.fc_exp = nn.Linear(dims[-1], 3 * config.num_kp)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # ConvNeXtV2's init; only matters for training from scratch and for tests.
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> dict[str, Tensor]:  # (B, 3, 256, 256)
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))  # 256 -> 64, 32, 16, 8 spatially
        features = self.norm(x.mean(dim=(-2, -1)))  # (B, dims[-1])
        return {
            "pitch": self.fc_pitch(features),  # (B, num_bins)
            "yaw": self.fc_yaw(features),
            "roll": self.fc_roll(features),
            "t": self.fc_t(features),  # (B, 3)
            "exp": self.fc_exp(features),  # (B, 3K)
            "scale": self.fc_scale(features),  # (B, 1)
            "kp": self.fc_kp(features),  # (B, 3K)
        }


# ----------------------------------------------------------------------------- model


class MotionExtractor(nn.Module):
    def __init__(self, config: MotionExtractorConfig | None = None):
        super().__init__()
        self.config = config or MotionExtractorConfig()
        self.detector = ConvNeXtV2(self.config)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: (B, 3, 256, 256) RGB in [0, 1] -> raw heads (see module docstring)."""
        return self.detector(x)

    @classmethod
    def from_pretrained(cls, path: str, config: MotionExtractorConfig | None = None) -> "MotionExtractor":
        """Load a LivePortrait `motion_extractor.pth`, or a folder holding one (and maybe its config JSON)."""
        if os.path.isdir(path):
            weights_path = os.path.join(path, WEIGHTS_NAME)
            config_path = os.path.join(path, CONFIG_NAME)
            if config is None and os.path.exists(config_path):
                config = _read_config(config_path)
        else:
            weights_path = path
        model = cls(config)
        load_state_dict_strict(model, _read_state_dict(weights_path), source=weights_path)
        return model.eval()

    def save_pretrained(self, folder: str) -> None:
        """Write `motion_extractor.pth` in LivePortrait's layout (+ the config JSON for non-paper sizes)."""
        os.makedirs(folder, exist_ok=True)
        state = OrderedDict((k, v.detach().cpu().contiguous()) for k, v in self.state_dict().items())
        torch.save(state, os.path.join(folder, WEIGHTS_NAME))
        config_path = os.path.join(folder, CONFIG_NAME)
        if self.config != PAPER_CONFIG:
            with open(config_path, "w") as f:
                json.dump(config_to_dict(self.config), f, indent=2, sort_keys=True)
        elif os.path.exists(config_path):
            os.remove(config_path)  # a stale config would override the paper default on load


def _read_config(path: str) -> MotionExtractorConfig:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable config ({e})") from e
    return config_from_dict(MotionExtractorConfig, data, source=path)


def _read_state_dict(path: str) -> Mapping[str, Tensor]:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, disallowed global: all mean "not a usable .pth"
        raise CheckpointError(f"{path}: corrupt or unreadable .pth file ({type(e).__name__}: {e})") from e
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a flat state dict")
    return state


# ----------------------------------------------------------------------------- post-processing


def bins_to_degrees(logits: Tensor) -> Tensor:
    """(B, bins) head-pose logits -> (B,) degrees: expected bin under softmax, 3° per bin, centred at 0."""
    num_bins = logits.shape[-1]
    bin_degrees = torch.arange(num_bins, dtype=logits.dtype, device=logits.device) * 3
    half_range = 3 * (num_bins - 1) / 2  # 97.5 for LivePortrait's 66 bins
    return (torch.softmax(logits, dim=-1) * bin_degrees).sum(dim=-1) - half_range


def rotation_matrix(pitch: Tensor, yaw: Tensor, roll: Tensor) -> Tensor:
    """Degrees (B,) -> (B, 3, 3) = (Rz(roll) @ Ry(yaw) @ Rx(pitch))^T, for row vectors: kp @ R."""
    pitch, yaw, roll = (a.reshape(-1) * (math.pi / 180) for a in (pitch, yaw, roll))
    one, zero = torch.ones_like(pitch), torch.zeros_like(pitch)

    def mat(*rows: Tensor) -> Tensor:  # nine (B,) entries, row-major -> (B, 3, 3)
        return torch.stack(rows, dim=-1).reshape(-1, 3, 3)

    cx, sx = torch.cos(pitch), torch.sin(pitch)
    cy, sy = torch.cos(yaw), torch.sin(yaw)
    cz, sz = torch.cos(roll), torch.sin(roll)
    rot_x = mat(one, zero, zero, zero, cx, -sx, zero, sx, cx)
    rot_y = mat(cy, zero, sy, zero, one, zero, -sy, zero, cy)
    rot_z = mat(cz, -sz, zero, sz, cz, zero, zero, zero, one)
    return (rot_z @ rot_y @ rot_x).transpose(1, 2)


def driven_keypoints(x_c: Tensor, R: Tensor, exp: Tensor, scale: Tensor, t: Tensor) -> Tensor:
    """Eq. 1: x_d = s * (x_c @ R + δ) + t, with t_z dropped as LivePortrait does. Returns (B, K, 3)."""
    translation = F.pad(t[:, None, :2], (0, 1))  # (B, 1, 3) = (t_x, t_y, 0)
    return scale[..., None] * (x_c @ R + exp) + translation


def motion_info(raw: dict[str, Tensor]) -> dict[str, Tensor]:
    """Raw heads -> x_c, exp (B, K, 3); pitch/yaw/roll (B,) degrees; R (B, 3, 3); t (B, 3); scale (B, 1); x_d (B, K, 3)."""
    batch, num_kp = raw["kp"].shape[0], raw["kp"].shape[1] // 3
    x_c = raw["kp"].reshape(batch, num_kp, 3)  # row-major: keypoint k = elements [3k:3k+3]
    exp = raw["exp"].reshape(batch, num_kp, 3)
    pitch, yaw, roll = (bins_to_degrees(raw[k]) for k in ("pitch", "yaw", "roll"))
    R = rotation_matrix(pitch, yaw, roll)
    return {
        "x_c": x_c,
        "exp": exp,
        "pitch": pitch,
        "yaw": yaw,
        "roll": roll,
        "R": R,
        "t": raw["t"],
        "scale": raw["scale"],
        "x_d": driven_keypoints(x_c, R, exp, raw["scale"], raw["t"]),
    }


def extract_motion(model: MotionExtractor, crops_uint8: np.ndarray, batch_size: int = 32) -> dict[str, np.ndarray]:
    """(N, 256, 256, 3) uint8 RGB LivePortrait crops -> motion_info as float32 numpy arrays, N first."""
    if crops_uint8.ndim != 4 or crops_uint8.shape[1:] != (256, 256, 3):
        raise ValueError(f"extract_motion expects (N, 256, 256, 3) RGB crops, got {crops_uint8.shape}")
    device = next(model.parameters()).device
    chunks: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        for start in range(0, max(len(crops_uint8), 1), batch_size):
            x = np.clip(crops_uint8[start : start + batch_size].astype(np.float32) / 255.0, 0, 1)
            x = torch.from_numpy(x).permute(0, 3, 1, 2).to(device)  # (b, 3, 256, 256)
            for key, value in motion_info(model(x)).items():
                chunks.setdefault(key, []).append(value.float().cpu().numpy())
    return {key: np.concatenate(parts) for key, parts in chunks.items()}
