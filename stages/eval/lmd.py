"""LMD, landmark distance of the mouth (Chen et al. 2018, as RAD-NeRF/ER-NeRF's LMDMeter).

Landmarks: mediapipe FaceMesh (the detector the project installs; dlib and face_alignment
are not available here), its lip points mapped to the 20 mouth points 48-67 of the 68-point
iBUG scheme (outer lip 48-59 clockwise from the left corner, inner lip 60-67) by the widely
used FaceMesh -> dlib-68 correspondence below. Both sets are in the pixels of the 256x256
aligned face crop of the source frame. Each frame's 20 points are mean-centred (translation
removed, as LMDMeter does), then LMD = mean over points of the L2 distance, per frame, and
the mean over frames.
"""
from __future__ import annotations

import numpy as np

# FaceMesh index of iBUG points 48..67.
MESH_MOUTH_68 = (61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181,  # outer 48-59
                 78, 82, 13, 312, 308, 317, 14, 87)  # inner 60-67
SETTINGS = {
    "landmarks": "mediapipe FaceMesh 0.10.14 lip points mapped to iBUG-68 48-67 (20 points)",
    "space": "pixels of the 256x256 aligned face crop (source track)",
    "normalisation": "each frame's 20 points mean-centred",
    "distance": "L2 per point, mean over points, mean over frames",
}


def mouth_points(mesh: np.ndarray) -> np.ndarray:
    """(..., 20, 2) iBUG 48-67 from (..., 478 or 468, 2) FaceMesh landmarks."""
    return np.asarray(mesh, np.float64)[..., list(MESH_MOUTH_68), :]


def lmd_per_frame(real: np.ndarray, fake: np.ndarray) -> np.ndarray:
    """(n,) LMD for (n, 20, 2) mouth points; NaN where either frame has no landmarks."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if real.shape != fake.shape or real.shape[-2:] != (20, 2):
        raise ValueError(f"lmd: expected two (n, 20, 2) arrays, got {real.shape} and {fake.shape}")
    real = real - real.mean(axis=-2, keepdims=True)
    fake = fake - fake.mean(axis=-2, keepdims=True)
    return np.linalg.norm(real - fake, axis=-1).mean(axis=-1)
