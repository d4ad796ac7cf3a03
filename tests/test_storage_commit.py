"""Commits, finalize and the retry layers (issue 10, items 6 and 9).

- An S3 commit is one upload: no temporary key ever, and an upload that dies before it
  completes leaves no object at all (tests against moto's S3 server on loopback).
- Finalize is one streaming pass whose output equals the two-step concat + mux.
- The feature cache's writes are retried; finalize tasks reserve their pool's resources.
- The weights cache and the resume key share one content identity; a lost race to
  populate the cache leaves no copy behind.
- One retry layer on S3: botocore's adaptive mode, s3fs's own loop set to one attempt.
"""
import errno
import functools
import json
import os
import subprocess
import sys
import threading
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import av
import numpy as np
import pytest

from pipeline.config import JobConfig, PoolConfig
from pipeline.storage import Storage, StorageOptions, is_transient
from stages.media import SegmentWriter, concat_segments, decode_frames, mux_audio, probe_video, segment_plan
from stages.media.mux import mux_segments
from test_media import NTSC, index_of, make_audio, make_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """(boto3 client, Storage) on the loopback endpoint, with a fresh bucket per test."""
    import uuid

    import boto3

    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    bucket = "b" + uuid.uuid4().hex[:12]
    client.create_bucket(Bucket=bucket)
    return client, Storage(StorageOptions(endpoint_url=s3_endpoint)), bucket


def _keys(client, bucket, prefix=""):
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []))


# --------------------------------------------------------------------------- S3 commits


def test_s3_put_is_one_upload_readable_whole_and_never_a_temporary_key(s3, tmp_path, monkeypatch):
    import s3fs.core

    client, storage, bucket = s3
    fs, _ = storage.fs_for(f"s3://{bucket}/out/x")
    calls = []
    real = fs._call_s3

    async def recording(method, *args, **kwargs):
        calls.append((method, kwargs.get("Key")))
        return await real(method, *args, **kwargs)

    monkeypatch.setattr(fs, "_call_s3", recording)
    small = tmp_path / "small.bin"
    small.write_bytes(os.urandom(100_000))
    storage.put_atomic(str(small), f"s3://{bucket}/out/small.bin")
    # a large file goes up in parts (5 MiB here instead of s3fs's 50 MiB, to keep it small)
    monkeypatch.setattr(s3fs.core, "calculate_chunksize", lambda size, chunksize=None: 5 * 2**20)
    large = tmp_path / "large.bin"
    large.write_bytes(os.urandom(11 * 2**20 + 7))
    storage.put_atomic(str(large), f"s3://{bucket}/out/large.bin")

    assert _keys(client, bucket) == ["out/large.bin", "out/small.bin"]
    assert client.get_object(Bucket=bucket, Key="out/small.bin")["Body"].read() == small.read_bytes()
    assert client.get_object(Bucket=bucket, Key="out/large.bin")["Body"].read() == large.read_bytes()
    writes = [(m, k) for m, k in calls if m in ("put_object", "create_multipart_upload", "upload_part",
                                                "complete_multipart_upload", "copy_object", "delete_object")]
    assert writes[0] == ("put_object", "out/small.bin")
    assert [m for m, _ in writes[1:]] == ["create_multipart_upload"] + ["upload_part"] * 3 + ["complete_multipart_upload"]
    assert all(k == "out/large.bin" for _, k in writes[1:])  # one key, written once: no copy, no delete


_DIE_BEFORE_COMPLETING = r"""
import os, sys
import s3fs.core
from pipeline.storage import Storage, StorageOptions

storage = Storage(StorageOptions(endpoint_url=sys.argv[1]))
fs, _ = storage.fs_for(sys.argv[3])
s3fs.core.calculate_chunksize = lambda size, chunksize=None: 5 * 2**20
real = fs._call_s3

async def dying(method, *args, **kwargs):
    if method == "complete_multipart_upload":
        print("parts sent", flush=True)
        os._exit(9)  # the worker is killed: every part is up, the upload never completes
    return await real(method, *args, **kwargs)

fs._call_s3 = dying
storage.put_atomic(sys.argv[2], sys.argv[3])
"""


