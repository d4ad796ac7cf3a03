"""Stage 1 audio window: k audio steps per frame and the B^A window, picked by validation L_rec.

    .venv/bin/python benchmarks/stage1_audio_window.py [--steps 300] [--seeds 3] [--lead-frames 2]

SYNTHETIC, CONTROLLED TASK -- NOT A REAL CORPUS. No talking-head corpus exists in this repo,
so this script builds one whose ground truth is known, to test review finding "d": with 25 Hz
features (k=1) and the paper's B^A (each frame sees only its own audio step) the
cross-attention has one key per frame (softmax = 1, Q/K get no gradient) and no look-ahead,
while real lips move AHEAD of the sound (anticipatory coarticulation, ~40-120 ms).

The data. "Speech" is a sequence of phonemes (P classes, durations 2-8 rows of 20 ms) at
HuBERT's 50 Hz row rate; each row's audio feature (A = 32) is a fixed random embedding of its
phoneme, smoothed over 3 rows, plus Gaussian noise. The mouth is a fixed smooth nonlinear
function of the phoneme identity (each phoneme's mouth target = 1e-2 * tanh of a random
projection of a latent code, on the 8 driven keypoints x 3), averaged over the frame's two
rows and smoothed over 3 frames (coarticulation), and it LEADS the audio by L frames
(`--lead-frames`, default 2 = 80 ms): the mouth at frame t is the function of the audio at
frame t+L. Each "video" has its own canonical keypoints x_c, neutral expression, scale,
translation and a slowly drifting head pose R; the non-driven keypoints carry a small jitter.
Chunks are built in the layout `stages.motion.training.sample_clips` reads (n, has_face, shot,
x_c, exp, R, t, scale, audio (n, 2, A)) with a few shot cuts, so the real clip sampler, the real
model (Audio2MotionConfig.tiny(audio_dim=32) + with_statistics from the training clips) and the
real trainer (Stage1Trainer.step / .evaluate: AdamW, warm-up + cosine, previous-offset noise,
scheduled sampling) are what is measured.

Each variant (k, audio_window_before, audio_window_after) is trained for the same number of
steps on the same training clips (per seed) and scored on held-out videos: `rec` is the
teacher-forced L_rec (Eq. 4; the ground-truth previous offset is fed in, and since Δδ_{t-1}
already encodes audio at t-1+L, this number partly leaks the future), `rec_free` the L_rec of
free-running `generate` (the honest number for inference). "mean" is the untrained model
(zero-initialised head = the training mean offset). A control run with --lead-frames 0 (mouth
in sync with the audio) shows whether look-ahead helps only when lips lead.
Ray-free, CPU, seeded; single-threaded torch by default.

Measured (one run of the defaults, 2-core CPU, 151 s; synthetic data, so this says what the
window CAN buy when lips lead, not how much it buys on real speech): lips leading by 80 ms,
val rec_free (paper k=1, 0, 0 = 1.000): k=2,0,0 0.997; k=2,0,2 0.396; k=2,2,2 0.629;
k=1,0,2 0.380; without look-ahead both settings free-run worse than the train-mean offset.
Lips in sync (lead 0): k=2,0,2 1.002 of the paper setting, i.e. look-ahead only helps when
lips lead, and k=2 alone changes nothing on this task.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

from stages.motion.audio2motion import Audio2Motion, Audio2MotionConfig
from stages.motion.extractor import NUM_KEYPOINTS
from stages.motion.training import BATCH_KEYS, Stage1TrainConfig, Stage1Trainer, sample_clips

AUDIO_DIM = 32
NUM_PHONEMES = 12
VARIANTS = [  # (k, before, after); the first is the paper's setting
    (1, 0, 0),
    (2, 0, 0),
    (2, 0, 2),
    (2, 2, 2),
    (1, 0, 2),
]
CONTROL_VARIANTS = [(1, 0, 0), (2, 0, 2)]


# ----------------------------------------------------------------------------- synthetic corpus


class World:
    """The fixed 'language': phoneme -> audio embedding and phoneme -> mouth shape (seeded)."""

    def __init__(self, seed: int, num_driven: int):
        rng = np.random.default_rng(10_000 + seed)
        self.embed = rng.normal(0.0, 1.0, (NUM_PHONEMES, AUDIO_DIM))
        latent = rng.normal(0.0, 1.0, (NUM_PHONEMES, 4))
        w1, w2 = rng.normal(0.0, 1.0, (4, 16)), rng.normal(0.0, 0.5, (16, num_driven * 3))
        self.mouth = (1e-2 * np.tanh(np.tanh(latent @ w1) @ w2)).reshape(NUM_PHONEMES, num_driven, 3)
        self.base_x_c = rng.normal(0.0, 0.3, (NUM_KEYPOINTS, 3))
        self.base_exp = rng.normal(0.0, 0.02, (NUM_KEYPOINTS, 3))


def smooth(x: np.ndarray, width: int) -> np.ndarray:
    """Moving average along axis 0 with edge padding."""
    pad = width // 2
    padded = np.concatenate([np.repeat(x[:1], pad, 0), x, np.repeat(x[-1:], width - 1 - pad, 0)])
    return np.stack([padded[i:i + len(x)] for i in range(width)]).mean(axis=0)


def rotation(yaw: np.ndarray, pitch: np.ndarray) -> np.ndarray:
    cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
    one, zero = np.ones_like(yaw), np.zeros_like(yaw)
    ry = np.stack([np.stack([cy, zero, sy], -1), np.stack([zero, one, zero], -1), np.stack([-sy, zero, cy], -1)], -2)
    rx = np.stack([np.stack([one, zero, zero], -1), np.stack([zero, cp, -sp], -1), np.stack([zero, sp, cp], -1)], -2)
    return ry @ rx


def make_video(world: World, rng: np.random.Generator, n: int, lead: int, driven: list[int]):
    """One synthetic video: (chunk, video) dicts as sample_clips reads them."""
    rows = 2 * (n + lead + 4)
    phonemes = []
    while len(phonemes) < rows:
        phonemes.extend([int(rng.integers(NUM_PHONEMES))] * int(rng.integers(2, 9)))
    phonemes = np.asarray(phonemes[:rows])
    audio = smooth(world.embed[phonemes], 3) + rng.normal(0.0, 0.5, (rows, AUDIO_DIM))
    mouth = world.mouth[phonemes].reshape(rows // 2, 2, len(driven), 3).mean(axis=1)  # per frame
    mouth = smooth(mouth, 3)
    offsets = mouth[lead:lead + n]  # the mouth at frame t is driven by the audio of frame t+lead
    audio = audio[: 2 * n].reshape(n, 2, AUDIO_DIM)

    x_c = world.base_x_c + rng.normal(0.0, 0.02, (NUM_KEYPOINTS, 3))
    neutral_exp = world.base_exp + rng.normal(0.0, 0.01, (NUM_KEYPOINTS, 3))
    exp = np.repeat(neutral_exp[None], n, 0) + rng.normal(0.0, 1e-3, (n, NUM_KEYPOINTS, 3))
    exp[:, driven] = neutral_exp[driven] + offsets
    drift = lambda s: smooth(np.cumsum(rng.normal(0.0, s, n)), 9)
    R = rotation(0.1 * np.tanh(drift(0.01)), 0.05 * np.tanh(drift(0.01)))
    scale = np.full((n, 1), rng.uniform(1.2, 1.8))
    t = np.concatenate([np.tile(rng.normal(0.0, 0.05, (1, 2)), (n, 1)), np.zeros((n, 1))], axis=1)
    shot = np.repeat(np.arange(n // 200 + 1), 200)[:n]  # a cut every 8 s
    chunk = {"n": n, "has_face": np.ones(n, bool), "shot": shot, "x_c": np.repeat(x_c[None], n, 0),
             "exp": exp, "R": R, "t": t, "scale": scale, "audio": audio}
    chunk = {key: (value.astype(np.float32) if isinstance(value, np.ndarray) and value.dtype == np.float64 else value)
             for key, value in chunk.items()}
    return chunk, {"neutral_x_c": x_c.astype(np.float32), "neutral_exp": neutral_exp.astype(np.float32)}


def make_corpus(seed: int, lead: int, num_train: int, num_val: int, frames: int, driven: list[int]):
    world = World(seed, len(driven))
    rng = np.random.default_rng(seed)
    train = [make_video(world, rng, frames, lead, driven) for _ in range(num_train)]
    val = [make_video(world, rng, frames // 2, lead, driven) for _ in range(num_val)]
    return train, val


def clips_for(videos, k: int, clip_frames: int, driven: list[int], seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)  # same seed for every k: the same clip starts
    clips = []
    for chunk, video in videos:
        clips.extend(sample_clips(chunk, video, clip_frames, k, tuple(driven), rng))
    return clips


def stack(clips: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(np.stack([clip[key] for clip in clips])) for key in BATCH_KEYS}


# ----------------------------------------------------------------------------- one run


def run_variant(variant, train_videos, val_videos, args, seed: int, driven: list[int]) -> dict[str, float]:
    k, before, after = variant
    train = clips_for(train_videos, k, args.clip_frames, driven, seed)
    val = stack(clips_for(val_videos, k, args.clip_frames, driven, seed + 1))
    offsets = np.concatenate([clip["offsets"] for clip in train])  # (N T, |D|, 3)
    neutral_exp = np.stack([video["neutral_exp"] for _, video in train_videos])
    neutral_x_c = np.stack([video["neutral_x_c"] for _, video in train_videos])
    cfg = dataclasses.replace(Audio2MotionConfig.tiny(audio_dim=AUDIO_DIM), audio_steps_per_frame=k,
                              audio_window_before=before, audio_window_after=after)
    cfg = cfg.with_statistics(offsets.mean(0), offsets.std(0), neutral_exp.mean(0), neutral_exp.std(0),
                              neutral_x_c.mean(0), neutral_x_c.std(0))
    torch.manual_seed(seed)  # model initialisation
    trainer = Stage1Trainer(Audio2Motion(cfg), Stage1TrainConfig(lr=args.lr, warmup_steps=args.steps // 10,
                                                                 total_steps=args.steps), seed=seed)
    mean_baseline = trainer.evaluate(val)
    rng = np.random.default_rng(seed + 2)
    for step in range(args.steps):
        batch = stack([train[i] for i in rng.choice(len(train), args.batch, replace=False)])
        trainer.step(batch, step)
    result = trainer.evaluate(val)
    result["mean_rec"] = mean_baseline["rec_free"]
    return result


def fmt(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {std:.4f}"


def table(title: str, results: dict, reference) -> None:
    print(f"\n### {title}\n")
    print("| k | before | after | val rec (teacher-forced) | val rec_free | rec_free / paper | train-mean baseline |")
    print("|---|---|---|---|---|---|---|")
    ref = statistics.fmean(results[reference]["rec_free"])
    for variant, r in results.items():
        k, before, after = variant
        ratio = statistics.fmean(r["rec_free"]) / ref
        tag = " (paper)" if variant == reference else ""
        print(f"| {k}{tag} | {before} | {after} | {fmt(r['rec'])} | {fmt(r['rec_free'])} | {ratio:.3f} | "
              f"{fmt(r['mean_rec'])} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lead-frames", type=int, default=2, help="frames the mouth leads the audio (2 = 80 ms)")
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--clip-frames", type=int, default=25)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train-videos", type=int, default=8)
    parser.add_argument("--val-videos", type=int, default=3)
    parser.add_argument("--frames", type=int, default=800, help="frames per training video (val: half)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-control", action="store_true", help="skip the --lead-frames 0 control")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print("Stage 1 audio-window benchmark -- SYNTHETIC controlled task, NOT a real corpus")
    print(f"machine: {platform.platform()} | {platform.processor() or platform.machine()} | "
          f"CPUs {os.cpu_count()} | python {platform.python_version()} | torch {torch.__version__} | "
          f"threads {torch.get_num_threads()}")
    print("command: " + " ".join([os.path.relpath(sys.executable)] + sys.argv))
    print(f"settings: steps {args.steps}, batch {args.batch} clips x {args.clip_frames} frames, lr {args.lr}, "
          f"seeds {args.seeds}, {args.train_videos} train videos x {args.frames} frames, "
          f"{args.val_videos} held-out videos x {args.frames // 2} frames, {NUM_PHONEMES} phonemes, "
          f"model Audio2MotionConfig.tiny(audio_dim={AUDIO_DIM})")
    driven = list(Audio2MotionConfig().driven_keypoints)

    runs = [(args.lead_frames, VARIANTS)]
    if not args.no_control and args.lead_frames != 0:
        runs.append((0, CONTROL_VARIANTS))
    start = time.perf_counter()
    for lead, variants in runs:
        results = {v: {"rec": [], "rec_free": [], "mean_rec": []} for v in variants}
        for seed in range(args.seeds):
            train_videos, val_videos = make_corpus(seed, lead, args.train_videos, args.val_videos, args.frames, driven)
            for variant in variants:
                r = run_variant(variant, train_videos, val_videos, args, seed, driven)
                for key in results[variant]:
                    results[variant][key].append(r[key])
                print(f"  lead {lead} seed {seed} k={variant[0]} before={variant[1]} after={variant[2]}: "
                      f"rec {r['rec']:.4f} rec_free {r['rec_free']:.4f} (mean baseline {r['mean_rec']:.4f}) "
                      f"[{time.perf_counter() - start:.0f} s]", flush=True)
        table(f"lips lead audio by {lead} frames ({40 * lead} ms); val L_rec, mean ± std over {args.seeds} seeds",
              results, variants[0])
    print(f"\ntotal {time.perf_counter() - start:.0f} s. L_rec = Eq. 4 (sum over the 8 driven keypoints of the L1 "
          "keypoint error, mean over frames) on held-out synthetic videos; lower is better.")


if __name__ == "__main__":
    main()
