"""Peak memory of each per-segment operator's stage work, against its pool's `memory_gb`.

For one 4-second segment at 1080p25 and at 2160p30 (sample-catalogue astronaut videos made
here with PyAV), each piece of work runs in a fresh Python process, which reports its peak
resident set (VmHWM) twice: after its imports and models (the floor an actor pays before
any segment) and after the work. Pieces:

- face (list): the old FaceOp path, the whole segment decoded into a list (FFmpeg's
  automatic threads), then tracked and cropped. The baseline.
- face (stream): FaceOp's path now: track_and_crop over two decodes, decoder threads from
  the face pool's num_cpus.
- compose: ComposeOp's stage, decode + paste-back + x264 (the job config's codec, crf and
  preset), threads from the compose pool's num_cpus.
- complete (tiny weights): CompletionStage on the CPU with the tiny test networks, batch
  from the job config. Its crops are 256² whatever the source size; real weights add their
  own size (and CUDA's context on a GPU) on top, so this row is the segment's share only.

Ratios are peak / memory_gb of the job config's pools (deploy/job.cluster.yaml by default).
A Ray actor adds its core worker and Ray's own imports on top of these processes, which
this benchmark does not measure; the README's rule of 1.25 x peak leaves room for it.
Takes about 5 minutes on 2 cores, most of it x264 at 4K.

    python benchmarks/memory_bench.py [--config deploy/job.cluster.yaml] [--sizes 1080p25,2160p30]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from fractions import Fraction

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("GLOG_minloglevel", "2")

SIZES = {
    "1080p25": ((1920, 1080), Fraction(25)),
    "2160p30": ((3840, 2160), Fraction(30)),
}
SEGMENT_SECONDS = 4.0
# (piece, the pool its ratio is taken against)
PIECES = (("face (list)", "face"), ("face (stream)", "face"), ("compose", "compose"), ("complete (tiny weights)", "complete"))


def peak_gib() -> float:
    """This process's peak resident set so far (VmHWM), GiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


# --------------------------------------------------------------------------- child side


def _face_list(video: str, n_frames: int, config, out: str):
    from stages.face import FaceTracker, crop_faces
    from stages.media import decode_frames

    tracker = FaceTracker(smoothing_sigma_frames=config.face.smoothing_sigma_frames,
                          max_gap_frames=config.face.max_gap_frames)
    floor = peak_gib()
    frames = [f for _, f in decode_frames(video, 0, n_frames)]
    track = tracker(frames)
    crops, affines = crop_faces(frames, track)
    return floor, dict(face_frames=int(track.has_face.sum()))


def _face_stream(video: str, n_frames: int, config, out: str):
    import numpy as np

    from stages.face import FaceTracker, track_and_crop
    from stages.media import decode_frames
    from stages.media.probe import codec_threads

    tracker = FaceTracker(smoothing_sigma_frames=config.face.smoothing_sigma_frames,
                          max_gap_frames=config.face.max_gap_frames)
    threads = codec_threads(config.pools["face"].num_cpus)
    floor = peak_gib()

    def frames():
        return (f for _, f in decode_frames(video, 0, n_frames, threads=threads))

    track, crops, affines = track_and_crop(tracker, frames)
    # compose and complete take over from here, as the rows would carry it.
    np.savez(out, crops=crops, affines=affines, has_face=track.has_face)
    return floor, dict(face_frames=int(track.has_face.sum()), threads=threads)


def _compose(video: str, n_frames: int, config, out: str):
    import numpy as np

    from stages.compose import ComposeStage
    from stages.face import MouthMask
    from stages.media import probe_video
    from stages.media.probe import codec_threads

    threads = codec_threads(config.pools["compose"].num_cpus)
    stage = ComposeStage(MouthMask().feathered(config.face.feather_px), codec=config.output.codec,
                         crf=config.output.crf, preset=config.output.preset, threads=threads)
    info = probe_video(video, threads=threads)
    face = np.load(out)
    floor = peak_gib()
    with tempfile.TemporaryDirectory() as tmp:
        stage(video, os.path.join(tmp, "segment.mp4"), 0, n_frames, info.width, info.height, info.fps,
              face["crops"], face["affines"], face["has_face"])
    return floor, dict(threads=threads, preset=config.output.preset)


