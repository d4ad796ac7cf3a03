"""imgtalk eval: the image metrics and LMD against known answers, the tables, the inputs,
and the Ray Data job end to end on a small dub report (with metric weights written in the
real files' layouts, and without any)."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.ndimage import gaussian_filter

from pipeline.eval.config import EvalConfig, EvalRow
from pipeline.eval.job import EvalError, dub_manifest, pairs_from_report, resolve_metric_weights, summarise
from pipeline.eval.tables import PAPER_TABLE1_HDTF, table1, table2
from pipeline.storage import Storage
from stages.eval.image_metrics import PSNR_CAP_DB, psnr_per_frame, ssim_per_frame
from stages.eval.lmd import MESH_MOUTH_68, lmd_per_frame, mouth_points


def _faces(n=2, size=96, seed=0):
    from skimage import data
    from skimage.transform import resize

    img = data.astronaut()[40:300, 130:390]
    img = (resize(img, (size, size), anti_aliasing=True) * 255).astype(np.uint8)
    rng = np.random.default_rng(seed)
    return np.stack([np.roll(img, int(rng.integers(-3, 4)), axis=1) for _ in range(n)])


# ----------------------------------------------------------------------------- PSNR / SSIM


def test_psnr_of_known_noise_matches_the_closed_form():
    rng = np.random.default_rng(0)
    clean = np.full((3, 64, 64, 3), 0.5)
    sigma = 0.05
    noisy = clean + rng.normal(0, sigma, clean.shape)  # no clipping at mid grey
    got = psnr_per_frame(clean, noisy)
    mse = ((clean - noisy) ** 2).reshape(3, -1).mean(1)
    np.testing.assert_allclose(got, 10 * np.log10(1 / mse), rtol=1e-12)
    assert np.all(np.abs(got - 10 * np.log10(1 / sigma**2)) < 0.2)
    # identical frames: the cap, not inf
    assert np.all(psnr_per_frame(_faces(), _faces()) == PSNR_CAP_DB)


def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. 2004 written out: Gaussian sigma 1.5 windows truncated at 3.5 sigma (11
    taps), population statistics, per channel, mean over the interior (no edge effects)."""
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for ch in range(a.shape[-1]):
        x, y = a[..., ch], b[..., ch]
        f = lambda z: gaussian_filter(z, 1.5, truncate=3.5)  # noqa: E731
        mx, my = f(x), f(y)
        vx, vy, cxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        vals.append(s[5:-5, 5:-5].mean())
    return float(np.mean(vals))


def test_ssim_is_one_on_identical_frames_and_matches_wang_et_al_on_noise():
    faces = _faces(3)
    np.testing.assert_allclose(ssim_per_frame(faces, faces), 1.0, atol=1e-12)
    rng = np.random.default_rng(1)
    clean = faces.astype(np.float64) / 255
    for sigma in (0.02, 0.1):
        noisy = np.clip(clean + rng.normal(0, sigma, clean.shape), 0, 1)
        got = ssim_per_frame(clean, noisy)
        want = [_ssim_reference(c, n) for c, n in zip(clean, noisy)]
        np.testing.assert_allclose(got, want, atol=2e-3)
    worse = ssim_per_frame(clean, np.clip(clean + rng.normal(0, 0.2, clean.shape), 0, 1))
    assert np.all(worse < got)  # more noise, lower SSIM


# ----------------------------------------------------------------------------- LMD


def test_lmd_zero_on_identical_and_hand_computed_on_a_known_displacement():
    rng = np.random.default_rng(0)
    pts = rng.uniform(100, 150, (4, 20, 2))
    assert np.all(lmd_per_frame(pts, pts) == 0)
    # a translation of the whole mouth is removed by the per-frame centring
    np.testing.assert_allclose(lmd_per_frame(pts, pts + [7.0, -2.0]), 0, atol=1e-12)
    moved = pts.copy()
    moved[:, 3] += [3.0, 4.0]  # one point by 5 px: after centring it is off by 5*19/20, the others by 5/20
    np.testing.assert_allclose(lmd_per_frame(pts, moved), (5 * 19 / 20 + 19 * 5 / 20) / 20, rtol=1e-12)


def test_mouth_points_are_the_facemesh_lip_ring_in_ibug_order():
    mesh = np.arange(478 * 2, dtype=np.float64).reshape(478, 2)
    got = mouth_points(mesh)
    assert got.shape == (20, 2)
    assert got[0, 0] == 61 * 2 and got[6, 0] == 291 * 2  # 48 and 54: the mouth corners
    assert got[14, 0] == 13 * 2 and got[18, 0] == 14 * 2  # 62 and 66: the inner-lip centre
    assert len(set(MESH_MOUTH_68)) == 20