def test_a_crash_between_upload_and_commit_leaves_nothing_in_the_output_prefix(s3, tmp_path, monkeypatch):
    import s3fs.core

    client, storage, bucket = s3
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 * 2**20))
    uri = f"s3://{bucket}/out/v.mp4"
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", _DIE_BEFORE_COMPLETING, storage.options.endpoint_url, str(big), uri],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9 and "parts sent" in proc.stdout, proc.stderr
    assert _keys(client, bucket) == []  # no object, whole or partial, and no temporary key
    # What it left is an incomplete upload: invisible to readers (and to a lifecycle rule to expire).
    assert [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])] == ["out/v.mp4"]

    # A failure inside this process (a part's upload broken off) aborts the upload: nothing at all remains.
    other = f"s3://{bucket}/out/w.mp4"
    fs, _ = storage.fs_for(other)
    real = fs._call_s3

    async def broken(method, *args, **kwargs):
        if method == "upload_part" and kwargs.get("PartNumber") == 2:
            raise ConnectionResetError(errno.ECONNRESET, "reset by peer")
        return await real(method, *args, **kwargs)

    monkeypatch.setattr(fs, "_call_s3", broken)
    monkeypatch.setattr(s3fs.core, "calculate_chunksize", lambda size, chunksize=None: 5 * 2**20)
    storage = Storage(storage.options, sleep=lambda s: None)
    with pytest.raises(OSError):
        storage.put_atomic(str(big), other)
    assert _keys(client, bucket) == []
    assert [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])] == ["out/v.mp4"]


def test_a_failed_single_put_leaves_the_old_object_or_none(s3, tmp_path, monkeypatch):
    client, storage, bucket = s3
    uri = f"s3://{bucket}/out/r.json"
    storage.write_bytes_atomic(b'{"v": 1}', uri)
    storage = Storage(StorageOptions(endpoint_url=storage.options.endpoint_url, retries=2), sleep=lambda s: None)
    fs, _ = storage.fs_for(uri)
    real = fs._call_s3

    async def cut(method, *args, **kwargs):
        if method == "put_object":
            raise ConnectionResetError(errno.ECONNRESET, "reset by peer")
        return await real(method, *args, **kwargs)

    monkeypatch.setattr(fs, "_call_s3", cut)
    with pytest.raises(OSError, match="after 3 attempts"):
        storage.write_bytes_atomic(b'{"v": 2, "longer": true}', uri)
    src = tmp_path / "new.json"
    src.write_bytes(b'{"v": 3}')
    with pytest.raises(OSError):
        storage.put_atomic(str(src), uri)
    assert _keys(client, bucket) == ["out/r.json"]
    assert client.get_object(Bucket=bucket, Key="out/r.json")["Body"].read() == b'{"v": 1}'


# --------------------------------------------------------------------------- retries: one layer


def test_s3_filesystem_carries_botocore_adaptive_retries_and_s3fs_tries_once(s3_endpoint, monkeypatch):
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    fs, _ = Storage(StorageOptions(endpoint_url=s3_endpoint, retries=6)).fs_for("s3://any/key")
    assert fs.retries == 1
    # The client s3fs built, as botocore reads the setting (max_attempts 6 retries after the
    # first attempt: 7 in all).
    assert fs.s3.meta.config.retries == {"mode": "adaptive", "total_max_attempts": 7}
    other, _ = Storage(StorageOptions(endpoint_url=s3_endpoint)).fs_for("s3://any/key")
    assert other.retries == 1 and other.s3.meta.config.retries == {"mode": "adaptive", "total_max_attempts": 5}


