"""The dubbing job end to end on a real local Ray (num_cpus=2) with a tiny random bundle
on generated media: once on local folders, once against a real S3 endpoint on loopback
(moto server) for manifest, cache, outputs and report."""
import os
import shutil
from fractions import Fraction

import av
import numpy as np
import pytest

from pipeline.config import JobConfig
from pipeline.sample_catalogue import SampleVideo, speak, write_video
from pipeline.dub.schemas import read_report, write_manifest
from pipeline.storage import Storage
from pipeline.weights import init_bundle
from stages.media import decode_frames, probe_video

# espeak-ng (installed by scripts/install.sh) speaks the dubbed tracks; without it the
# fixtures fail with a SampleError that says so, rather than skipping.

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-DO-NOT-LOG",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ.update(S3_ENV)
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("weights") / "tiny")
    init_bundle(path, size="tiny")
    return path


SMALL = (320, 240)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    v = {}
    v["a25"] = SampleVideo("a25", Fraction(25), 2.4, "", size=SMALL)
    v["b2997"] = SampleVideo("b2997", Fraction(30000, 1001), 2.0, "", no_face=(0.8, 1.3), size=SMALL)
    v["noface"] = SampleVideo("noface", Fraction(25), 1.0, "", no_face=(0.0, 5.0), size=SMALL)
    paths = {}
    for name, s in v.items():
        paths[name] = str(root / f"{name}.mp4")
        write_video(paths[name], s)
    speak("Hi.", str(root / "short.wav"))  # shorter than a25: padded
    speak("This dubbed line goes on for quite a bit longer than the picture does.", str(root / "long.wav"))
    (root / "corrupt.mp4").write_bytes(os.urandom(5000))
    (root / "garbled.wav").write_bytes(b"RIFF" + os.urandom(3000))
    # an audio-only file handed over as a video
    shutil.copy(root / "short.wav", root / "audio_only.mp4.wav")
    paths.update(
        short=str(root / "short.wav"),
        long=str(root / "long.wav"),
        corrupt=str(root / "corrupt.mp4"),
        garbled=str(root / "garbled.wav"),
        audio_only=str(root / "audio_only.mp4.wav"),
        root=str(root),
    )
    return paths


def _rows(media, out):
    return [
        {"video_uri": media["a25"], "audio_uri": media["short"], "output_uri": f"{out}/a25.mp4"},
        {"video_uri": media["b2997"], "audio_uri": media["long"], "output_uri": f"{out}/b2997.mp4"},
        {"video_uri": media["corrupt"], "audio_uri": media["short"], "output_uri": f"{out}/corrupt.mp4"},
        {"video_uri": media["noface"], "audio_uri": media["short"], "output_uri": f"{out}/noface.mp4"},
        {"video_uri": media["audio_only"], "audio_uri": media["short"], "output_uri": f"{out}/audio_only.mp4"},
        {"video_uri": media["a25"], "audio_uri": media["root"] + "/missing.wav", "output_uri": f"{out}/missing_audio.mp4"},
        {"video_uri": media["a25"], "audio_uri": media["garbled"], "output_uri": f"{out}/garbled_audio.mp4"},
    ]


def by_stage(report):
    out = {}
    for r in report:
        if r.status == "failed":
            out[r.error_stage] = out.get(r.error_stage, 0) + 1
    return out


def _mean_abs(a, b):
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _check_outputs(report, media, fetch):
    by_name = {os.path.basename(r.output_uri).split(".")[0]: r for r in report}
    assert by_name["a25"].status == "ok", by_name["a25"].error
    assert by_name["b2997"].status == "ok", by_name["b2997"].error
    for name, needle in [("corrupt", "corrupt.mp4"), ("noface", "no face"), ("audio_only", "no video stream"),
                         ("missing_audio", "missing.wav"), ("garbled_audio", "garbled.wav")]:
        r = by_name[name]
        assert r.status == "failed", name
        assert needle in r.error, (name, r.error)
    for name in ("a25", "b2997"):
        r = by_name[name]
        local = fetch(r.output_uri)
        src, out = probe_video(media[name]), probe_video(local)
        assert (out.width, out.height, out.fps, out.n_frames) == (src.width, src.height, src.fps, src.n_frames)
        assert r.output_frames == src.n_frames == r.source_frames
        with av.open(local) as c:
            assert len(c.streams.audio) == 1 and c.streams.audio[0].codec_context.name == "aac"
            audio_dur = float(c.streams.audio[0].duration * c.streams.audio[0].time_base)
        assert abs(audio_dur - src.duration_s) < 0.1
        assert r.output_sha256 and r.output_bytes == os.path.getsize(local)
    assert by_name["a25"].audio_padded_s > 0 and by_name["a25"].audio_trimmed_s == 0
    assert by_name["b2997"].audio_trimmed_s > 0 and by_name["b2997"].audio_padded_s == 0
    # frames without a face are the source frames up to codec loss; with a face the mouth changed
    out_b = fetch(by_name["b2997"].output_uri)
    fps = Fraction(30000, 1001)
    i_noface = int(1.0 * fps)
    src_f = next(decode_frames(media["b2997"], i_noface, i_noface + 1))[1]
    out_f = next(decode_frames(out_b, i_noface, i_noface + 1))[1]
    assert _mean_abs(src_f, out_f) < 3.0
    assert 0.5 < by_name["b2997"].face_fraction < 0.9
    assert by_name["a25"].face_fraction == pytest.approx(1.0)


