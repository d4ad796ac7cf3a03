"""Training-side figures, each against a baseline measured in the same run.

    .venv/bin/python benchmarks/train_bench.py --part prepare   # imgtalk prepare frames/s: Ray vs the same stages in a plain loop
    .venv/bin/python benchmarks/train_bench.py --part train     # samples/s per worker: Ray Train harness vs the bare trainer
    .venv/bin/python benchmarks/train_bench.py --part memory    # paper-size Stage 1/2: one step on the CPU, peak RSS vs static state

Tiny random bundle unless said; CPU or CUDA, whichever torch finds (printed). Prints the
machine, the figures and the ratios; asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def machine() -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {device}"


def _corpus(folder: str) -> tuple[str, str]:
    """The sample catalogue as a corpus (one speaker per video) and a tiny bundle."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.sample_catalogue import make_sample_catalogue
    from pipeline.weights import init_bundle

    paths = make_sample_catalogue(folder)
    rows = pq.read_table(paths["manifest"]).to_pylist()
    corpus = os.path.join(folder, "corpus.parquet")
    pq.write_table(pa.Table.from_pylist([{"video_uri": r["video_uri"], "audio_uri": r["audio_uri"],
                                          "speaker_id": os.path.basename(r["video_uri"]).split(".")[0]} for r in rows]), corpus)
    bundle = os.path.join(folder, "weights-tiny")
    if not os.path.exists(os.path.join(bundle, "bundle.json")):
        init_bundle(bundle, size="tiny")
    return corpus, bundle


def part_prepare(folder: str) -> str:
    import ray

    from pipeline.prepare import operators as ops
    from pipeline.prepare.config import PrepareConfig, read_corpus
    from pipeline.prepare.job import run_prepare
    from pipeline.storage import Storage

    corpus, bundle = _corpus(folder)
    config = PrepareConfig(cache_uri=os.path.join(folder, "cache-prepare"), chunk_seconds=4.0)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    start = time.perf_counter()
    result = run_prepare(corpus, bundle, os.path.join(folder, "shards-ray"), config)
    ray_s = time.perf_counter() - start
    ray.shutdown()
    frames = result.frames

    # Baseline: the same operators in one process, one row at a time (features already cached).
    cfg = config.model_dump()
    plan, audio = ops.PrepPlanOp(cfg), ops.PrepAudioOp(cfg, bundle)
    chunk = ops.ChunkOp(cfg, bundle, os.path.join(folder, "shards-loop"))
    split = ops.chunk_splitter(config.chunk_seconds)
    start = time.perf_counter()
    loop_frames = 0
    for index, row, _ in read_corpus(corpus, Storage()):
        video = audio(plan(ops.normalise(dict(row_index=index, video_id=row.video_id, video_uri=row.video_uri,
                                              audio_uri=row.audio_uri or "", speaker_id=row.speaker))))
        for c in split(video):
            out = chunk(c)
            loop_frames += int(out["stop"]) - int(out["first"]) if not out["error"] else 0
    loop_s = time.perf_counter() - start
    return (f"prepare ({len(result.rows)} videos, {frames} frames at 25 fps, chunks of {config.chunk_seconds:g} s)\n"
            f"  Ray (local, num_cpus={os.cpu_count()}): {frames / ray_s:.2f} frames/s ({ray_s:.1f} s incl. actor start-up)\n"
            f"  plain loop, same operators:   {loop_frames / loop_s:.2f} frames/s ({loop_s:.1f} s)\n"
            f"  ratio Ray/loop: {frames / ray_s / (loop_frames / loop_s):.2f}")


