"""Quality checks of the dub job without Ray: the report's `warnings` column, the optional
SyncNet component of a weights bundle, SyncNet's figures of a video file, and the
qc.min_sync_conf gate in finalize_video (no output committed, a "qc" failure)."""
import json
import math
import os
from fractions import Fraction

import numpy as np
import pytest

from pipeline.config import JobConfig, QCConfig
from pipeline.dub.qc import QCError, qc_failure, qc_warnings, sync_fields
from pipeline.sample_catalogue import SampleVideo, speak, write_video
from pipeline.weights import COMPONENTS, BundleError, load_syncnet, read_bundle_info

SMALL = (320, 240)


def _row(**fields):
    base = dict(status="ok", audio_padded_s=0.0, audio_trimmed_s=0.0, face_fraction=1.0,
                sync_conf=None, sync_dist=None, sync_offset=None)
    base.update(fields)
    return base


# ---------------------------------------------------------------- qc_warnings


def test_a_clean_row_has_no_warnings():
    assert qc_warnings(_row(sync_conf=7.5, sync_dist=6.0, sync_offset=0), QCConfig(), trained=True) == []


@pytest.mark.parametrize("fields, needles", [
    (dict(audio_padded_s=0.6), ["padded with 0.60 s"]),
    (dict(audio_padded_s=0.4), []),
    (dict(audio_trimmed_s=1.25), ["trimmed by 1.25 s"]),
    (dict(audio_trimmed_s=0.5), []),  # exactly the limit: not more than it
    (dict(face_fraction=0.3), ["face found on only 0.30 of the frames"]),
    (dict(face_fraction=0.5), []),
    (dict(sync_conf=1.2345, sync_dist=9.5, sync_offset=-2), ["low lip-sync confidence 1.234", "offset -2 frames"]),
    (dict(sync_conf=3.0, sync_dist=8.0, sync_offset=0), []),
])
def test_each_check_warns_past_its_limit_only(fields, needles):
    found = qc_warnings(_row(**fields), QCConfig(), trained=True)
    if not needles:
        assert found == []
    else:
        assert len(found) == 1, found
        for needle in needles:
            assert needle in found[0], found


def test_untrained_bundle_and_several_findings_in_one_list():
    found = qc_warnings(_row(audio_padded_s=2.0, face_fraction=0.1), QCConfig(), trained=False, weights_uri="s3://m/tiny")
    assert len(found) == 3
    assert found[0].startswith("untrained weights bundle s3://m/tiny")
    assert "padded" in found[1] and "face found on only 0.10" in found[2]


def test_thresholds_come_from_the_config_and_a_missing_score_is_flagged_when_expected():
    qc = QCConfig(low_sync_conf=8.0, max_audio_fit_s=2.0, min_face_fraction=0.05)
    found = qc_warnings(_row(sync_conf=7.9, sync_dist=6.0, sync_offset=1, audio_padded_s=1.5, face_fraction=0.1), qc)
    assert len(found) == 1 and "below qc.low_sync_conf=8" in found[0]
    assert qc_warnings(_row(), QCConfig(), sync_expected=False) == []
    (missing,) = qc_warnings(_row(), QCConfig(), sync_expected=True)
    assert "no lip-sync score" in missing


def test_qc_failure_only_below_min_sync_conf():
    figures = dict(sync_conf=2.5, sync_dist=7.25, sync_offset=3)
    assert qc_failure(figures, QCConfig(), "s3://out/v.mp4") is None  # no minimum set
    assert qc_failure(figures, QCConfig(min_sync_conf=2.5), "s3://out/v.mp4") is None
    assert qc_failure(dict.fromkeys(figures), QCConfig(min_sync_conf=2.5), "s3://out/v.mp4") is None  # nothing to judge
    message = qc_failure(figures, QCConfig(min_sync_conf=4.0), "s3://out/v.mp4")
    assert "s3://out/v.mp4" in message and "not committed" in message
    assert "2.500" in message and "qc.min_sync_conf=4" in message and "7.250" in message and "offset 3" in message


def test_a_qc_failure_counts_as_low_sync():
    from pipeline.metrics import error_kind

    message = qc_failure(dict(sync_conf=0.5, sync_dist=9.0, sync_offset=0), QCConfig(min_sync_conf=1.0), "/out/v.mp4")
    assert error_kind(message) == "low_sync"


