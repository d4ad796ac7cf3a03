"""The frozen SD VAE of Stage 2: RGB face crops in [0, 1] <-> scaled latents (Eq. 7).

IMGTalk completes the mouth in the latent space of the Stable Diffusion 1.x VAE
(stabilityai/sd-vae-ft-mse, the one MuseTalk uses): a 256x256 crop becomes a 4x32x32 latent.
The VAE is kept in diffusers' own `AutoencoderKL` format so users' weight folders load
unchanged; this wrapper only fixes the conventions around it (value range, scaling factor,
deterministic encoding) so that every caller gets the same latents.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
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

    def window_statistics(self, latent: Tensor, rows: tuple[int, int], cols: tuple[int, int]) -> "WindowStatistics":
        """What decode_window normalises with outside the window: a full decode of `latent`
        (1, C, h, w), one frame, noting each up-block GroupNorm's sums outside latent rows
        [r0, r1) and columns [c0, c1)."""
        self._check_latents(latent, "window_statistics")
        norms = _UpBlockNorms(self.vae.decoder, latent.shape[2])
        with norms.recording(rows, cols):
            _decoder_end(self.vae.decoder, self._decoder_start(latent[:1]))
        return WindowStatistics(norms.outside)

    def decode_window(self, latents: Tensor, rows: tuple[int, int], cols: tuple[int, int],
                      statistics: "WindowStatistics | None" = None) -> Tensor:
        """decode() of only latent rows [r0, r1) and columns [c0, c1): (B,3,f*(r1-r0),f*(c1-c0)),
        f = `downsample`, for the pixels a paste-back keeps (stages.completion.stage.latent_window).

        The decoder's start (conv_in and the mid block, whose attention sees the whole frame:
        a few percent of its FLOPs) runs on the whole latent; the up blocks, where the FLOPs
        are, on the window. Their GroupNorms would see only the window's statistics, which
        differ from the frame's (a mouth-and-chin window is not a face: 27 dB from the full
        decode at 4 latents of margin on the demo VAE), so each frame is normalised with its
        own window's sums plus `statistics`' sums outside the window: those of one full frame
        (window_statistics; by default the batch's first). The caller passes the same frame's
        statistics to every batch of a segment (its frames are crops aligned to one face), so
        a frame's pixels do not depend on how the segment was batched. What is left is the
        window edges' zero padding and the frames' differences outside the window;
        benchmarks/decode_window.py measures both.
        """
        (r0, r1), (c0, c1) = rows, cols
        self._check_latents(latents, "decode_window")
        if not (0 <= r0 < r1 <= latents.shape[2] and 0 <= c0 < c1 <= latents.shape[3]):
            raise ValueError(f"LatentVAE.decode_window: window rows {rows}, cols {cols} is empty or outside the "
                             f"{latents.shape[2]}x{latents.shape[3]} latent")
        if statistics is None:
            statistics = self.window_statistics(latents[:1], rows, cols)
        start = self._decoder_start(latents)  # (B, C, h, w): the whole frame
        norms = _UpBlockNorms(self.vae.decoder, latents.shape[2], statistics.outside)
        with norms.imposing():
            images = _decoder_end(self.vae.decoder, start[:, :, r0:r1, c0:c1])  # (B,3,f*(r1-r0),f*(c1-c0))
        return ((images + 1.0) / 2.0).clamp(0.0, 1.0)

    def _decoder_start(self, latents: Tensor) -> Tensor:
        """diffusers' decode up to and including the decoder's mid block."""
        z = latents / self.scaling_factor
        if self.vae.post_quant_conv is not None:
            z = self.vae.post_quant_conv(z)
        h = self.vae.decoder.mid_block(self.vae.decoder.conv_in(z))
        return h.to(next(iter(self.vae.decoder.up_blocks.parameters())).dtype)  # as diffusers' upscale_dtype

    def _check_latents(self, latents: Tensor, caller: str) -> None:
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"LatentVAE.{caller}: expected latents (B,{self.latent_channels},h,w), got {tuple(latents.shape)}"
            )

    def _check_images(self, images: Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"LatentVAE.encode: expected RGB images (B,3,H,W), got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % self.downsample or width % self.downsample:
            raise ValueError(
                f"LatentVAE.encode: image size {height}x{width} is not a multiple of {self.downsample}"
            )


def _decoder_end(decoder, h: Tensor) -> Tensor:
    """diffusers' Decoder.forward after its mid block (no latent_embeds: the SD VAE has none)."""
    for block in decoder.up_blocks:
        h = block(h)
    return decoder.conv_out(decoder.conv_act(decoder.conv_norm_out(h)))


@dataclass(frozen=True)
class WindowStatistics:
    """Per up-block GroupNorm of a decoder (keyed by the module's id): the per-group sum of x,
    sum of x² (each (1, groups, 1), float64) and element count outside a latent window, of
    one full frame's decode."""

    outside: dict[int, tuple[Tensor, Tensor, int]]


class _UpBlockNorms:
    """The GroupNorms after a decoder's mid block. `recording(rows, cols)` notes, for a batch
    of one full frame, each norm's per-group sums of x and x² outside the latent window
    (scaled to the norm's resolution); `imposing()` then normalises a window's features with
    the statistics of the whole frame they stand for: the window's own sums plus those noted
    outside it."""

    def __init__(self, decoder, latent_height: int, outside: dict[int, tuple[Tensor, Tensor, int]] | None = None):
        self.norms = [m for m in decoder.up_blocks.modules() if isinstance(m, nn.GroupNorm)] + [decoder.conv_norm_out]
        self.latent_height = latent_height
        self.outside: dict[int, tuple[Tensor, Tensor, int]] = dict(outside or {})  # id(norm) -> (sum, sum of squares, count)

    @staticmethod
    def _sums(x: Tensor, groups: int) -> tuple[Tensor, Tensor, int]:
        # Per-group mean and variance by torch's own (stable) reduction over a view (no copy
        # of a channels_last or windowed x), then sums in float64 on the (B, groups, 1)
        # results only: no float64 copy of the activations.
        grouped = x.float().unflatten(1, (groups, -1))  # (B, groups, C/groups, H, W)
        var, mean = torch.var_mean(grouped, dim=(2, 3, 4), unbiased=False)
        count = grouped[0, 0].numel()
        mean, var = mean.double()[..., None], var.double()[..., None]
        return mean * count, (var + mean.square()) * count, count

    @contextmanager
    def recording(self, rows: tuple[int, int], cols: tuple[int, int]):
        def forward(norm):
            def record(x: Tensor) -> Tensor:
                scale = x.shape[-2] // self.latent_height
                window = x[:, :, rows[0] * scale : rows[1] * scale, cols[0] * scale : cols[1] * scale]
                total, inside = self._sums(x, norm.num_groups), self._sums(window, norm.num_groups)
                self.outside[id(norm)] = (total[0] - inside[0], total[1] - inside[1], total[2] - inside[2])
                return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
            return record

        with self._patched(forward):
            yield

    @contextmanager
    def imposing(self):
        missing = [n for n in self.norms if id(n) not in self.outside]
        if missing:
            raise ValueError(f"decode_window: no outside-window statistics for {len(missing)} of the decoder's "
                             f"{len(self.norms)} up-block GroupNorms (statistics of another VAE?)")

        def forward(norm):
            out_sum, out_squares, out_count = self.outside[id(norm)]  # (1, groups, 1) each, and a count
            per_group = norm.num_channels // norm.num_groups

            def impose(x: Tensor) -> Tensor:
                own_sum, own_squares, own_count = self._sums(x, norm.num_groups)
                count = own_count + out_count
                mean = (own_sum + out_sum) / count  # (B, groups, 1)
                inv_std = torch.rsqrt(((own_squares + out_squares) / count - mean.square()).clamp_min(0) + norm.eps)
                # As one per-channel scale and shift (B, C, 1, 1), applied in float32 (the
                # normalisation cancels the mean, too coarse in bf16) by elementwise ops, which
                # keep x's memory format (channels_last stays channels_last).
                inv_std = inv_std.float().repeat_interleave(per_group, dim=1)[..., None]
                mean = mean.float().repeat_interleave(per_group, dim=1)[..., None]
                scale = inv_std * norm.weight.float()[None, :, None, None]
                shift = norm.bias.float()[None, :, None, None] - mean * scale
                return (x.float() * scale + shift).to(x.dtype)
            return impose

        with self._patched(forward):
            yield

    @contextmanager
    def _patched(self, forward):
        forwards = {id(norm): forward(norm) for norm in self.norms}  # all built before any is patched
        try:
            for norm in self.norms:
                norm.forward = forwards[id(norm)]
            yield
        finally:
            for norm in self.norms:
                norm.__dict__.pop("forward", None)  # back to the class's forward
