"""Unit tests of the job's edge and glue pieces, without Ray."""
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, JobConfig, load_job_config
from pipeline.dub.rows import ROW_DEFAULTS, fail, new_row, pack, unpack
from pipeline.dub.schemas import ManifestError, ReportRow, read_manifest, read_report, write_manifest, write_report
from pipeline.storage import Storage
from stages.audio.cache import FeatureCache, content_hash
from stages.motion.selection import (
    choose_references, dark_lip_gap, mouth_opening, mouth_spread, neutral_score, select_neutral_and_references,
)
from stages.motion.stage import resample_25hz


# ---------------------------------------------------------------- config


def test_job_config_defaults_and_yaml_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("segment_seconds: 2.5\npools:\n  complete: {size: 4, num_gpus: 1}\noutput: {crf: 23}\n")
    cfg = load_job_config(str(path))
    assert cfg.segment_seconds == 2.5
    assert cfg.pools["complete"].size == 4 and cfg.pools["complete"].num_gpus == 1
    # pools not named keep their defaults
    assert cfg.pools["face"] == JobConfig().pools["face"]
    assert cfg.output.crf == 23 and cfg.output.codec == "libx264"


@pytest.mark.parametrize(
    "text, needle",
    [
        ("segment_seconds: -1\n", "segment_seconds"),
        ("pools:\n  gpu_magic: {size: 1}\n", "gpu_magic"),
        ("segmnet_seconds: 3\n", "segmnet_seconds"),
        ("- a\n- b\n", "mapping"),
        ("a: [unclosed\n", "YAML"),
    ],
)
def test_job_config_errors_name_file_and_problem(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_job_config(str(path))
    assert str(path) in str(e.value) and needle in str(e.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load_job_config("/nonexistent/job.yaml")


# ---------------------------------------------------------------- manifest / report


def test_manifest_round_trip_and_bad_rows(tmp_path):
    storage = Storage()
    uri = str(tmp_path / "m.parquet")
    write_manifest(
        [
            {"video_uri": "a.mp4", "audio_uri": "a.wav", "output_uri": "out/a.mp4", "options": {"crf": 20}},
            {"video_uri": "", "audio_uri": "b.wav", "output_uri": "out/b.mp4"},
            {"video_uri": "c.mp4", "audio_uri": "c.wav", "output_uri": "out/a.mp4"},
            {"video_uri": "d.mp4", "audio_uri": "d.wav", "output_uri": "out/d.mp4", "options": '{"bogus": 1}'},
        ],
        uri,
        storage,
    )
    rows = read_manifest(uri, storage)
    assert [i for i, _, _ in rows] == [0, 1, 2, 3]
    assert rows[0][1].options.crf == 20 and rows[0][2] is None
    assert rows[1][1] is None and "video_uri" in rows[1][2]
    assert rows[2][1] is None and "repeats row 0" in rows[2][2]
    assert rows[3][1] is None and "bogus" in rows[3][2]
    # video ids are stable and distinct per output
    assert rows[0][1].video_id == read_manifest(uri, storage)[0][1].video_id


def test_manifest_file_level_errors(tmp_path):
    storage = Storage()
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(str(tmp_path / "nope.parquet"), storage)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(ManifestError, match="junk.parquet"):
        read_manifest(str(junk), storage)
    nocol = tmp_path / "nocol.parquet"
    pq.write_table(pa.table({"video_uri": ["a"], "audio_uri": ["b"]}), nocol)
    with pytest.raises(ManifestError, match="output_uri"):
        read_manifest(str(nocol), storage)


def test_report_round_trip_sorted_by_row(tmp_path):
    storage = Storage()
    rows = [
        ReportRow(job_id="j", row_index=2, video_id="b", video_uri="v2", audio_uri="a2", output_uri="o2", status="failed", error="boom", error_stage="face"),
        ReportRow(job_id="j", row_index=0, video_id="a", video_uri="v0", audio_uri="a0", output_uri="o0", status="ok", source_frames=10, output_frames=10, fps=25.0, feature_cache_hit=True),
    ]
    uri = str(tmp_path / "r.parquet")
    write_report(rows, uri, storage)
    back = read_report(uri, storage)
    assert [r.row_index for r in back] == [0, 2]
    assert back[0] == rows[1] and back[1] == rows[0]


# ---------------------------------------------------------------- storage


def test_put_atomic_leaves_no_temporary_files(tmp_path):
    storage = Storage()
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 1000)
    dst = tmp_path / "deep" / "out.bin"
    storage.put_atomic(str(src), str(dst))
    assert dst.read_bytes() == b"x" * 1000
    assert os.listdir(dst.parent) == ["out.bin"]
    assert storage.sha256(str(dst)) == content_hash(b"x" * 1000)


def test_retry_gives_up_with_context_and_does_not_retry_missing():
    storage = Storage()
    storage.options = storage.options.__class__(retries=2, backoff_s=0.0)
    calls = []

    def flaky():
        calls.append(1)
        raise ConnectionError("reset by peer")

    with pytest.raises(OSError, match="after 3 attempts"):
        storage.retry(flaky, "read s3://b/k")
    assert len(calls) == 3

    calls.clear()

    def missing():
        calls.append(1)
        raise FileNotFoundError("k")

    with pytest.raises(FileNotFoundError):
        storage.retry(missing, "read")
    assert len(calls) == 1


# ---------------------------------------------------------------- rows


def test_rows_pack_round_trip_and_fail_drops_payload():
    a = np.random.rand(3, 4, 5).astype(np.float32)
    assert np.array_equal(unpack(pack(a)), a) and unpack(pack(a)).dtype == np.float32
    row = new_row(video_id="v", crops=pack(a))
    assert set(row) == set(ROW_DEFAULTS)
    failed = fail(row, "face", ValueError("bad"))
    assert failed["error"] == "ValueError: bad" and failed["error_stage"] == "face" and failed["crops"] == b""
    with pytest.raises(KeyError):
        new_row(not_a_key=1)


# ---------------------------------------------------------------- feature cache


def test_feature_cache_hit_and_window(tmp_path):
    import fsspec

    cache = FeatureCache(fsspec.filesystem("file"), str(tmp_path / "cache"))
    feats = np.random.rand(620, 8).astype(np.float32)  # 50 Hz rows: 310 frames at 25 fps
    sha = content_hash(b"some audio")
    assert cache.lookup("m1", sha) is None
    stored = cache.store("m1", sha, feats, duration_s=12.4)
    hit = cache.lookup("m1", sha)
    assert hit == stored and hit.n_frames == 310 and hit.dim == 8
    assert cache.lookup("m2", sha) is None  # a different model never hits
    np.testing.assert_array_equal(cache.read_window(hit, 240, 510), feats[480:620])  # spans row groups, clamped
    np.testing.assert_array_equal(cache.read_window(hit, -5, 3), feats[:6])
    assert cache.read_window(hit, 700, 800).shape == (0, 8)
    leftovers = [p for p in os.listdir(os.path.dirname(hit.path)) if "tmp" in p]
    assert leftovers == []


# ---------------------------------------------------------------- selection / resampling


def test_resample_25hz_known_answers():
    values = np.arange(10, dtype=np.float32)[:, None] * 2.0  # row j = 2j, centred at (j+0.5)/25
    times = np.array([0.5 / 25, 3.5 / 25, 4.0 / 25, 100.0, 0.0])
    out = resample_25hz(values, 0, times)[:, 0]
    np.testing.assert_allclose(out, [0.0, 6.0, 7.0, 18.0, 0.0])
    # an offset window: row 0 is feature frame 5
    np.testing.assert_allclose(resample_25hz(values, 5, np.array([5.5 / 25]))[:, 0], [0.0])


def test_choose_references_never_near_target():
    ref_frames = np.array([0, 50, 100])
    ref_pose = np.array([[0, 0, 0], [0, 10, 0], [0, 20, 0]], np.float32)
    targets = np.array([0, 2, 50, 101, 60])
    pose = np.array([[0, 0, 0], [0, 0, 0], [0, 10, 0], [0, 20, 0], [0, 12, 0]], np.float32)
    choice = choose_references(targets, pose, ref_frames, ref_pose, min_gap_frames=12)
    # each target's own (or too-near) frame is excluded; next-most-similar pose wins
    assert list(choice) == [1, 1, 0, 1, 2]
    assert np.all(np.abs(targets - ref_frames[choice]) >= 12)


def test_neutral_is_frontal_and_closed():
    s = 6
    frames = np.arange(s) * 10
    crops = np.random.randint(0, 255, (s, 8, 8, 3), np.uint8)
    has_face = np.array([True, True, True, True, False, True])
    opening = np.array([0.30, 0.01, 0.02, 0.05, np.nan, 0.20])
    motion = {
        "pitch": np.array([0, 20, 1, 2, 0, 0], np.float32),
        "yaw": np.array([0, 5, 1, 1, 0, 0], np.float32),
        "roll": np.zeros(s, np.float32),
        "x_c": np.random.rand(s, 21, 3).astype(np.float32),
        "exp": np.random.rand(s, 21, 3).astype(np.float32),
    }
    a = select_neutral_and_references(frames, crops, has_face, opening, motion, bank_size=3)
    assert a.neutral_frame == 20  # frame 0 is frontal but open, frame 10 closed but turned
    np.testing.assert_array_equal(a.neutral_exp, motion["exp"][2])
    assert a.ref_frames[0] == 20 and len(set(a.ref_frames)) == 3 and 40 not in a.ref_frames
    assert a.sampled_face_fraction == pytest.approx(5 / 6)


def _mesh(gap: float, at=(100.0, 100.0)) -> np.ndarray:
    """A (478, 2) mesh at `at` whose mouth is 40 px wide with the inner lips `gap` px apart."""
    pts = np.tile(np.asarray(at, np.float64), (478, 1))
    pts[61, 0] -= 20
    pts[291, 0] += 20
    pts[13, 1] -= gap / 2
    pts[14, 1] += gap / 2
    return pts


def test_mouth_spread_follows_the_same_face_in_the_frames_around():
    centre = _mesh(0.4)
    # the same face, still; somebody else 300 px away with a wide-open mouth
    assert mouth_spread(centre, [[_mesh(0.4), _mesh(20.0, (400, 100))], [_mesh(0.8)]]) == pytest.approx(0.4 / 40)
    # moving: a syllable either side
    assert mouth_spread(centre, [[_mesh(8.0)], [_mesh(0.0)]]) == pytest.approx(8.0 / 40)
    # only the other person, or nobody, around: unknown
    assert np.isnan(mouth_spread(centre, [[_mesh(0.4, (400, 100))], []]))


def test_neutral_is_a_mouth_at_rest_where_one_was_sampled():
    s = 4
    frames = np.arange(s) * 10
    crops = np.zeros((s, 8, 8, 3), np.uint8)
    has_face = np.ones(s, bool)
    opening = np.array([0.002, 0.010, 0.030, 0.0])  # frame 0: lips pressed for a "b"; frame 1 at rest
    motion = {k: np.zeros(s, np.float32) for k in ("pitch", "yaw", "roll")} | {
        "x_c": np.random.rand(s, 21, 3).astype(np.float32), "exp": np.random.rand(s, 21, 3).astype(np.float32)}
    has_face[3] = False  # the most closed of all, but not the dubbed person
    spread = np.array([0.20, 0.004, 0.003, 0.0])
    asked = []

    def spread_of(k: int) -> float:
        asked.append(k)
        return float(spread[k])

    a = select_neutral_and_references(frames, crops, has_face, opening, motion, 2, spread_of=spread_of)
    assert a.neutral_frame == 10 and asked == [0, 1]  # read in score order, and no further than the first at rest
    # no mouth at rest among the sampled frames (or nothing known of it): the most closed one
    for unknown in (0.2, np.nan):
        assert select_neutral_and_references(frames, crops, has_face, opening, motion, 2,
                                             spread_of=lambda k: unknown).neutral_frame == 0
    assert select_neutral_and_references(frames, crops, has_face, opening, motion, 2).neutral_frame == 0


def test_the_neutral_frame_at_rest_is_looked_for_among_the_best_scored_only():
    from stages.motion.selection import STILL_CANDIDATES

    s = STILL_CANDIDATES + 2
    opening = np.linspace(0.0, 0.05, s)  # frame k is the k-th best
    motion = {k: np.zeros(s, np.float32) for k in ("pitch", "yaw", "roll")} | {
        "x_c": np.zeros((s, 21, 3), np.float32), "exp": np.zeros((s, 21, 3), np.float32)}
    still_from = lambda first: (lambda k: 0.0 if k >= first else 0.2)  # noqa: E731
    pick = lambda first: select_neutral_and_references(  # noqa: E731
        np.arange(s), np.zeros((s, 8, 8, 3), np.uint8), np.ones(s, bool), opening, motion, 2,
        spread_of=still_from(first)).neutral_frame
    assert pick(STILL_CANDIDATES - 1) == STILL_CANDIDATES - 1
    assert pick(STILL_CANDIDATES) == 0  # the first at rest is past the candidates: the best score


def test_dark_lip_gap_is_the_dark_band_on_the_lips_centre_line():
    img = np.full((100, 100, 3), 180, np.uint8)  # lips and skin alike: bright
    lm = np.full((478, 2), np.nan, np.float32)
    lm[61], lm[291] = (30, 50), (70, 50)  # mouth 40 px wide
    lm[0], lm[17] = (50, 40), (50, 60)  # the outer lips' top and bottom, 20 px apart
    assert dark_lip_gap(img, lm) == 0.0  # lips that touch
    img[48:52, 35:65] = 30  # a 4-px dark gap between them
    assert dark_lip_gap(img, lm) == pytest.approx(4 / 40, abs=0.01)
    img[48:52, 35:65] = 120  # a shadow, not a cavity: above half the lips' brightness
    assert dark_lip_gap(img, lm) == 0.0
    lm[17] = (50, 130)  # a chin out of the frame: the edge pixels carry on, no error
    assert 0.0 <= dark_lip_gap(img, lm) < 1.0
    lm[0] = np.nan  # no face
    assert np.isnan(dark_lip_gap(img, lm))


def test_neutral_prefers_lips_that_touch_over_a_dark_gap_the_mesh_reads_as_closed():
    pose = np.zeros((2, 3), np.float32)
    pose[1] = (4, 0, 0)  # the truly closed frame is a little less frontal
    mesh = np.array([0.001, 0.004])  # the mesh reads the parted frame as the more closed
    gap = np.array([0.06, 0.0])
    assert np.argmin(neutral_score(pose, mesh)) == 0
    assert np.argmin(neutral_score(pose, mesh, gap)) == 1
    assert np.argmin(neutral_score(pose, mesh, np.array([np.nan, np.nan]))) == 0  # no pixels: the mesh decides


def test_mouth_opening_ratio():
    lm = np.zeros((1, 478, 2))
    lm[0, 61], lm[0, 291] = (0, 0), (40, 0)
    lm[0, 13], lm[0, 14] = (20, -2), (20, 2)
    np.testing.assert_allclose(mouth_opening(lm), [0.1])