def test_a_qc_failure_row_fails_at_stage_qc_with_its_figures():
    from pipeline.dub.job import _video_report
    from pipeline.dub.rows import new_row

    head = new_row(job_id="j", row_index=3, video_id="v", video_uri="/in/v.mp4", audio_uri="/in/a.wav",
                   output_uri="/out/v.mp4", n_frames=30, fps_num=25, n_segments=1, seg_idx=0, face_frames=30)
    figures = dict(sync_conf=0.25, sync_dist=9.0, sync_offset=-4, audio_padded_s=0.0, audio_trimmed_s=0.1, time_finalize_s=2.0)
    message = qc_failure(figures, QCConfig(min_sync_conf=1.0), head["output_uri"])
    row = _video_report("j", head, [head], figures, message, "qc")
    assert (row.status, row.error_stage, row.error) == ("failed", "qc", message)
    assert (row.sync_conf, row.sync_dist, row.sync_offset) == (0.25, 9.0, -4)
    assert row.output_bytes is None and row.output_sha256 is None and row.warnings is None


def test_job_config_reads_the_qc_block():
    cfg = JobConfig.model_validate({"qc": {"min_sync_conf": 1.5}})
    assert cfg.qc.min_sync_conf == 1.5 and cfg.qc.low_sync_conf == 3.0
    with pytest.raises(ValueError):
        JobConfig.model_validate({"qc": {"min_sync_cnf": 1.5}})


def test_qc_error_keeps_its_fields_through_pickling():
    import pickle

    e = pickle.loads(pickle.dumps(QCError("output x: not committed", {"sync_conf": 0.5})))
    assert str(e) == "output x: not committed" and e.fields == {"sync_conf": 0.5}


# ---------------------------------------------------------------- the bundle


def _bare_bundle(root, components=None) -> str:
    """A bundle folder with every required component present (empty) and bundle.json."""
    for rel in COMPONENTS.values():
        path = os.path.join(root, rel)
        if rel.endswith(".pth"):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "wb").close()
        else:
            os.makedirs(path, exist_ok=True)
    meta = {"format": "imgtalk-weights", "version": 1, "size": "tiny", "trained": False, "components": components or COMPONENTS}
    with open(os.path.join(root, "bundle.json"), "w") as f:
        json.dump(meta, f)
    return str(root)


@pytest.fixture(scope="module")
def syncnet_file(tmp_path_factory):
    """A randomly initialised SyncNet v2 in syncnet_python's file layout."""
    import torch

    from stages.eval.syncnet import SyncNet

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("syncnet") / "syncnet_v2.model")
    SyncNet().save_file(path)
    return path


def _with_syncnet(root, syncnet_file) -> str:
    os.makedirs(os.path.join(root, "syncnet"), exist_ok=True)
    os.symlink(syncnet_file, os.path.join(root, "syncnet", "syncnet_v2.model"))
    return str(root)


def test_a_bundle_without_syncnet_is_complete(tmp_path):
    info = read_bundle_info(_bare_bundle(tmp_path))
    assert not info.has("syncnet") and info.has("stage2")
    assert "syncnet" not in info.components
    assert load_syncnet(info) is None


def test_a_bundle_with_syncnet_knows_it_and_loads_it(tmp_path, syncnet_file):
    from stages.eval.syncnet import SyncNet

    info = read_bundle_info(_with_syncnet(_bare_bundle(tmp_path), syncnet_file))
    assert info.has("syncnet")
    assert info.path("syncnet") == os.path.join(str(tmp_path), "syncnet", "syncnet_v2.model")
    assert isinstance(load_syncnet(info), SyncNet)


def test_a_broken_syncnet_file_is_a_bundle_error(tmp_path):
    root = _bare_bundle(tmp_path)
    os.makedirs(os.path.join(root, "syncnet"))
    with open(os.path.join(root, "syncnet", "syncnet_v2.model"), "wb") as f:
        f.write(b"not a model")
    info = read_bundle_info(root)
    with pytest.raises(BundleError, match="syncnet_v2.model"):
        load_syncnet(info)


def test_syncnet_named_in_bundle_json_is_required(tmp_path):
    root = _bare_bundle(tmp_path, components={**COMPONENTS, "syncnet": "syncnet/syncnet_v2.model"})
    with pytest.raises(BundleError, match="'syncnet' is missing"):
        read_bundle_info(root)


# ---------------------------------------------------------------- SyncNet on a video file


