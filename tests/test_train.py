"""`imgtalk train` on Ray Train (TorchTrainer, V2) with 2 gloo workers on CPU: losses fall,
a killed run resumes to the uninterrupted run's next-step loss, a worker failure restarts
from the checkpoint, uneven inputs still give every rank the same number of steps, and the
trained bundle dubs through `imgtalk dub` unchanged.

The corpus is written in the shard layout of `imgtalk prepare` (its own writers), with
synthetic motion whose mouth keypoints follow the audio, so the tests need no video."""
import json
import os
import threading

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.prepare.job import _videos_table
from pipeline.prepare.operators import shard_bytes
from pipeline.storage import Storage
from pipeline.train.config import Stage1Options, Stage2Options, TrainConfig
from stages.corpus.card import corpus_card
from stages.corpus.chunk import ChunkSettings, encode_crop

AUDIO_DIM = 32  # the tiny bundle's HuBERT width


def _face_crops(n: int, rng) -> list[bytes]:
    from skimage import data

    face = cv2.resize(data.astronaut()[0:300, 100:400], (256, 256), interpolation=cv2.INTER_AREA)
    out = []
    for i in range(n):
        shift = np.float32([[1, 0, rng.integers(-3, 4)], [0, 1, rng.integers(-3, 4)]])
        out.append(encode_crop(cv2.warpAffine(face, shift, (256, 256), borderMode=cv2.BORDER_REFLECT), ChunkSettings()))
    return out


