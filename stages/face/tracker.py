"""Face detection, tracking and temporal smoothing with mediapipe (BlazeFace + 478-point mesh).

Why a region of interest: mediapipe's FaceMesh finds faces with the short-range BlazeFace
on the whole image shrunk to 128 px, so in a 1280x720 frame it misses faces narrower than
~200 px and in 1920x1080 nearly everything but close-ups (measured on the astronaut face).
So we detect once with the full-range BlazeFace (192 px input, finds ~50 px faces in 640x480
and ~100 px faces in 1080p), cut a square region three face-widths wide around it, resize it
to `roi_px`, and run FaceMesh in video mode on that region, letting mediapipe track from
frame to frame. The region stays put while the face stays near its centre; when the face
drifts or changes size we re-centre it and reset FaceMesh, because mediapipe's tracked
rectangle is in region coordinates and would point at the wrong place after a move.
When tracking loses the face we detect again on the same frame, so a cut costs no frame.
Which face is tracked when there are several is the FaceTracker docstring's subject.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import correlate1d

from .align import MESH_POINTS, warp_crop

NUM_LANDMARKS = 478


@dataclass
class FaceTrack:
    landmarks: np.ndarray  # (N, 478, 2) float32 source-frame pixels, NaN rows where no face
    has_face: np.ndarray  # (N,) bool
    filled: np.ndarray | None = None  # (N,) bool: interpolated across a short detection gap

    def __post_init__(self):
        if self.filled is None:
            self.filled = np.zeros(len(self.has_face), dtype=bool)

    def __len__(self) -> int:
        return len(self.has_face)


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) index pairs of the runs of True in a 1-D bool array."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def jumped(before: np.ndarray, after: np.ndarray) -> bool:
    """True when the face's centre moved by more than the face's size: a cut or another
    person, not motion (a head crossing its own width in one frame is not plausible)."""
    size = np.ptp(before[:MESH_POINTS], axis=0).max()
    return bool(np.linalg.norm(after[:MESH_POINTS].mean(0) - before[:MESH_POINTS].mean(0)) > size)


def shots(landmarks: np.ndarray, has_face: np.ndarray) -> list[tuple[int, int]]:
    """Runs of frames with a face, also split where the face jumps between two frames."""
    out = []
    for start, stop in runs(has_face):
        for i in range(start + 1, stop):
            if jumped(landmarks[i - 1], landmarks[i]):
                out.append((start, i))
                start = i
        out.append((start, stop))
    return out


def fill_gaps(landmarks: np.ndarray, has_face: np.ndarray, max_gap_frames: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """Linearly interpolate gaps of <= max_gap_frames between two detected frames.

    A blink of the detector (motion blur, a hand passing) should not make the mouth pop back
    to the original for one frame; a longer gap is a real absence and stays "no face". Gaps
    at the start or end of the clip have only one side and are not filled, and neither are
    gaps across which the face jumps by more than its own size (a cut, another person):
    the frames between would get a face where there is none.
    """
    landmarks = landmarks.copy()
    has_face = has_face.copy()
    for start, stop in runs(~has_face):
        if start == 0 or stop == len(has_face) or stop - start > max_gap_frames:
            continue
        before, after = landmarks[start - 1], landmarks[stop]
        if jumped(before, after):
            continue
        t = (np.arange(start, stop) - (start - 1)) / (stop - (start - 1))
        landmarks[start:stop] = before + t[:, None, None] * (after - before)
        has_face[start:stop] = True
    return landmarks, has_face


def smooth_landmarks(landmarks: np.ndarray, has_face: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-smooth landmark trajectories over time, separately within each run of frames
    with a face.

    MuseTalk tracks nothing and smooths nothing, and its users report high-frequency mouth
    jitter (MuseTalk #190, #11): per-frame landmarks wobble by a pixel or two, the crop
    affine wobbles with them, and the generated mouth, pasted back through that affine,
    shimmers. Smoothing the landmarks steadies the crop. Runs are smoothed separately, and
    split where the face jumps (a cut), so a face is never dragged across a gap or a cut.

    The smoother is a Gaussian-weighted local linear fit: inside a run it equals the plain
    Gaussian average; at run ends a plain (renormalised) average sees one side only and
    lags a moving face (by 6 px at 6 px/frame, measured on the tracker test clip), which
    the linear term removes.
    """
    if sigma <= 0:
        return landmarks.copy()
    return smooth_runs(landmarks, shots(landmarks, has_face), sigma)