def test_sample_indices_take_the_nearest_frame_at_25_fps():
    from stages.eval.sync_check import sample_indices

    assert list(sample_indices(5, Fraction(25))) == [0, 1, 2, 3, 4]
    # 50 fps: every other frame; 30000/1001: 1.2 s of 36 frames -> 30 points, never past the end
    assert list(sample_indices(6, Fraction(50))) == [0, 2, 4]
    idx = sample_indices(36, Fraction(30000, 1001))
    assert len(idx) == 30 and idx[-1] <= 35 and np.all(np.diff(idx) >= 1)
    assert list(sample_indices(3, Fraction(12))) == [0, 0, 1, 1, 2, 2]  # below 25 fps frames repeat


def test_frames_without_a_face_take_the_nearest_box():
    from stages.eval.sync_check import nearest_face_boxes

    nan = [np.nan] * 4
    boxes = np.array([nan, [0, 0, 1, 1], nan, nan, nan, [5, 5, 6, 6], nan], dtype=float)
    filled = nearest_face_boxes(boxes)
    assert [row[0] for row in filled] == [0, 0, 0, 0, 5, 5, 5]  # frame 3: a tie, the earlier one
    assert nearest_face_boxes(np.array([nan, nan], dtype=float)) is None


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    paths = {"video": str(root / "v.mp4"), "audio": str(root / "a.wav"), "noface": str(root / "noface.mp4")}
    write_video(paths["video"], SampleVideo("v", Fraction(25), 1.2, "", size=SMALL))
    write_video(paths["noface"], SampleVideo("n", Fraction(25), 1.2, "", no_face=(0.0, 5.0), size=SMALL))
    speak("Hello there.", paths["audio"])  # real speech, about a second (espeak-ng, as the sample catalogue)
    return paths


def test_sync_score_of_a_short_clip_with_a_random_syncnet(clip, syncnet_file):
    from stages.eval.sync_check import sync_score_video
    from stages.eval.syncnet import SyncNetScorer

    scorer = SyncNetScorer(syncnet_file)
    score = sync_score_video(clip["video"], clip["audio"], scorer)
    assert score is not None
    assert math.isfinite(score.conf) and math.isfinite(score.min_dist) and score.conf >= 0
    assert abs(score.offset) <= 15 and len(score.mean_dists) == 31
    # the report's fields, as finalize returns them
    fields = sync_fields(score)
    assert fields == {"sync_conf": score.conf, "sync_dist": score.min_dist, "sync_offset": score.offset}
    assert type(fields["sync_offset"]) is int
    # no face in any frame: nothing to score
    assert sync_score_video(clip["noface"], clip["audio"], scorer) is None


# ---------------------------------------------------------------- the gate in finalize


def test_min_sync_conf_fails_the_video_and_commits_nothing(clip, syncnet_file, tmp_path):
    from pipeline.dub.finalize import finalize_video

    bundle = _with_syncnet(_bare_bundle(tmp_path / "bundle"), syncnet_file)
    out_dir = tmp_path / "out"
    video = {"video_uri": clip["video"], "audio_uri": clip["audio"], "output_uri": str(out_dir / "v.mp4"), "rotation": 0}
    segments = [{"seg_idx": 0, "segment_uri": clip["video"]}]

    # No minimum: scored and committed, figures among the report fields.
    fields = finalize_video(JobConfig().model_dump(), video, segments, bundle)
    assert os.path.exists(video["output_uri"])
    assert math.isfinite(fields["sync_conf"]) and math.isfinite(fields["sync_dist"]) and abs(fields["sync_offset"]) <= 15

    # A minimum above any score this clip can get: QCError, and no output anywhere.
    video["output_uri"] = str(out_dir / "gated.mp4")
    strict = JobConfig.model_validate({"qc": {"min_sync_conf": 1e6}}).model_dump()
    with pytest.raises(QCError) as caught:
        finalize_video(strict, video, segments, bundle)
    assert sorted(os.listdir(out_dir)) == ["v.mp4"]  # nothing half-written either
    message = str(caught.value)
    assert video["output_uri"] in message and "not committed" in message and "qc.min_sync_conf=1e+06" in message
    assert f"{fields['sync_conf']:.3f}" in message  # the same file, the same figure
    assert caught.value.fields["sync_conf"] == pytest.approx(fields["sync_conf"])
    assert caught.value.fields["audio_padded_s"] is not None

    # Without SyncNet weights (or without a bundle) nothing is scored and nothing is gated.
    video["output_uri"] = str(out_dir / "unscored.mp4")
    plain = finalize_video(strict, video, segments, _bare_bundle(tmp_path / "plain"))
    assert (plain["sync_conf"], plain["sync_dist"], plain["sync_offset"]) == (None, None, None)
    assert os.path.exists(video["output_uri"])
