"""Track and crop a clip that is decoded twice rather than held in memory.

A 4-s segment is 0.6 GB of RGB frames at 1080p25 and 3 GB at 2160p30, while everything the
later stages need from it is 256² crops (20 MB) and landmarks. Cropping needs the smoothed
track, and smoothing needs every frame's landmarks, so the clip is read twice: pass 1
streams frames through detection and keeps only landmarks, pass 2 streams them again
through the crop. Both passes see the same frames in the same order, so crops, affines and
has_face equal those of tracking and cropping a list of the clip's frames.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from .align import crop_faces
from .tracker import FaceTrack


def track_and_crop(tracker, open_frames: Callable[[], Iterable[np.ndarray]], dsize: int = 256,
                   identity: np.ndarray | None = None) -> tuple[FaceTrack, np.ndarray, np.ndarray]:
    """(track, crops (N, dsize, dsize, 3) uint8, affines (N, 2, 3) float64) of a clip.

    `tracker` is a FaceTracker; `open_frames()` starts a fresh pass over the clip's HxWx3
    uint8 RGB frames (e.g. a new decode of the segment) and is called twice. A second pass
    that yields a different number of frames raises ValueError. `identity`: the signature of
    the person to track (the video's, from the analyse stage); None takes the largest face.
    """
    track = tracker(open_frames(), identity=identity)
    crops, affines = crop_faces(open_frames(), track, dsize)
    return track, crops, affines