def smooth_runs(series: np.ndarray, spans: list[tuple[int, int]], sigma: float) -> np.ndarray:
    """`series` (N, ...) with each [start, stop) span Gaussian-smoothed over time on its own
    (the local linear fit of smooth_landmarks); entries outside the spans are kept."""
    out = series.copy()
    if sigma <= 0:
        return out
    radius = int(np.ceil(3 * sigma))
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)  # tau - t
    w = np.exp(-0.5 * (offsets / sigma) ** 2)
    extra = (None,) * (series.ndim - 1)
    for start, stop in spans:
        seg = series[start:stop].astype(np.float64)  # (T, ...)
        ones = np.ones(stop - start)
        s0, s1, s2 = (correlate1d(ones, w * offsets ** p, mode="constant") for p in range(3))
        t0 = correlate1d(seg, w, axis=0, mode="constant")
        t1 = correlate1d(seg, w * offsets, axis=0, mode="constant")
        s0, s1, s2, det = (a[(slice(None), *extra)] for a in (s0, s1, s2, s0 * s2 - s1 ** 2))
        ok = det > 1e-9 * s0 ** 2  # det is 0 only for a one-frame run: keep the plain average
        fit = (s2 * t0 - s1 * t1) / np.where(ok, det, 1.0)
        out[start:stop] = np.where(ok, fit, t0 / s0)
    return out