def write_corpus(root: str, chunk_frames: dict[str, list[int]], seed: int = 0) -> str:
    """A prepared corpus: one speaker per video; each video's chunks have the given frame counts.
    The mouth keypoints (δ on the driven set) are a fixed linear function of the audio rows."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(AUDIO_DIM, 21 * 3)).astype(np.float32) * 0.002
    storage = Storage()
    markers = []
    for vid, sizes in chunk_frames.items():
        neutral_exp = rng.normal(size=(21, 3)).astype(np.float32) * 0.01
        x_c = rng.normal(size=(21, 3)).astype(np.float32) * 0.2
        uris, sums = [], {"exp": 0, "exp2": 0, "x_c": 0, "x_c2": 0, "n": 0}
        for c, n in enumerate(sizes):
            audio = rng.normal(size=(n, 2, AUDIO_DIM)).astype(np.float32)
            exp = neutral_exp + (audio.mean(1) @ mixing).reshape(n, 21, 3)
            chunk = {
                "n": n, "crops": _face_crops(n, rng), "has_face": np.ones(n, bool), "shot": np.zeros(n, np.int32),
                "x_c": np.repeat(x_c[None], n, 0), "exp": exp.astype(np.float32),
                "R": np.repeat(np.eye(3, dtype=np.float32)[None], n, 0), "t": np.zeros((n, 3), np.float32),
                "scale": np.ones((n, 1), np.float32), "pose": rng.normal(size=(n, 3)).astype(np.float32),
                "mouth_open": np.zeros(n, np.float32), "audio": audio, "wave": np.zeros((n, 640), np.int16),
            }
            uri = os.path.join(root, "chunks", vid, f"{c:05d}.parquet")
            storage.write_bytes_atomic(shard_bytes({"video_id": vid, "speaker_id": vid, "chunk_idx": c, "first": 0}, chunk), uri)
            uris.append(uri)
            sums["exp"] = sums["exp"] + exp.sum(0)
            sums["exp2"] = sums["exp2"] + (exp.astype(np.float64) ** 2).sum(0)
            sums["x_c"] = sums["x_c"] + chunk["x_c"].sum(0)
            sums["x_c2"] = sums["x_c2"] + (chunk["x_c"].astype(np.float64) ** 2).sum(0)
            sums["n"] += n
        total = sum(sizes)
        markers.append({"video_id": vid, "video_uri": f"/videos/{vid}.mp4", "speaker_id": vid, "chunk_uris": uris,
                        "counts": {"frames": total, "face": total, "usable": total, "small": 0, "turned": 0, "silent": 0},
                        "sums": {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in sums.items()},
                        "neutral": {"frame": 0, "score": 0.0, "x_c": x_c.tolist(), "exp": neutral_exp.tolist(),
                                    "crop": _face_crops(1, rng)[0].hex()}})
    splits = {m["speaker_id"]: "train" for m in markers}
    splits[markers[-1]["speaker_id"]] = "val"
    storage.write_bytes_atomic(_videos_table(markers, splits), os.path.join(root, "videos.parquet"))
    card = corpus_card(markers, splits, {"synthetic": True})
    storage.write_bytes_atomic(json.dumps(card).encode(), os.path.join(root, "card.json"))
    return root


def _config(tmp_path, name, **extra) -> TrainConfig:
    base = dict(name=name, storage_path=str(tmp_path / "runs"), num_workers=2, cpus_per_worker=0.5, batch_size=2,
                steps=6, warmup_steps=1, val_every=3, val_batches=1, checkpoint_every=2, num_to_keep=2, max_failures=0,
                collective_timeout_s=120,  # a rank left waiting fails the test in minutes, not after 30
                shuffle_buffer=8, stage1=Stage1Options(clip_frames=8, lr=3e-3, dropout=0.0),
                stage2=Stage2Options(pairs_per_chunk=2, min_gap_frames=2, max_pose_deg=50.0, gan_start_step=3,
                                     perc=0.0, motion=0.1, adv=0.01, lr=1e-3))
    base.update(extra)
    return TrainConfig(**base)


def _steps(curve):
    return {r["step"]: r for r in curve if "loss" in r}


def test_stage1_trains_resumes_exactly_and_exports_a_bundle(local_ray, tiny_bundle, tmp_path):
    from pipeline.train.job import TrainError, load_corpus, read_curve, run_dir_of, run_train
    from pipeline.train.tasks import decode_chunk
    from pipeline.weights import load_stage1, read_bundle_info
    from stages.motion.audio2motion import Audio2Motion, stage1_loss
    from stages.motion.training import sample_clips

    corpus = write_corpus(str(tmp_path / "corpus"), {"a": [40, 40], "b": [40, 40], "c": [40]})
    storage = Storage()

    whole = _config(tmp_path, "whole")
    result = run_train("stage1", corpus, tiny_bundle, str(tmp_path / "bundle-whole"), whole, progress=False)
    assert result.steps == 6
    curve = _steps(read_curve(storage, run_dir_of(whole), "stage1"))
    assert sorted(curve) == [1, 2, 3, 4, 5, 6]
    assert np.mean([curve[s]["loss"] for s in (5, 6)]) < np.mean([curve[s]["loss"] for s in (1, 2)])
    # Every rank took every step.
    ranks = [json.loads(storage.read_bytes(os.path.join(run_dir_of(whole), "ranks", "stage1", f"rank{r}.json"))) for r in (0, 1)]
    assert [r["steps"] for r in ranks] == [6, 6]

    # Killed before step 5 (checkpoints at 2 and 4), then the same command again.
    cut = _config(tmp_path, "cut")
    with pytest.raises(TrainError):
        run_train("stage1", corpus, tiny_bundle, str(tmp_path / "bundle-cut"), cut, progress=False,
                  fault={"step": 5, "marker": str(tmp_path / "fault-cut")})
    run_train("stage1", corpus, tiny_bundle, str(tmp_path / "bundle-cut"), cut, progress=False)
    rows = read_curve(storage, run_dir_of(cut), "stage1")
    assert {"event": "resumed", "step": 4} == {k: v for k, v in rows[[r.get("event") for r in rows].index("resumed")].items() if k != "time"}
    resumed = _steps(rows)
    for step in (5, 6):  # the resumed run's next steps are the uninterrupted run's, exactly
        assert resumed[step]["loss"] == curve[step]["loss"], (step, resumed[step]["loss"], curve[step]["loss"])

    # The bundle: stage1 trained on this corpus, carrying its statistics; stage2 still the base's.
    info = read_bundle_info(str(tmp_path / "bundle-whole"))
    meta = json.load(open(os.path.join(info.root, "bundle.json")))
    card = json.load(open(os.path.join(corpus, "card.json")))
    assert meta["training"]["stage1"]["corpus"] == card["id"] and meta["training"]["stage1"]["steps"] == 6
    assert meta["trained"] is False
    model = load_stage1(info)
    assert model.cfg.offset_std is not None and model.cfg.audio_steps_per_frame == 2
    # The exported weights are the trained ones: lower loss on a fixed clip than at init.
    _, videos, _ = load_corpus(storage, corpus)
    row = pq.read_table(os.path.join(corpus, "chunks", "a", "00000.parquet")).to_pylist()[0]
    clips = sample_clips(decode_chunk(row), videos["a"], 8, 2, model.cfg.driven_keypoints, np.random.default_rng(0))
    batch = {k: torch.from_numpy(np.stack([c[k] for c in clips])) for k in clips[0]}
    torch.manual_seed(whole.seed)
    fresh = Audio2Motion(model.cfg).eval()

    def loss(m):
        with torch.no_grad():
            pred = m(batch["audio"], batch["x_c"], batch["delta_neutral"], batch["offsets"])
            return stage1_loss(pred, batch["x_c"], batch["delta_neutral"], batch["R"], batch["scale"], batch["t"],
                               batch["x_gt"], lip=model.cfg.driven_keypoints)[0].item()

    assert loss(model) < loss(fresh)


def test_worker_failure_restarts_from_the_checkpoint_and_uneven_inputs_keep_steps_equal(local_ray, tiny_bundle, tmp_path):
    from pipeline.train.job import read_curve, run_dir_of, run_train

    # Rank 0 reads a 120-frame shard and a 24-frame one, rank 1 two 24-frame shards: unequal
    # sample counts per rank, so every epoch ends when rank 1 runs dry.
    corpus = write_corpus(str(tmp_path / "corpus"), {"a": [120, 24], "b": [24, 24], "c": [24]})
    storage = Storage()
    config = _config(tmp_path, "restart", steps=7, max_failures=1)
    result = run_train("stage1", corpus, tiny_bundle, str(tmp_path / "bundle"), config, progress=False,
                       fault={"step": 4, "marker": str(tmp_path / "fault")})
    assert result.steps == 7
    rows = read_curve(storage, run_dir_of(config), "stage1")
    assert [r["step"] for r in rows if r.get("event") == "resumed"] == [2]  # the group restarted from step 2
    assert sorted(_steps(rows)) == list(range(1, 8))
    ranks = [json.loads(storage.read_bytes(os.path.join(run_dir_of(config), "ranks", "stage1", f"rank{r}.json"))) for r in (0, 1)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 5  # steps 3..7 after the restart, on both ranks
    assert max(r["epoch"] for r in _steps(rows).values()) >= 1  # the short rank ended epochs early for both


@pytest.mark.parametrize("hang,timeout", [
    ({"stall_rank": 1}, {"collective_timeout_s": 10}),  # rank 1 hangs in the step, alive; rank 0's all-reduce gives up
    ({"data_stall": True}, {"data_timeout_s": 60}),  # every rank's read hangs: no collective left to time out
], ids=["a-rank-hangs-in-a-collective", "every-rank-hangs-in-its-read"])
def test_a_hang_without_a_dying_process_fails_the_group_which_restarts_from_the_checkpoint(
        local_ray, tiny_bundle, tmp_path, hang, timeout):
    """The hang comes before step 4 with every process alive; the rank's timeout (the
    collective's or the data read's) turns it into a failure, the group restarts from step
    2's checkpoint, and the run completes with equal steps on both ranks."""
    from pipeline.train.job import read_curve, run_dir_of, run_train

    corpus = write_corpus(str(tmp_path / "corpus"), {"a": [40, 40], "b": [40, 40], "c": [40]})
    storage = Storage()
    config = _config(tmp_path, "stall", steps=5, max_failures=1, **timeout)
    result = run_train("stage1", corpus, tiny_bundle, str(tmp_path / "bundle"), config, progress=False,
                       fault={"step": 4, "marker": str(tmp_path / "fault"), **hang})
    assert result.steps == 5
    assert storage.exists(str(tmp_path / "fault"))
    rows = read_curve(storage, run_dir_of(config), "stage1")
    assert [r["step"] for r in rows if r.get("event") == "resumed"] == [2]
    assert sorted(_steps(rows)) == [1, 2, 3, 4, 5]
    ranks = [json.loads(storage.read_bytes(os.path.join(run_dir_of(config), "ranks", "stage1", f"rank{r}.json"))) for r in (0, 1)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 3  # steps 3..5 after the restart


def test_next_within_hands_batches_and_errors_on_and_gives_up_on_a_read_that_never_returns():
    from pipeline.train.loop import next_within

    batches = iter([1, 2])
    assert [next_within(batches, 60, "rank 0") for _ in range(3)] == [1, 2, None]

    def broken():
        raise OSError("shard 00003.parquet: gone")
        yield

    with pytest.raises(OSError, match="00003.parquet: gone"):
        next_within(broken(), 60, "rank 0")
    release = threading.Event()

    def stuck():
        release.wait()
        yield 1

    with pytest.raises(TimeoutError, match=r"rank 1, epoch 2: no batch within data_timeout_s=0.05 s"):
        next_within(stuck(), 0.05, "rank 1, epoch 2")
    release.set()


def test_stage2_trains_with_the_gan_and_the_trained_bundle_dubs(local_ray, tiny_bundle, tmp_path):
    from pipeline.dub.job import run_dub
    from pipeline.train.job import read_curve, run_dir_of, run_train
    from pipeline.weights import load_stage2, read_bundle_info

    corpus = write_corpus(str(tmp_path / "corpus"), {"a": [16], "b": [16], "c": [16]})
    storage = Storage()
    s1 = _config(tmp_path, "s1", steps=2, checkpoint_every=2, val_every=2)
    run_train("stage1", corpus, tiny_bundle, str(tmp_path / "trained"), s1, progress=False)
    s2 = _config(tmp_path, "s2", steps=4, checkpoint_every=2, val_every=2)
    result = run_train("stage2", corpus, str(tmp_path / "trained"), str(tmp_path / "trained"), s2, progress=False)
    assert result.steps == 4
    steps = _steps(read_curve(storage, run_dir_of(s2), "stage2"))
    assert "d_loss" not in steps[3] and "d_loss" in steps[4]  # the GAN joins at gan_start_step (step index 3)
    meta = json.load(open(tmp_path / "trained" / "bundle.json"))
    assert meta["trained"] is True and set(meta["training"]) == {"stage1", "stage2"}
    unet = load_stage2(read_bundle_info(str(tmp_path / "trained")))
    assert unet.config.motion_std is not None
    assert any(float(a) != 0.0 for a in unet.rsca_alphas())  # RSCA's alphas moved off zero

    # The trained bundle runs the dub job unchanged.
    from fractions import Fraction

    from pipeline.config import JobConfig
    from pipeline.dub.schemas import write_manifest
    from pipeline.sample_catalogue import SampleVideo, speak, write_video

    video, audio = str(tmp_path / "v.mp4"), str(tmp_path / "a.wav")
    write_video(video, SampleVideo("v", Fraction(25), 1.2, "", size=(320, 240)))
    speak("Hello.", audio)
    manifest = str(tmp_path / "m.parquet")
    write_manifest([{"video_uri": video, "audio_uri": audio, "output_uri": str(tmp_path / "out.mp4"), "options": None}],
                   manifest, storage)
    dub = run_dub(manifest, str(tmp_path / "trained"), str(tmp_path / "report.parquet"),
                  JobConfig(cache_uri=str(tmp_path / "cache")), progress=False)
    assert dub.counts["ok"] == 1, [r.error for r in dub.rows]
    assert dub.rows[0].output_frames == 30
    assert not dub.warnings
