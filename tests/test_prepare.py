"""`imgtalk prepare` end to end on a real local Ray: a small corpus of generated talking-head
videos (one at 29.97 fps, resampled to 25) with espeak-ng speech, a corrupt file, local
folders and an S3 endpoint on loopback. Every shard value is checked against the stage that
should have produced it."""
import io
import json
import os
from fractions import Fraction

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.arrays import unpack
from pipeline.prepare.config import PrepareConfig
from pipeline.sample_catalogue import SampleVideo, speak, write_video
from pipeline.storage import Storage
from pipeline.weights import load_hubert, load_motion_extractor, read_bundle_info

SMALL = (320, 240)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    videos = {
        "anna_1": SampleVideo("anna_1", Fraction(25), 2.0, "", size=SMALL),
        "anna_2": SampleVideo("anna_2", Fraction(30000, 1001), 2.0, "", size=SMALL),
        "ben": SampleVideo("ben", Fraction(25), 2.0, "", size=SMALL),
        "carl": SampleVideo("carl", Fraction(25), 2.0, "", no_face=(0.8, 1.2), size=SMALL),
        "dora": SampleVideo("dora", Fraction(25), 2.0, "", size=SMALL),
    }
    rows = []
    for name, s in videos.items():
        write_video(str(root / f"{name}.mp4"), s)
        speak("Hello there, this is a short line.", str(root / f"{name}.wav"))
        rows.append({"video_uri": str(root / f"{name}.mp4"), "audio_uri": str(root / f"{name}.wav"),
                     "speaker_id": name.split("_")[0]})
    (root / "corrupt.mp4").write_bytes(os.urandom(4000))
    speak("Hi.", str(root / "corrupt.wav"))
    rows.append({"video_uri": str(root / "corrupt.mp4"), "audio_uri": str(root / "corrupt.wav"), "speaker_id": "eve"})
    return root, rows


def _manifest(rows, uri, storage):
    import pyarrow as pa

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    storage.write_bytes_atomic(buf.getvalue(), uri)


def _config(tmp_path, **extra):
    return PrepareConfig(cache_uri=str(tmp_path / "cache"), chunk_seconds=1.0, min_usable_seconds=0.5, **extra)


def _read_parquet(storage, uri):
    return pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pylist()


