"""Who is dubbed: a face signature, the per-row choice of person, and matching faces to it.

Why a home-made signature: no face-recognition weights exist on the machines this runs on
and none may be fetched (cv2.FaceRecognizerSF needs the SFace ONNX file; cv2.face's LBPH
needs no weights but must be trained per person on aligned grey crops, which is what the
appearance half below does by hand, in a form we can average and compare in one line).
So a signature is built from what mediapipe already gives us, and only from parts of the
face the dub never changes (no lips, no jaw, no chin):

- geometry (GEOMETRY_POINTS, 2 x 19 numbers): the eye corners, eyebrows, nose bridge, nose
  tip and nostril wings, and the face outline at cheek/temple level, in a frame where the
  eye centres sit at (-0.5, 0) and (0.5, 0) (translation, roll and scale removed). Ratios
  such as brow height, nose length and face width over eye distance differ between people.
- appearance (APPEARANCE_BINS numbers): a 12x6 hue-saturation histogram and a 10-bin
  uniform-LBP texture histogram (uniform_lbp_histogram) of the upper-face patch (brows to the nose tip, cheek to
  cheek), warped so the eyes land on fixed pixels: skin tone, brows, eyes, glasses.

`signature_distance` is the mean of the two halves' distances, each divided by a scale
(GEOMETRY_SCALE, APPEARANCE_SCALE); FaceConfig.identity_max_distance (1.0) is the match
threshold. Measured on tests/test_identity.py's video (H.264, face widths 55-105 px, a few
pixels of sway; "another person" is the astronaut stretched 1.25 x 0.9 and darkened), every
third frame against each person's frame-0 look: one person at most 0.35 (parts: geometry
0.35, appearance 0.39), the two people at least 1.85 (parts 1.53 and 2.06). The scales sit
between, leaving room for pose and lighting that these frames do not show; they are a
first calibration, not a measured operating point on real footage. Cost: under 1 ms a
face (patch warp 0.3 ms, histograms 0.4 ms), against 10-30 ms of FaceMesh per frame.

Limits (why this is a stopgap, not a recogniser): yaw and pitch move the 2-D geometry (a
profile does not match its frontal look), lighting and grading move the colour histogram,
relatives and look-alikes may match, and a face seen only in profile or smaller than ~40 px
carries little signal. The tracker therefore chooses by signature only when it (re)acquires
a face; while tracking, continuity decides and the signature is held to a looser bound
(FaceTracker.IDENTITY_KEEP_FACTOR) that only a different person exceeds. A real embedding plugs in at
`face_signature` / `signature_distance`: an ArcFace or SFace ONNX model run (cv2.dnn or
onnxruntime) on `crop_transform`'s aligned crop gives a 512-d vector whose cosine
distance replaces this one (and SIGNATURE_SIZE its size); nothing else changes (the row
carries whatever array `face_signature` returns, and the threshold moves to the model's own).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import cv2
import numpy as np

from .align import LEFT_EYE_RING, MESH_POINTS, RIGHT_EYE_RING

# Mesh points that speech does not move: eye corners (33, 133, 362, 263), brows (70, 105,
# 107, 336, 334, 300), nose bridge/top (168, 6), nose tip (1), nostril wings (98, 327), the
# outline at cheekbone/temple level (234, 454, 127, 356).
GEOMETRY_POINTS = (33, 133, 362, 263, 70, 105, 107, 336, 334, 300, 168, 6, 1, 98, 327, 234, 454, 127, 356)
GEOMETRY_SIZE = 2 * len(GEOMETRY_POINTS)
HUE_BINS, SAT_BINS, LBP_BINS = 12, 6, 10
APPEARANCE_BINS = HUE_BINS * SAT_BINS + LBP_BINS
SIGNATURE_SIZE = GEOMETRY_SIZE + APPEARANCE_BINS
# Upper-face patch: eyes at (PATCH_EYE_X[0], PATCH_EYE_Y) and (PATCH_EYE_X[1], PATCH_EYE_Y);
# 64 px between the eyes, 26 px above them (brows) and 54 px below (to ~0.85 eye distances,
# above the upper lip, so the dubbed mouth never enters the signature).
PATCH_W, PATCH_H = 128, 80
PATCH_EYE_X, PATCH_EYE_Y = (32.0, 96.0), 26.0
# Distances at which one person's looks end and two people begin (module docstring).
GEOMETRY_SCALE = 0.04  # RMS point distance in eye-distance units
APPEARANCE_SCALE = 0.2  # Hellinger distance of the histograms, mean of the two


def _eye_centres(pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return pts[list(RIGHT_EYE_RING)].mean(0), pts[list(LEFT_EYE_RING)].mean(0)


def _eye_frame(pts: np.ndarray) -> np.ndarray:
    """(2, 3) similarity taking the image-left eye centre to (-0.5, 0), the other to (0.5, 0)."""
    a, b = _eye_centres(pts)
    d = b - a
    dist = max(float(np.hypot(*d)), 1e-6)
    c, s = d / dist
    rot = np.array([[c, s], [-s, c]]) / dist  # rotates the eye line onto +x, unit eye distance
    M = np.zeros((2, 3))
    M[:, :2] = rot
    M[:, 2] = -rot @ ((a + b) / 2)
    return M


def geometry_signature(landmarks: np.ndarray) -> np.ndarray:
    """(GEOMETRY_SIZE,) float32: the stable points in eye-centre coordinates."""
    pts = np.asarray(landmarks, dtype=np.float64)
    M = _eye_frame(pts)
    sel = pts[list(GEOMETRY_POINTS)]
    return (sel @ M[:, :2].T + M[:, 2]).astype(np.float32).ravel()


def upper_face_patch(frame: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """(PATCH_H, PATCH_W, 3) uint8 eye-aligned patch of brows, eyes, cheeks and nose."""
    pts = np.asarray(landmarks, dtype=np.float64)
    a, b = _eye_centres(pts)
    # Third point one eye distance up the face from the first eye (image y points down, so
    # (dx, dy) -> (dy, -dx) turns the eye line towards the forehead), like dst's third.
    src = np.float32([a, b, a + np.array([[0, 1], [-1, 0]]) @ (b - a)])
    span = PATCH_EYE_X[1] - PATCH_EYE_X[0]
    dst = np.float32([[PATCH_EYE_X[0], PATCH_EYE_Y], [PATCH_EYE_X[1], PATCH_EYE_Y],
                      [PATCH_EYE_X[0], PATCH_EYE_Y - span]])
    M = cv2.getAffineTransform(src, dst)
    return cv2.warpAffine(np.ascontiguousarray(frame), M, (PATCH_W, PATCH_H), flags=cv2.INTER_AREA,
                          borderMode=cv2.BORDER_REPLICATE)


def _uniform_lbp_table() -> np.ndarray:
    """(256,) bin of each 8-bit LBP code: its number of set bits when the circular pattern
    changes at most twice ("uniform": edges, corners, flat spots), else LBP_BINS - 1."""
    codes = np.arange(256)
    bits = (codes[:, None] >> np.arange(8)) & 1  # (256, 8)
    changes = np.sum(bits != np.roll(bits, 1, axis=1), axis=1)
    return np.where(changes <= 2, bits.sum(1), LBP_BINS - 1)


_LBP_BIN = _uniform_lbp_table()
# The 8 neighbours at radius 1, in circular order (dy, dx).
_LBP_RING = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))


def uniform_lbp_histogram(grey: np.ndarray) -> np.ndarray:
    """(LBP_BINS,) counts of the uniform 8-neighbour LBP codes of a 2-D image's inner pixels
    (skimage's local_binary_pattern(P=8, R=1, "uniform") with the diagonal neighbours taken
    at the pixel grid instead of interpolated; a tenth of its time, which is paid on every
    tracked frame)."""
    g = grey.astype(np.int16)
    h, w = g.shape
    centre = g[1:-1, 1:-1]
    code = np.zeros(centre.shape, np.uint8)
    for bit, (dy, dx) in enumerate(_LBP_RING):
        code |= (g[1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx] >= centre).astype(np.uint8) << bit
    return np.bincount(_LBP_BIN[code.ravel()], minlength=LBP_BINS).astype(np.float64)


def appearance_signature(patch: np.ndarray) -> np.ndarray:
    """(APPEARANCE_BINS,) float32: hue-saturation histogram (sums to 1) then uniform-LBP
    histogram (sums to 1) of an upper-face patch."""
    hsv = cv2.cvtColor(patch, cv2.COLOR_RGB2HSV)
    hs = cv2.calcHist([hsv], [0, 1], None, [HUE_BINS, SAT_BINS], [0, 180, 0, 256]).ravel()
    tex = uniform_lbp_histogram(cv2.cvtColor(patch, cv2.COLOR_RGB2GRAY))
    return np.concatenate([hs / max(hs.sum(), 1e-9), tex / max(tex.sum(), 1e-9)]).astype(np.float32)


def face_signature(frame: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """(SIGNATURE_SIZE,) float32 signature of the face with these (478, 2) landmarks in frame."""
    return np.concatenate([geometry_signature(landmarks),
                           appearance_signature(upper_face_patch(frame, landmarks))])


def _hellinger(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.sqrt(max(0.0, 1.0 - np.sum(np.sqrt(np.clip(p, 0, None) * np.clip(q, 0, None))))))


def signature_parts(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(geometry, appearance) distances, each in units of its scale (1 = the boundary)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != (SIGNATURE_SIZE,) or b.shape != (SIGNATURE_SIZE,):
        raise ValueError(f"face/identity.py: signatures must be ({SIGNATURE_SIZE},), got {a.shape} and {b.shape}")
    g = float(np.sqrt(np.mean((a[:GEOMETRY_SIZE] - b[:GEOMETRY_SIZE]) ** 2)))
    h = HUE_BINS * SAT_BINS
    app = (_hellinger(a[GEOMETRY_SIZE:GEOMETRY_SIZE + h], b[GEOMETRY_SIZE:GEOMETRY_SIZE + h])
           + _hellinger(a[GEOMETRY_SIZE + h:], b[GEOMETRY_SIZE + h:])) / 2
    return g / GEOMETRY_SCALE, app / APPEARANCE_SCALE


def signature_distance(a: np.ndarray, b: np.ndarray) -> float:
    """>= 0; below FaceConfig.identity_max_distance (1.0) means the same person."""
    g, app = signature_parts(a, b)
    return (g + app) / 2


def mean_signature(signatures) -> np.ndarray:
    """The average look of one person over several frames (every part is a mean-able
    vector: coordinates and normalised histograms)."""
    return np.mean(np.stack([np.asarray(s, np.float32) for s in signatures]), axis=0).astype(np.float32)


# --------------------------------------------------------------------------- who is dubbed


@dataclass(frozen=True)
class FaceChoice:
    """The manifest's per-row `face` option: "largest", "center", or a box at a time."""

    mode: str  # "largest" | "center" | "box"
    box: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1 source-frame pixels
    t: float = 0.0  # seconds (mode "box")

    @classmethod
    def parse(cls, value) -> "FaceChoice":
        """From the row's string ("largest", "center", or the box option as JSON) or the
        option itself."""
        if isinstance(value, str):
            if value in ("", "largest", "center"):
                return cls(value or "largest")
            value = json.loads(value)
        if isinstance(value, dict) and "box" in value:
            x0, y0, x1, y1 = (float(v) for v in value["box"])
            return cls("box", (x0, y0, x1, y1), float(value.get("t", 0.0)))
        raise ValueError(f"face option must be 'largest', 'center' or {{'box': [x0, y0, x1, y1], 't': s}}, got {value!r}")