def _complete(video: str, n_frames: int, config, out: str):
    import numpy as np
    import torch

    from stages.completion.imc_unet import IMCUNet, IMCUNetConfig
    from stages.completion.stage import CompletionStage
    from stages.completion.vae import LatentVAE, tiny_vae_config
    from stages.face import MouthMask

    torch.set_num_threads(max(1, int(config.torch_threads)))
    torch.manual_seed(0)
    stage = CompletionStage(LatentVAE.from_config(tiny_vae_config()), IMCUNet(IMCUNetConfig.tiny()),
                            MouthMask().array(), batch_frames=config.batch.complete_frames, device="cpu")
    face = np.load(out)
    n = len(face["crops"])
    driving = np.random.default_rng(0).normal(scale=0.05, size=(n, 21, 3)).astype(np.float32)
    floor = peak_gib()
    stage("video", face["crops"], face["has_face"], driving, np.zeros(n, np.int64), face["crops"][:6])
    return floor, dict(batch=config.batch.complete_frames)


CHILDREN = {"face (list)": _face_list, "face (stream)": _face_stream, "compose": _compose,
            "complete (tiny weights)": _complete}


def child(args) -> None:
    from pipeline.config import load_job_config

    config = load_job_config(args.config)
    started = time.perf_counter()
    floor, extra = CHILDREN[args.piece](args.video, args.frames, config, args.state)
    print(json.dumps(dict(floor_gib=floor, peak_gib=peak_gib(), seconds=time.perf_counter() - started, **extra)))


# --------------------------------------------------------------------------- parent side


def make_source(path: str, size: tuple[int, int], fps: Fraction) -> int:
    from pipeline.sample_catalogue import SampleVideo, write_video

    return write_video(path, SampleVideo("astronaut", fps, SEGMENT_SECONDS, "", size=size))


def run_piece(piece: str, video: str, frames: int, config: str, state: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", piece, "--video", video,
           "--frames", str(frames), "--config", config, "--state", state]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{piece} on {video} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "deploy", "job.cluster.yaml"))
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--piece", help=argparse.SUPPRESS)
    parser.add_argument("--video", help=argparse.SUPPRESS)
    parser.add_argument("--frames", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.piece = args.child
        child(args)
        return

    from pipeline.config import load_job_config

    pools = load_job_config(args.config).pools
    print(f"config {os.path.relpath(args.config, ROOT)}; {os.cpu_count()} CPUs; one {SEGMENT_SECONDS:.0f}-s segment per size")
    header = f"{'size':8} {'piece':24} {'floor GiB':>9} {'peak GiB':>9} {'pool GiB':>8} {'peak/pool':>9} {'s':>6}  notes"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory(prefix="memory-bench-") as tmp:
        for name in args.sizes.split(","):
            size, fps = SIZES[name]
            video = os.path.join(tmp, f"{name}.mp4")
            frames = make_source(video, size, fps)
            state = os.path.join(tmp, f"{name}-face.npz")
            for piece, pool in PIECES:
                r = run_piece(piece, video, frames, args.config, state)
                budget = pools[pool].memory_gb
                ratio = f"{r['peak_gib'] / budget:9.2f}" if budget else f"{'-':>9}"
                notes = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("floor_gib", "peak_gib", "seconds"))
                fits = "" if not budget or r["peak_gib"] <= budget else "  OVER"
                print(f"{name:8} {piece:24} {r['floor_gib']:9.2f} {r['peak_gib']:9.2f} "
                      f"{budget or 0:8.2f} {ratio} {r['seconds']:6.1f}  {notes}{fits}", flush=True)


if __name__ == "__main__":
    main()
