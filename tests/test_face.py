"""Face stage: tracking on a moving real face, the aligned crop, the mouth mask, paste-back."""
import cv2
import mediapipe as mp
import numpy as np
import pytest
from skimage import data

from stages.face import (FaceTrack, FaceTracker, MouthMask, crop_faces, crop_transform, crop_transforms,
                         eye_lip_anchors, fill_gaps, paste_back, smooth_landmarks,
                         transform_points, warp_crop)
from stages.face.align import (CHIN_BELOW_NOSE, EYEBROWS, LEFT_EYE_RING, MESH_POINTS, NOSE_BASE, RIGHT_EYE_RING,
                               UPPER_FACE_BELOW_EYES)

ASTRONAUT = data.astronaut()  # 512x512 RGB
FACE_CENTRE = np.array([224.0, 122.0])  # middle of the astronaut's face in the 512 image
LIPS = sorted({i for edge in mp.solutions.face_mesh.FACEMESH_LIPS for i in edge})
EYE_POINTS = list(RIGHT_EYE_RING) + list(LEFT_EYE_RING) + list(range(468, 478))  # + irises
NOSE_TIP = [1, 4]
CHIN = 152


def place(size, scale=1.0, roll_deg=0.0, centre=None, distortion=np.eye(2)):
    """The astronaut warped onto a (w, h) canvas with its face centre at `centre`.
    Returns the frame and the (2,3) astronaut->frame affine."""
    w, h = size
    centre = np.array([w / 2, h / 2]) if centre is None else np.asarray(centre, float)
    linear = cv2.getRotationMatrix2D((0, 0), roll_deg, scale)[:, :2] @ distortion
    M = np.zeros((2, 3))
    M[:, :2] = linear
    M[:, 2] = centre - linear @ FACE_CENTRE
    frame = cv2.warpAffine(ASTRONAUT, M, (w, h), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=(40, 60, 90))
    return frame, M


