"""The right face (issue 11): one person is dubbed throughout a two-person video.

The video (480x270, 25 fps, 30 frames, H.264): person A, skimage's astronaut, on the left;
person B on the right, the astronaut stretched 1.25 x 0.9 (other face proportions) and
darkened (other skin tone), because skimage holds no second real face and a plainly
mirrored or scaled astronaut is the same face to any signature. A is the larger face in
frames 0-14 and B the larger in 15-29 (the legacy "largest face at every re-detection"
switches to B there), A leaves the picture in frames 24-27, both sway a few pixels. A is
the person the default `largest` option chooses (more face area over the video); B is
nearer the frame centre.
"""
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest
from skimage import data

from pipeline.config import JobConfig
from pipeline.dub.rows import new_row, pack, unpack
from pipeline.dub.schemas import ManifestRow
from stages.face import FaceTracker
from stages.face.identity import FaceChoice, face_signature, signature_distance
from stages.media import frame_to_rgb
from stages.media.encode import encode_frames

W, H = 480, 270
FPS = Fraction(25)
N = 30
SPLIT_X = 215  # columns left of it show A, right of it B
A_ABSENT = range(24, 28)  # longer than max_gap_frames: a real absence
SEGMENTS = [(0, 10), (10, 20), (20, 30)]
ASTRONAUT = data.astronaut()
FACE_CENTRE = np.array([224.0, 122.0])  # the astronaut's face in its 512 image
A_X, B_X = 0.27 * W, 0.64 * W


