"""Decoding only the pasted mouth (complete.decode: mouth): its quality against the full
decode, and its speed, against the full decode in the same run.

    .venv/bin/python benchmarks/decode_window.py [--weights weights/demo] [--shards DIR]
                                                 [--device cpu|cuda] [--frames 32] [--time]

Quality: the bundle's VAE encodes face crops, as segments (with --shards, up to
--segment-frames consecutive stored crops of each of a prepared corpus's shards; else one
segment of the astronaut at 8 sizes and places, tracked and cropped like a dub), then
decodes the latents in batches of 8 whole and through latent windows over the paste-back
alpha (MouthMask().feathered(6)) with 0-8 latents of margin, each segment with its first
frame's GroupNorm statistics as the dub does; PSNR inside the pasted region between the two
(what reaches the output), next to the full decode's own PSNR against the source crop
there. The issue's bar for keeping the option: > 40 dB.
Speed: the paper-size SD VAE decoder on the full 32x32 latent and on the default window
(margin 4): FLOPs per frame at batch 16 (counted on the meta device), the window's with one
full decode for the statistics per 100-frame segment (4 s at 25 fps) and, with --time,
frames/s at --time-batch with random weights (the time is the weights' shapes', not their
values').
"""
from __future__ import annotations

import argparse
import glob
import io
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

from model_size import timed  # this folder is on sys.path when the script runs

MARGINS = (0, 1, 2, 4, 8)


def shard_crops(shards: str, limit: int, segment_frames: int) -> list[np.ndarray]:
    """Up to `limit` crops in all, as segments of up to `segment_frames` consecutive face
    crops of one shard each."""
    import pyarrow.parquet as pq

    from stages.corpus.chunk import decode_crop

    segments, total = [], 0
    for path in sorted(glob.glob(os.path.join(shards, "chunks", "*", "*.parquet"))):
        with open(path, "rb") as f:
            row = pq.read_table(io.BytesIO(f.read())).to_pylist()[0]
        crops = [decode_crop(b) for b in row["crops"] if b][: min(segment_frames, limit - total)]
        if crops:
            segments.append(np.stack(crops))
            total += len(crops)
        if total >= limit:
            break
    return segments


def astronaut_crops(limit: int) -> np.ndarray:
    """The astronaut at a few sizes and places in 640x480 frames, tracked and cropped."""
    import cv2
    from skimage.data import astronaut

    from stages.face import FaceTracker, crop_faces

    face = astronaut()[:260, 110:370]
    frames = []
    for i in range(limit):
        size = 200 + 6 * (i % 8)
        frame = np.full((480, 640, 3), 40, np.uint8)
        x, y = 100 + 9 * i % 300, 60 + 5 * i % 160
        frame[y : y + size, x : x + size] = cv2.resize(face, (size, size), interpolation=cv2.INTER_AREA)
        frames.append(frame)
    with FaceTracker() as tracker:
        track = tracker(frames)
    crops, _ = crop_faces(frames, track)
    return crops[track.has_face.astype(bool)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default="weights/demo")
    ap.add_argument("--shards", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--segment-frames", type=int, default=16, help="with --shards: consecutive crops per segment")
    ap.add_argument("--time", action="store_true", help="also time the paper-size decoder (minutes on a CPU)")
    ap.add_argument("--time-batch", type=int, default=16, help="frames per timed decode")
    args = ap.parse_args()
    torch.manual_seed(0)

    from pipeline.weights import load_vae, read_bundle_info
    from stages.completion.stage import decode_pasted, latent_window, to_tensor, to_uint8
    from stages.completion.vae import LatentVAE, sd_vae_config
    from stages.face import MouthMask

    alpha = MouthMask().feathered(6.0)
    pasted = alpha > 0
    segments = shard_crops(args.shards, args.frames, args.segment_frames) if args.shards else [astronaut_crops(args.frames)]
    crops = np.concatenate(segments)
    source = f"{len(crops)} crops in {len(segments)} segments from {args.shards or 'the astronaut'}"
    print(f"decode window: VAE of {args.weights}, {source}, device {args.device}, torch {torch.__version__}")

    vae = load_vae(read_bundle_info(args.weights)).to(args.device).eval()
    with torch.inference_mode():
        latents = [torch.cat([vae.encode(to_tensor(seg[i : i + 8], args.device)) for i in range(0, len(seg), 8)])
                   for seg in segments]
        full = np.concatenate([to_uint8(vae.decode(z[i : i + 8])) for z in latents for i in range(0, len(z), 8)])
        print(f"full decode against the source crop, inside the pasted region: PSNR {psnr(full[:, pasted], crops[:, pasted]):.2f} dB")
        print(f"{'margin':>8} {'window (latent rows, cols)':>28} {'area':>6} {'PSNR vs full, pasted region':>29}")
        for margin in MARGINS:
            window = (r0, r1), (c0, c1) = latent_window(alpha, vae.downsample, margin)
            windowed, done = [], 0
            for z in latents:
                statistics = vae.window_statistics(z[:1], *window)  # the segment's first frame's
                for i in range(0, len(z), 8):
                    source = to_tensor(full[done + i : done + i + len(z[i : i + 8])], args.device)
                    windowed.append(to_uint8(decode_pasted(vae, z[i : i + 8], source, window, statistics)))
                done += len(z)
            windowed = np.concatenate(windowed)
            area = (r1 - r0) * (c1 - c0) / (latents[0].shape[2] * latents[0].shape[3])
            print(f"{margin:>8} {f'[{r0},{r1}) x [{c0},{c1})':>28} {area:>6.2f} "
                  f"{psnr(windowed[:, pasted], full[:, pasted]):>26.2f} dB")

    # FLOPs at the dub's default batch (batch.complete_frames 16), counted on the meta device.
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        paper_meta = LatentVAE.from_config(sd_vae_config()).eval()
    rows, cols = latent_window(alpha, paper_meta.downsample, 4)
    flops = {}
    z = torch.empty(16, 4, 32, 32, device="meta")
    with torch.inference_mode():
        statistics = paper_meta.window_statistics(z[:1], rows, cols)
        for name, fn, frames in (("full", lambda: paper_meta.decode(z), 16),
                                 ("window", lambda: paper_meta.decode_window(z, rows, cols, statistics), 16),
                                 ("statistics", lambda: paper_meta.window_statistics(z[:1], rows, cols), 100)):
            with FlopCounterMode(display=False) as counter:
                fn()
            flops[name] = counter.get_total_flops() / frames
    window = flops["window"] + flops["statistics"]
    print(f"paper-size SD VAE decoder, GFLOPs per frame at batch 16: full {flops['full'] / 1e9:.0f}, "
          f"window {rows} x {cols} (margin 4, with one full decode per 100-frame segment for the statistics) "
          f"{window / 1e9:.0f}; ratio full/window {flops['full'] / window:.2f}")

    if not args.time:
        return
    paper = LatentVAE.from_config(sd_vae_config()).to(args.device).eval()
    batch = args.time_batch
    z = torch.randn(batch, 4, 32, 32, device=args.device)
    with torch.inference_mode():
        full_s = timed(lambda: paper.decode(z), args.device, repeats=1)
        statistics = paper.window_statistics(z[:1], rows, cols)
        window_s = timed(lambda: paper.decode_window(z, rows, cols, statistics), args.device, repeats=1)
    print(f"  timed at batch {batch}, {torch.get_num_threads()} threads on {args.device}: full {batch / full_s:.2f} "
          f"frames/s, window {batch / window_s:.2f} frames/s; ratio window/full {full_s / window_s:.2f}")

if __name__ == "__main__":
    main()