# ----------------------------------------------------------------------------- tables and inputs


def test_table_marks_skipped_metrics_and_labels_the_quoted_rows():
    rows = {"demo (ours)": {"ssim": 0.91, "psnr": 23.7, "lmd": 3.4, "fid": None, "sync_conf": None}}
    skipped = {"fid": "no FID weights", "sync_conf": "no SyncNet", "sync_dist": "no SyncNet"}
    text = table1(rows, "reconstruction", skipped)
    ours = next(line for line in text.splitlines() if line.startswith("| demo (ours)"))
    assert ours.split("|")[1:-1] == [" demo (ours) ", " 0.910 ", " 23.700 ", " skipped ", " 3.400 ", " skipped ", " skipped "]
    quoted = [line for line in text.splitlines() if "(quoted: paper Table 1, HDTF)" in line]
    assert len(quoted) == len(PAPER_TABLE1_HDTF)
    assert any("| IMGTalk (quoted" in line and "34.259" in line for line in quoted)
    assert "- FID: skipped: no FID weights" in text
    cross = table2(rows, "cross", skipped).splitlines()[0]
    assert "SSIM" not in cross and "FID" in cross and "LSE-D" in cross
    assert "w/o RSCA (quoted: paper Table 2, HDTF)" in table2(rows, "cross", skipped)


def _videos_parquet(folder, rows):
    os.makedirs(folder, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(folder, "videos.parquet"))


def test_dub_manifest_pairs_test_videos_with_their_own_or_the_next_audio(tmp_path):
    prepared = str(tmp_path / "prepared")
    _videos_parquet(prepared, [
        {"video_id": "c", "video_uri": "/v/c.mp4", "audio_uri": "/a/c.wav", "split": "test"},
        {"video_id": "a", "video_uri": "/v/a.mp4", "audio_uri": "", "split": "test"},
        {"video_id": "t", "video_uri": "/v/t.mp4", "audio_uri": "/a/t.wav", "split": "train"},
        {"video_id": "b", "video_uri": "/v/b.mp4", "audio_uri": "/a/b.wav", "split": "test"},
    ])
    storage, cfg = Storage(), EvalConfig()
    rec = dub_manifest(prepared, storage, "reconstruction", "/out", cfg)
    assert [(r["video_uri"], r["audio_uri"]) for r in rec] == [
        ("/v/a.mp4", "/v/a.mp4"), ("/v/b.mp4", "/a/b.wav"), ("/v/c.mp4", "/a/c.wav")]  # "" = own track
    assert rec[0]["output_uri"] == "/out/dubbed/a.mp4"
    cross = dub_manifest(prepared, storage, "cross", "/out", cfg)
    assert [r["audio_uri"] for r in cross] == ["/a/b.wav", "/a/c.wav", "/v/a.mp4"]
    with pytest.raises(EvalError, match="no video in split 'val'"):
        dub_manifest(prepared, storage, "reconstruction", "/out", EvalConfig(split="val"))
    with pytest.raises(EvalError, match="videos.parquet: not found"):
        dub_manifest(str(tmp_path / "nowhere"), storage, "reconstruction", "/out", cfg)


def test_metric_weights_are_found_or_skipped_with_the_reason(tmp_path):
    storage = Storage()
    weights, skipped = resolve_metric_weights(EvalConfig(), storage)
    assert weights == {} and set(skipped) == {"fid", "sync_conf", "sync_dist"}
    assert "pt_inception-2015-12-05-6726825d.pth" in skipped["fid"] and "syncnet_v2.model" in skipped["sync_conf"]
    folder = tmp_path / "mw"
    folder.mkdir()
    (folder / "weights-inception-2015-12-05-6726825d.pth").write_bytes(b"x")
    bundle = tmp_path / "bundle"
    (bundle / "syncnet").mkdir(parents=True)
    (bundle / "syncnet" / "syncnet_v2.model").write_bytes(b"x")
    weights, skipped = resolve_metric_weights(EvalConfig(metric_weights_uri=str(folder)), storage, [str(bundle)])
    assert weights == {"inception_uri": f"{folder}/weights-inception-2015-12-05-6726825d.pth",
                       "syncnet_uri": str(bundle / "syncnet" / "syncnet_v2.model")}
    assert skipped == {}


