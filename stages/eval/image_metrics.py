"""PSNR and SSIM, per frame, with scikit-image.

The convention (papers must state it; ours is ViCo's / IP-LAP's with a fixed region):
- region: the 256x256 aligned face crop of the *source* frame's track (stages/face/align.py),
  the same affine applied to the real and the generated frame, so the two are pixel-aligned;
- colour: RGB, uint8 mapped to [0, 1], data_range = 1;
- PSNR: 10 log10(1 / MSE) of each frame (over all pixels and channels), then averaged;
- SSIM: Wang et al.'s settings (Gaussian window sigma 1.5, population covariance, K1 0.01,
  K2 0.03), channel-wise on RGB then averaged over channels, per frame, then averaged.
A pair of identical frames has infinite PSNR; it is reported as `PSNR_CAP_DB` so that means
stay finite (the paper's Table 1 writes N/A for the ground truth).
"""
from __future__ import annotations

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

PSNR_CAP_DB = 100.0
SETTINGS = {
    "library": "scikit-image",
    "region": "256x256 aligned face crop (source track)",
    "colour": "RGB",
    "data_range": 1.0,
    "ssim": "gaussian_weights sigma 1.5, use_sample_covariance False, channel mean",
    "psnr": f"per frame on [0,1], capped at {PSNR_CAP_DB} dB",
}


def _unit(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return frames.astype(np.float64) / 255.0
    return frames.astype(np.float64)


def psnr_per_frame(real: np.ndarray, fake: np.ndarray) -> np.ndarray:
    """(n,) dB for (n,H,W,3) frames (uint8, or float in [0,1])."""
    real, fake = _unit(real), _unit(fake)
    if real.shape != fake.shape:
        raise ValueError(f"psnr: shapes differ {real.shape} vs {fake.shape}")
    out = np.empty(len(real))
    for i, (a, b) in enumerate(zip(real, fake)):
        if np.array_equal(a, b):
            out[i] = PSNR_CAP_DB
        else:
            out[i] = min(PSNR_CAP_DB, peak_signal_noise_ratio(a, b, data_range=1.0))
    return out


def ssim_per_frame(real: np.ndarray, fake: np.ndarray) -> np.ndarray:
    """(n,) SSIM in [-1, 1] for (n,H,W,3) frames (uint8, or float in [0,1])."""
    real, fake = _unit(real), _unit(fake)
    if real.shape != fake.shape:
        raise ValueError(f"ssim: shapes differ {real.shape} vs {fake.shape}")
    return np.array([
        structural_similarity(a, b, data_range=1.0, channel_axis=-1, gaussian_weights=True,
                              sigma=1.5, use_sample_covariance=False)
        for a, b in zip(real, fake)
    ])