def part_train(folder: str, steps: int) -> str:
    import json

    import numpy as np
    import ray
    import torch

    from pipeline.prepare.config import PrepareConfig
    from pipeline.prepare.job import run_prepare
    from pipeline.storage import Storage
    from pipeline.train.config import Stage1Options, Stage2Options, TrainConfig
    from pipeline.train.job import load_corpus, run_dir_of, run_train
    from pipeline.train.tasks import TASKS
    from pipeline.weights import localize_bundle, read_bundle_info

    corpus, bundle = _corpus(folder)
    shards = os.path.join(folder, "shards-ray")
    storage = Storage()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    if not storage.exists(os.path.join(shards, "card.json")):
        run_prepare(corpus, bundle, shards, PrepareConfig(cache_uri=os.path.join(folder, "cache-prepare"), chunk_seconds=4.0))
    lines = []
    for stage, batch in (("stage1", 4), ("stage2", 2)):
        name = f"bench-{stage}-{int(time.time())}"
        # Half a CPU for the rank: Ray Data needs the rest to list and read the shards
        # (with a whole CPU per rank on 2 cores the reads starve and the run stalls).
        config = TrainConfig(name=name, storage_path=os.path.join(folder, "runs"), num_workers=1, batch_size=batch,
                             cpus_per_worker=0.5, torch_threads=os.cpu_count(),
                             steps=steps, warmup_steps=1, val_every=steps, checkpoint_every=steps, max_failures=0,
                             shuffle_buffer=8, stage1=Stage1Options(clip_frames=25),
                             stage2=Stage2Options(pairs_per_chunk=8, perc=0.0, gan_start_step=0))
        start = time.perf_counter()
        run_train(stage, shards, bundle, os.path.join(folder, f"bundle-{stage}"), config, progress=False)
        wall = time.perf_counter() - start
        rank = json.loads(storage.read_bytes(os.path.join(run_dir_of(config), "ranks", stage, "rank0.json")))
        ray_rate = rank["steps"] * batch / rank["seconds"]

        # Baseline: the bare Ray-free trainer on one batch drawn the same way, in this process.
        card, videos, files = load_corpus(storage, shards)
        task = TASKS[stage](config, card)
        info = read_bundle_info(localize_bundle(bundle))
        model_config = task.model_config(info)
        sampler = task.sampler(videos, 0, model_config)
        import pyarrow.parquet as pq
        samples = []
        for uri in files["train"]:
            samples += sampler(pq.read_table(uri).to_pylist()[0])
            if len(samples) >= batch:
                break
        tensors = {k: torch.from_numpy(np.stack([s[k] for s in samples[:batch]])) for k in samples[0]}
        trainer = task.build_trainer(info, model_config, lambda m: m, torch.device("cpu"), None, 0)
        trainer.step(task.to_batch(tensors), 0)  # warm-up
        start = time.perf_counter()
        for i in range(steps):
            trainer.step(task.to_batch(tensors), i + 1)
        bare_rate = steps * batch / (time.perf_counter() - start)
        lines.append(f"{stage} (tiny, batch {batch}, {steps} steps, 1 worker): Ray Train {ray_rate:.2f} samples/s per worker "
                     f"(loop seconds {rank['seconds']:.1f}, fit wall {wall:.1f} s); bare trainer {bare_rate:.2f} samples/s; "
                     f"ratio {ray_rate / bare_rate:.2f}")
    ray.shutdown()
    return "\n".join(lines)


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def part_memory() -> str:
    """Stage 2 at paper size: one forward and backward of batch 1 on the CPU, the way the
    trainer runs it (frozen VAE encode, IMC-UNet, VAE decode with input gradients, the motion
    extractor on the result); AdamW's moments are added by arithmetic, since allocating them
    for 1B parameters would not fit next to everything else on a 24 GiB machine."""
    import torch
    import torch.nn.functional as F

    from stages.completion.imc_unet import IMCUNet, IMCUNetConfig
    from stages.completion.vae import LatentVAE, sd_vae_config
    from stages.face import MouthMask
    from stages.motion.extractor import MotionExtractor, motion_info

    torch.set_num_threads(os.cpu_count())
    before = _rss_gib()
    unet = IMCUNet(IMCUNetConfig()).train()
    vae = LatentVAE.from_config(sd_vae_config())
    extractor = MotionExtractor().eval().requires_grad_(False)
    params = sum(p.numel() for p in unet.parameters())
    frozen = sum(p.numel() for m in (vae, extractor) for p in m.parameters())
    built = _rss_gib()
    keep = torch.from_numpy(1.0 - MouthMask().array())[None, None]
    target, reference = torch.rand(1, 3, 256, 256), torch.rand(1, 3, 256, 256)
    start = time.perf_counter()
    with torch.no_grad():
        masked, ref = vae.encode(target * keep), vae.encode(reference)
    generated = vae.decode(unet(masked, torch.randn(1, 21, 3) * 0.02, ref))
    motion = motion_info(extractor(generated))
    loss = F.l1_loss(generated, target) + F.l1_loss(motion["exp"], torch.zeros_like(motion["exp"]))
    loss.backward()
    step_s = time.perf_counter() - start
    peak = _rss_gib()
    gib = 2**30
    weights, grads, adam = params * 4 / gib, params * 4 / gib, params * 8 / gib
    activations = max(0.0, peak - built - grads)
    return (f"Stage 2 at paper size, forward + backward of batch 1 on the CPU ({step_s:.0f} s), fp32, no checkpointing:\n"
            f"  IMC-UNet {params:,} params; frozen VAE + extractor {frozen:,} ({frozen * 4 / gib:.2f} GiB)\n"
            f"  RSS before {before:.1f} GiB, models built {built:.1f}, peak after backward {peak:.1f} "
            f"-> grads {grads:.1f} + activations ~{activations:.1f} GiB at batch 1\n"
            f"  per GPU (fp32 weights {weights:.1f} + grads {grads:.1f} + AdamW {adam:.1f} + frozen {frozen * 4 / gib:.2f}) "
            f"= {weights + grads + adam + frozen * 4 / gib:.1f} GiB static + ~{activations:.1f} GiB x batch "
            f"(bf16 autocast roughly halves activations; gradient checkpointing cuts them further)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["prepare", "train", "memory"], required=True)
    p.add_argument("--folder", default=None)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    print(f"machine: {machine()}")
    print(f"command: {' '.join(sys.argv)}")
    folder = args.folder or tempfile.mkdtemp(prefix="imgtalk-train-bench-")
    if args.part == "prepare":
        print(part_prepare(folder))
    elif args.part == "train":
        print(part_train(folder, args.steps))
    else:
        print(part_memory())


if __name__ == "__main__":
    main()
