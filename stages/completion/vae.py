"""The frozen SD VAE of Stage 2: RGB face crops in [0, 1] <-> scaled latents (Eq. 7).

IMGTalk completes the mouth in the latent space of the Stable Diffusion 1.x VAE
(stabilityai/sd-vae-ft-mse, the one MuseTalk uses): a 256x256 crop becomes a 4x32x32 latent.
The VAE is kept in diffusers' own `AutoencoderKL` format so users' weight folders load
unchanged; this wrapper only fixes the conventions around it (value range, scaling factor,
deterministic encoding) so that every caller gets the same latents.
"""
from __future__ import annotations

import os

from diffusers import AutoencoderKL
from torch import Tensor, nn

from stages.common.checkpoint import CheckpointError


def sd_vae_config() -> dict:
    """`AutoencoderKL` config of stabilityai/sd-vae-ft-mse (the SD 1.x VAE, ~84M parameters)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 256,
        "scaling_factor": 0.18215,
    }


def tiny_vae_config() -> dict:
    """Same structure as `sd_vae_config` (four blocks -> three downsamplings, factor 8), tiny widths."""
    config = sd_vae_config()
    config.update(block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=4, sample_size=64)
    return config


class LatentVAE(nn.Module):
    """Frozen `AutoencoderKL`: `encode` maps (B,3,H,W) RGB in [0,1] to (B,4,H/8,W/8) scaled latents,
    `decode` maps them back. Parameters are frozen (the paper keeps E and D fixed) but gradients
    still flow through `decode` to its input, which Stage 2's pixel losses need."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = int(vae.config.latent_channels)

    @classmethod
    def from_config(cls, config: dict) -> "LatentVAE":
        return cls(AutoencoderKL.from_config(config))

    @classmethod
    def from_pretrained(cls, folder: str) -> "LatentVAE":
        """Load a diffusers-format folder (config.json + diffusion_pytorch_model.safetensors); never
        touches a model hub."""
        config_path = os.path.join(folder, "config.json")
        if not os.path.isfile(config_path):
            raise CheckpointError(f"{config_path}: VAE config file not found (expected a diffusers AutoencoderKL folder)")
        try:
            vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{folder}: cannot load the AutoencoderKL weights ({e})") from e
        return cls(vae)

    def save_pretrained(self, folder: str) -> None:
        self.vae.save_pretrained(folder, safe_serialization=True)

    def encode(self, images: Tensor) -> Tensor:
        # images: (B,3,H,W) in [0,1]; H and W multiples of `downsample`.
        self._check_images(images)
        # Deterministic on purpose: the posterior's mode, never a sample. MuseTalk's inference
        # encodes with latent_dist.sample(), so the same frame gives different latents on every
        # run; with the mode, re-encoding a frame (or a re-run of a segment) reproduces its latent.
        posterior = self.vae.encode(images * 2.0 - 1.0).latent_dist
        return posterior.mode() * self.scaling_factor  # (B,4,H/8,W/8)

    def decode(self, latents: Tensor) -> Tensor:
        # latents: (B,4,h,w) scaled as `encode` returns them.
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"LatentVAE.decode: expected latents (B,{self.latent_channels},h,w), got {tuple(latents.shape)}"
            )
        images = self.vae.decode(latents / self.scaling_factor).sample  # (B,3,8h,8w) in about [-1,1]
        return ((images + 1.0) / 2.0).clamp(0.0, 1.0)

    def _check_images(self, images: Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"LatentVAE.encode: expected RGB images (B,3,H,W), got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % self.downsample or width % self.downsample:
            raise ValueError(
                f"LatentVAE.encode: image size {height}x{width} is not a multiple of {self.downsample}"
            )
