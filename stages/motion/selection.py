"""Per-video choices made before any segment is rendered: the neutral frame (Stage 1's
silent-state embedding) and a bank of reference frames (Stage 2's appearance source),
and per target frame, which reference to use.

Neutral frame (paper, "Datasets"): the frame whose head pose is closest to frontal and
whose mouth is closed. Pose comes from the motion extractor; mouth opening from the face
mesh (inner-lip gap over mouth width), which is an explicit, detector-independent signal,
and from the pixels: the mesh can put both inner-lip points inside a dark gap between
parted lips and read them as closed (on the synthetic held-out videos it read lips 3 pixels
apart, jaw 0.14, as more closed than pressed ones), while the dark band on the lips'
centre line is that gap (`dark_lip_gap`).

A closed mouth is not yet a neutral one: lips pressed together for a "b", "m" or "p"
read as more closed than lips at rest, and the score above picks them (on the 640x480
held-out synthetic videos it chose a bilabial closure inside speech for 6 of 8 speakers;
pasted into the silent frames, such a mouth measured 0.35-2.46 times the speaker's closed
median, a mouth at rest 0.84-1.09). A mouth at rest stays as it is for a while, so the
neutral frame is taken among the sampled frames whose mouth opening hardly changes over
the frames around them (`mouth_spread` below STILL_MOUTH_SPREAD), where any are. Reading
the frames around costs a seek and a few face meshes per sampled frame, so the candidates
are read in the order of their score, the best STILL_CANDIDATES at most, and the first at
rest is the neutral frame.

Reference frames: MuseTalk uses the target frame itself as its reference at inference,
so the original mouth leaks into the output. We pick references from *other* frames with
a similar head pose, and never one within `min_gap_frames` of the target.

Whose frames: only the dubbed person's. With two people in the video, a neutral frame of
the other one would give Stage 1 their x_c, and farthest-point sampling in pose space
favours exactly the other person's faces (they are the most different poses), so RSCA
would copy their lips and teeth. The caller (the analyse stage) passes the crops of the
chosen person (stages/face/identity.py) and `has_face` False for every sampled frame that
person is not in, even when somebody else is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

# Face-mesh indices: inner lips (upper 13, lower 14) and mouth corners (61, 291).
MESH_UPPER_INNER_LIP, MESH_LOWER_INNER_LIP = 13, 14
MESH_MOUTH_LEFT, MESH_MOUTH_RIGHT = 61, 291
# Outer lip contour at the centre: top of the upper lip (0), bottom of the lower lip (17).
MESH_UPPER_LIP_TOP, MESH_LOWER_LIP_BOTTOM = 0, 17
# A pixel on the lips' centre line darker than this share of the line's bright lip
# (75th percentile) is mouth cavity. Measured on four held-out synthetic videos: the darkest
# pixel of a pressed mouth is at least 0.61 of it, of a mouth open by 1-3 pixels 0.16-0.46.
DARK_GAP_SHARE = 0.5
# A mouth at rest: its opening (inner-lip gap over mouth width) moves by less than this
# across the frames 80 ms either side. Measured on the 640x480 held-out synthetic videos
# (two frames either side at 25 fps): at most 0.006 in silence, at least 0.013 in speech
# but for one frame in 128 (0.002, lips held shut for a bilabial).
STILL_MOUTH_SPREAD = 0.01
# How many of the best-scored sampled frames are checked for a mouth at rest (of 24 sampled;
# on the 24 held-out source videos, at both sizes, this picks what checking all 24 did).
STILL_CANDIDATES = 8


class NoFaceError(ValueError):
    pass


def mouth_opening(landmarks: np.ndarray) -> np.ndarray:
    """(N, 478, 2) mesh landmarks -> (N,) inner-lip gap / mouth width (0 = closed). NaN without a face."""
    gap = np.linalg.norm(landmarks[:, MESH_UPPER_INNER_LIP] - landmarks[:, MESH_LOWER_INNER_LIP], axis=-1)
    width = np.linalg.norm(landmarks[:, MESH_MOUTH_LEFT] - landmarks[:, MESH_MOUTH_RIGHT], axis=-1)
    return gap / np.maximum(width, 1e-6)


def dark_lip_gap(image: np.ndarray, landmarks: np.ndarray) -> float:
    """One (H, W, 3) uint8 image and its (478, 2) mesh landmarks in its pixels -> the height
    of the dark band on the lips' centre line (mesh 0 to 17) over the mouth width: 0 for
    lips that touch, about the gap for parted ones, whatever the mesh reads. NaN without a
    face (NaN landmarks)."""
    top, bottom = landmarks[MESH_UPPER_LIP_TOP], landmarks[MESH_LOWER_LIP_BOTTOM]
    width = float(np.linalg.norm(landmarks[MESH_MOUTH_LEFT] - landmarks[MESH_MOUTH_RIGHT]))
    length = float(np.linalg.norm(bottom - top))
    if not (np.isfinite(length) and np.isfinite(width)) or width < 1e-6:
        return float("nan")
    n = max(16, int(np.ceil(4 * length)))  # a quarter pixel apart
    t = np.linspace(0.0, 1.0, n)[:, None]
    points = top[None] * (1 - t) + bottom[None] * t  # (n, 2) x, y
    # Only the patch around the line is turned grey (a 4K frame is 8 million pixels).
    size = np.array(image.shape[1::-1])  # (W, H), as points are (x, y)
    lo = np.clip(np.floor(points.min(0)) - 1, 0, size - 1).astype(int)
    hi = np.maximum(np.clip(np.ceil(points.max(0)) + 2, 0, size), lo + 1).astype(int)
    grey = cv2.cvtColor(np.ascontiguousarray(image[lo[1]:hi[1], lo[0]:hi[0]]), cv2.COLOR_RGB2GRAY)
    local = (points - lo).astype(np.float32)
    line = cv2.remap(grey, local[:, :1].copy(), local[:, 1:].copy(), cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)[:, 0].astype(np.float32)  # (n,)
    dark = line < DARK_GAP_SHARE * np.percentile(line, 75)
    return float(dark.mean() * length / width)


def mouth_spread(centre: np.ndarray, neighbours: list[list[np.ndarray]]) -> float:
    """How much one face's mouth opening moves around a frame: `centre` (478, 2) its mesh
    there, `neighbours` the meshes of every face found in each nearby frame. In each
    nearby frame the face nearest the centre one (mean landmark distance, within one mouth
    width) is the same face; the spread is the largest minus the smallest mouth_opening
    over them and the centre. NaN when no nearby frame has the face."""
    width = float(np.linalg.norm(centre[MESH_MOUTH_LEFT] - centre[MESH_MOUTH_RIGHT]))
    openings = [float(mouth_opening(centre[None])[0])]
    for faces in neighbours:
        if not faces:
            continue
        distance = [float(np.linalg.norm(f[:MESH_MOUTH_RIGHT + 1] - centre[:MESH_MOUTH_RIGHT + 1], axis=-1).mean())
                    for f in faces]
        nearest = int(np.argmin(distance))
        if distance[nearest] <= width:
            openings.append(float(mouth_opening(faces[nearest][None])[0]))
    return max(openings) - min(openings) if len(openings) > 1 else float("nan")


def neutral_score(pose: np.ndarray, opening: np.ndarray, dark_gap: np.ndarray | None = None) -> np.ndarray:
    """(N,) lower = better neutral frame: distance from a frontal pose plus mouth opening.
    15 degrees off-frontal costs as much as a mouth open by 10% of its width; an unknown
    opening (NaN) counts as wide open. With `dark_gap` (N,) the opening is the larger of
    the mesh's and the pixels' (`dark_lip_gap`; NaN there defers to the mesh): the pixels
    can only add to the mesh's reading, so where they mislead (a dark lip line, a moustache,
    lips as dark as the mouth) they cost every frame alike or nothing."""
    frontal = np.linalg.norm(pose, axis=-1) / 15.0
    opening = np.nan_to_num(opening, nan=1.0)
    if dark_gap is not None:
        opening = np.maximum(opening, np.nan_to_num(dark_gap, nan=0.0))
    return frontal + opening / 0.10


@dataclass
class VideoAnalysis:
    neutral_frame: int
    neutral_x_c: np.ndarray  # (21, 3)
    neutral_exp: np.ndarray  # (21, 3)
    ref_frames: np.ndarray  # (R,) source frame indices
    ref_crops: np.ndarray  # (R, 256, 256, 3) uint8
    ref_pose: np.ndarray  # (R, 3) pitch, yaw, roll in degrees
    sampled_face_fraction: float


def select_neutral_and_references(
    frame_indices: np.ndarray,
    crops: np.ndarray,
    has_face: np.ndarray,
    opening: np.ndarray,
    motion: dict[str, np.ndarray],
    bank_size: int,
    dark_gap: np.ndarray | None = None,
    spread_of: Callable[[int], float] | None = None,
) -> VideoAnalysis:
    """Choose from sampled frames. `crops` (S, 256, 256, 3) are the dubbed person's faces,
    `has_face` (S,) True only where that person is present (never another person's face);
    `motion` is extract_motion's output for `crops`; `opening` and `dark_gap` (S,) are the
    mesh's and the pixels' mouth opening (neutral_score); `spread_of(k)` sampled frame k's
    mouth_spread (NaN: unknown), asked of the STILL_CANDIDATES best-scored frames in turn:
    the first whose mouth is at rest is the neutral frame, else the best-scored one."""
    idx = np.flatnonzero(has_face)
    if len(idx) == 0:
        raise NoFaceError("the dubbed person's face is in no sampled frame")
    pose = np.stack([motion["pitch"], motion["yaw"], motion["roll"]], axis=-1)  # (S, 3)
    gap = None if dark_gap is None else dark_gap[idx]
    ranked = idx[np.argsort(neutral_score(pose[idx], opening[idx], gap), kind="stable")]
    neutral = ranked[0]
    if spread_of is not None:
        neutral = next((k for k in ranked[:STILL_CANDIDATES] if spread_of(int(k)) < STILL_MOUTH_SPREAD), neutral)

    # Bank: greedy farthest-point sampling in pose space, starting at the neutral frame,
    # so the bank covers the poses the video visits.
    chosen = [neutral]
    while len(chosen) < min(bank_size, len(idx)):
        dist = np.min(np.linalg.norm(pose[idx][:, None] - pose[chosen][None], axis=-1), axis=1)
        dist[np.isin(idx, chosen)] = -1
        # Ties (e.g. a static video) are broken by distance in time, to spread the bank out.
        time_gap = np.min(np.abs(frame_indices[idx][:, None] - frame_indices[chosen][None]), axis=1)
        chosen.append(idx[int(np.lexsort((-time_gap, -dist))[0])])
    chosen = np.array(chosen)
    return VideoAnalysis(
        neutral_frame=int(frame_indices[neutral]),
        neutral_x_c=motion["x_c"][neutral].astype(np.float32),
        neutral_exp=motion["exp"][neutral].astype(np.float32),
        ref_frames=frame_indices[chosen].astype(np.int64),
        ref_crops=crops[chosen],
        ref_pose=pose[chosen].astype(np.float32),
        sampled_face_fraction=float(len(idx) / len(has_face)),
    )


def choose_references(
    target_frames: np.ndarray, target_pose: np.ndarray, ref_frames: np.ndarray, ref_pose: np.ndarray, min_gap_frames: int
) -> np.ndarray:
    """(N,) index into the bank for each target: the most similar pose among references at
    least `min_gap_frames` away in time; if none is that far, the farthest in time."""
    dist = np.linalg.norm(target_pose[:, None] - ref_pose[None], axis=-1)  # (N, R)
    gap = np.abs(target_frames[:, None] - ref_frames[None])  # (N, R)
    allowed = gap >= min_gap_frames
    masked = np.where(allowed, dist, np.inf)
    choice = np.argmin(masked, axis=1)
    none_allowed = ~allowed.any(axis=1)
    choice[none_allowed] = np.argmax(gap[none_allowed], axis=1)
    return choice.astype(np.int64)