def sky(size, seed=0):
    """A face-free frame: a blue gradient with mild noise."""
    w, h = size
    rng = np.random.default_rng(seed)
    grad = np.linspace(120, 230, h, dtype=np.float32)[:, None, None]
    frame = np.concatenate([grad * 0.5, grad * 0.7, np.full_like(grad, 240)], axis=2)
    frame = np.broadcast_to(frame, (h, w, 3)) + rng.normal(0, 4, (h, w, 3))
    return np.clip(frame, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tracker():
    with FaceTracker() as t:
        yield t


@pytest.fixture(scope="module")
def astronaut_landmarks(tracker):
    track = tracker([ASTRONAUT])
    assert track.has_face.tolist() == [True]
    return track.landmarks[0].astype(np.float64)


def lip_centre(pts):
    return pts[[13, 14]].mean(0)


def test_tracker_follows_moving_face_and_handles_gaps(tracker, astronaut_landmarks):
    size = (1280, 720)
    frames, affines = [], []
    for t in range(15):
        frame, M = place(size, scale=1.2 + 0.015 * t, roll_deg=4 * np.sin(t / 3),
                         centre=(560 + 6 * t, 380 - 3 * t))
        frames.append(frame)
        affines.append(M)
    frames[5] = np.random.default_rng(1).integers(0, 256, (720, 1280, 3), dtype=np.uint8)
    for i in (9, 10, 11):  # a gap longer than max_gap_frames=2
        frames[i] = sky(size, seed=i)
    track = tracker(frames)

    assert track.landmarks.shape == (15, 478, 2) and track.landmarks.dtype == np.float32
    expected = np.ones(15, bool)
    expected[[9, 10, 11]] = False
    np.testing.assert_array_equal(track.has_face, expected)
    assert track.filled.tolist() == [i == 5 for i in range(15)]
    assert np.isnan(track.landmarks[[9, 10, 11]]).all()
    assert np.isfinite(track.landmarks[track.has_face]).all()

    for i in np.flatnonzero(track.has_face):
        pts = track.landmarks[i]
        truth = transform_points(affines[i], astronaut_landmarks)
        # Where the face was put, independently of the mesh...
        placed_at = transform_points(affines[i], FACE_CENTRE)
        assert np.linalg.norm(pts[:MESH_POINTS].mean(0) - placed_at) < 8
        # ...and the mesh agrees with the mesh of the untouched image carried along, the
        # interpolated frame 5 included.
        assert np.linalg.norm(lip_centre(pts) - lip_centre(truth)) < 3, i
        assert np.linalg.norm(pts - truth, axis=1).mean() < 3, i
    moved = lip_centre(track.landmarks[8]) - lip_centre(track.landmarks[0])
    applied = lip_centre(transform_points(affines[8], astronaut_landmarks)) - \
        lip_centre(transform_points(affines[0], astronaut_landmarks))
    assert np.abs(moved - applied).max() < 3

    crops, crop_affines = crop_faces(frames, track)
    assert crops.shape == (15, 256, 256, 3) and crops.dtype == np.uint8
    assert crop_affines.shape == (15, 2, 3)
    assert (crops[[9, 10, 11]] == 0).all() and np.isnan(crop_affines[[9, 10, 11]]).all()
    np.testing.assert_array_equal(crops[3], warp_crop(frames[3], crop_transforms(track)[3]))
    # the steadied crop keeps each frame's roll; only its zoom and the eyes' place are smoothed
    per_frame = crop_transform(track.landmarks[3])
    cos = lambda M: M[0, 0] / np.hypot(M[0, 0], M[0, 1])
    assert abs(cos(crop_affines[3]) - cos(per_frame)) < 1e-9


def test_tracker_follows_a_cut_without_losing_or_blending_frames(tracker, astronaut_landmarks):
    size = (1280, 720)
    placed = [place(size, scale=1.3, centre=(300 + 2 * t, 360)) for t in range(4)] + \
        [place(size, scale=1.6, roll_deg=-8.0, centre=(950 + 2 * t, 330)) for t in range(4)]
    track = tracker([f for f, _ in placed])
    assert track.has_face.all() and not track.filled.any()
    for i, (_, M) in enumerate(placed):
        truth = transform_points(M, astronaut_landmarks)
        assert np.linalg.norm(track.landmarks[i] - truth, axis=1).mean() < 3, i


def test_tracker_reports_no_face_on_face_free_and_tiny_faces(tracker):
    tiny, _ = place((640, 480), scale=0.25)  # ~25 px face: below the 40 px minimum
    track = tracker([sky((640, 480)), tiny, np.zeros((480, 640, 3), np.uint8)])
    assert not track.has_face.any()
    assert np.isnan(track.landmarks).all()
    assert FaceTrack(track.landmarks, track.has_face).filled.tolist() == [False] * 3


def test_fill_gaps_interpolates_short_gaps_only():
    n = 12
    pts = np.zeros((n, 478, 2))
    pts[:, :, 0] = np.arange(n)[:, None] * 2.0  # x = 2t everywhere
    has = np.ones(n, bool)
    pts[:, :, 1] = np.arange(478)[None, :] * 0.1  # a face 47.7 px tall
    has = np.ones(n, bool)
    has[[0, 4, 5, 8, 9, 10]] = False  # leading gap, gap of 2, gap of 3
    pts[~has] = np.nan
    filled, has_face = fill_gaps(pts, has, max_gap_frames=2)
    assert has_face.tolist() == [False, True, True, True, True, True, True, True,
                                 False, False, False, True]
    np.testing.assert_allclose(filled[[4, 5], 0, 0], [8.0, 10.0])
    assert np.isnan(filled[[0, 8, 9, 10]]).all()

    # Across a cut (the face lands more than its size away) a short gap is not bridged.
    pts[6:] += 100.0
    filled, has_face = fill_gaps(pts, has, max_gap_frames=2)
    assert not has_face[[4, 5]].any() and np.isnan(filled[[4, 5]]).all()


def test_smoothing_reduces_jitter_and_keeps_motion(astronaut_landmarks):
    rng = np.random.default_rng(0)
    n = 60
    static = np.repeat(astronaut_landmarks[None], n, axis=0)
    noisy = static + rng.normal(0, 1.0, static.shape)
    has = np.ones(n, bool)
    smooth = smooth_landmarks(noisy, has, sigma=1.5)
    raw_jitter = np.diff(noisy, axis=0).std()
    smooth_jitter = np.diff(smooth, axis=0).std()
    assert smooth_jitter < 0.35 * raw_jitter
    assert np.abs(smooth - static).mean() < 0.6 * np.abs(noisy - static).mean()

    # A face moving at constant speed is left where it is, run ends included (no lag).
    moving = static + np.arange(n)[:, None, None] * np.array([5.0, -3.0])
    np.testing.assert_allclose(smooth_landmarks(moving, has, 1.5), moving, atol=1e-6)

    # Runs are smoothed separately: a jump across a gap does not leak into either side.
    two_runs = static.copy()
    two_runs[30:] += 200.0
    has_gap = has.copy()
    has_gap[27:30] = False
    two_runs[27:30] = np.nan
    out = smooth_landmarks(two_runs, has_gap, 3.0)
    np.testing.assert_allclose(out[:27], static[:27], atol=1e-6)
    np.testing.assert_allclose(out[30:], static[30:] + 200.0, atol=1e-6)
    assert np.isnan(out[27:30]).all()
    # ...and so is a cut with no gap at all.
    two_runs[27:30] = static[27:30]
    out = smooth_landmarks(two_runs, has, 3.0)
    np.testing.assert_allclose(out[:30], static[:30], atol=1e-6)
    np.testing.assert_allclose(out[30:], static[30:] + 200.0, atol=1e-6)


def test_crop_transform_is_equivariant_and_frames_like_liveportrait(astronaut_landmarks):
    P = astronaut_landmarks
    M = crop_transform(P)
    # Moving the landmarks by any similarity leaves the crop of the face unchanged.
    T = np.zeros((2, 3))
    T[:, :2] = cv2.getRotationMatrix2D((0, 0), 33.0, 1.7)[:, :2]
    T[:, 2] = (400.0, -50.0)
    M_moved = crop_transform(transform_points(T, P))
    np.testing.assert_allclose(transform_points(M_moved, transform_points(T, P)),
                               transform_points(M, P), atol=1e-6)

    # The box is LivePortrait's, from landmarks the mouth does not move: the width of the
    # mesh points from the brows to just below the eyes, the height from the brows to the
    # chin placed CHIN_BELOW_NOSE nose heights below the nose base. Side = dsize/scale,
    # middle at (d/2, d/2 - vy*d), eyes level.
    Q = transform_points(M, P[:MESH_POINTS])
    eye_r, eye_l, _ = (transform_points(M, a) for a in eye_lip_anchors(P))
    assert abs(eye_r[1] - eye_l[1]) < 1e-9
    eyes_y, eye_distance = (eye_r[1] + eye_l[1]) / 2, eye_l[0] - eye_r[0]
    top = Q[list(EYEBROWS), 1].min()
    band = (Q[:, 1] >= top - 1e-9) & (Q[:, 1] <= eyes_y + UPPER_FACE_BELOW_EYES * eye_distance + 1e-9)
    chin = Q[NOSE_BASE, 1] + CHIN_BELOW_NOSE * (Q[NOSE_BASE, 1] - eyes_y)
    lo, hi = np.array([Q[band, 0].min(), top]), np.array([Q[band, 0].max(), chin])
    np.testing.assert_allclose((hi - lo).max(), 256 / 2.3, rtol=1e-9)
    np.testing.assert_allclose((lo + hi) / 2, [128.0, 128.0 + 0.125 * 256], atol=1e-6)
    # and it frames the astronaut as LivePortrait's own box did (chin = mesh point 152): the
    # same size, the centre within 2 px
    below = Q[:, 1] >= top - 1e-9
    lp_lo, lp_hi = Q[below].min(0), Q[below].max(0)
    assert abs((lp_hi - lp_lo).max() / (hi - lo).max() - 1) < 0.02
    assert np.abs((lp_lo + lp_hi) / 2 - (lo + hi) / 2).max() < 2.0
    M512 = crop_transform(P, dsize=512)
    np.testing.assert_allclose(transform_points(M512, P), 2 * transform_points(M, P), atol=1e-6)

    with pytest.raises(ValueError, match="NaN"):
        crop_transform(np.full((478, 2), np.nan))


@pytest.mark.parametrize("roll_deg", [15.0, -15.0])
def test_crop_levels_the_eyes_of_a_rolled_face(tracker, roll_deg):
    upright, _ = place((960, 720))
    rolled, _ = place((960, 720), roll_deg=roll_deg)
    pts_up, pts_rolled = (tracker([f]).landmarks[0] for f in (upright, rolled))
    maps = []
    for pts in (pts_up, pts_rolled):
        M = crop_transform(pts)
        eye_r, eye_l, lip = (transform_points(M, a) for a in eye_lip_anchors(pts))
        assert abs(eye_r[1] - eye_l[1]) < 1.5
        eyes = (eye_r + eye_l) / 2
        assert abs(lip[0] - eyes[0]) < 2 and lip[1] - eyes[1] > 30  # eye->lip is +y
        maps.append(transform_points(M, pts))
    assert np.linalg.norm(maps[0] - maps[1], axis=1).mean() < 2.0


def test_crop_is_scale_invariant(tracker):
    maps, crops = [], []
    for scale in (1.0, 1.5):
        frame, _ = place((1280, 720), scale=scale)
        pts = tracker([frame]).landmarks[0]
        M = crop_transform(pts)
        maps.append(transform_points(M, pts))
        crops.append(warp_crop(frame, M).astype(np.float32))
    assert np.linalg.norm(maps[0] - maps[1], axis=1).mean() < 2.0
    face = MouthMask().array() > 0  # the crops agree where the face is, not just the points
    assert np.abs(crops[0] - crops[1])[face].mean() < 12


@pytest.mark.parametrize("source_px_per_crop_px", [0.6, 3.0])
def test_warp_crop_puts_a_point_where_the_affine_sends_it(source_px_per_crop_px):
    # A Gaussian blob at a known source point must land at M @ point in the crop, on the
    # direct bilinear path (upscaling) and on the supersample + area path (downscaling).
    frame = np.zeros((1200, 1200, 3), np.uint8)
    point = np.array([613.3, 587.6])
    y, x = np.mgrid[0:1200, 0:1200]
    sigma = 6.0 * source_px_per_crop_px
    blob = 250 * np.exp(-((x - point[0]) ** 2 + (y - point[1]) ** 2) / (2 * sigma ** 2))
    frame[..., 1] = blob.astype(np.uint8)
    s = 1 / source_px_per_crop_px
    M = np.array([[s * np.cos(0.3), s * np.sin(0.3), 0], [-s * np.sin(0.3), s * np.cos(0.3), 0]])
    M[:, 2] = np.array([120.4, 131.7]) - M[:, :2] @ point
    crop = warp_crop(frame, M)[..., 1].astype(np.float64)
    yy, xx = np.mgrid[0:256, 0:256]
    centroid = np.array([(crop * xx).sum(), (crop * yy).sum()]) / crop.sum()
    np.testing.assert_allclose(centroid, [120.4, 131.7], atol=0.1)


POSES = [dict(scale=s, roll_deg=r, distortion=np.asarray(d, float))
         for s in (0.75, 2.5) for r in (-15.0, 15.0)
         for d in (np.eye(2), [[0.85, 0], [0, 1]], [[1, 0], [0, 0.88]], [[1, 0.12], [0, 1]])]


def test_mouth_mask_covers_lips_and_spares_eyes_and_nose(tracker):
    mask = MouthMask()
    A = mask.array()
    inner = cv2.erode(A.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0  # >= 2 px inside
    outer = cv2.dilate(A.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0  # >= 2 px away
    for pose in POSES:
        frame, _ = place((1280, 720), **pose)
        track = tracker([frame])
        assert track.has_face[0], pose
        pts = track.landmarks[0]
        q = np.rint(transform_points(crop_transform(pts), pts)).astype(int)
        assert inner[q[LIPS, 1], q[LIPS, 0]].all(), pose
        assert inner[q[CHIN, 1], q[CHIN, 0]], pose
        keep = EYE_POINTS + NOSE_TIP
        assert not outer[q[keep, 1], q[keep, 0]].any(), pose


def test_mouth_mask_apply_and_feather():
    mask = MouthMask()
    A = mask.array()
    assert A.shape == (256, 256) and A.dtype == np.float32 and set(np.unique(A)) == {0.0, 1.0}
    assert 0.08 < A.mean() < 0.2
    crops = np.random.default_rng(0).integers(1, 256, (3, 256, 256, 3), dtype=np.uint8)
    masked = mask.apply(crops)
    assert masked.dtype == np.uint8
    assert (masked[:, A == 1] == 0).all()
    np.testing.assert_array_equal(masked[:, A == 0], crops[:, A == 0])

    # The network's hole runs from the mouth box straight down to the crop's edge (the chin
    # below the box moves with the jaw); the pasted box stops short of it, rounded.
    P = mask.pasted()
    assert (A[P == 1] == 1).all() and (A[-1] == 1).sum() > 100 and (P[-12:] == 0).all()
    assert P[int(0.93 * 256) - 2, int(0.27 * 256) + 2] == 0 and A[int(0.93 * 256) - 2, int(0.27 * 256) + 2] == 1
    np.testing.assert_array_equal(MouthMask(hide_below=False).array(), P)

    blur = 8.0
    F = mask.feathered(blur)
    assert F.shape == (256, 256) and F.dtype == np.float32
    assert (F[P == 1] == 1).all()
    assert F.min() >= 0 and F.max() <= 1
    ramp = (F > 0) & (F < 1)
    assert ramp.sum() > 0 and not (ramp & (P == 1)).any()  # the feather lies outside the box
    assert (F[-1] == 0).all()  # and ends inside the crop: no seam at its edge
    dist = cv2.distanceTransform((P == 0).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    assert (F[dist >= blur] == 0).all() and (F[dist < blur - 1] > 0).all()
    # Smooth: no step between neighbours larger than the raised cosine's steepest slope.
    steepest = np.pi / (2 * blur)
    assert np.abs(np.diff(F, axis=0)).max() < 1.1 * steepest
    assert np.abs(np.diff(F, axis=1)).max() < 1.1 * steepest


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_crop_paste_round_trip(tracker, scale):
    frame, _ = place((1280, 720), scale=scale, roll_deg=10.0)
    M = crop_transform(tracker([frame]).landmarks[0])
    crop = warp_crop(frame, M)
    mask = MouthMask()
    F = mask.feathered(8.0)
    to_frame = cv2.invertAffineTransform(M)
    alpha = cv2.warpAffine(F, to_frame, (1280, 720), flags=cv2.INTER_LINEAR)
    interior = cv2.erode(mask.pasted(), np.ones((9, 9), np.uint8))
    interior = cv2.warpAffine(interior, to_frame, (1280, 720), flags=cv2.INTER_LINEAR) > 0.999
    assert interior.sum() > 1000

    out = paste_back(frame, crop, M, F)
    assert out.dtype == np.uint8 and out.shape == frame.shape and out is not frame
    err = np.abs(out.astype(np.int16) - frame.astype(np.int16))
    assert err[interior].mean() < 3
    np.testing.assert_array_equal(out[alpha == 0], frame[alpha == 0])

    # A generated crop really replaces the mask's inside.
    painted = crop.copy()
    painted[:] = (255, 0, 128)
    out = paste_back(frame, painted, M, F)
    assert (out[interior] == (255, 0, 128)).all()
    np.testing.assert_array_equal(out[alpha == 0], frame[alpha == 0])


def test_paste_back_without_a_face_returns_the_frame():
    frame = sky((320, 240))
    crop = np.full((256, 256, 3), 255, np.uint8)
    out = paste_back(frame, crop, np.full((2, 3), np.nan), MouthMask().feathered(8.0))
    np.testing.assert_array_equal(out, frame)
    assert out is not frame


def test_tracking_and_cropping_a_stream_equals_the_list_and_holds_few_frames(tracker):
    """track_and_crop over two generator passes: the same track, crops and affines as the
    list of frames, with an interpolated frame and a real gap in the clip; and the frames
    a pass has moved past are freed (a 4K segment held whole would be gigabytes)."""
    import weakref

    from stages.face import track_and_crop

    size = (640, 480)
    def frame_at(t):
        if t == 4:
            return np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8)
        if t in (8, 9, 10):
            return sky(size, seed=t)
        return place(size, scale=0.8 + 0.01 * t, roll_deg=3 * np.sin(t / 3), centre=(300 + 4 * t, 250 - 2 * t))[0]

    n = 14
    listed = [frame_at(t) for t in range(n)]
    track = tracker(listed)
    crops, affines = crop_faces(listed, track)
    assert track.has_face.sum() == n - 3 and track.filled[4]  # the clip has both kinds of gap

    most_alive = []

    def stream():
        alive = []
        for t in range(n):
            frame = frame_at(t)
            alive.append(weakref.ref(frame))
            most_alive.append(sum(ref() is not None for ref in alive))
            yield frame
            del frame

    streamed, streamed_crops, streamed_affines = track_and_crop(tracker, stream)
    np.testing.assert_array_equal(streamed.landmarks, track.landmarks)
    np.testing.assert_array_equal(streamed.has_face, track.has_face)
    np.testing.assert_array_equal(streamed.filled, track.filled)
    np.testing.assert_array_equal(streamed_crops, crops)
    np.testing.assert_array_equal(streamed_affines, affines)
    assert len(most_alive) == 2 * n and max(most_alive) <= 2


def test_cropping_refuses_a_stream_of_another_length(tracker):
    frames = [place((320, 240), scale=0.5)[0] for _ in range(3)]
    track = tracker(frames)
    with pytest.raises(ValueError, match="2 frames but a track of 3"):
        crop_faces(iter(frames[:2]), track)
    with pytest.raises(ValueError, match="more than 3 frames"):
        crop_faces(iter(frames + frames[:1]), track)


def test_the_crop_does_not_follow_the_mouth(tracker):
    # A still head whose jaw opens and closes every few frames (the synthetic speaker's warp
    # of the real mouth): the crop must hold still, or Stage 2 could read the mouth's state
    # from the unmasked pixels (the crop zooming out as the chin drops) instead of from the
    # motion it is given, and the dub would copy the source's mouth.
    from stages.synth.speaker import SpeakerIdentity, render_frame

    identity = SpeakerIdentity.from_seed(0, 0)
    jaw = np.tile([0.0, 0.0, 0.5, 1.0, 1.0, 0.5], 5)
    frames = [render_frame(None, identity, j, 0.5, 0.0, size=(480, 360)) for j in jaw]
    track = tracker(frames)
    assert track.has_face.all()
    crops, affines = crop_faces(frames, track)
    zoom = np.sqrt(np.abs(np.linalg.det(affines[:, :, :2])))
    assert np.ptp(zoom) / zoom.mean() < 0.015  # LivePortrait's box, per frame: 5.7 %
    per_frame = np.array([crop_transform(p) for p in track.landmarks])
    per_frame_zoom = np.sqrt(np.abs(np.linalg.det(per_frame[:, :, :2])))
    assert np.ptp(per_frame_zoom) / per_frame_zoom.mean() < 0.04
    # outside the mask (2 px clear of it) the open and the closed frames' crops agree
    outside = cv2.dilate(MouthMask().array().astype(np.uint8), np.ones((5, 5), np.uint8)) == 0
    diff = np.abs(crops[jaw == 1.0].astype(np.float32).mean(0) - crops[jaw == 0.0].astype(np.float32).mean(0))
    assert diff[outside].mean() < 1.5  # LivePortrait's box: 6.7 levels
    # and inside it the mouth is what changed
    assert diff[MouthMask().array() > 0].mean() > 3 * diff[outside].mean()