def test_summary_means_over_videos_and_fid_pooled_over_frames():
    rows = [
        EvalRow(bundle="b", protocol="reconstruction", video_uri="v1", audio_uri="", output_uri="o1", status="ok",
                ssim=0.8, psnr=20.0, lmd=2.0, sync_conf=5.0, sync_dist=7.0, gt_sync_conf=8.0, gt_sync_dist=6.0),
        EvalRow(bundle="b", protocol="reconstruction", video_uri="v2", audio_uri="", output_uri="o2", status="ok",
                ssim=0.6, psnr=30.0, lmd=4.0, sync_conf=3.0, sync_dist=9.0, gt_sync_conf=9.0, gt_sync_dist=5.0),
        EvalRow(bundle="b", protocol="reconstruction", video_uri="v3", audio_uri="", output_uri="o3", status="failed",
                error="boom"),
    ]
    rng = np.random.default_rng(0)
    real = rng.normal(0, 1, (3000, 4))
    shifted = rng.normal(0, 1, (3000, 4)) + [1.0, 0, 0, 0]
    features = {"b": {"real": [real[:1000], real[1000:]], "fake": [shifted[:1000], shifted[1000:]]}}
    got = summarise(rows, features, {})["b"]
    assert got["videos"] == 2 and got["failed"] == 1
    assert got["ssim"] == pytest.approx(0.7) and got["psnr"] == pytest.approx(25.0) and got["lmd"] == pytest.approx(3.0)
    assert got["sync_conf"] == pytest.approx(4.0) and got["gt_sync_conf"] == pytest.approx(8.5)
    assert got["fid_frames"] == 3000 and got["fid"] == pytest.approx(1.0, abs=0.15)  # a unit mean shift
    assert "fid_note" not in got  # 3000 frames: a full-rank covariance
    small = summarise(rows, {"b": {"real": [real[:100]], "fake": [shifted[:100]]}}, {})["b"]
    assert small["fid_frames"] == 100 and "rank-deficient" in small["fid_note"]
    skipped = summarise(rows, features, {"fid": "no weights", "sync_conf": "x"})["b"]
    assert skipped["fid"] is None and skipped["sync_conf"] is None  # never a made-up value


def test_pairs_from_report_keeps_outputs_that_exist(tmp_path):
    from pipeline.dub.schemas import ReportRow, write_report

    out = tmp_path / "made.mp4"
    out.write_bytes(b"x")
    base = dict(job_id="j", video_id="v", video_uri="/v.mp4", audio_uri="/a.wav")
    rows = [ReportRow(row_index=0, output_uri=str(out), status="ok", **base),
            ReportRow(row_index=1, output_uri=str(tmp_path / "gone.mp4"), status="skipped", **base),
            ReportRow(row_index=2, output_uri=str(tmp_path / "bad.mp4"), status="failed", error="x", **base),
            ReportRow(row_index=3, output_uri=str(out) + ".own", status="ok", **dict(base, audio_uri="/v.mp4"))]
    write_report(rows, str(tmp_path / "report.parquet"), Storage())
    pairs = pairs_from_report(str(tmp_path / "report.parquet"), Storage(), "cross", "lab")
    assert [(p["output_uri"], p["audio_uri"]) for p in pairs] == [(str(out), "/a.wav"), (str(out) + ".own", "")]
    assert all(p["bundle"] == "lab" and p["protocol"] == "cross" for p in pairs)


# ----------------------------------------------------------------------------- the job, end to end


def _blur_mouth_copy(src: str, dst: str) -> None:
    """A 'dub' of src: every frame's lower face blurred (the mouth re-rendered badly)."""
    import av
    import cv2

    with av.open(src) as inp, av.open(dst, "w") as out:
        vin = inp.streams.video[0]
        stream = out.add_stream("libx264", rate=vin.average_rate)
        stream.width, stream.height, stream.pix_fmt = vin.width, vin.height, "yuv420p"
        stream.options = {"crf": "12"}
        for frame in inp.decode(vin):
            img = frame.to_ndarray(format="rgb24")
            h, w = img.shape[:2]
            box = img[int(h * 0.45):int(h * 0.8), int(w * 0.3):int(w * 0.7)]
            box[:] = cv2.GaussianBlur(box, (0, 0), 4)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.fixture(scope="module")