def test_prepare_local_shards_round_trip_and_rerun_skips(local_ray, tiny_bundle, corpus, tmp_path, monkeypatch):
    from pipeline.prepare.job import run_prepare
    from stages.audio import load_audio
    from stages.corpus.chunk import decode_crop
    from stages.face import FaceTracker, crop_faces
    from stages.media.decode import decode_at_rate
    from stages.motion.extractor import extract_motion

    root, rows = corpus
    storage = Storage()
    manifest = str(tmp_path / "corpus.parquet")
    _manifest(rows, manifest, storage)
    out = str(tmp_path / "shards")
    config = _config(tmp_path)
    result = run_prepare(manifest, tiny_bundle, out, config)

    by_name = {os.path.basename(r.video_uri): r for r in result.rows}
    bad = by_name["corrupt.mp4"]
    assert bad.status == "failed" and bad.error_stage == "plan" and "corrupt.mp4" in bad.error
    assert all(by_name[f"{n}.mp4"].status == "ok" for n in ("anna_1", "anna_2", "ben", "carl", "dora"))
    assert by_name["anna_2.mp4"].frames == 50  # 2 s at 29.97 fps resampled to 25 fps

    # Splits: disjoint by speaker, every split used, both videos of a speaker together.
    videos = _read_parquet(storage, os.path.join(out, "videos.parquet"))
    split_of = {}
    for v in videos:
        assert split_of.setdefault(v["speaker_id"], v["split"]) == v["split"]
    assert set(split_of.values()) == {"train", "val", "test"}
    assert len(videos) == 5

    # One shard, every column against the stage that made it.
    info = read_bundle_info(tiny_bundle)
    extractor = load_motion_extractor(info)
    hubert = load_hubert(info)
    video = next(v for v in videos if v["video_uri"].endswith("anna_2.mp4"))
    shard = _read_parquet(storage, video["chunk_uris"][1])[0]
    first, n = shard["frame_start"], shard["n"]
    assert (first, n) == (25, 25)
    has_face = unpack(shard["has_face"])
    assert has_face.all()
    stored = np.stack([decode_crop(b) for b in shard["crops"]])
    # Crop pixels: the same chunk tracked and cropped again, against the stored JPEGs.
    frames = decode_at_rate(video["video_uri"], first, first + n, Fraction(30000, 1001), 60)
    with FaceTracker(min_face_px=40.0) as tracker:
        crops, _ = crop_faces(frames, tracker(frames))
    mse = np.mean((crops.astype(np.float64) - stored) ** 2)
    psnr = 10 * np.log10(255.0**2 / mse)
    assert psnr > 35.0, psnr
    # Motion: exactly the extractor on the stored crops.
    motion = extract_motion(extractor, stored)
    np.testing.assert_allclose(unpack(shard["exp"]), motion["exp"], atol=1e-6)
    np.testing.assert_allclose(unpack(shard["x_c"]), motion["x_c"], atol=1e-6)
    np.testing.assert_allclose(unpack(shard["pose"])[:, 1], motion["yaw"], atol=1e-4)
    # Audio: the audio stage's 50 Hz rows of these frames, two per frame.
    features = hubert(load_audio(str(root / "anna_2.wav")))
    want = features[2 * first: 2 * (first + n)]
    got = unpack(shard["audio"])
    assert got.shape == (n, 2, features.shape[1])
    np.testing.assert_allclose(got.reshape(-1, features.shape[1])[: len(want)], want, atol=1e-6)
    # Speech: the frames' own 16 kHz samples, 640 a frame, as 16-bit PCM (silence past the end).
    samples = load_audio(str(root / "anna_2.wav"))[640 * first: 640 * (first + n)]
    wave = unpack(shard["wave"])
    assert wave.shape == (n, 640) and wave.dtype == np.int16 and len(samples) > 0
    np.testing.assert_allclose(wave.reshape(-1)[: len(samples)] / 32768, samples, atol=1 / 32768)
    assert not wave.reshape(-1)[len(samples):].any()

    # A face-absent span breaks the shot: no shot id on both sides of it.
    carl = next(v for v in videos if v["video_uri"].endswith("carl.mp4"))
    shots = np.concatenate([unpack(_read_parquet(storage, u)[0]["shot"]) for u in carl["chunk_uris"]])
    face = np.concatenate([unpack(_read_parquet(storage, u)[0]["has_face"]) for u in carl["chunk_uris"]])
    assert not face[20:30].any() and (shots[20:30] == -1).all()
    assert set(shots[:20]).isdisjoint(set(shots[30:])) and (shots[:20] == 0).all() and (shots[30:] == 30).all()

    # The card's statistics are exact: recompute δ's mean over the train split's usable frames.
    card = json.loads(storage.read_bytes(os.path.join(out, "card.json")))
    train = [v for v in videos if v["split"] == "train"]
    exps = []
    for v in train:
        for u in v["chunk_uris"]:
            s = _read_parquet(storage, u)[0]
            exps.append(unpack(s["exp"])[unpack(s["shot"]) >= 0])
    exps = np.concatenate(exps)
    np.testing.assert_allclose(np.array(card["statistics"]["exp"]["mean"]), exps.mean(0), atol=1e-6)
    assert card["statistics"]["frames"] == len(exps)
    assert card["splits"]["train"]["speakers"] == sorted({v["speaker_id"] for v in train})
    assert card["videos"] == 5 and card["speakers"] == 4

    # A rerun skips every prepared video and touches none of its shards.
    mtimes = {u: os.stat(u).st_mtime_ns for v in videos for u in v["chunk_uris"]}
    again = run_prepare(manifest, tiny_bundle, out, config)
    statuses = {os.path.basename(r.video_uri): r.status for r in again.rows}
    assert statuses.pop("corrupt.mp4") == "failed"
    assert set(statuses.values()) == {"skipped"}
    assert {u: os.stat(u).st_mtime_ns for u in mtimes} == mtimes
    assert json.loads(storage.read_bytes(os.path.join(out, "card.json")))["id"] == card["id"]
    # Nothing of the failed video is left behind.
    assert sorted(os.listdir(os.path.join(out, "chunks"))) == sorted(v["video_id"] for v in videos)

    # The shards' speech trains the HuBERT stand-in (`imgtalk train hubert`): the bundle's hubert/
    # is the trained model, read as the real checkpoint is; the rest is the base bundle's.
    from pipeline.train.config import HubertOptions, TrainConfig
    from pipeline.train.job import run_train

    train = TrainConfig(name="hubert", storage_path=str(tmp_path / "runs"), batch_size=2, steps=3, warmup_steps=1,
                        val_every=3, val_batches=1, checkpoint_every=3, hubert=HubertOptions(clip_frames=16, clips_per_chunk=2))
    # a bundle given relative to the driver's folder (Ray Train's workers run in folders of their own)
    monkeypatch.chdir(os.path.dirname(tiny_bundle))
    trained = run_train("hubert", out, os.path.basename(tiny_bundle), str(tmp_path / "trained"), train, progress=False)
    assert trained.steps == 3 and "val_masked" in trained.metrics
    info2 = read_bundle_info(str(tmp_path / "trained"))
    assert os.path.isfile(os.path.join(info2.path("hubert"), "preprocessor_config.json"))
    meta = json.loads(storage.read_bytes(os.path.join(info2.root, "bundle.json")))
    assert meta["training"]["hubert"]["steps"] == 3 and meta["training"]["hubert"]["corpus"] == card["id"]
    new_hubert = load_hubert(info2)
    assert new_hubert.model_id != hubert.model_id  # new weights, new feature-cache entries
    speech = load_audio(str(root / "anna_2.wav"))
    assert new_hubert(speech).shape == features.shape and not np.allclose(new_hubert(speech), features)


