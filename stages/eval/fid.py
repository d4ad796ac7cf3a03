"""Fréchet Inception Distance (FID) from pool3 features, and the stage that extracts them.

FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between Gaussians fitted to two sets
of Inception features (Heusel et al. 2017). Computed as pytorch-fid 0.3.0 does
(`fid_score.calculate_frechet_distance`): float64 statistics, np.cov with rowvar=False,
scipy.linalg.sqrtm of the product; if that square root is not finite (a singular
product), eps*I is added to both covariances and it is taken again; an imaginary part
left by sqrtm is dropped when its diagonal is negligible (|imag| <= 1e-3) and is an error
otherwise.

FID is pooled over all frames of a set (not averaged per video), and needs at least as
many frames as feature dimensions (2048) for full-rank covariances; smaller sets give a
biased, larger value, so compare FIDs only at equal set sizes.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import linalg

from stages.eval.inception import FIDInceptionV3


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> (mu (D,), sigma (D, D)), both float64; N >= 2."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"expected (N, D) features with N >= 2, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"shape mismatch: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {sigma1.shape}, sigma2 {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # Singular product: pytorch-fid's fix, a small offset on both diagonals.
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3:
            raise ValueError(f"sqrtm left an imaginary component of {imag:.3g} on the diagonal")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two (N, D) feature sets.

    With fewer frames than dimensions (the usual case for a small test set: 2048-d features)
    the covariances have rank < D and the D x D square root is both singular and slow (minutes
    on two cores). Tr((S1 S2)^(1/2)) is then taken exactly from the frames: with centred
    features A (n1 x D) and B (n2 x D), S1 S2 = A'A B'B / c has the nonzero eigenvalues of
    the n1 x n1 positive semi-definite A B'B A' / c, so the trace is the sum of their
    square roots. Same value as the D x D route without its eps fix (the test checks it)."""
    x1, x2 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu1, sigma1 = feature_stats(x1)
    mu2, sigma2 = feature_stats(x2)
    if min(len(x1), len(x2)) >= x1.shape[1]:
        return frechet_distance(mu1, sigma1, mu2, sigma2)
    if x1.shape[1] != x2.shape[1]:
        raise ValueError(f"feature sets differ in dimension: {x1.shape} vs {x2.shape}")
    c1, c2 = x1 - mu1, x2 - mu2
    cross = c1 @ c2.T  # (n1, n2)
    small = cross @ cross.T / ((len(x1) - 1) * (len(x2) - 1))  # (n1, n1), PSD
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(small), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


class InceptionFeatures:
    """Stage: {"frames": uint8 (B,H,W,3) RGB} -> {"features": float32 (B,2048)} pool3 features.

    Frames are scaled to [0,1] (x / 255, as pytorch-fid's ToTensor) and run through
    FIDInceptionV3 in chunks of `batch_size` (pytorch-fid's default, 50).
    """

    def __init__(self, weights_path: str, device: str = "cpu", batch_size: int = 50):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = FIDInceptionV3.from_file(weights_path).to(self.device).eval()

    def __call__(self, batch: dict) -> dict:
        frames = np.asarray(batch["frames"])
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 (B,H,W,3) RGB, got {frames.dtype} {frames.shape}")
        out = np.empty((frames.shape[0], 2048), dtype=np.float32)
        with torch.inference_mode():
            for i in range(0, frames.shape[0], self.batch_size):
                chunk = torch.from_numpy(np.ascontiguousarray(frames[i : i + self.batch_size])).to(self.device)
                images = chunk.permute(0, 3, 1, 2).to(torch.float32) / 255.0  # (b,3,H,W) in [0,1]
                out[i : i + chunk.shape[0]] = self.model(images).cpu().numpy()
        return {"features": out}
