"""One chunk of a training video, prepared: the paper's per-frame training data.

A chunk is a few seconds of a video on a 25 fps timeline (sources at other rates are
resampled, as the paper processes every video at 25 fps). Per frame it holds:

- the 256² LivePortrait-aligned face crop, stored as JPEG (quality 95 by default; PNG is
  lossless) -- the motion below is extracted from the *stored* crop after decoding, so
  what a training step reads is exactly what the motion describes;
- the motion extractor's outputs: x_c, exp (δ), R, t, scale, pose in degrees;
- the two 50 Hz HuBERT rows that fall in the frame's 40 ms (`audio`, (n, 2, D));
- `has_face` (the tracker found a face) and `shot`: the clip a frame belongs to. Frames
  that must not be trained on (no face, a face smaller than `min_face_px`, turned further
  than `max_abs_yaw_deg`, past the end of the audio) get shot -1; a new shot id starts
  after every such frame and at every scene cut (the 25 fps index of the shot's first
  frame), so a clip sampled inside one shot never crosses a cut or a face-absent span.

Per chunk it also returns what the driver needs without reading the frames again: the
best neutral-frame candidate (most frontal, mouth closed) and sums of δ and x_c over the
usable frames, from which the corpus card's per-keypoint statistics follow exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import cv2
import numpy as np

from stages.face import crop_faces
from stages.media.decode import iter_at_rate
from stages.motion.extractor import extract_motion
from stages.motion.selection import dark_lip_gap, mouth_opening, neutral_score

CROP_SIZE = 256
# LivePortrait's crop (scale 2.3) makes the face 1/2.3 of the crop wide.
FACE_WIDTH_IN_CROP = CROP_SIZE / 2.3


@dataclass(frozen=True)
class ChunkSettings:
    crop_format: str = "jpeg"  # or "png" (lossless)
    jpeg_quality: int = 95
    min_face_px: float = 64.0  # face width in source pixels
    max_abs_yaw_deg: float = 45.0
    cut_threshold: float = 30.0  # mean absolute grey-level change (0-255) of 32² thumbnails


def encode_crop(crop: np.ndarray, settings: ChunkSettings) -> bytes:
    bgr = cv2.cvtColor(crop, cv2.COLOR_RGB2BGR)
    if settings.crop_format == "png":
        ok, data = cv2.imencode(".png", bgr)
    else:
        ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(settings.jpeg_quality)])
    if not ok:
        raise ValueError(f"could not encode a crop as {settings.crop_format}")
    return data.tobytes()


def decode_crop(data: bytes) -> np.ndarray:
    """(256, 256, 3) uint8 RGB from a stored crop; zeros for an empty (no-face) entry."""
    if not data:
        return np.zeros((CROP_SIZE, CROP_SIZE, 3), np.uint8)
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("corrupt stored crop")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def cut_thumbnail(frame: np.ndarray) -> np.ndarray:
    """(32, 32) float32 grey thumbnail of an RGB frame, what scene_cuts compares."""
    return cv2.resize(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)


def scene_cuts(thumbnails: list[np.ndarray], threshold: float) -> np.ndarray:
    """(n,) bool, True where frame i starts a new scene: the mean absolute change of its
    cut_thumbnail from frame i-1's exceeds `threshold`. Talking heads move a few grey
    levels per frame; a cut changes most pixels by tens."""
    cuts = np.zeros(len(thumbnails), bool)
    for i in range(1, len(thumbnails)):
        cuts[i] = float(np.abs(thumbnails[i] - thumbnails[i - 1]).mean()) > threshold
    return cuts


def shot_ids(usable: np.ndarray, cuts: np.ndarray, first: int = 0) -> np.ndarray:
    """(n,) int32: -1 where not usable, else the 25 fps index (counting from `first`) of the
    frame that starts the frame's shot: a new id after every unusable frame and at every
    cut, unique within the video."""
    shot = np.full(len(usable), -1, np.int32)
    current, previous_usable = -1, False
    for i in range(len(usable)):
        if usable[i]:
            if not previous_usable or cuts[i]:
                current = first + i
            shot[i] = current
        previous_usable = bool(usable[i])
    return shot


class CorpusChunkStage:
    """Constructor holds the face tracker and the motion extractor; `__call__` prepares one chunk."""

    def __init__(self, tracker, extractor, settings: ChunkSettings = ChunkSettings(), batch_frames: int = 32,
                 threads: int | None = None):
        self.tracker = tracker
        self.extractor = extractor.eval()
        self.settings = settings
        self.batch_frames = batch_frames
        self.threads = threads  # decoder threads (None: FFmpeg's count from the node's cores)

    def __call__(
        self,
        source,  # path or seekable file of the video
        source_fps: Fraction,
        source_frames: int,
        first: int,  # chunk = 25 fps frames [first, stop)
        stop: int,
        audio_50hz: np.ndarray,  # (2 * (stop - first), D): HuBERT rows of the chunk, zeros past the audio
        audio_frames: int,  # 25 fps frames the audio covers
    ) -> dict:
        s = self.settings
        n = stop - first
        if audio_50hz.shape[0] != 2 * n:
            raise ValueError(f"chunk [{first}, {stop}): {audio_50hz.shape[0]} audio rows for {n} frames (want {2 * n})")
        # Two decodes (landmarks, then crops and cut thumbnails), one frame in memory at a
        # time: a whole chunk of 4K frames would be gigabytes.
        thumbnails: list[np.ndarray] = []
        dark_gap = np.full(n, np.nan, np.float32)  # the pixels' mouth opening, for the neutral choice

        def frames(second_pass: bool = False):
            for i, frame in enumerate(iter_at_rate(source, first, stop, source_fps, source_frames, threads=self.threads)):
                if second_pass:
                    thumbnails.append(cut_thumbnail(frame))
                    if i < n and track.has_face[i]:
                        dark_gap[i] = dark_lip_gap(frame, track.landmarks[i])
                yield frame

        track = self.tracker(frames())
        crops, affines = crop_faces(frames(second_pass=True), track, CROP_SIZE)
        if len(crops) != n:
            raise ValueError(f"chunk [{first}, {stop}): the second decode gave {len(crops)} frames, want {n}")
        has_face = track.has_face.astype(bool)
        # Encode, then decode: the stored crop is what training reads and what M sees.
        stored = [encode_crop(crops[i], s) if has_face[i] else b"" for i in range(n)]
        crops = np.stack([decode_crop(b) for b in stored]) if n else crops
        motion = {k: np.zeros((n, *shape), np.float32) for k, shape in
                  (("x_c", (21, 3)), ("exp", (21, 3)), ("R", (3, 3)), ("t", (3,)), ("scale", (1,)), ("pose", (3,)))}
        face = np.flatnonzero(has_face)
        if len(face):
            m = extract_motion(self.extractor, crops[face], batch_size=self.batch_frames)
            for key in ("x_c", "exp", "R", "t", "scale"):
                motion[key][face] = m[key]
            motion["pose"][face] = np.stack([m["pitch"], m["yaw"], m["roll"]], axis=-1)
        opening = np.full(n, np.nan, np.float32)
        opening[face] = mouth_opening(track.landmarks[face])
        # Face width in source pixels, from the crop affine's scale.
        with np.errstate(invalid="ignore"):
            crop_px_per_source_px = np.sqrt(np.abs(np.linalg.det(affines[:, :, :2])))
        face_px = np.where(has_face, FACE_WIDTH_IN_CROP / np.where(has_face, crop_px_per_source_px, 1.0), 0.0)
        small = has_face & (face_px < s.min_face_px)
        turned = has_face & (np.abs(motion["pose"][:, 1]) > s.max_abs_yaw_deg)
        silent = np.arange(first, stop) >= audio_frames
        usable = has_face & ~small & ~turned & ~silent
        shot = shot_ids(usable, scene_cuts(thumbnails, s.cut_threshold), first)

        neutral = None
        if usable.any():
            scores = np.where(usable, neutral_score(motion["pose"], opening, dark_gap), np.inf)
            best = int(np.argmin(scores))
            neutral = {"frame": first + best, "score": float(scores[best]), "x_c": motion["x_c"][best],
                       "exp": motion["exp"][best], "crop": stored[best]}
        u = usable
        return {
            "n": n,
            "crops": stored,
            "has_face": has_face,
            "shot": shot,
            **motion,
            "mouth_open": opening,
            "audio": audio_50hz.reshape(n, 2, -1).astype(np.float32),
            "counts": {"frames": n, "face": int(has_face.sum()), "usable": int(u.sum()), "small": int(small.sum()),
                       "turned": int(turned.sum()), "silent": int((has_face & silent).sum())},
            "sums": {"exp": motion["exp"][u].sum(0), "exp2": (motion["exp"][u].astype(np.float64) ** 2).sum(0),
                     "x_c": motion["x_c"][u].sum(0), "x_c2": (motion["x_c"][u].astype(np.float64) ** 2).sum(0),
                     "n": int(u.sum())},
            "neutral": neutral,
        }