def face_box(landmarks: np.ndarray) -> np.ndarray:
    """(4,) x0, y0, x1, y1 of the face mesh in frame pixels."""
    mesh = np.asarray(landmarks)[:MESH_POINTS]
    return np.concatenate([mesh.min(0), mesh.max(0)])


def _area(box: np.ndarray) -> float:
    return float(max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1]))


def box_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two x0, y0, x1, y1 boxes."""
    inter = _area(np.array([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])]))
    union = _area(np.asarray(a)) + _area(np.asarray(b)) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class SampledFace:
    """One face found in one sampled frame."""

    frame: int  # position in the sampled frames
    landmarks: np.ndarray  # (478, 2) frame pixels
    signature: np.ndarray  # (SIGNATURE_SIZE,)


def group_people(faces: list[SampledFace], max_distance: float) -> list[list[SampledFace]]:
    """Faces of the sampled frames grouped into people: greedily, frame by frame, each face
    joins the nearest group (by its mean signature) that is within max_distance and has no
    face in that frame yet (one person is in a frame once), else starts a group."""
    groups: list[list[SampledFace]] = []
    for face in sorted(faces, key=lambda f: f.frame):
        best, best_d = None, max_distance
        for group in groups:
            if any(g.frame == face.frame for g in group):
                continue
            d = signature_distance(face.signature, mean_signature([g.signature for g in group]))
            if d < best_d:
                best, best_d = group, d
        if best is None:
            groups.append([face])
        else:
            best.append(face)
    return groups


def choose_person(groups: list[list[SampledFace]], choice: FaceChoice, frame_size: tuple[int, int]
                  ) -> list[SampledFace] | None:
    """The group to dub for "largest" or "center" (None when there is no face at all).

    largest: the person whose face covers most of the picture summed over the sampled
    frames (the main speaker, not whoever is biggest in one frame). center: the person
    whose face is nearest the frame centre on most sampled frames (ties: the larger total)."""
    if not groups:
        return None
    areas = [sum(_area(face_box(f.landmarks)) for f in g) for g in groups]
    if choice.mode == "largest":
        return groups[int(np.argmax(areas))]
    if choice.mode != "center":
        raise ValueError(f"choose_person decides 'largest' or 'center', not {choice.mode!r}")
    w, h = frame_size
    centre = np.array([w / 2, h / 2])
    nearest: dict[int, tuple[float, int]] = {}  # sampled frame -> (distance, group)
    for gi, g in enumerate(groups):
        for f in g:
            box = face_box(f.landmarks)
            d = float(np.linalg.norm((box[:2] + box[2:]) / 2 - centre))
            if f.frame not in nearest or d < nearest[f.frame][0]:
                nearest[f.frame] = (d, gi)
    wins = np.bincount([gi for _, gi in nearest.values()], minlength=len(groups))
    return groups[int(np.lexsort((-np.array(areas), -wins))[0])]


def face_in_box(faces: list[np.ndarray], box: tuple[float, float, float, float]) -> int | None:
    """Index of the face (landmarks) the box names: its centre inside the box, the largest
    overlap with it; None when no face centre lies inside."""
    box = np.asarray(box, dtype=np.float64)
    best, best_iou = None, -1.0
    for i, lm in enumerate(faces):
        fb = face_box(lm)
        cx, cy = (fb[:2] + fb[2:]) / 2
        if box[0] <= cx <= box[2] and box[1] <= cy <= box[3]:
            iou = box_overlap(fb, box)
            if iou > best_iou:
                best, best_iou = i, iou
    return best


def best_match(signatures: list[np.ndarray], identity: np.ndarray, max_distance: float) -> int | None:
    """Index of the signature nearest `identity` if within max_distance, else None."""
    if not signatures:
        return None
    d = [signature_distance(s, identity) for s in signatures]
    i = int(np.argmin(d))
    return i if d[i] < max_distance else None
