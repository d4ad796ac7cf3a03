"""Paste a (generated) aligned crop back into its source frame."""
from __future__ import annotations

import cv2
import numpy as np


def paste_back(frame: np.ndarray, crop: np.ndarray, M: np.ndarray,
               blend_mask: np.ndarray) -> np.ndarray:
    """A new uint8 frame: crop alpha-blended into frame through the inverse of M.

    frame (H, W, 3) uint8; crop (d, d, 3) uint8; M (2, 3) source->crop affine (all NaN for
    a frame without a face, which is returned unchanged); blend_mask (d, d) float in [0, 1].
    Only the frame rectangle under the non-zero part of the mask is warped and blended, so
    a 1080p frame costs about as much as the face, and every pixel outside that footprint
    (and every pixel where the warped mask is exactly 0) is copied bit for bit.
    """
    out = np.array(frame, dtype=np.uint8, copy=True)
    M = np.asarray(M, dtype=np.float64)
    if not np.all(np.isfinite(M)):
        return out
    d = crop.shape[0]
    if crop.shape[:2] != (d, d) or blend_mask.shape != (d, d):
        raise ValueError(f"face/paste.py: crop {crop.shape} and blend_mask {blend_mask.shape} "
                         f"must both be {d}x{d}")
    ys, xs = np.nonzero(blend_mask > 0)
    if len(xs) == 0:
        return out
    to_frame = cv2.invertAffineTransform(M)
    # Footprint of the mask's bounding box (plus a pixel for bilinear reach) in the frame.
    corners = np.array([[xs.min() - 1, ys.min() - 1], [xs.max() + 1, ys.min() - 1],
                        [xs.min() - 1, ys.max() + 1], [xs.max() + 1, ys.max() + 1]], np.float64)
    footprint = corners @ to_frame[:, :2].T + to_frame[:, 2]
    h, w = out.shape[:2]
    x0, y0 = np.maximum(np.floor(footprint.min(0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(footprint.max(0)).astype(int) + 1, (w, h))
    if x0 >= x1 or y0 >= y1:
        return out
    to_roi = to_frame.copy()
    to_roi[:, 2] -= (x0, y0)
    size = (int(x1 - x0), int(y1 - y0))
    face = cv2.warpAffine(crop, to_roi, size, flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0).astype(np.float32)
    alpha = cv2.warpAffine(blend_mask.astype(np.float32), to_roi, size, flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)[..., None]
    roi = out[y0:y1, x0:x1].astype(np.float32)
    out[y0:y1, x0:x1] = np.clip(np.rint(roi + alpha * (face - roi)), 0, 255).astype(np.uint8)
    return out