class FaceTracker:
    """Landmarks for a clip of RGB frames. Builds mediapipe graphs once; not thread-safe,
    one per worker. Each call is a new clip: tracking state starts fresh, so one tracker
    serves any number of segments or videos (building the graphs costs ~1 s here).

    Which face: without an identity, the largest detection (the single-face behaviour).
    With one (a signature from stages.face.identity, decided once per video), every
    (re)acquisition -- the clip's first frame, after a lost track, after a jump -- meshes
    each detected face and takes the one whose signature matches it, never simply the
    largest; when none matches, the frame has no face (it passes through undubbed).
    Between acquisitions the track's continuity keeps the person: FaceMesh may see several
    faces in the region (MAX_MESH_FACES) and we follow the one nearest where ours was; a
    mesh that jumps by more than the face's size, or whose signature has drifted beyond
    IDENTITY_KEEP_FACTOR times the bound (a cut to someone framed alike), is dropped and
    the face re-acquired."""

    MAX_MESH_FACES = 3  # faces FaceMesh reports in a region: a neighbour must not displace ours
    IDENTITY_KEEP_FACTOR = 1.5  # a tracked face stays ours up to this times the acquisition bound

    def __init__(self, min_detection_confidence: float = 0.5, min_tracking_confidence: float = 0.5,
                 smoothing_sigma_frames: float = 1.5, max_gap_frames: int = 2,
                 min_face_px: float = 40.0, roi_px: int = 512, roi_face_widths: float = 3.0,
                 tiled_detection: bool = True, identity_max_distance: float = 1.0):
        import mediapipe as mp

        self.smoothing_sigma_frames = smoothing_sigma_frames
        self.max_gap_frames = max_gap_frames
        self.min_face_px = min_face_px
        self.roi_px = roi_px
        self.roi_face_widths = roi_face_widths
        self.tiled_detection = tiled_detection
        self.identity_max_distance = identity_max_distance
        # model_selection=1: full-range BlazeFace, the one that still sees small faces in HD.
        self._detector = mp.solutions.face_detection.FaceDetection(
            model_selection=1, min_detection_confidence=min_detection_confidence)
        self._mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=False, max_num_faces=self.MAX_MESH_FACES, refine_landmarks=True,
            min_detection_confidence=min_detection_confidence,
            min_tracking_confidence=min_tracking_confidence)
        self._roi = None  # (centre x, centre y, side) in frame pixels
        self._prev = None  # (478, 2) landmarks of the last tracked frame, None after a loss
        self._identity = None  # (SIGNATURE_SIZE,) signature of the person to follow, or None

    def close(self):
        for graph in (self._detector, self._mesh):
            if graph is not None:
                graph.close()
        self._detector = self._mesh = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __call__(self, frames, identity: np.ndarray | None = None) -> FaceTrack:
        """Track a clip: `frames` is any iterable of HxWx3 uint8 RGB frames (a list, or a
        decoder's generator). Frames are consumed one at a time and only their landmarks
        are kept, so a streamed clip costs one frame of memory, not the clip; smoothing
        then runs over the whole clip's landmarks. `identity`: the signature of the person
        to track (stages.face.identity.face_signature); None takes the largest face."""
        if self._mesh is None:
            raise RuntimeError("face/tracker.py: FaceTracker used after close()")
        empty = np.full((NUM_LANDMARKS, 2), np.nan, dtype=np.float64)
        rows = []
        self._identity = None if identity is None else np.asarray(identity, dtype=np.float32)
        self._lose_track()
        for i, frame in enumerate(frames):
            frame = np.asarray(frame)
            if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
                raise ValueError(f"face/tracker.py: frame {i} must be HxWx3 uint8 RGB, "
                                 f"got {frame.shape} {frame.dtype}")
            pts = self._track_frame(np.ascontiguousarray(frame))
            rows.append(empty if pts is None else pts)
        raw = np.stack(rows) if rows else np.empty((0, NUM_LANDMARKS, 2), dtype=np.float64)
        detected = np.isfinite(raw).all(axis=(1, 2))
        filled_pts, has_face = fill_gaps(raw, detected, self.max_gap_frames)
        smooth = smooth_landmarks(filled_pts, has_face, self.smoothing_sigma_frames)
        return FaceTrack(landmarks=smooth.astype(np.float32), has_face=has_face,
                         filled=has_face & ~detected)

    def faces(self, frame: np.ndarray) -> list[np.ndarray]:
        """Every face in one frame: (478, 2) frame-pixel landmarks each, one per person
        (the analyse stage's view of a sampled frame, which then decides who is dubbed)."""
        if self._mesh is None:
            raise RuntimeError("face/tracker.py: FaceTracker used after close()")
        frame = np.ascontiguousarray(frame)
        found = self._meshes(frame, self._detections(frame, tiles=True))
        self._lose_track()
        return found

    def _meshes(self, frame: np.ndarray, detections, skip=()) -> list[np.ndarray]:
        """A fresh mesh per distinct face among `detections`, none for a face in `skip`
        (landmarks of faces already meshed). Overlapping detections (tiles, or two boxes on
        one face) are meshed once."""
        found, seen = [], list(skip)
        for cx, cy, side in detections:
            if any(np.linalg.norm(np.array([cx, cy]) - f[:MESH_POINTS].mean(0)) < 0.5 * side for f in seen):
                continue
            pts = self._mesh_of_detection(frame, cx, cy, side)
            if pts is None:
                continue
            centre, extent = pts[:MESH_POINTS].mean(0), np.ptp(pts[:MESH_POINTS], axis=0).max()
            if all(np.linalg.norm(centre - f[:MESH_POINTS].mean(0)) > 0.5 * extent for f in seen):
                found.append(pts)
                seen.append(pts)
        return found

    def _lose_track(self):
        self._roi = None
        self._prev = None
        self._mesh.reset()

    def _detections(self, frame: np.ndarray, tiles: bool = False) -> list[tuple[float, float, float]]:
        """(centre x, centre y, box side) of every BlazeFace detection of at least
        min_face_px, largest first; `tiles`: search the tiles even when the whole frame
        found a face (a small face beside a large one, e.g. 60 px next to 300 px in 720p,
        is missed on the whole frame). Overlapping tiles may report one face twice.

        The full-range model sees the frame at 192 px, so faces under ~100 px in 1080p or
        ~70 px in 720p are missed on the whole frame; when that finds nothing we look again
        in square tiles of the short side's size (overlapping by >= 1/4), where the same
        face is 1.5-2x larger to the model.
        """
        faces = self._faces_in(frame, 0, 0)
        if (tiles or not faces) and self.tiled_detection:
            h, w = frame.shape[:2]
            tile = min(h, w)
            count = int(np.ceil((max(h, w) - tile) / (0.75 * tile))) + 1
            for start in np.linspace(0, max(h, w) - tile, count).round().astype(int):
                y0, x0 = (start, 0) if h > w else (0, start)
                faces += self._faces_in(frame[y0:y0 + tile, x0:x0 + tile], x0, y0)
        faces = [f for f in faces if f[2] >= self.min_face_px]
        return sorted(faces, key=lambda f: -f[2])

    def _faces_in(self, image: np.ndarray, x0: int, y0: int) -> list[tuple[float, float, float]]:
        """(centre x, centre y, box side) in frame pixels of every detection in image."""
        result = self._detector.process(np.ascontiguousarray(image))
        h, w = image.shape[:2]
        faces = []
        for det in result.detections or []:
            box = det.location_data.relative_bounding_box
            faces.append((x0 + (box.xmin + box.width / 2) * w, y0 + (box.ymin + box.height / 2) * h,
                          max(box.width * w, box.height * h)))
        return faces

    def _mesh_of_detection(self, frame: np.ndarray, cx: float, cy: float, side: float):
        """Fresh mesh of the face detected at (cx, cy), or None when the mesh found in its
        region is somebody else (its centre off the detection box) or nothing."""
        self._mesh.reset()
        roi = (cx, cy, side * self.roi_face_widths)
        pts = self._mesh_at(frame, roi, np.array([cx, cy]))
        if pts is None or np.abs(pts[:MESH_POINTS].mean(0) - (cx, cy)).max() > 0.5 * side:
            return None
        return pts

    def _acquire(self, frame: np.ndarray):
        """Start a track on this frame: the largest face, or the face matching the identity."""
        from .identity import face_signature, signature_distance

        detections = self._detections(frame)
        if self._identity is None:
            if not detections:
                return None
            cx, cy, side = detections[0]  # LivePortrait also takes the largest
            self._roi = (cx, cy, side * self.roi_face_widths)
            self._mesh.reset()
            return self._follow(frame)
        best, best_d = None, self.identity_max_distance
        tried = self._meshes(frame, detections)
        for pts in tried:
            d = signature_distance(face_signature(frame, pts), self._identity)
            if d < best_d:
                best, best_d = pts, d
        if best is None and detections and self.tiled_detection:
            # Our person may be a small face the whole-frame search missed beside larger ones.
            for pts in self._meshes(frame, self._detections(frame, tiles=True), skip=tried):
                d = signature_distance(face_signature(frame, pts), self._identity)
                if d < best_d:
                    best, best_d = pts, d
        self._lose_track()  # the mesh graph's state is that of the last face tried
        if best is None:
            return None
        mesh = best[:MESH_POINTS]
        centre = mesh.mean(0)
        self._roi = (centre[0], centre[1], float(np.ptp(mesh, axis=0).max()) * self.roi_face_widths)
        self._prev = best
        return best

    def _track_frame(self, frame: np.ndarray):
        # A tracked face that is lost (a cut, a jump) gets one fresh acquisition on the same
        # frame, so a cut costs no frame.
        if self._roi is not None:
            pts = self._follow(frame)
            if pts is not None:
                return pts
        return self._acquire(frame)

    def _follow(self, frame: np.ndarray):
        """Mesh of the tracked face in the current region; None (and the track lost) when
        it is gone or jumped (a cut, or FaceMesh settling on someone else)."""
        cx, cy, side = self._roi
        expect = self._prev[:MESH_POINTS].mean(0) if self._prev is not None else np.array([cx, cy])
        pts = self._mesh_at(frame, self._roi, expect)
        if pts is None or (self._prev is not None and jumped(self._prev, pts)) or not self._still_ours(frame, pts):
            self._lose_track()
            return None
        mesh = pts[:MESH_POINTS]
        extent = float(np.ptp(mesh, axis=0).max())
        centre = mesh.mean(0)
        # Keep the region while the face sits near its centre at about 1/3 of its width.
        ratio = extent / side
        if np.abs(centre - (cx, cy)).max() > 0.12 * side or not 0.22 <= ratio <= 0.5:
            self._roi = (centre[0], centre[1], extent * self.roi_face_widths)
            self._mesh.reset()
        self._prev = pts
        return pts

    def _still_ours(self, frame: np.ndarray, pts: np.ndarray) -> bool:
        """Whether a tracked face is still the identity's (always, without one).

        Continuity alone misses a cut between two people framed alike (shot/reverse-shot):
        FaceMesh keeps tracking at the same place and size. So every tracked frame is
        checked too (under 1 ms against 10-30 ms of mesh), with a looser bound than acquisition's
        (IDENTITY_KEEP_FACTOR) so that blur or a turn of the head does not drop our person
        while another person, far beyond it, is dropped at once."""
        if self._identity is None:
            return True
        from .identity import face_signature, signature_distance

        limit = self.identity_max_distance * self.IDENTITY_KEEP_FACTOR
        return signature_distance(face_signature(frame, pts), self._identity) < limit

    def _mesh_at(self, frame: np.ndarray, roi: tuple[float, float, float], expect: np.ndarray):
        """(478, 2) frame-pixel landmarks of the mesh face nearest `expect` in the region,
        or None when there is none or it is not a usable face."""
        cx, cy, side = roi
        scale = self.roi_px / side
        to_roi = np.array([[scale, 0, self.roi_px / 2 - scale * cx],
                           [0, scale, self.roi_px / 2 - scale * cy]])
        result = self._mesh.process(warp_crop(frame, to_roi, self.roi_px))
        if not result.multi_face_landmarks:
            return None
        candidates = []
        for face in result.multi_face_landmarks:
            pts = np.array([(p.x, p.y) for p in face.landmark], dtype=np.float64) * self.roi_px
            candidates.append((pts - to_roi[:, 2]) / scale)  # region -> frame pixels
        pts = min(candidates, key=lambda c: np.linalg.norm(c[:MESH_POINTS].mean(0) - expect))

        h, w = frame.shape[:2]
        mesh = pts[:MESH_POINTS]
        extent = float(np.ptp(mesh, axis=0).max())
        centre = mesh.mean(0)
        inside = 0 <= centre[0] < w and 0 <= centre[1] < h
        if pts.shape != (NUM_LANDMARKS, 2) or not np.all(np.isfinite(pts)) or not inside \
                or extent < self.min_face_px:
            return None
        return pts
