"""SyncNet's lip-sync figures (offset, LSE-D, LSE-C) of one video file: the quality check the
dub job runs on every output before committing it (pipeline/dub/qc.py). Ray-free.

What syncnet_python's run_pipeline.py + SyncNetInstance do, with the project's pieces:

1. Time: the reference re-encodes to 25 fps (`ffmpeg -r 25`) because SyncNet pairs 5
   frames with 20 MFCC columns (0.2 s each). Here the video is read at the 25 fps time
   points t_k = k / 25 s, k < round(25 * duration), each taking the nearest source frame
   (index round(t_k * fps), the one ffmpeg's frame-rate conversion keeps), turned upright
   (the stream's display rotation).
2. Faces: FaceMesh landmarks per frame through the project's FaceTracker (default: no
   temporal smoothing, no gap filling, so each frame is its own detection), a square box
   around the mesh (stages.eval.syncnet.face_boxes_from_landmarks); a frame without a face
   carries the box of the nearest frame with one (the reference would cut the track);
   boxes median-filtered over 13 frames (smooth_boxes, as run_pipeline.py); 224x224 BGR
   crops with the reference's geometry (syncnet_face_crops).
3. Audio: the project's loader (stages.audio.load.load_audio: any container, 16 kHz mono
   float, sample j at j / 16000 s on the container clock).
4. Score: SyncNetScorer.score(crops, wave, fps=25).

The video is decoded twice (landmarks, then crops) so that only 250 full frames and the
224x224 crops (150 KB per 25 fps frame, ~220 MB a minute) are held at once.

Returns None when there is nothing to score: no face in any frame, or fewer than six
usable 25 fps frames (SyncNet needs one 5-frame window).
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Iterator

import numpy as np

FPS = 25
_CHUNK_FRAMES = 250  # full frames held at once


def sample_indices(n_frames: int, fps: Fraction) -> np.ndarray:
    """Source frame index for each 25 fps time point k / 25 s of a video of `n_frames` at
    `fps`: the nearest frame, round(k * fps / 25) (halves up), within [0, n_frames)."""
    fps = Fraction(fps)
    if n_frames <= 0 or fps <= 0:
        return np.zeros(0, dtype=np.int64)
    n25 = int(math.floor(Fraction(n_frames) / fps * FPS + Fraction(1, 2)))
    idx = [math.floor(Fraction(k) * fps / FPS + Fraction(1, 2)) for k in range(n25)]
    return np.minimum(np.array(idx, dtype=np.int64), n_frames - 1)


def _frames_at(video_path: str, indices: np.ndarray, rotation: int) -> Iterator[np.ndarray]:
    """The upright RGB frame at each of `indices` (non-decreasing), decoding once."""
    from stages.media import decode_frames

    if len(indices) == 0:
        return
    k = 0
    for i, frame in decode_frames(video_path, 0, int(indices[-1]) + 1):
        while k < len(indices) and indices[k] == i:
            yield np.ascontiguousarray(np.rot90(frame, k=rotation // 90)) if rotation else frame
            k += 1
        if k == len(indices):
            return


def _chunks(frames: Iterator[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    chunk = []
    for frame in frames:
        chunk.append(frame)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def nearest_face_boxes(boxes: np.ndarray) -> np.ndarray | None:
    """(n, 4) boxes with NaN rows (no face) -> every NaN row replaced by the box of the
    nearest row with a face (the earlier one on a tie); None when no row has a face."""
    boxes = np.asarray(boxes, dtype=np.float64)
    found = np.flatnonzero(np.isfinite(boxes).all(axis=1))
    if len(found) == 0:
        return None
    t = np.arange(len(boxes))
    after = np.clip(np.searchsorted(found, t), 0, len(found) - 1)
    before = np.clip(after - 1, 0, len(found) - 1)
    use_before = np.abs(t - found[before]) <= np.abs(found[after] - t)
    return boxes[np.where(use_before, found[before], found[after])]


def sync_score_video(video_path: str, audio_path: str, scorer, tracker=None, identity=None):
    """SyncNet's SyncScore (offset, min_dist = LSE-D, conf = LSE-C) of the local video file
    `video_path` with the audio of `audio_path` (a local file: audio or any container with
    an audio stream, e.g. the same video file); None when no frame has a face or the clip
    is too short to score.

    scorer: a stages.eval.syncnet.SyncNetScorer. tracker: a FaceTracker to reuse (used as
    configured); without one a FaceTracker with no smoothing and no gap filling is built
    and closed here. identity: the signature (stages.face.identity) of the person to score;
    None scores the largest face."""
    from stages.audio.load import load_audio
    from stages.eval.syncnet import (
        BOX_MEDFILT,
        WINDOW_FRAMES,
        face_boxes_from_landmarks,
        num_sync_windows,
        smooth_boxes,
        syncnet_face_crops,
    )
    from stages.face.tracker import FaceTracker
    from stages.media import probe_video

    info = probe_video(video_path)
    indices = sample_indices(info.n_frames, Fraction(info.fps))
    wave = load_audio(audio_path)
    if num_sync_windows(len(indices), len(wave)) < 1 or len(indices) <= WINDOW_FRAMES:
        return None

    own = tracker is None
    if own:
        tracker = FaceTracker(smoothing_sigma_frames=0.0, max_gap_frames=0)
    try:
        boxes = []
        for chunk in _chunks(_frames_at(video_path, indices, info.rotation), _CHUNK_FRAMES):
            track = tracker(chunk, identity=identity)
            lm = np.where(np.asarray(track.has_face, bool)[:, None, None], track.landmarks, np.nan)
            boxes.append(face_boxes_from_landmarks(lm))
    finally:
        if own:
            tracker.close()
    filled = nearest_face_boxes(np.concatenate(boxes)) if boxes else None
    if filled is None:
        return None
    # The reference's 13-frame median; on a shorter clip the longest odd window that fits,
    # so real boxes outnumber medfilt's zero padding in every window.
    filled = smooth_boxes(filled, kernel_size=min(BOX_MEDFILT, len(filled) - (1 - len(filled) % 2)))

    crops = np.empty((len(indices), 224, 224, 3), dtype=np.uint8)
    done = 0
    for chunk in _chunks(_frames_at(video_path, indices, info.rotation), _CHUNK_FRAMES):
        crops[done:done + len(chunk)] = syncnet_face_crops(np.stack(chunk), filled[done:done + len(chunk)])
        done += len(chunk)
    if done != len(indices):  # the stream ended early: score what was read
        crops = crops[:done]
        if num_sync_windows(done, len(wave)) < 1:
            return None
    return scorer.score(crops, wave, fps=float(FPS))