def test_dub_local_folders(ray_local, bundle, media, tmp_path):
    from pipeline.dub.job import run_dub

    out = str(tmp_path / "out")
    manifest = str(tmp_path / "manifest.parquet")
    # a25's dub track is this job's own copy: the third run re-records it
    a25_audio = str(tmp_path / "a25-dub.wav")
    shutil.copy(media["short"], a25_audio)
    rows = [dict(r, audio_uri=a25_audio) if r["output_uri"].endswith("/a25.mp4") else r for r in _rows(media, out)]
    write_manifest(rows, manifest, Storage())
    config = JobConfig(segment_seconds=1.0, cache_uri=str(tmp_path / "cache"))
    result = run_dub(manifest, bundle, str(tmp_path / "report.parquet"), config)
    report = read_report(str(tmp_path / "report.parquet"), Storage())
    assert [r.row_index for r in report] == list(range(7))
    _check_outputs(report, media, fetch=lambda uri: uri)
    assert result.counts == {"ok": 2, "failed": 5, "skipped": 0}
    assert by_stage(report) == {"plan": 3, "analyse": 1, "audio": 1}
    # A random bundle dubs, and says so: in the result and on every ok row of the report.
    assert len(result.warnings) == 1 and "untrained weights bundle" in result.warnings[0]
    assert all(r.warnings.startswith(result.warnings[0]) for r in report if r.status == "ok")
    assert all(r.warnings is None for r in report if r.status != "ok")
    # The QC columns (pipeline/dub/qc.py): the dubbed tracks miss the videos' lengths by
    # more than 0.5 s both ways, and each row says so with the seconds; the faces are on
    # most frames (no face warning); this bundle has no SyncNet, so no sync figures.
    import pyarrow.parquet as pq

    columns = pq.read_schema(str(tmp_path / "report.parquet")).names
    assert {"sync_conf", "sync_dist", "sync_offset", "warnings"} <= set(columns)
    a25, b2997 = report[0], report[1]
    assert a25.audio_padded_s > 0.5 and f"dubbed audio padded with {a25.audio_padded_s:.2f} s" in a25.warnings
    assert b2997.audio_trimmed_s > 0.5 and f"dubbed audio trimmed by {b2997.audio_trimmed_s:.2f} s" in b2997.warnings
    assert "trimmed" not in a25.warnings and "padded" not in b2997.warnings
    assert all(len(r.warnings.split("; ")) == 2 for r in (a25, b2997))  # untrained + the audio fit
    assert all((r.sync_conf, r.sync_dist, r.sync_offset) == (None, None, None) for r in report)
    # a25 spans 3 segments of 1 s (2.4 s, the 0.4 s tail merged)
    assert report[0].segments == 2 and report[1].segments == 2
    # nothing half-written at the output location
    assert sorted(os.listdir(out)) == ["a25.mp4", "b2997.mp4"]
    # the work area keeps only each video's durable result: reference banks and encoded
    # parts are dropped once settled
    work = tmp_path / "cache" / "work"
    kept = sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file())
    assert kept == sorted(f"results/{r.video_id}.json" for r in report if r.error_stage != "manifest"), kept
    assert report[0].feature_cache_hit is False

    # Re-run: committed outputs are skipped, and their rows are the first run's (frames,
    # sha, timings); a second dub of the same audio hits the cache.
    rows2 = rows + [{"video_uri": media["b2997"], "audio_uri": media["long"], "output_uri": f"{out}/b2997_again.mp4"}]
    write_manifest(rows2, manifest, Storage())
    sha_before = report[0].output_sha256
    run_dub(manifest, bundle, str(tmp_path / "report2.parquet"), config)
    report2 = read_report(str(tmp_path / "report2.parquet"), Storage())
    for first, again in zip(report[:2], report2[:2]):
        assert again.status == "skipped" and again.error is None
        assert again.job_id != first.job_id and again.result_job_id == first.job_id == first.result_job_id
        for key in ("output_frames", "output_sha256", "output_bytes", "source_frames", "segments", "time_face_s", "time_finalize_s"):
            assert getattr(again, key) == getattr(first, key) is not None, key
    assert [r.status for r in report2[2:7]] == ["failed"] * 5  # failures are tried again
    assert report2[7].status == "ok" and report2[7].feature_cache_hit is True
    assert Storage().sha256(f"{out}/a25.mp4") == sha_before

    # A re-recorded dub track is redone; unchanged rows are skipped.
    shutil.copy(media["long"], a25_audio)
    write_manifest(rows2[:2], manifest, Storage())
    run_dub(manifest, bundle, str(tmp_path / "report3.parquet"), config)
    report3 = read_report(str(tmp_path / "report3.parquet"), Storage())
    assert [r.status for r in report3] == ["ok", "skipped"], [r.error for r in report3]
    assert report3[0].output_sha256 != sha_before
    assert report3[0].audio_trimmed_s > 0 and Storage().sha256(f"{out}/a25.mp4") == report3[0].output_sha256
    # --force redoes a video whose output is current (the CLI flag is run_dub's force)
    write_manifest(rows2[1:2], manifest, Storage())
    run_dub(manifest, bundle, str(tmp_path / "report4.parquet"), config, force=True)
    report4 = read_report(str(tmp_path / "report4.parquet"), Storage())
    assert report4[0].status == "ok" and report4[0].result_job_id == report4[0].job_id != report2[1].result_job_id
    assert report4[0].output_frames == report[1].output_frames