def test_prepare_against_s3(local_ray, tiny_bundle, corpus, s3_endpoint, tmp_path, monkeypatch):
    import s3fs

    from pipeline.prepare.job import run_prepare

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    root, _ = corpus
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("corpus")
    rows = []
    for name in ("ben", "dora", "corrupt"):
        fs.put(str(root / f"{name}.mp4"), f"corpus/videos/{name}.mp4")
        fs.put(str(root / f"{name}.wav"), f"corpus/audio/{name}.wav")
        rows.append({"video_uri": f"s3://corpus/videos/{name}.mp4", "audio_uri": f"s3://corpus/audio/{name}.wav"})
    storage = Storage()
    _manifest(rows, "s3://corpus/manifest.parquet", storage)
    from pipeline.config import StorageConfig

    # Workers started before this test: they learn the endpoint from the job config.
    config = _config(tmp_path).model_copy(update={"cache_uri": "s3://corpus/cache", "storage": StorageConfig(endpoint_url=s3_endpoint)})
    result = run_prepare("s3://corpus/manifest.parquet", tiny_bundle, "s3://corpus/shards", config)
    statuses = {r.video_uri.rsplit("/", 1)[1]: r.status for r in result.rows}
    assert statuses == {"ben.mp4": "ok", "dora.mp4": "ok", "corrupt.mp4": "failed"}, [(r.error_stage, r.error) for r in result.rows]
    videos = _read_parquet(storage, "s3://corpus/shards/videos.parquet")
    assert {v["speaker_id"] for v in videos} == {"ben", "dora"}  # no speaker_id: each video is its own speaker
    shard = _read_parquet(storage, videos[0]["chunk_uris"][0])[0]
    assert shard["n"] == 25 and len(shard["crops"]) == 25
    assert not [p for p in fs.find("corpus/shards") if ".tmp-" in p]

    # A folder (prefix) of videos: their speech comes from the files' own audio streams,
    # which these generated videos lack, so each fails at the audio stage naming its file.
    folder = run_prepare("s3://corpus/videos", tiny_bundle, "s3://corpus/shards-2", config)
    failed = {r.video_uri.rsplit("/", 1)[1]: r for r in folder.rows}
    assert failed["ben.mp4"].status == "failed" and failed["ben.mp4"].error_stage == "audio"
    assert "s3://corpus/videos/ben.mp4" in failed["ben.mp4"].error
    assert not fs.exists("corpus/shards-2/chunks") or not fs.find("corpus/shards-2/chunks")