def scored_report(tmp_path_factory):
    """A dub report of three rows: a blurred-mouth 'dub', an exact copy (known answers), and an
    ok row whose output has gone missing; plus metric weights in the real files' layouts."""
    import shutil
    from fractions import Fraction

    import torch

    from pipeline.dub.schemas import ReportRow, write_report
    from pipeline.sample_catalogue import SampleVideo, speak, write_video
    from stages.eval.inception import FIDInceptionV3
    from stages.eval.syncnet import SyncNet

    root = tmp_path_factory.mktemp("eval")
    src, wav = str(root / "src.mp4"), str(root / "src.wav")
    write_video(src, SampleVideo("src", Fraction(25), 1.6, "", size=(320, 240)))
    speak("Hello there, how are you?", wav)
    _blur_mouth_copy(src, str(root / "blurred.mp4"))
    shutil.copy(src, root / "copy.mp4")
    base = dict(job_id="j", video_id="v", video_uri=src, audio_uri=wav, status="ok")
    rows = [ReportRow(row_index=i, output_uri=str(root / name), **base)
            for i, name in enumerate(("blurred.mp4", "copy.mp4", "gone.mp4"))]
    write_report(rows, str(root / "report.parquet"), Storage())
    weights = root / "metric-weights"
    weights.mkdir()
    torch.manual_seed(0)
    FIDInceptionV3().save_file(str(weights / "pt_inception-2015-12-05-6726825d.pth"))
    SyncNet().save_file(str(weights / "syncnet_v2.model"))
    return {"root": root, "report": str(root / "report.parquet"), "weights": str(weights)}


def test_eval_job_scores_every_metric_with_weights_and_names_a_missing_output(local_ray, scored_report):
    from pipeline.eval.job import run_eval

    out = str(scored_report["root"] / "with-weights")
    config = EvalConfig(metric_weights_uri=scored_report["weights"], fid_stride=4)
    result = run_eval(out, "reconstruction", report_uri=scored_report["report"], config=config)
    table = pq.read_table(os.path.join(out, "eval.parquet")).to_pylist()
    blurred, copy, gone = table
    assert gone["status"] == "failed" and "gone.mp4" in gone["error"] and "no such file" in gone["error"]
    # the exact copy: known answers through the whole job
    assert copy["psnr"] == PSNR_CAP_DB and copy["ssim"] == pytest.approx(1.0) and copy["lmd"] == pytest.approx(0.0)
    assert copy["sync_conf"] == pytest.approx(copy["gt_sync_conf"]) and copy["sync_offset"] == copy["gt_sync_offset"]
    # the blurred mouth: worse on every image metric
    assert blurred["status"] == "ok" and blurred["face_frames"] == blurred["frames"] == 40
    assert 15 < blurred["psnr"] < PSNR_CAP_DB and 0 < blurred["ssim"] < 0.999 and blurred["lmd_frames"] > 30
    assert math.isfinite(blurred["sync_conf"]) and blurred["sync_conf"] >= 0 and abs(blurred["sync_offset"]) <= 15
    assert blurred["fid_frames"] == copy["fid_frames"] == 10  # every 4th of 40 face frames
    summary = json.loads(open(os.path.join(out, "summary.json")).read())
    entry = summary["bundles"][result.rows[0].bundle]
    assert entry["videos"] == 2 and entry["failed"] == 1 and entry["fid"] > 0
    assert summary["skipped"] == {} and "pytorch-fid" in json.dumps(summary["settings"]["fid"])
    text = open(os.path.join(out, "table.md")).read()
    assert "skipped" not in text.split("(quoted")[0] and f"{entry['psnr']:.3f}" in text


def test_eval_cli_without_weights_marks_the_skipped_metrics(local_ray, scored_report, capsys):
    from pipeline.cli import main

    out = str(scored_report["root"] / "no-weights")
    rc = main(["eval", "--report", scored_report["report"], "--out", out])  # cross protocol by default
    printed = capsys.readouterr().out
    assert rc == 3  # one row failed: its output is gone
    assert "FAILED" in printed and "gone.mp4" in printed
    header, _, ours = [line for line in printed.splitlines() if line.startswith("|")][:3]
    assert "SSIM" not in header and "FID" in header  # cross: no ground-truth frame
    assert ours.count("skipped") == 3  # FID, AVConf, LSE-D
    assert "- FID: skipped: no FID Inception weights" in printed
    summary = json.loads(open(os.path.join(out, "summary.json")).read())
    assert set(summary["skipped"]) == {"fid", "sync_conf", "sync_dist"}
    assert all(v["fid"] is None and v["sync_conf"] is None for v in summary["bundles"].values())