def test_dub_against_s3(ray_local, bundle, media, s3_endpoint, tmp_path, monkeypatch):
    import boto3

    monkeypatch.chdir(tmp_path)  # the job log of a report in object storage goes to the current folder

    from pipeline.config import StorageConfig
    from pipeline.dub.job import run_dub

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, **{k.lower(): v for k, v in S3_ENV.items() if k != "AWS_DEFAULT_REGION"}, region_name="us-east-1")
    s3.create_bucket(Bucket="catalogue")
    for key in ("a25", "b2997", "short", "long", "corrupt"):
        s3.upload_file(media[key], "catalogue", f"in/{os.path.basename(media[key])}")
    rows = [
        {"video_uri": "s3://catalogue/in/a25.mp4", "audio_uri": "s3://catalogue/in/short.wav", "output_uri": "s3://catalogue/out/a25.mp4"},
        {"video_uri": "s3://catalogue/in/b2997.mp4", "audio_uri": "s3://catalogue/in/long.wav", "output_uri": "s3://catalogue/out/b2997.mp4"},
        {"video_uri": "s3://catalogue/in/corrupt.mp4", "audio_uri": "s3://catalogue/in/short.wav", "output_uri": "s3://catalogue/out/corrupt.mp4"},
    ]
    config = JobConfig(segment_seconds=1.0, cache_uri="s3://catalogue/cache", storage=StorageConfig(endpoint_url=s3_endpoint))
    storage = Storage(config.storage.options())
    write_manifest(rows, "s3://catalogue/manifest.parquet", storage)
    run_dub("s3://catalogue/manifest.parquet", bundle, "s3://catalogue/report.parquet", config)
    report = read_report("s3://catalogue/report.parquet", storage)
    assert [r.status for r in report] == ["ok", "ok", "failed"], [r.error for r in report]
    assert "corrupt.mp4" in report[2].error
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="catalogue", Prefix="out/").get("Contents", []))
    assert keys == ["out/a25.mp4", "out/b2997.mp4"]  # no temporary keys left behind
    cache_keys = [o["Key"] for o in s3.list_objects_v2(Bucket="catalogue", Prefix="cache/hubert/")["Contents"]]
    # Per dubbed track: its HuBERT features and its speech level (the silence gate's).
    assert len(cache_keys) == 4 and all(k.endswith(".parquet") for k in cache_keys)
    assert sum("/speech-level-db-v1/" in k for k in cache_keys) == 2

    def fetch(uri):
        local = str(tmp_path / os.path.basename(uri))
        s3.download_file("catalogue", uri.split("catalogue/", 1)[1], local)
        return local

    for r, name in zip(report[:2], ("a25", "b2997")):
        src, out = probe_video(media[name]), probe_video(fetch(r.output_uri))
        assert (out.width, out.height, out.fps, out.n_frames) == (src.width, src.height, src.fps, src.n_frames)
    # the fake secret never reaches the report
    assert S3_ENV["AWS_SECRET_ACCESS_KEY"] not in open(fetch("s3://catalogue/report.parquet"), "rb").read().decode("latin-1")