class _AlwaysSlowDown:
    """An S3 endpoint on loopback that answers every request 503 SlowDown and counts them."""

    def __init__(self):
        self.count = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def answer(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                owner.count += 1
                body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def test_a_throttled_bucket_gets_botocores_attempts_only_not_a_product_of_layers(monkeypatch):
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    server = _AlwaysSlowDown()
    pauses = []
    try:
        storage = Storage(StorageOptions(endpoint_url=server.url, retries=2), sleep=pauses.append)
        with pytest.raises(OSError, match=r"read s3://bucket/key: storage error after the S3 client's retries") as e:
            storage.read_bytes("s3://bucket/key")
    finally:
        server.stop()
    assert server.count == 3  # botocore's max_attempts (retries + 1): not 3 x s3fs's 5 x ours 3
    assert pauses == []  # Storage.retry added no attempt of its own
    assert is_transient(e.value)  # still a transient failure, for whoever decides about the row


def test_errors_no_client_retries_are_still_retried_with_injected_backoff():
    from botocore.exceptions import ClientError, ResponseStreamingError

    pauses = []
    storage = Storage(StorageOptions(retries=3, backoff_s=0.1), sleep=pauses.append, jitter=lambda: 1.0)
    # A body broken off mid-read (after botocore's handler), and a local file system's hiccup.
    for error in (ResponseStreamingError(error="connection reset"), OSError(errno.EIO, "nfs")):
        calls = []

        def flaky(error=error):
            calls.append(1)
            if len(calls) < 3:
                raise error
            return "ok"

        pauses.clear()
        assert storage.retry(flaky, "read s3://b/k") == "ok"
        assert len(calls) == 3 and pauses == pytest.approx([0.1, 0.2])
    # An answer botocore already retried is not tried again by this layer.
    calls = []

    def throttled():
        calls.append(1)
        raise ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject")

    pauses.clear()
    with pytest.raises(OSError, match="after the S3 client's retries"):
        storage.retry(throttled, "read s3://b/k")
    assert len(calls) == 1 and pauses == []


def test_a_body_cut_off_mid_read_of_an_open_object_is_read_again(s3, monkeypatch):
    """Streamed reads (PyAV on an fsspec file: finalize, decode) fetch ranges; a range
    whose body breaks off after botocore's handler is retried by Storage.retry."""
    import s3fs.core
    from botocore.exceptions import ResponseStreamingError

    client, storage, bucket = s3
    data = os.urandom(3 * 2**20)
    client.put_object(Bucket=bucket, Key="in/v.mp4", Body=data)
    real, cuts = s3fs.core._inner_fetch, []

    async def cut_once(*args, **kwargs):
        if not cuts:
            cuts.append(1)
            raise ResponseStreamingError(error="connection reset while reading the body")
        return await real(*args, **kwargs)

    monkeypatch.setattr(s3fs.core, "_inner_fetch", cut_once)
    pauses = []
    storage = Storage(storage.options, sleep=pauses.append, jitter=lambda: 1.0)
    with storage.open(f"s3://{bucket}/in/v.mp4", "rb", block_size=2**20) as f:
        assert f.read() == data
    assert cuts == [1] and pauses == [storage.options.backoff_s]


# --------------------------------------------------------------------------- feature cache


def test_feature_cache_store_retries_a_transient_write_error(tmp_path, tiny_bundle, monkeypatch):
    from pipeline.features import hubert_and_cache
    from pipeline.weights import read_bundle_info

    pauses = []
    storage = Storage(StorageOptions(retries=2, backoff_s=0.25), sleep=pauses.append, jitter=lambda: 1.0)
    _, cache = hubert_and_cache(JobConfig(cache_uri=str(tmp_path / "cache")), read_bundle_info(tiny_bundle), storage)
    real_mv, failures = cache.fs.mv, []

    def flaky_mv(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise OSError(errno.EIO, "input/output error")
        return real_mv(*args, **kwargs)

    monkeypatch.setattr(cache.fs, "mv", flaky_mv)
    features = np.random.rand(8, 4).astype(np.float32)
    stored = cache.store("m-50hz", "sha", features, duration_s=0.16)
    assert failures == [1] and pauses == [0.25]  # failed once, retried after the injected pause
    found = cache.lookup("m-50hz", "sha")
    assert found == stored and np.array_equal(cache.read_window(found, 0, 4), features)
    folder = os.path.dirname(stored.path)
    assert os.listdir(folder) == ["sha.parquet"]  # the failed try left no temporary file


def test_feature_cache_on_s3_commits_with_one_put(s3):
    from stages.audio.cache import FeatureCache

    client, storage, bucket = s3
    fs, root = storage.fs_for(f"s3://{bucket}/cache")
    cache = FeatureCache(fs, root, retry=storage.retry)
    features = np.random.rand(6, 3).astype(np.float32)
    stored = cache.store("m-50hz", "abc", features, duration_s=0.12)
    assert _keys(client, bucket) == ["cache/hubert/m-50hz/abc.parquet"]
    assert np.array_equal(cache.read_window(stored, 0, 3), features)


# --------------------------------------------------------------------------- finalize


def _segments(source, folder, seconds=1.0):
    info = probe_video(source)
    paths = []
    for seg in segment_plan("v", info, seconds):
        path = str(folder / f"seg{seg.seg_idx}.mp4")
        with SegmentWriter(path, info.width, info.height, info.fps, seg.frame_start, preset="veryfast") as writer:
            for _, img in decode_frames(source, seg.frame_start, seg.frame_end):
                writer.write(img)
        paths.append(path)
    return info, paths


def _contents(path):
    """Every video packet's bytes and timing, the decoded frames, and the decoded audio."""
    with av.open(path) as c:
        v = c.streams.video[0]
        packets = [(bytes(p), p.pts, p.dts, p.is_keyframe) for p in c.demux(v) if p.size]
    with av.open(path) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    with av.open(path) as c:
        a = c.streams.audio[0]
        n_audio_packets = sum(1 for p in c.demux(a) if p.size)
    with av.open(path) as c:
        a = c.streams.audio[0]
        samples = np.concatenate([f.to_ndarray() for f in c.decode(a)], axis=1)
        audio = (a.codec_context.name, a.rate, a.codec_context.channels, float(a.duration * a.time_base))
    return packets, frames, n_audio_packets, samples, audio


@pytest.mark.parametrize("audio_kind", ["short_mono_wav", "long_stereo_aac"])
def test_one_pass_mux_equals_concat_then_mux(tmp_path, audio_kind):
    source = make_video(tmp_path / "src.mp4", NTSC, 70, first_pts=5)
    info, parts = _segments(source, tmp_path)
    assert len(parts) == 2
    if audio_kind == "short_mono_wav":
        audio = make_audio(tmp_path / "dub.wav", 1.5, rate=22050, layout="mono", codec="pcm_s16le")
    else:
        audio = make_audio(tmp_path / "dub.m4a", 3.1, rate=44100, layout="stereo")

    joined, two_step = str(tmp_path / "joined.mp4"), str(tmp_path / "two.mp4")
    concat_segments(parts, joined)
    expected = mux_audio(joined, audio, two_step, rotation=90)
    one_pass = str(tmp_path / "one.mp4")
    # the segments as finalize hands them over: each opened (as a file object) only when its turn comes
    opened = []

    def opener(path):
        opened.append(path)
        return open(path, "rb")

    with open(audio, "rb") as audio_file:
        got = mux_segments([functools.partial(opener, p) for p in parts], audio_file, one_pass, rotation=90)

    assert opened == [parts[0]] + parts  # the first one twice: its header is the output stream's template
    assert got == expected
    assert (got.padded_s > 0) == (audio_kind == "short_mono_wav") and (got.trimmed_s > 0) == (audio_kind != "short_mono_wav")
    a, b = _contents(two_step), _contents(one_pass)
    assert a[0] == b[0]  # the same video packets, bytes and timestamps
    assert len(b[1]) == info.n_frames and all(np.array_equal(x, y) for x, y in zip(a[1], b[1]))
    assert [index_of(f) for f in b[1]] == list(range(info.n_frames))
    assert a[2] == b[2]  # as many audio packets
    assert np.array_equal(a[3], b[3]) and a[4] == b[4]  # the same decoded audio, codec, rate, layout, duration
    out = probe_video(one_pass)
    assert (out.n_frames, out.fps, out.rotation, out.has_audio) == (info.n_frames, info.fps, 90, True)


def test_one_pass_mux_keeps_concats_checks_and_leaves_no_partial_file(tmp_path):
    from stages.media import MediaError, encode_frames

    a, b = str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4")
    encode_frames(a, [np.zeros((48, 64, 3), np.uint8)] * 2, 64, 48, Fraction(25))
    encode_frames(b, [np.zeros((48, 80, 3), np.uint8)] * 2, 80, 48, Fraction(25), frame_start=2)
    audio = make_audio(tmp_path / "dub.wav", 0.2, codec="pcm_s16le")
    out = str(tmp_path / "out.mp4")
    with pytest.raises(MediaError, match="b.mp4.*size"):
        mux_segments([a, b], audio, out)
    assert not os.path.exists(out)
    with pytest.raises(MediaError, match="no segments"):
        mux_segments([], audio, out)


def test_finalize_streams_segments_and_audio_from_s3_and_commits_once(s3, tmp_path, monkeypatch):
    from pipeline.dub import finalize as finalize_step

    client, storage, bucket = s3
    source = make_video(tmp_path / "src.mp4", Fraction(25), 60)
    info, parts = _segments(source, tmp_path)
    audio = make_audio(tmp_path / "dub.m4a", 2.0)
    segments = []
    for i, part in enumerate(parts):
        client.upload_file(part, bucket, f"work/seg{i}.mp4")
        segments.append({"seg_idx": i, "segment_uri": f"s3://{bucket}/work/seg{i}.mp4"})
    client.upload_file(audio, bucket, "in/dub.m4a")
    video = {"video_uri": "unused", "audio_uri": f"s3://{bucket}/in/dub.m4a", "output_uri": f"s3://{bucket}/out/v.mp4",
             "rotation": 0}
    config = JobConfig(storage={"endpoint_url": storage.options.endpoint_url}).model_dump(mode="json")
    # Nothing is downloaded whole: the only local file is the output.
    monkeypatch.setattr(Storage, "local_copy", None)
    monkeypatch.setattr(Storage, "read_bytes", None)

    first = finalize_step.finalize_video(config, video, list(reversed(segments)))
    assert first["output_frames"] == info.n_frames
    body = client.get_object(Bucket=bucket, Key="out/v.mp4")["Body"].read()
    import hashlib

    assert hashlib.sha256(body).hexdigest() == first["output_sha256"] and len(body) == first["output_bytes"]
    assert _keys(client, bucket, "out/") == ["out/v.mp4"]
    puts = []
    real_put = Storage.put_atomic
    monkeypatch.setattr(Storage, "put_atomic", lambda self, *a: (puts.append(a), real_put(self, *a)))
    again = finalize_step.finalize_video(config, video, segments)  # Ray's retry after a lost answer
    assert again["output_sha256"] == first["output_sha256"] and puts == []  # same bytes there: not uploaded again


def test_finalize_tasks_reserve_their_pools_resources():
    import ray

    pool = PoolConfig(size=2, num_cpus=1.5, num_gpus=0.5, memory_gb=3.0)
    assert pool.task_args() == {"num_cpus": 1.5, "num_gpus": 0.5, "memory": 3 * 2**30}
    assert PoolConfig().task_args() == {"num_cpus": 0.25}
    task = ray.remote(max_retries=2, **pool.task_args())(lambda: None)  # as pipeline/dub/job.py builds finalize
    assert {k: task._default_options[k] for k in ("num_cpus", "num_gpus", "memory")} == pool.task_args()
    with open(os.path.join(ROOT, "pipeline", "dub", "job.py")) as f:
        assert 'ray.remote(max_retries=2, **pools["finalize"].task_args())(finalize_step.finalize_video)' in f.read()


# --------------------------------------------------------------------------- weights cache


def _fake_bundle(folder, stage2: bytes):
    os.makedirs(folder / "stage2", exist_ok=True)
    (folder / "bundle.json").write_text(json.dumps({"format": "imgtalk-weights", "version": 1}))
    (folder / "stage2" / "model.safetensors").write_bytes(stage2)
    return str(folder)


def test_reuploading_one_bundle_file_is_a_new_cache_entry_and_a_new_resume_key(s3, tmp_path, monkeypatch):
    from pipeline.weights import bundle_identity, localize_bundle, upload_folder
    from pipeline.workarea import work_fingerprint

    client, storage, bucket = s3
    monkeypatch.setenv("IMGTALK_CACHE_DIR", str(tmp_path / "cache"))
    uri = f"s3://{bucket}/weights"
    upload_folder(storage, _fake_bundle(tmp_path / "v1", b"old weights"), uri)
    ident, key = bundle_identity(uri, storage), work_fingerprint(JobConfig(), uri, storage)
    first = localize_bundle(uri, storage)
    assert open(os.path.join(first, "stage2", "model.safetensors"), "rb").read() == b"old weights"
    assert localize_bundle(uri, storage) == first  # cached

    # stage2/ re-uploaded (same size), bundle.json untouched
    client.put_object(Bucket=bucket, Key="weights/stage2/model.safetensors", Body=b"new weights")
    assert bundle_identity(uri, storage) != ident
    assert work_fingerprint(JobConfig(), uri, storage) != key
    second = localize_bundle(uri, storage)
    assert second != first
    assert open(os.path.join(second, "stage2", "model.safetensors"), "rb").read() == b"new weights"
    assert sorted(os.listdir(tmp_path / "cache" / "bundles")) == sorted([os.path.basename(first), os.path.basename(second)])


def test_the_local_identity_follows_any_file_and_needs_bundle_json(tmp_path):
    from pipeline.weights import BundleError, bundle_identity

    root = _fake_bundle(tmp_path / "b", b"w")
    base = bundle_identity(root)
    assert bundle_identity("file://" + root) == base
    path = os.path.join(root, "stage2", "model.safetensors")
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert bundle_identity(root) != base
    os.remove(os.path.join(root, "bundle.json"))
    with pytest.raises(BundleError, match="bundle.json"):
        bundle_identity(root)


def test_two_workers_racing_to_cache_a_bundle_leave_one_copy(s3, tmp_path, monkeypatch):
    from pipeline.weights import localize_bundle, upload_folder

    client, storage, bucket = s3
    monkeypatch.setenv("IMGTALK_CACHE_DIR", str(tmp_path / "cache"))
    uri = f"s3://{bucket}/weights"
    upload_folder(storage, _fake_bundle(tmp_path / "v1", b"weights"), uri)
    both_downloaded = threading.Barrier(2, timeout=60)

    class Racing(Storage):
        def retry(self, fn, what):
            result = super().retry(fn, what)
            if what.startswith("download bundle"):
                both_downloaded.wait()  # neither renames its copy before both have one
            return result

    results, errors = [], []

    def worker():
        try:
            results.append(localize_bundle(uri, Racing(storage.options)))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(results)) == 1
    assert os.listdir(tmp_path / "cache" / "bundles") == [os.path.basename(results[0])]  # the loser's copy is gone
    assert open(os.path.join(results[0], "stage2", "model.safetensors"), "rb").read() == b"weights"
