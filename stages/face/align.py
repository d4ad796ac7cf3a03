"""LivePortrait-style aligned face crop, driven by mediapipe's 478-point face mesh.

LivePortrait's motion extractor was trained on crops made by `crop_image(lmk, dsize,
scale=2.3, vy_ratio=-0.125)` from InsightFace's 106 landmarks (reference/liveportrait.md
§4): a square of 2.3 times the side of the landmarks' box (brows to chin, jaw contour to
jaw contour), centred on the box and shifted up by 0.125 of its side, rolled so that the
eye-to-lip direction points down. Its keypoints only mean what they were trained to mean if
our crops frame the face the same way, so `crop_transform` keeps that framing.

What it does not keep is where the box's edges are read. LivePortrait's chin and lip
anchor move with the mouth: measured on the synthetic speaker, its box grows by 5-12 % as
the jaw opens (the crop zooms out; r = -0.74 to -0.83 between zoom and jaw over a clip) and
the open upper lip rises above the mouth mask. For a mouth-completion model that is a leak:
trained on a frame's own masked crop, Stage 2 learned to read the mouth's state from the
zoom and the unmasked pixels instead of from its motion condition, and a dub then copied
the source's mouth (held-out: the output's opening followed the source video at r 0.55-0.74
and the new audio at 0.33). So the box is measured on landmarks the mouth does not move:

- roll: the eye line (eye centres: mean of each eye's outer corner, inner corner, upper-lid
  and lower-lid mesh points, [33, 133, 159, 145] and [362, 263, 386, 374] -- the same
  corner/corner/lid/lid choice as LivePortrait's four 106-point indices per eye);
- width: the mesh points from the highest eyebrow point to UPPER_FACE_BELOW_EYES eye
  distances below the eyes (temples and upper cheeks; InsightFace's 106 points stop at the
  eyebrows, so the forehead is left out as before);
- height: the brows to a chin placed CHIN_BELOW_NOSE eye-to-nose-base heights below the
  nose base (mesh 2). 1.41 puts it where mesh point 152 is on skimage's astronaut (the crop
  matches LivePortrait's there: same size, centre within 2 px); a vertical measure, so a
  turned head (eye distance shrinking) is not zoomed in.

Even these landmarks wobble a little with each syllable (FaceMesh fits all points jointly),
so `crop_transforms` steadies a track's zoom and eye position over about a second
(ZOOM_SIGMA_FRAMES) and follows the eyes and the roll frame by frame. On a still head whose
jaw opens and closes, the crop's zoom then varies by under 1 % (5.7 % per frame with
LivePortrait's box) and the unmasked pixels of open and closed frames differ by under one
level (6.7), tests/test_face.py.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

MESH_POINTS = 468  # 478 with refine_landmarks=True; 468..477 are the irises
RIGHT_EYE_RING = (33, 133, 159, 145)  # subject's right eye: outer, inner, upper lid, lower lid
LEFT_EYE_RING = (362, 263, 386, 374)  # subject's left eye: inner, outer, upper lid, lower lid
MOUTH_CORNERS = (61, 291)
UPPER_FACE_BELOW_EYES = 0.45  # eye distances: temples and upper cheeks, above the nose base
NOSE_BASE = 2  # subnasale
CHIN_BELOW_NOSE = 1.41
ZOOM_SIGMA_FRAMES = 25.0  # about a second: longer than a syllable, shorter than a camera zoom
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
    """(2,3) float64 similarity mapping source pixels to the dsize x dsize aligned crop.

    LivePortrait's box, measured on landmarks the mouth does not move (module docstring):
    the eye line sets the roll, the mesh points from the eyebrows to just below the eyes
    set the width, and the chin is placed CHIN_BELOW_NOSE eye-to-nose-base heights below the
    nose base (a vertical measure, so a turned head, whose eye distance shrinks, is not
    zoomed in)."""
    pts = _check_landmarks(landmarks)
    eye_r, eye_l, _ = eye_lip_anchors(pts)
    ux = eye_l - eye_r  # the subject's left eye is on the image's right when upright
    eye_distance = float(np.linalg.norm(ux))
    ux = ux / eye_distance if eye_distance > 1e-3 else np.array([1.0, 0.0])
    uy = np.array([-ux[1], ux[0]])  # +y runs from the eyes towards the mouth
    axes = np.stack([ux, uy])  # (2, 2): rows are the crop's x and y directions

    eyes = (eye_r + eye_l) / 2
    proj = (pts[:MESH_POINTS] - eyes) @ axes.T  # (468, 2) coordinates along (ux, uy)
    brow_top = proj[list(EYEBROWS), 1].min()
    upper_face = (proj[:, 1] >= brow_top) & (proj[:, 1] <= UPPER_FACE_BELOW_EYES * eye_distance)
    lo = np.array([proj[upper_face, 0].min(), brow_top])
    nose_base = max(proj[NOSE_BASE, 1], 1e-3)
    hi = np.array([proj[upper_face, 0].max(), nose_base * (1.0 + CHIN_BELOW_NOSE)])
    box_mid = (lo + hi) / 2
    size = float((hi - lo).max()) * scale
    center = eyes + axes.T @ box_mid + uy * (vy_ratio * size)  # vx is always 0 in LivePortrait

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


def crop_transforms(track, dsize: int = 256, zoom_sigma_frames: float = ZOOM_SIGMA_FRAMES) -> np.ndarray:
    """(N, 2, 3) float64 affines of a FaceTrack's frames, NaN without a face: crop_transform
    per frame, then steadied within each shot: the zoom and where the eyes sit in the crop are
    smoothed over time (Gaussian, sigma in frames), while the crop follows the eyes and the
    roll frame by frame.

    Even from the upper face, FaceMesh's width estimate swells and shrinks by a few percent
    with every syllable; a crop that zoomed with it would tell Stage 2, through the unmasked
    pixels, how wide the source's mouth is open, and the dub would copy the source's mouth."""
    from .tracker import shots, smooth_runs

    n = len(track.has_face)
    affines = np.full((n, 2, 3), np.nan, dtype=np.float64)
    for i in np.flatnonzero(track.has_face):
        affines[i] = crop_transform(track.landmarks[i], dsize=dsize)
    spans = shots(track.landmarks, track.has_face)
    if zoom_sigma_frames <= 0 or not spans:
        return affines
    face = np.asarray(track.has_face, bool)
    linear = affines[face, :, :2]  # (F, 2, 2) = zoom * rotation
    zoom = np.ones(n)
    zoom[face] = np.sqrt(np.abs(np.linalg.det(linear)))  # crop px per source px
    eyes_src = np.stack([np.mean(eye_lip_anchors(track.landmarks[i])[:2], axis=0) for i in np.flatnonzero(face)])
    eyes_crop = np.zeros((n, 2))
    eyes_crop[face] = (linear @ eyes_src[..., None])[..., 0] + affines[face, :, 2]
    steady_zoom = np.exp(smooth_runs(np.log(zoom), spans, zoom_sigma_frames))
    steady_eyes = smooth_runs(eyes_crop, spans, zoom_sigma_frames)
    # the same roll, the steadied zoom, and the eyes where the steadied crop puts them
    rescaled = (steady_zoom / zoom)[face][:, None, None] * linear
    affines[face, :, :2] = rescaled
    affines[face, :, 2] = steady_eyes[face] - (rescaled @ eyes_src[..., None])[..., 0]
    return affines


def crop_faces(frames, track, dsize: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Crops (N, dsize, dsize, 3) uint8 (zeros without a face) and affines (N, 2, 3) float64
    (NaN without a face, see crop_transforms) for frames and their FaceTrack.

    `frames` is any iterable (a list, or a decoder's generator: one frame in memory at a
    time); it must yield exactly one frame per frame of the track."""
    n = len(track.has_face)
    crops = np.zeros((n, dsize, dsize, 3), dtype=np.uint8)
    affines = crop_transforms(track, dsize)
    count = 0
    for i, frame in enumerate(frames):
        if i >= n:
            raise ValueError(f"face/align.py: more than {n} frames for a track of {n}")
        if track.has_face[i]:
            crops[i] = warp_crop(np.asarray(frame), affines[i], dsize)
        count = i + 1
    if count != n:
        raise ValueError(f"face/align.py: {count} frames but a track of {n}")
    return crops, affines