def _place(image, scale, centre, distortion=np.eye(2)):
    M = np.zeros((2, 3))
    M[:, :2] = scale * distortion
    M[:, 2] = np.asarray(centre) - M[:, :2] @ FACE_CENTRE
    return cv2.warpAffine(image, M, (W, H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=(40, 60, 90))


def _other_person(image):
    f = image.astype(np.float32)
    return np.clip(np.stack([f[..., 0] * 0.62, f[..., 1] * 0.52, f[..., 2] * 0.48 + 20], -1), 0, 255).astype(np.uint8)


B_LOOK = _other_person(ASTRONAUT)
B_SHAPE = np.diag([1.25, 0.9])


def render(i: int) -> np.ndarray:
    a_scale, b_scale = (1.0, 0.5) if i < 15 else (0.6, 0.8)
    sway = 3 * np.sin(i / 4)
    left = _place(ASTRONAUT, a_scale, (A_X + sway, H / 2))
    right = _place(B_LOOK, b_scale, (B_X - sway, H / 2), B_SHAPE)
    frame = right.copy()
    if i not in A_ABSENT:
        frame[:, :SPLIT_X] = left[:, :SPLIT_X]
    else:
        frame[:, :SPLIT_X] = (40, 60, 90)
    return frame


def read_all(path):
    with av.open(path) as container:
        return np.stack([frame_to_rgb(f) for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("two") / "two_people.mp4")
    assert encode_frames(path, (render(i) for i in range(N)), W, H, FPS, crf=16, preset="veryfast") == N
    return {"path": path, "frames": read_all(path)}


@pytest.fixture(scope="module")
def tracker():
    with FaceTracker() as t:
        yield t


@pytest.fixture(scope="module")
def looks(video, tracker):
    """Each person's signature in frame 0 (both present, A larger)."""
    frame = video["frames"][0]
    faces = tracker.faces(frame)
    assert len(faces) == 2  # the premise: mediapipe finds both people
    by_side = {("A" if lm[:468, 0].mean() < SPLIT_X else "B"): face_signature(frame, lm) for lm in faces}
    assert set(by_side) == {"A", "B"}
    return by_side


def who(signature, looks) -> str:
    return min("AB", key=lambda p: signature_distance(signature, looks[p]))


def test_signature_matches_one_person_at_other_sizes_and_tells_the_two_apart(video, tracker, looks):
    assert signature_distance(looks["A"], looks["B"]) > 1.0
    frame = video["frames"][20]  # second half: A smaller, B larger than in frame 0
    for lm in tracker.faces(frame):
        person = "A" if lm[:468, 0].mean() < SPLIT_X else "B"
        other = "B" if person == "A" else "A"
        sig = face_signature(frame, lm)
        assert signature_distance(sig, looks[person]) < 0.5
        assert signature_distance(sig, looks[other]) > 1.0


def test_a_small_chosen_face_beside_a_large_one_is_found_and_tracked(tracker, looks):
    """720p: A at ~55 px beside B at ~300 px. The whole-frame detector sees only B; the
    tracker, looking for A, searches the tiles too, and never settles for B."""
    w, h = 1280, 720

    def place(image, scale, centre, distortion=np.eye(2)):
        M = np.zeros((2, 3))
        M[:, :2] = scale * distortion
        M[:, 2] = np.asarray(centre) - M[:, :2] @ FACE_CENTRE
        return cv2.warpAffine(image, M, (w, h), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_CONSTANT,
                              borderValue=(40, 60, 90))

    frames = []
    for i in range(4):
        frame = place(B_LOOK, 3.0, (900, 360), B_SHAPE)
        frame[:, :560] = place(ASTRONAUT, 0.6, (300 + 2 * i, 360))[:, :560]
        frames.append(frame)
    assert [round(x) for x, _, _ in tracker._faces_in(frames[0], 0, 0)] == [903]  # the premise: B only
    assert sorted(round(lm[:468, 0].mean() / 100) for lm in tracker.faces(frames[0])) == [3, 9]
    track = tracker(frames, identity=looks["A"])
    assert track.has_face.all()
    assert np.abs(track.landmarks[:, :468, 0].mean(1) - (300 + 2 * np.arange(4))).max() < 10
    track = tracker(frames, identity=looks["B"])
    assert track.has_face.all() and (track.landmarks[:, :468, 0].mean(1) > 800).all()


def test_a_cut_to_the_other_person_framed_alike_is_not_followed(tracker, looks):
    """Shot/reverse-shot: A, then B at the same place and size, then A again. FaceMesh
    tracks straight across the cut (no jump), so only the per-frame signature check keeps
    B undubbed; without an identity B is tracked."""
    frames = ([_place(ASTRONAUT, 0.9, (W / 2 + i, H / 2)) for i in range(4)]
              + [_place(B_LOOK, 0.8, (W / 2 + 4 + i, H / 2), B_SHAPE) for i in range(4)]
              + [_place(ASTRONAUT, 0.9, (W / 2 + 8 + i, H / 2)) for i in range(2)])
    assert tracker(frames, identity=looks["A"]).has_face.tolist() == [True] * 4 + [False] * 4 + [True] * 2
    assert tracker(frames, identity=looks["B"]).has_face.tolist() == [False] * 4 + [True] * 4 + [False] * 2
    assert tracker(frames).has_face.all()


def test_uniform_lbp_known_answers():
    from stages.face.identity import LBP_BINS, uniform_lbp_histogram

    flat = np.full((5, 5), 7, np.uint8)  # every neighbour >= centre: 8 ones, uniform
    assert uniform_lbp_histogram(flat).tolist() == [0] * 8 + [9, 0]
    spot = np.zeros((3, 3), np.uint8)
    spot[1, 1] = 200  # a bright spot: no neighbour >= centre
    assert uniform_lbp_histogram(spot)[0] == 1
    stripes = np.tile(np.array([0, 255], np.uint8), (3, 2))[:, :3]  # columns 0, 255, 0
    # Centre 255, only the two neighbours in its own column reach it: two separate runs of
    # ones (4 changes round the ring), not uniform.
    assert uniform_lbp_histogram(stripes)[LBP_BINS - 1] == 1


def test_face_option_validates_and_reaches_the_row():
    ok = ManifestRow(video_uri="v", audio_uri="a", output_uri="o", options='{"face": {"box": [1, 2, 30, 40], "t": 1.5}}')
    choice = FaceChoice.parse(ok.options.face_key())
    assert (choice.mode, choice.box, choice.t) == ("box", (1.0, 2.0, 30.0, 40.0), 1.5)
    assert ManifestRow(video_uri="v", audio_uri="a", output_uri="o").options.face_key() == "largest"
    assert FaceChoice.parse(ManifestRow(video_uri="v", audio_uri="a", output_uri="o",
                                        options='{"face": "center"}').options.face_key()).mode == "center"
    for bad in ('{"face": "smallest"}', '{"face": {"box": [30, 2, 1, 40]}}', '{"face": {"box": [1, 2, 3]}}'):
        with pytest.raises(ValueError):
            ManifestRow(video_uri="v", audio_uri="a", output_uri="o", options=bad)


# ----------------------------------------------------------------------------- stage-level run


def _config(tmp_path):
    return JobConfig(cache_uri=str(tmp_path), segment_seconds=0.4, analyse={"sample_frames": 12})


def _video_row(video, face="largest", **extra):
    return new_row(job_id="job", row_index=0, video_id="two", video_uri=video["path"], audio_uri="unused.wav",
                   output_uri="unused.mp4", segment_seconds=0.4, face=face, width=W, height=H, fps_num=25, fps_den=1,
                   n_frames=N, duration_s=N / 25, work_key="wk", audio_sha256="sha", **extra)


def _segment_row(video_row, seg_idx):
    start, end = SEGMENTS[seg_idx]
    return dict(video_row, seg_idx=seg_idx, n_segments=len(SEGMENTS), frame_start=start, frame_end=end)


def _face_centres(face_row) -> np.ndarray:
    """(n, 2) frame position of each crop's centre (NaN without a face)."""
    affines = unpack(face_row["affines"])
    out = np.full((len(affines), 2), np.nan)
    for k, M in enumerate(affines):
        if np.isfinite(M).all():
            out[k] = cv2.invertAffineTransform(M) @ np.array([128.0, 128.0, 1.0])
    return out


@pytest.fixture(scope="module")
def analysed(video, tiny_bundle, tmp_path_factory):
    from pipeline.dub.operators import AnalyseOp

    config = _config(tmp_path_factory.mktemp("work"))
    row = AnalyseOp(config.model_dump(), tiny_bundle)(_video_row(video))
    assert row["error"] == "", row["error"]
    return config, row


def test_largest_dubs_one_person_throughout_and_leaves_the_other_untouched(video, tracker, looks, analysed, tiny_bundle):
    from pipeline.dub.operators import ComposeOp, CompleteOp, FaceOp

    config, row = analysed
    # Decided once per video: A (more face area over the video), carried in the row.
    assert who(unpack(row["face_identity"]), looks) == "A"
    # The neutral frame heads the reference bank; every reference is A's face.
    ref_frames = unpack(row["ref_frames"])
    assert ref_frames[0] == row["neutral_frame"]
    assert not set(ref_frames.tolist()) & set(A_ABSENT)
    bank = unpack(config_storage(config).read_bytes(row["ref_crops_uri"]))
    assert len(bank) >= 2
    for crop in bank:
        faces = tracker.faces(crop)
        assert len(faces) == 1
        assert who(face_signature(crop, faces[0]), looks) == "A"

    face_op, complete_op, compose_op = FaceOp(config.model_dump()), CompleteOp(config.model_dump(), tiny_bundle), \
        ComposeOp(config.model_dump())
    rng = np.random.default_rng(0)
    composed = []
    for seg_idx, (start, end) in enumerate(SEGMENTS):
        seg = face_op(_segment_row(row, seg_idx))
        assert seg["error"] == "", seg["error"]
        has_face = unpack(seg["has_face"])
        expected = np.array([i not in A_ABSENT for i in range(start, end)])
        np.testing.assert_array_equal(has_face, expected)  # A absent: no face, never B instead
        centres = _face_centres(seg)
        assert (centres[has_face, 0] < SPLIT_X).all(), (seg_idx, centres[:, 0])  # on A in every segment
        assert np.abs(centres[has_face, 0] - A_X).max() < 20
        seg.update(driving=pack(rng.normal(0, 0.05, (end - start, 21, 3)).astype(np.float32)),
                   ref_index=pack(np.zeros(end - start, np.int64)))
        seg = complete_op(seg)
        assert seg["error"] == "", seg["error"]
        seg = compose_op(seg)
        assert seg["error"] == "", seg["error"]
        composed.append(read_all(seg["segment_uri"]))
    out = np.concatenate(composed).astype(np.float32)
    src = video["frames"].astype(np.float32)
    assert out.shape == src.shape
    diff = np.abs(out - src).mean(axis=-1)  # (N, H, W)
    # B's side is untouched up to codec loss in every frame, the frames where B is the
    # larger face (15-29) and where A is absent (24-27) included.
    right = diff[:, :, SPLIT_X + 5:]
    assert right.mean(axis=(1, 2)).max() < 2.0
    assert np.percentile(right, 99.9) < 20
    # With A absent the whole frame passes through.
    assert diff[list(A_ABSENT)].mean(axis=(1, 2)).max() < 2.0
    # And A's mouth was re-rendered (the random tiny bundle paints noise there): the dub
    # happened, on A.
    mouth = diff[:, int(H / 2) + 10:int(H / 2) + 45, int(A_X) - 20:int(A_X) + 20]
    present = [i for i in range(N) if i not in A_ABSENT]
    assert mouth[present].mean(axis=(1, 2)).min() > 3 * right[present].mean()


def config_storage(config):
    from pipeline.storage import Storage

    return Storage(config.storage.options())


def test_without_an_identity_the_last_segment_takes_the_larger_face(video, analysed, tmp_path):
    """The trap the test video sets: re-detecting the largest face picks B once B is larger."""
    from pipeline.dub.operators import FaceOp

    _, row = analysed
    config = _config(tmp_path)  # a work area without the committed segments of the test above
    seg = FaceOp(config.model_dump())(_segment_row(dict(row, face_identity=b""), 2))
    assert seg["error"] == "", seg["error"]
    centres = _face_centres(seg)
    assert unpack(seg["has_face"]).all()
    assert (centres[:, 0] > SPLIT_X).all()


@pytest.mark.parametrize("face, person", [
    ("center", "B"),
    ({"box": [A_X - 60, 60, A_X + 60, 210], "t": 0.8}, "A"),  # frame 20: A smaller, B larger
    ({"box": [B_X - 60, 60, B_X + 60, 210], "t": 0.2}, "B"),  # frame 5: B smaller
])
def test_center_and_box_pick_the_named_person(video, looks, tiny_bundle, tmp_path, face, person):
    import json

    from pipeline.dub.operators import AnalyseOp, FaceOp

    config = _config(tmp_path)
    key = face if isinstance(face, str) else json.dumps(face, sort_keys=True)
    row = AnalyseOp(config.model_dump(), tiny_bundle)(_video_row(video, face=key))
    assert row["error"] == "", row["error"]
    assert who(unpack(row["face_identity"]), looks) == person
    bank = unpack(config_storage(config).read_bytes(row["ref_crops_uri"]))
    with FaceTracker() as tracker:
        # Every crop FaceMesh finds a face in is the named person's. B's crops come from a
        # small, darkened, stretched face, and FaceMesh misses one of them now and then.
        found = [(crop, faces[0]) for crop in bank for faces in [tracker.faces(crop)] if faces]
        assert len(found) >= len(bank) - 1 >= 2
        assert {who(face_signature(crop, face), looks) for crop, face in found} == {person}
    # The first segment, where A is the larger face, follows the chosen person.
    seg = FaceOp(config.model_dump())(_segment_row(row, 0))
    assert seg["error"] == "", seg["error"]
    centres = _face_centres(seg)
    assert unpack(seg["has_face"]).all()
    side = centres[:, 0] < SPLIT_X
    assert side.all() if person == "A" else not side.any()


def test_a_box_with_no_face_fails_the_video_naming_the_box(video, tiny_bundle, tmp_path):
    from pipeline.dub.operators import AnalyseOp

    config = _config(tmp_path)
    row = AnalyseOp(config.model_dump(), tiny_bundle)(_video_row(video, face='{"box": [200, 0, 240, 30], "t": 0.0}'))
    assert row["error_stage"] == "analyse"
    assert "face box [200.0, 0.0, 240.0, 30.0]" in row["error"] and "two_people.mp4" in row["error"]


class _CropsCaught:
    """A SyncNet scorer stand-in that keeps the face crops it is given."""

    def score(self, crops, wave, fps):
        self.crops = crops
        return None


def test_the_sync_check_scores_the_dubbed_person_not_the_largest_face(video, looks, tmp_path):
    import wave as wavfile

    from stages.eval.sync_check import sync_score_video

    audio = str(tmp_path / "tone.wav")
    with wavfile.open(audio, "wb") as w:  # 1.2 s: as long as the video
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((3000 * np.sin(np.arange(19200) * 0.05)).astype(np.int16).tobytes())

    def tone(identity) -> np.ndarray:
        """Red minus blue of each scored crop: the two people differ in skin tone."""
        scorer = _CropsCaught()
        with FaceTracker(smoothing_sigma_frames=0.0, max_gap_frames=0) as t:
            sync_score_video(video["path"], audio, scorer, t, identity=identity)
        crops = scorer.crops.astype(np.float32)
        assert len(crops) == N  # every frame scored
        return crops[..., 0].mean(axis=(1, 2)) - crops[..., 2].mean(axis=(1, 2))

    largest, a, b = tone(None), tone(looks["A"]), tone(looks["B"])
    a_present = [i for i in range(N) if i not in A_ABSENT]
    # Without an identity the check scores A (the first larger face, followed) ...
    np.testing.assert_allclose(largest[a_present], a[a_present], atol=2.0)
    # ... and with B's identity every frame's crop is B's, though A came first.
    # (The spread within one person, up to ~3.3 as the crop takes in more or less of the
    # background when B's size changes at frame 15, stays far below the A-B gap of ~19.)
    assert np.ptp(a[a_present]) < 5.0 and np.ptp(b) < 5.0
    assert abs(a[a_present].mean() - b.mean()) > 10.0
