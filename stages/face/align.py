"""LivePortrait-style aligned face crop, driven by mediapipe's 478-point face mesh.

LivePortrait's motion extractor was trained on crops made by `crop_image(lmk, dsize,
scale=2.3, vy_ratio=-0.125)` from InsightFace's 106 landmarks (reference/liveportrait.md
§4). Its keypoints only mean what they were trained to mean if our crops frame the face the
same way, so `crop_transform` follows that algorithm step for step and only swaps the
anchors:

- eye centres: mean of each eye's outer corner, inner corner, upper-lid and lower-lid mesh
  points, [33, 133, 159, 145] (subject's right eye, image left) and [362, 263, 386, 374]
  (subject's left eye) -- the same corner/corner/lid/lid choice as LivePortrait's four
  106-point indices per eye.
- lip anchor: midpoint of the mouth corners 61 and 291. LivePortrait's 203-point anchor
  (48+66)/2 is the pair whose distance is the denominator of its lip-open ratio, i.e. the
  mouth corners (and 52/61 play that role in the 106 layout). Corners also barely move
  when the jaw opens, whereas the inner-lip midpoints 13/14 bounce with every syllable,
  which would tilt and shift the crop while the speaker talks.
- box points (calibration): InsightFace's 106 points stop at the eyebrows -- the jaw
  contour, brows, eyes, nose and lips -- while the mesh continues up the forehead to the
  hairline. Measured on skimage's astronaut (frontal, 512 px image): projected box of all
  468 mesh points is 91.3 x 105.9 px (w x h), so the forehead makes the height win and would
  zoom the crop out by 16 %; dropping the mesh points above the highest eyebrow point gives
  91.3 x 89.3 px, square with width winning, which is the shape of the 106-point box
  (ear-level contour width vs brow-to-chin height). So the box is taken over the mesh points
  at or below the eyebrows and `scale`=2.3 then makes the face width 1/2.3 of the crop, as in
  LivePortrait (eye centres ~53 px apart in a 256 crop).
- c0 (the projection origin) is the mean of the 468 mesh points; the 10 iris points are
  left out so that the eyes are not counted twice. c0 only sets the origin of the projection:
  the final centre is the box middle, so any choice of c0 gives the same crop.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

MESH_POINTS = 468  # 478 with refine_landmarks=True; 468..477 are the irises
RIGHT_EYE_RING = (33, 133, 159, 145)  # subject's right eye: outer, inner, upper lid, lower lid
LEFT_EYE_RING = (362, 263, 386, 374)  # subject's left eye: inner, outer, upper lid, lower lid
MOUTH_CORNERS = (61, 291)
EYEBROWS = (46, 52, 53, 55, 63, 65, 66, 70, 105, 107,
            276, 282, 283, 285, 293, 295, 296, 300, 334, 336)


def _check_landmarks(landmarks: np.ndarray) -> np.ndarray:
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] < MESH_POINTS:
        raise ValueError(
            f"face/align.py: landmarks must be (>=468, 2) mesh points, got {pts.shape}")
    if not np.all(np.isfinite(pts[:MESH_POINTS])):
        raise ValueError("face/align.py: landmarks contain NaN/inf (a frame without a face?)")
    return pts


def eye_lip_anchors(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(right eye centre, left eye centre, lip anchor), each (2,) in the landmarks' frame."""
    pts = _check_landmarks(landmarks)
    return (pts[list(RIGHT_EYE_RING)].mean(0), pts[list(LEFT_EYE_RING)].mean(0),
            pts[list(MOUTH_CORNERS)].mean(0))


def crop_transform(landmarks: np.ndarray, dsize: int = 256, scale: float = 2.3,
                   vy_ratio: float = -0.125) -> np.ndarray:
    """(2,3) float64 similarity mapping source pixels to the dsize x dsize aligned crop."""
    pts = _check_landmarks(landmarks)
    eye_r, eye_l, lip = eye_lip_anchors(pts)
    eyes = (eye_r + eye_l) / 2
    uy = lip - eyes
    norm = np.linalg.norm(uy)
    uy = uy / norm if norm > 1e-3 else np.array([0.0, 1.0])
    ux = np.array([uy[1], -uy[0]])  # eye->lip becomes +y, ux becomes +x
    axes = np.stack([ux, uy])  # (2, 2): rows are the crop's x and y directions

    mesh = pts[:MESH_POINTS]
    c0 = mesh.mean(0)
    proj = (mesh - c0) @ axes.T  # (468, 2) coordinates along (ux, uy)
    below_brows = proj[:, 1] >= proj[list(EYEBROWS), 1].min()
    lo, hi = proj[below_brows].min(0), proj[below_brows].max(0)
    box_mid = (lo + hi) / 2
    size = float((hi - lo).max()) * scale
    center = c0 + axes.T @ box_mid + uy * (vy_ratio * size)  # vx is always 0 in LivePortrait

    s = dsize / size
    M = np.zeros((2, 3), dtype=np.float64)
    M[:, :2] = s * axes
    M[:, 2] = dsize / 2 - s * axes @ center
    return M


def transform_points(M: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a (2,3) affine to (..., 2) points."""
    points = np.asarray(points, dtype=np.float64)
    return points @ M[:, :2].T + M[:, 2]


def warp_crop(frame: np.ndarray, M: np.ndarray, dsize: int = 256) -> np.ndarray:
    """The aligned crop, (dsize, dsize, 3) uint8, constant-0 outside the frame.

    When the crop shrinks the face (large faces), a bilinear warp alone aliases; like
    LivePortrait (warp to 512, INTER_AREA to 256) we warp onto a k-times finer grid and
    area-average it down. A fine pixel at x_k covers crop pixel (x_k + 0.5)/k - 0.5, hence
    M_k = k*M + (k-1)/2.
    """
    M = np.asarray(M, dtype=np.float64)
    source_px_per_crop_px = 1.0 / math.sqrt(abs(np.linalg.det(M[:, :2])))
    k = int(min(4, max(1, math.ceil(source_px_per_crop_px - 1e-6))))
    if k == 1:
        return cv2.warpAffine(frame, M, (dsize, dsize), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    fine = k * M
    fine[:, 2] += (k - 1) / 2
    big = cv2.warpAffine(frame, fine, (dsize * k, dsize * k), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return cv2.resize(big, (dsize, dsize), interpolation=cv2.INTER_AREA)


def crop_faces(frames, track, dsize: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Crops (N, dsize, dsize, 3) uint8 (zeros without a face) and affines (N, 2, 3) float64
    (NaN without a face) for frames and their FaceTrack.

    `frames` is any iterable (a list, or a decoder's generator: one frame in memory at a
    time); it must yield exactly one frame per frame of the track."""
    n = len(track.has_face)
    crops = np.zeros((n, dsize, dsize, 3), dtype=np.uint8)
    affines = np.full((n, 2, 3), np.nan, dtype=np.float64)
    count = 0
    for i, frame in enumerate(frames):
        if i >= n:
            raise ValueError(f"face/align.py: more than {n} frames for a track of {n}")
        if track.has_face[i]:
            affines[i] = crop_transform(track.landmarks[i], dsize=dsize)
            crops[i] = warp_crop(np.asarray(frame), affines[i], dsize)
        count = i + 1
    if count != n:
        raise ValueError(f"face/align.py: {count} frames but a track of {n}")
    return crops, affines
