"""The GPU stage: VAE-encode the mouth-masked crops, complete them with the IMC-UNet
conditioned on the driving motion and the chosen reference, VAE-decode.

One forward pass per batch of frames, no diffusion loop. Reference latents are encoded
once per video and kept in a small per-actor cache, since every segment of a video
draws from the same reference bank.

A batch that runs the GPU out of memory is retried in halves, down to a single frame:
the networks work frame by frame, so the halves give the pixels the whole batch would
have, up to float rounding (at most one level of a uint8, as any batch size).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import NamedTuple

import cv2
import numpy as np
import torch

from stages.completion.imc_unet import IMCUNet
from stages.completion.vae import LatentVAE

log = logging.getLogger("imgtalk.completion")


def is_cuda_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError, or a RuntimeError worded the way older torch and some
    extensions word it."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)
    )


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def compute_dtype(device: str, precision: str) -> torch.dtype:
    """The dtype the networks' weights are stored in and run at: bf16 (fp16 when asked) on
    CUDA, fp32 on the CPU unless bf16 is asked for. Weights stored in bf16, not fp32 weights
    under bf16 autocast, which re-casts every weight on every batch: 1.28-1.49x the frames/s
    at batch 32-256 on an H200 (benchmarks/results/h200-2026-12-04.txt)."""
    if precision == "fp32":
        return torch.float32
    if device.startswith("cuda"):
        return torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.bfloat16 if precision == "bf16" else torch.float32


def audio_conditions(rows_50hz: np.ndarray, first_feature: int, frame_centres_s: np.ndarray,
                     window_frames: int) -> np.ndarray:
    """The audio-conditioned IMC-UNet's condition for each frame (the ablation of
    IMCUNetConfig.condition, MuseTalk's kind): rows_50hz (2F, A) HuBERT rows of 25 Hz frames
    first_feature.. -> (N, 2 * (2w + 1), A), the rows of 25 Hz frames t-w..t+w where t is the
    25 Hz frame holding each frame's centre, clamped to the rows given (as in training,
    stages/completion/training.py's audio_window at a chunk's edges)."""
    from stages.completion.training import audio_window

    rows = np.asarray(rows_50hz, np.float32)
    per_frame = rows[: len(rows) // 2 * 2].reshape(-1, 2, rows.shape[-1])  # (F, 2, A)
    t = np.floor(np.asarray(frame_centres_s, np.float64) * 25 + 1e-9).astype(np.int64) - first_feature
    if len(t) == 0:
        return np.zeros((0, 2 * (2 * window_frames + 1), rows.shape[-1]), np.float32)
    return np.stack([audio_window(per_frame, int(i), window_frames) for i in t])


def to_tensor(images: np.ndarray, device: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 255.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def latent_window(region: np.ndarray, downsample: int, margin: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(rows, cols): the latent rows [r0, r1) and columns [c0, c1) whose decode covers every
    pixel of `region` (H, W; > 0 = used) with `margin` latents of context on each side,
    clamped to the latent grid. An empty region gives the whole grid."""
    height, width = region.shape[0] // downsample, region.shape[1] // downsample
    ys, xs = np.nonzero(region > 0)
    if len(ys) == 0:
        return (0, height), (0, width)
    rows = (max(0, ys.min() // downsample - margin), min(height, ys.max() // downsample + 1 + margin))
    cols = (max(0, xs.min() // downsample - margin), min(width, xs.max() // downsample + 1 + margin))
    return (int(rows[0]), int(rows[1])), (int(cols[0]), int(cols[1]))


def colour_ring(mouth_mask: np.ndarray, width: int = 12) -> np.ndarray:
    """(H, W) bool: the band `width` pixels wide around the hole (mouth_mask > 0.5), where a
    crop shows its own frame's skin next to what is pasted into the hole."""
    hole = mouth_mask > 0.5
    grown = cv2.dilate(hole.astype(np.uint8), np.ones((2 * width + 1, 2 * width + 1), np.uint8)) > 0
    return grown & ~hole


def colour_matched(references: np.ndarray, crops: np.ndarray, ring: np.ndarray) -> np.ndarray:
    """references (b, H, W, 3) uint8, each scaled per channel so that its mean over `ring` is
    its crop's: the neutral frame the silence gate shows may come from another part of the
    video, lit or exposed differently, and Stage 2, which would have drawn from the frame's
    own surroundings, does not run there. Gains are kept within [0.5, 2]; a gain of exactly
    1 leaves the bytes as they are."""
    reference = references.astype(np.float32)
    gain = crops[:, ring].astype(np.float32).mean(axis=1) / np.maximum(reference[:, ring].mean(axis=1), 1.0)  # (b, 3)
    gain = np.clip(gain, 0.5, 2.0)
    return np.clip(reference * gain[:, None, None, :] + 0.5, 0, 255).astype(np.uint8)


class CompletionStage:
    """Constructor holds the VAE, the IMC-UNet and the mask; `__call__` completes one
    segment's crops. With `decode_region` (the paste-back alpha: only its pixels reach the
    output) the VAE decodes just the latent window over it plus `decode_margin` latents,
    and the crop keeps its source pixels outside that window: the decoder is most of the
    stage's FLOPs, and most of its pixels are thrown away by compose. The window's
    GroupNorm statistics outside it come from the segment's first face frame."""

    def __init__(
        self,
        vae: LatentVAE,
        unet: IMCUNet,
        mouth_mask: np.ndarray,  # (256, 256) float, 1 = to complete
        batch_frames: int = 16,
        device: str = "auto",
        precision: str = "auto",
        reference_cache_videos: int = 8,
        decode_region: np.ndarray | None = None,  # (256, 256) float, > 0 = pasted; None: decode everything
        decode_margin: int = 4,
    ):
        if decode_region is not None and decode_region.shape != mouth_mask.shape:
            raise ValueError(f"CompletionStage: decode_region is {decode_region.shape}, the crop (its mouth mask) "
                             f"is {mouth_mask.shape}: the window would cover the wrong pixels")
        self.device = resolve_device(device)
        self.window = None if decode_region is None else latent_window(decode_region, vae.downsample, decode_margin)
        self.precision = precision
        self.dtype = compute_dtype(self.device, precision)
        self.vae = vae.to(self.device, self.dtype).eval()
        self.unet = unet.to(self.device, self.dtype).eval()
        self.keep = torch.from_numpy(1.0 - mouth_mask.astype(np.float32)).to(self.device, self.dtype)[None, None]
        self.ring = colour_ring(mouth_mask)
        self.batch_frames = batch_frames
        self._ref_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._ref_cache_size = reference_cache_videos
        self.reference_encodes = 0  # how many reference banks were encoded (a test/metrics hook)

    def reference_latents(self, video_id: str, ref_crops: np.ndarray) -> torch.Tensor:
        cached = self._ref_cache.get(video_id)
        if cached is not None and cached.shape[0] == len(ref_crops):
            self._ref_cache.move_to_end(video_id)
            return cached
        with torch.inference_mode():
            latents = self.vae.encode(to_tensor(ref_crops, self.device).to(self.dtype))
        self.reference_encodes += 1
        self._ref_cache[video_id] = latents
        while len(self._ref_cache) > self._ref_cache_size:
            self._ref_cache.popitem(last=False)
        return latents

    def __call__(
        self,
        video_id: str,
        crops: np.ndarray,  # (N, 256, 256, 3) uint8
        has_face: np.ndarray,  # (N,) bool
        driving: np.ndarray,  # (N, 21, 3)
        ref_index: np.ndarray,  # (N,) into ref_crops
        ref_crops: np.ndarray,  # (R, 256, 256, 3) uint8
        shows_reference: np.ndarray | None = None,  # (N,) bool: the frame is its reference crop, colour-matched
    ) -> np.ndarray:
        generated = crops.copy()
        face = np.flatnonzero(has_face)
        if shows_reference is not None:
            # The silence gate's real closed mouth (MotionStage, "neutral-pixels"): no VAE, no UNet.
            shown = face[np.asarray(shows_reference, bool)[face]]
            generated[shown] = colour_matched(ref_crops[ref_index[shown]], crops[shown], self.ring)
            drawn = face[~np.asarray(shows_reference, bool)[face]]
        else:
            drawn = face
        if len(drawn) == 0:
            return generated
        refs = self.reference_latents(video_id, ref_crops)
        frames = _Frames(crops, driving, ref_index, refs)
        # Mouth-window decode: one frame's statistics for the whole segment, so no frame's
        # pixels depend on how the segment was batched (or halved after an out-of-memory),
        # nor on which frames the gate showed as they are.
        statistics = None if self.window is None else self._window_statistics(face[:1], frames)
        for start in range(0, len(drawn), self.batch_frames):
            sel = drawn[start : start + self.batch_frames]
            generated[sel] = self._complete_in_halves(sel, frames, statistics)
        return generated

    def _complete_in_halves(self, sel: np.ndarray, frames: "_Frames", statistics) -> np.ndarray:
        """The frames `sel`, completed; on CUDA out-of-memory each half of them on its own,
        recursively. A single frame that does not fit re-raises: nothing smaller is left."""
        try:
            return self._complete_batch(sel, frames, statistics)
        except Exception as e:
            if not is_cuda_out_of_memory(e) or len(sel) == 1:
                raise
        # Outside the except block, so the failed batch's tensors (held by the traceback)
        # are freed before the allocator's cache is emptied and the halves run.
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        half = len(sel) // 2
        log.warning("CUDA out of memory on %d frames; retrying as %d + %d", len(sel), half, len(sel) - half)
        return np.concatenate([
            self._complete_in_halves(sel[:half], frames, statistics),
            self._complete_in_halves(sel[half:], frames, statistics),
        ])

    def _completed_latents(self, sel: np.ndarray, frames: "_Frames") -> tuple[torch.Tensor, torch.Tensor]:
        """VAE encode and IMC-UNet over the frames `sel`: (their crops (b,3,256,256) in [0,1],
        the completed latents (b,4,32,32)), in the stage's dtype. Call under inference mode."""
        images = to_tensor(frames.crops[sel], self.device).to(self.dtype)  # (b, 3, 256, 256)
        masked = self.vae.encode(images * self.keep)  # Ĩ_s = I_s ⊙ (1 − M) -> (b, 4, 32, 32)
        motion = torch.from_numpy(frames.driving[sel]).to(self.device, self.dtype)
        reference = frames.refs[torch.from_numpy(frames.ref_index[sel]).to(self.device)]
        return images, self.unet(masked, motion, reference)

    def _window_statistics(self, sel: np.ndarray, frames: "_Frames"):
        with torch.inference_mode():
            _, completed = self._completed_latents(sel, frames)
            return self.vae.window_statistics(completed, *self.window)

    def _complete_batch(self, sel: np.ndarray, frames: "_Frames", statistics) -> np.ndarray:
        """One forward pass of VAE encode, IMC-UNet and VAE decode over the frames `sel`."""
        with torch.inference_mode():
            images, completed = self._completed_latents(sel, frames)
            if self.window is None:
                out = self.vae.decode(completed).float()
            else:
                out = decode_pasted(self.vae, completed, images.float(), self.window, statistics).float()
        return to_uint8(out)


class _Frames(NamedTuple):
    """One segment's inputs to completion, as CompletionStage.__call__ got them."""

    crops: np.ndarray  # (N, 256, 256, 3) uint8
    driving: np.ndarray  # (N, 21, 3)
    ref_index: np.ndarray  # (N,)
    refs: torch.Tensor  # (R, 4, 32, 32) reference latents


def decode_pasted(vae: LatentVAE, latents: torch.Tensor, source: torch.Tensor,
                  window: tuple[tuple[int, int], tuple[int, int]], statistics=None) -> torch.Tensor:
    """(B,3,H,W) in [0,1]: `latents` decoded inside the latent `window` (latent_window), the
    `source` crops (B,3,H,W) outside it, which compose does not paste; `statistics`: the
    segment's vae.window_statistics (None: the batch's first frame's)."""
    (r0, r1), (c0, c1) = window
    f = vae.downsample
    out = source.clone()
    out[:, :, r0 * f : r1 * f, c0 * f : c1 * f] = vae.decode_window(latents, (r0, r1), (c0, c1), statistics).to(out.dtype)
    return out
