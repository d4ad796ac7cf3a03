"""Pipeline benchmarks: end-to-end throughput (Ray against a plain loop), one worker's peak
memory against video length, and the CPU cost per frame of the pixel stages at 1080p.

    .venv/bin/python benchmarks/pipeline_bench.py [--part all|throughput|memory|stages]
                                                  [--device cpu|cuda] [--out DIR] [--fused-lead on|off]

It prints figures and asserts nothing: timings on a shared machine move from run to run,
so every part prints the device, the machine (cores, CPU, torch) and the load average it
started under. Inputs (catalogue, videos, tiny weights) are made under --out once and
reused; outputs and feature caches are wiped before each run so nothing is reused.
`--part all` runs memory first (see main), then throughput, then stages.

throughput  The demo catalogue (pipeline.sample_catalogue.SAMPLES) with a tiny random
            bundle, dubbed by run_dub on a local Ray (ray.init(num_cpus=os.cpu_count()),
            timed apart), then by pipeline.dub.local_loop.dub_rows_locally (the same operators
            in one Python loop) in a fresh process, into another folder with another feature
            cache; both clocks start with the job's modules imported and none of the libraries
            the operators load (torch, diffusers, mediapipe), which both count. Frames are
            source frames of the videos dubbed. Each finished segment is timed where it
            comes out (the driver's pipeline.dub.job.normalise on Ray, ComposeOp in the loop),
            which gives the first-segment latency and a rate after it.
memory      One fresh subprocess per video (10 s and 60 s of 640x360 25 fps astronaut with
            a tone track of the same length) runs dub_rows_locally on that one row and
            reports its peak RSS (getrusage RUSAGE_SELF, and RUSAGE_CHILDREN apart):
            imports and model loading are the same in both, so the ratio shows whether
            memory grows with length; the child's VmHWM is printed beside it as a check.
            Each child also notes, per operator, the highest RSS sampled every 5 ms while
            it ran and how far it raised the kernel's peak (VmHWM), so a stage that grows
            shows up by name.
stages      decode / face (tracker + aligned crops) / compose (feathered paste-back, no
            encode) / encode (SegmentWriter, the job's codec settings) on a 4 s 1080p25
            clip, one default segment: CPU seconds (time.process_time, all threads of the
            process) and wall seconds, per frame.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import wave
from fractions import Fraction

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("GLOG_minloglevel", "2")  # mediapipe prints a line per graph otherwise
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np

MIB = 1 << 20
CHILD_TAG = "PIPELINE_BENCH_CHILD "


# --------------------------------------------------------------------------- common


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(title: str, device: str) -> None:
    import torch

    gpu = f", {torch.cuda.get_device_name(0)}" if device == "cuda" else ""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n== {title} ==")
    print(f"device: {device.upper()}{gpu}")
    print(f"machine: {os.cpu_count()} cores ({cpu_model()}), torch {torch.__version__}, "
          f"python {platform.python_version()}; load average at start {load}")


def job_config(device: str, cache_uri: str, ray_pools: bool = False):
    """The job's defaults, with `device` passed through. On CUDA under Ray the stages that
    put models on the device (audio: HuBERT, complete: VAE + IMC-UNet) ask for a share of
    the GPU, since a worker that reserves none may be shown no GPU at all."""
    from pipeline.config import JobConfig, PoolConfig

    config = JobConfig(device=device, cache_uri=cache_uri)
    if device == "cuda" and ray_pools:
        pools = config.pools
        pools["audio"] = PoolConfig(size=pools["audio"].size, num_cpus=pools["audio"].num_cpus, num_gpus=0.25)
        pools["complete"] = PoolConfig(size=pools["complete"].size, num_cpus=pools["complete"].num_cpus, num_gpus=0.5)
        config = config.model_copy(update={"pools": pools})
    return config


def tiny_bundle(folder: str) -> str:
    from pipeline.weights import init_bundle

    if not os.path.exists(os.path.join(folder, "bundle.json")):
        init_bundle(folder, size="tiny")
    return folder


def start_child(flag: str, spec: dict) -> subprocess.Popen:
    """This script again in a fresh process (`--memory-child` / `--loop-child`), given `spec`."""
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), flag, json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def child_result(proc: subprocess.Popen, what: str) -> dict | None:
    """The dict a child printed on its CHILD_TAG line; None (and its stderr printed) if it failed."""
    stdout, stderr = proc.communicate()
    lines = [l for l in stdout.splitlines() if l.startswith(CHILD_TAG)]
    if proc.returncode != 0 or not lines:
        print(f"  {what} failed (exit {proc.returncode}):\n{stderr[-3000:]}")
        return None
    return json.loads(lines[-1][len(CHILD_TAG):])


def fresh_dir(path: str) -> str:
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


class SegmentClock:
    """Wraps `owner.attr`, a function every finished segment row passes through, to note
    when each one finished and how many source frames it carried."""

    def __init__(self, owner, attr: str, start: float):
        self.owner, self.attr, self.start = owner, attr, start
        self.original = getattr(owner, attr)
        self.done: list[tuple[float, int]] = []  # (seconds since start, frames)

    def __enter__(self) -> SegmentClock:
        original = self.original

        def noting(*args, **kwargs):
            row = original(*args, **kwargs)
            if not row["error"] and int(row["seg_idx"]) >= 0:
                self.done.append((time.perf_counter() - self.start, int(row["frame_end"]) - int(row["frame_start"])))
            return row

        setattr(self.owner, self.attr, noting)
        return self

    def __exit__(self, *exc) -> None:
        setattr(self.owner, self.attr, self.original)

    def first_latency(self) -> float:
        return min(t for t, _ in self.done) if self.done else float("nan")

    def timeline(self) -> str:
        """'t s (frames)' per moment rows finished, rows finishing within 0.1 s merged."""
        moments: dict[float, int] = {}
        for t, n in sorted(self.done):
            moments[round(t, 1)] = moments.get(round(t, 1), 0) + n
        return ", ".join(f"{t:.1f} s ({n})" for t, n in moments.items())

    def after_first(self) -> tuple[int, float]:
        """(frames, seconds) of the segments that finished after the first one, from the
        first one's finish to the last one's."""
        done = sorted(self.done)
        if len(done) < 2:
            return 0, 0.0
        return sum(n for _, n in done[1:]), done[-1][0] - done[0][0]


class VideoClock:
    """Wraps `owner.attr`, called once per finished video (the driver's GraphSink.settle
    on Ray, finalize_video in the loop), to note when the first one finished."""

    def __init__(self, owner, attr: str, start: float, finished=lambda args, result: True):
        self.owner, self.attr, self.start, self.finished = owner, attr, start, finished
        self.original = getattr(owner, attr)
        self.done: list[float] = []

    def __enter__(self) -> VideoClock:
        original = self.original

        def noting(*args, **kwargs):
            result = original(*args, **kwargs)
            if self.finished(args, result):
                self.done.append(time.perf_counter() - self.start)
            return result

        setattr(self.owner, self.attr, noting)
        return self

    def __exit__(self, *exc) -> None:
        setattr(self.owner, self.attr, self.original)

    def first(self) -> float:
        return min(self.done) if self.done else float("nan")


def fps(frames: int, seconds: float) -> float:
    return frames / seconds if seconds > 0 else float("nan")


# --------------------------------------------------------------------------- throughput


def part_throughput(out: str, device: str, fused_lead: bool = True) -> None:
    import ray

    from pipeline.dub.job import run_dub
    from pipeline.sample_catalogue import SAMPLES, make_sample_catalogue
    from pipeline.dub.schemas import write_manifest
    from pipeline.storage import Storage

    root = os.path.join(out, "throughput")
    catalogue = os.path.join(root, "catalogue")
    make_sample_catalogue(catalogue)
    bundle = tiny_bundle(os.path.join(root, "weights-tiny"))

    def manifest_rows(out_folder: str) -> list[dict]:
        return [
            {
                "video_uri": os.path.join(catalogue, "videos", f"{s.name}.mp4"),
                "audio_uri": os.path.join(catalogue, "audio", f"{s.name}.wav"),
                "output_uri": os.path.join(out_folder, "outputs", f"{s.name}.dubbed.mp4"),
                "options": None,
            }
            for s in SAMPLES
        ]

    header(f"throughput: demo catalogue ({len(SAMPLES)} videos), tiny random bundle", device)

    # Ray: run_dub on a Ray this process starts, so ray.init's own time is known. The
    # driver passes every finished segment row through pipeline.dub.job.normalise.
    import pipeline.dub.job as job_module

    ray_dir = fresh_dir(os.path.join(root, "ray"))
    manifest = os.path.join(ray_dir, "manifest.parquet")
    write_manifest(manifest_rows(ray_dir), manifest, Storage())
    config = job_config(device, os.path.join(ray_dir, "cache"), ray_pools=True).model_copy(update={"fused_lead": fused_lead})
    t0 = time.perf_counter()

    def ray_ok(args, result) -> bool:  # GraphSink.settle(self, index, row)
        return args[2].status == "ok"

    with SegmentClock(job_module, "normalise", t0) as ray_clock, VideoClock(job_module.GraphSink, "settle", t0, ray_ok) as ray_video:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ray_init_s = time.perf_counter() - t0
        layout = job_module.stage_layout(ray, config)
        try:
            result = run_dub(manifest, bundle, os.path.join(ray_dir, "report.parquet"), config, progress=False)
        finally:
            ray.shutdown()
    ray_total_s = ray_init_s + result.seconds
    ok = [r for r in result.rows if r.status == "ok"]
    for r in result.rows:
        if r.status != "ok":
            print(f"  Ray row {r.row_index} {r.status} [{r.error_stage}] {r.error}")
    ray_frames = sum(int(r.source_frames or 0) for r in ok)

    # The same operators in one loop, in a fresh process with its own outputs and feature
    # cache, so that it imports torch, diffusers and mediapipe inside its clock as Ray's
    # workers do inside Ray's: in this process the header and the tiny bundle have already
    # imported them.
    loop_dir = fresh_dir(os.path.join(root, "loop"))
    loop = child_result(start_child("--loop-child", {
        "device": device, "rows": manifest_rows(loop_dir), "weights": bundle, "cache": os.path.join(loop_dir, "cache")}),
        "the loop's process")
    if loop is None:
        return
    for error in loop["errors"]:
        print(f"  {error}")
    loop_total_s, loop_frames, loop_ok = loop["total_s"], loop["frames"], loop["ok"]

    pools = ", ".join(f"{k} {p.size}x{p.num_cpus:g}cpu" + (f"+{p.num_gpus:g}gpu" if p.num_gpus else "")
                      for k, p in config.pools.items())
    print(f"job config: segment_seconds {config.segment_seconds:g}, torch_threads {config.torch_threads}, "
          f"batch complete {config.batch.complete_frames} / motion {config.batch.motion_frames}")
    print(f"Ray pools: {pools}")
    print(f"Ray stage layout: {layout} (config {config.stage_layout}; fused: plan+analyse+audio in one actor, "
          f"face..compose in one actor per CPU; fused_lead {'on' if config.fused_lead else 'off'})")
    print(f"videos dubbed: Ray {len(ok)}/{len(SAMPLES)}, loop {loop_ok}/{len(SAMPLES)}; "
          f"source frames: Ray {ray_frames}, loop {loop_frames}")
    print(f"{'':58s}{'frames':>7s}{'seconds':>10s}{'frames/s':>10s}")
    line = "  {:56s}{:7d}{:10.1f}{:10.2f}"
    print(f"Ray (run_dub, local Ray with num_cpus={os.cpu_count()}):")
    print(line.format(f"end to end, incl. ray.init ({ray_init_s:.1f} s) and actor start-up", ray_frames, ray_total_s, fps(ray_frames, ray_total_s)))
    print(line.format("end to end, excl. ray.init (incl. actor start-up)", ray_frames, result.seconds, fps(ray_frames, result.seconds)))
    ray_steady, loop_steady = ray_clock.after_first(), tuple(loop["after_first"])
    print(line.format(f"after the first segment reached the driver ({ray_clock.first_latency():.1f} s in)", *ray_steady, fps(*ray_steady)))
    print(f"plain loop (dub_rows_locally, same operators, one fresh process; {loop['imported_s']:.1f} s to import "
          "its libraries):")
    print(line.format("end to end, incl. imports and model loading", loop_frames, loop_total_s, fps(loop_frames, loop_total_s)))
    print(line.format(f"after the first segment finished ({loop['first_segment_s']:.1f} s in)", *loop_steady, fps(*loop_steady)))
    print(f"ratio Ray/loop (frames/s): end to end {fps(ray_frames, ray_total_s) / fps(loop_frames, loop_total_s):.2f}, "
          f"excl. ray.init {fps(ray_frames, result.seconds) / fps(loop_frames, loop_total_s):.2f}, "
          f"after the first segment {fps(*ray_steady) / fps(*loop_steady):.2f}")
    print(f"first finished video: Ray {ray_video.first():.1f} s (incl. ray.init), loop {loop['first_video_s']:.1f} s "
          f"(incl. importing its libraries; {loop['first_video_s'] - loop['imported_s']:.1f} s after them); "
          f"ratio Ray/loop {ray_video.first() / loop['first_video_s']:.2f} (the goal: at most 2)")
    print(f"segments finished at (s since start, frames): Ray {ray_clock.timeline()}")
    print(f"  loop {loop['timeline']}")
    print("  'after the first segment' leaves out Ray and actor start-up, model loading and the first segment's way")
    print("  through every stage; the later videos' per-video work (analyse, audio, concat + mux) stays in: on Ray it")
    print("  overlaps the segments, in the loop it runs between them. It is not a clean steady-state figure for Ray:")
    print("  Ray Data hands rows to the driver a block at a time (flat_map puts a video's segments in one block), so")
    print("  4 videos give only a few arrival moments (listed above); read it as a rough figure")
    stage_s = {k: sum(getattr(r, f"time_{k}_s") or 0.0 for r in ok) for k in ("analyse", "audio", "face", "motion", "complete", "compose")}
    busy = sum(stage_s.values())
    print("Ray stage seconds (report, summed over videos): "
          + ", ".join(f"{k} {v:.1f}" for k, v in stage_s.items()) + f" (sum {busy:.1f})")


def loop_child(spec: dict) -> dict:
    """The throughput part's plain loop, in this fresh process. Its clock starts as Ray's
    does in the parent: with the job's own modules imported (the driver's, there) and none
    of the libraries the operators load, which Ray's workers import inside Ray's clock."""
    from pipeline.dub import finalize as finalize_step
    from pipeline.dub import operators as ops
    from pipeline.dub.local_loop import dub_rows_locally, make_rows

    assert not {"torch", "diffusers", "transformers", "mediapipe"} & set(sys.modules), "imported before the clock"
    start = time.perf_counter()
    # The libraries the operators load, imported first so their time can be told apart.
    import av  # noqa: F401
    import cv2  # noqa: F401
    import diffusers  # noqa: F401
    import mediapipe  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    imported_s = time.perf_counter() - start
    config = job_config(spec["device"], spec["cache"])
    rows = make_rows(spec["rows"], config)
    # Every finished segment comes out of ComposeOp, every finished video out of finalize_video.
    with SegmentClock(ops.ComposeOp, "__call__", start) as segments, \
            VideoClock(finalize_step, "finalize_video", start) as videos:
        results = dub_rows_locally(rows, config, spec["weights"])
    total_s = time.perf_counter() - start
    ok, frames, errors = 0, 0, []
    for res in results:
        video = res["video"]
        if res["final"] is None:
            failed = [s["error"] for s in res["segments"] if s["error"]] or [video["error"] or "no output"]
            errors.append(f"loop row {video['row_index']} failed: {failed[0]}")
            continue
        ok += 1
        frames += int(video["n_frames"])
    return {"imported_s": imported_s, "first_segment_s": segments.first_latency(), "after_first": segments.after_first(),
            "timeline": segments.timeline(), "first_video_s": videos.first(), "total_s": total_s, "ok": ok,
            "frames": frames, "errors": errors}


# --------------------------------------------------------------------------- memory


def write_tone_wav(path: str, seconds: float, rate: int = 16000) -> None:
    """A voiced-sounding track: 140 Hz with harmonics, its loudness swelling at a syllable
    rate, so the audio stage sees speech-like energy for the whole length."""
    t = np.arange(int(round(seconds * rate))) / rate
    voice = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in (1, 2, 3, 4))
    envelope = 0.5 * (1 - np.cos(2 * np.pi * 4.0 * t))
    samples = (0.25 * 32767 * voice * envelope / 2.1).astype(np.int16)
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hwm_bytes() -> int:
    """The kernel's own peak RSS of this process so far (never misses a spike)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def memory_child(spec: dict) -> dict:
    """Dub one video with the local loop in this (fresh) process. Returns the peak RSS and,
    per operator, the highest RSS sampled while it ran and how far it raised the kernel's
    peak (VmHWM): the operator that raises VmHWM on the long video and not on the short
    one is the one whose memory grows with length."""
    import torch

    from pipeline.dub import finalize as finalize_step
    from pipeline.dub import operators as ops
    from pipeline.dub.local_loop import dub_rows_locally, make_rows

    config = job_config(spec["device"], spec["cache"]).model_copy(update={"torch_threads": spec["torch_threads"]})
    stage = ["load"]  # what this process is doing now, read by the sampler thread
    peaks: dict[str, int] = {}  # name -> highest sampled RSS
    rises: dict[str, int] = {}  # name -> bytes by which VmHWM rose while it ran
    calls: dict[str, int] = {}
    last_hwm = [hwm_bytes()]
    lock = threading.Lock()

    def note(name: str) -> None:
        with lock:
            peaks[name] = max(peaks.get(name, 0), rss_bytes())

    def switch(to: str) -> None:
        """Close the running stage's account and start `to`'s."""
        note(stage[0])
        hwm = hwm_bytes()
        rises[stage[0]] = rises.get(stage[0], 0) + hwm - last_hwm[0]
        last_hwm[0] = hwm
        stage[0] = to
        note(to)

    def accounted(name: str, fn):
        def wrapper(*args, **kwargs):
            switch(name)
            calls[name] = calls.get(name, 0) + 1
            try:
                return fn(*args, **kwargs)
            finally:
                switch("between")

        return wrapper

    for name in ("PlanOp", "AnalyseOp", "AudioOp", "FaceOp", "MotionOp", "CompleteOp", "ComposeOp"):
        cls = getattr(ops, name)
        cls.__call__ = accounted(name[: -len("Op")].lower(), cls.__call__)
    ops.split_segments = accounted("split", ops.split_segments)
    finalize_step.finalize_video = accounted("finalize", finalize_step.finalize_video)

    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.005):
            note(stage[0])

    baseline = rss_bytes()  # imports done, no model loaded yet
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rows = make_rows([{"video_uri": spec["video"], "audio_uri": spec["audio"], "output_uri": spec["output"]}], config)
    t0 = time.perf_counter()
    (result,) = dub_rows_locally(rows, config, spec["weights"])
    seconds = time.perf_counter() - t0
    switch("end")
    stop.set()
    sampler.join()
    video = result["video"]
    errors = [s["error"] for s in result["segments"] if s["error"]] or ([video["error"]] if video["error"] else [])
    return {
        "ok": result["final"] is not None,
        "error": errors[0] if errors else None,
        "frames": int(video["n_frames"]),
        "segments": len(result["segments"]),
        "seconds": seconds,
        # Linux reports ru_maxrss in KiB. For children it is the largest finished child's.
        "peak_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "peak_own": hwm_bytes(),
        "baseline_rss": baseline,
        "stage_peaks": peaks,
        "stage_rises": rises,
        "stage_calls": calls,
        "cuda_peak": torch.cuda.max_memory_allocated() if spec["device"] == "cuda" else None,
    }


def part_memory(out: str, device: str, lengths_s: tuple[float, float] = (10.0, 60.0)) -> None:
    from pipeline.config import JobConfig
    from pipeline.sample_catalogue import SampleVideo, write_video

    root = os.path.join(out, "memory")
    os.makedirs(root, exist_ok=True)
    bundle = tiny_bundle(os.path.join(out, "throughput", "weights-tiny"))
    header("memory: peak RSS of one worker running every operator on one video", device)
    children = []
    for seconds in lengths_s:
        name = f"astronaut_{seconds:g}s"
        video = os.path.join(root, f"{name}.mp4")
        audio = os.path.join(root, f"{name}.wav")
        if not os.path.exists(video):
            write_video(video, SampleVideo(name, Fraction(25), seconds, "", size=(640, 360)))
        if not os.path.exists(audio):
            write_tone_wav(audio, seconds)
        work = fresh_dir(os.path.join(root, f"run_{seconds:g}s"))
        spec = {"device": device, "video": video, "audio": audio, "weights": bundle, "torch_threads": os.cpu_count(),
                "output": os.path.join(work, f"{name}.dubbed.mp4"), "cache": os.path.join(work, "cache")}
        # Separate processes, so running them side by side leaves each one's peak alone.
        children.append((seconds, start_child("--memory-child", spec)))
    results = {}
    for seconds, proc in children:
        result = child_result(proc, f"the {seconds:g} s child")
        if result is None:
            return
        results[seconds] = result
    short, long = (results[s] for s in lengths_s)
    print("videos: 640x360, 25 fps, gentle-motion astronaut (write_video); dubbed track: a tone WAV of the same length")
    print(f"job config: the job's defaults (segment_seconds {JobConfig().segment_seconds:g}) but torch_threads "
          f"{os.cpu_count()} in both children, so the long one uses the machine once the short one is done")
    print(f"{'':40s}{lengths_s[0]:>10g} s{lengths_s[1]:>10g} s")
    print(f"  {'frames / segments':38s}{short['frames']:>6d} / {short['segments']:<3d}{long['frames']:>6d} / {long['segments']:<3d}")
    print(f"  {'ok':38s}{str(short['ok']):>12s}{str(long['ok']):>12s}")
    print(f"  {'wall seconds':38s}{short['seconds']:>12.1f}{long['seconds']:>12.1f}")
    print(f"  {'RSS after imports, before models MiB':38s}{short['baseline_rss'] / MIB:>12.0f}{long['baseline_rss'] / MIB:>12.0f}")
    print(f"  {'peak RSS MiB, self':38s}{short['peak_self'] / MIB:>12.0f}{long['peak_self'] / MIB:>12.0f}")
    print(f"  {'  cross-check: VmHWM since exec':38s}{short['peak_own'] / MIB:>12.0f}{long['peak_own'] / MIB:>12.0f}")
    print(f"  {'peak RSS MiB, children':38s}{short['peak_children'] / MIB:>12.0f}{long['peak_children'] / MIB:>12.0f}")
    total = {s: r["peak_self"] + r["peak_children"] for s, r in results.items()}
    print(f"  {'peak RSS MiB, self + children':38s}{total[lengths_s[0]] / MIB:>12.0f}{total[lengths_s[1]] / MIB:>12.0f}")
    if device == "cuda":
        print(f"  {'peak CUDA memory allocated MiB':38s}{short['cuda_peak'] / MIB:>12.0f}{long['cuda_peak'] / MIB:>12.0f}")
    print("  per operator, MiB: highest RSS sampled every 5 ms while it ran / rise of the process peak (VmHWM)")
    print("  during it [calls]; 'load' is model loading before the first row, 'between' the loop around the calls")
    print(f"    {'':34s}{f'{lengths_s[0]:g} s':>20s}{f'{lengths_s[1]:g} s':>20s}")
    order = ("load", "plan", "analyse", "audio", "split", "face", "motion", "complete", "compose", "finalize", "between")
    growth = {}
    for n in order:
        if n not in short["stage_peaks"] and n not in long["stage_peaks"]:
            continue
        cells = []
        for r in (short, long):
            calls = r["stage_calls"].get(n, "")
            cells.append(f"{r['stage_peaks'].get(n, 0) / MIB:8.0f} /{r['stage_rises'].get(n, 0) / MIB:+5.0f} [{calls!s:>2s}]")
        growth[n] = long["stage_peaks"].get(n, 0) - short["stage_peaks"].get(n, 0)
        print(f"    {n:34s}{''.join(cells)}")
    ratio = long["peak_self"] / short["peak_self"]
    ratio_total = total[lengths_s[1]] / total[lengths_s[0]]
    verdict = "meets" if ratio <= 1.2 else "EXCEEDS"
    print(f"peak RSS ratio {lengths_s[1]:g} s / {lengths_s[0]:g} s: {ratio:.3f} self, {ratio_total:.3f} self + children "
          f"({verdict} the goal <= 1.2)")
    if any(r["peak_self"] > 1.01 * r["peak_own"] for r in (short, long)):
        print("  WARNING: getrusage's self peak exceeds the child's own VmHWM: Linux carries the launching process's")
        print("  peak across fork+exec, so it is this benchmark process's peak, not the child's; read the VmHWM row")
    if short["peak_children"] or long["peak_children"]:
        print("  (children are short helper processes, e.g. ldconfig/gcc that ctypes.util.find_library runs when "
              "mediapipe imports sounddevice; a child's figure is mostly the parent's pages it was forked with)")
    if ratio > 1.2:
        worst = max(growth, key=growth.get)
        print(f"grows most: {worst} ({growth[worst] / MIB:+.0f} MiB of sampled RSS between the two lengths)")
    for label, r in (("short", short), ("long", long)):
        if r["error"]:
            print(f"  {label} video error: {r['error']}")


# --------------------------------------------------------------------------- stages


def part_stages(out: str, device: str) -> None:
    from pipeline.config import JobConfig
    from pipeline.sample_catalogue import SampleVideo, write_video
    from stages.face import FaceTracker, MouthMask, crop_faces, paste_back
    from stages.media import SegmentWriter, decode_frames, probe_video

    root = os.path.join(out, "stages")
    os.makedirs(root, exist_ok=True)
    sample = SampleVideo("astronaut_1080p", Fraction(25), 4.0, "", size=(1920, 1080))
    source = os.path.join(root, "astronaut_1080p_4s.mp4")
    if not os.path.exists(source):
        write_video(source, sample)
    info = probe_video(source)
    n = info.n_frames
    config = JobConfig()
    header(f"stages: CPU cost per frame at {info.width}x{info.height}, {n} frames at {float(info.fps):g} fps", device)
    print("decode, face, compose and encode run on the CPU whatever --device says (no torch in them)")

    tracker = FaceTracker(
        min_detection_confidence=config.face.min_detection_confidence,
        smoothing_sigma_frames=config.face.smoothing_sigma_frames,
        max_gap_frames=config.face.max_gap_frames,
    )
    # One frame through every library first, so one-time library start-up is not counted;
    # per-segment start-up (a fresh mediapipe graph per clip) still is, as in the job.
    warm = [f for _, f in decode_frames(source, 0, 1)]
    crop_faces(warm, tracker(warm))

    timings = {}

    def timed(name: str, fn):
        c0, w0 = time.process_time(), time.perf_counter()
        value = fn()
        timings[name] = (time.process_time() - c0, time.perf_counter() - w0)
        return value

    frames = timed("decode", lambda: [f for _, f in decode_frames(source, 0, n)])

    def face():
        track = tracker(frames)
        return track, *crop_faces(frames, track)

    track, crops, affines = timed("face", face)
    generated = np.ascontiguousarray(255 - crops)  # stands in for the network's crops
    blend = MouthMask().feathered(config.face.feather_px)

    def compose():
        for i in range(n):  # in place: 100 composited 1080p frames need not sit beside the decoded ones
            if track.has_face[i]:
                frames[i] = paste_back(frames[i], generated[i], affines[i], blend)

    timed("compose", compose)
    out_path = os.path.join(root, "encoded.mp4")
    out = config.output

    def encode():
        with SegmentWriter(out_path, info.width, info.height, info.fps, 0, codec=out.codec, crf=out.crf, preset=out.preset) as w:
            for f in frames:
                w.write(f)

    timed("encode", encode)
    print(f"face found in {int(track.has_face.sum())}/{n} frames; encode: {out.codec} crf {out.crf} preset {out.preset}, "
          f"{os.path.getsize(out_path) / MIB:.1f} MiB written")
    print(f"  {'stage':30s}{'CPU ms/frame':>13s}{'wall ms/frame':>14s}{'CPU/wall':>9s}{'frames/s':>10s}")
    labels = {
        "decode": "decode (decode_frames)",
        "face": "face (FaceTracker+crop_faces)",
        "compose": "compose (paste_back, feathered)",
        "encode": "encode (SegmentWriter)",
    }
    for name, (cpu, wall) in timings.items():
        print(f"  {labels[name]:30s}{1000 * cpu / n:13.1f}{1000 * wall / n:14.1f}{cpu / wall:9.2f}{n / wall:10.1f}")
    cpu = sum(c for c, _ in timings.values())
    wall = sum(w for _, w in timings.values())
    print(f"  {'all four':30s}{1000 * cpu / n:13.1f}{1000 * wall / n:14.1f}{cpu / wall:9.2f}{n / wall:10.1f}")


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["all", "throughput", "memory", "stages"], default="all")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "imgtalk-bench"),
                    help="inputs are made here once and reused; run outputs are replaced")
    ap.add_argument("--fused-lead", choices=["on", "off"], default="on",
                    help="throughput: the job's fused_lead setting for the Ray run (on, the default: one segment "
                         "actor leads, the others run in the idle scheduling class)")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    ap.add_argument("--loop-child", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.memory_child:
        print(CHILD_TAG + json.dumps(memory_child(json.loads(args.memory_child))), flush=True)
        return
    if args.loop_child:
        print(CHILD_TAG + json.dumps(loop_child(json.loads(args.loop_child))), flush=True)
        return

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("pipeline_bench.py: --device cuda, but torch sees no CUDA device (torch "
                     f"{torch.__version__}, CUDA build {torch.version.cuda})")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    started = time.perf_counter()
    print(f"pipeline benchmarks, part {args.part}, device {args.device}, files under {out}")
    print("figures only: a shared machine's timings vary from run to run")
    # Memory first: a child's getrusage peak starts at the peak of the process that launched
    # it (Linux keeps it across fork+exec), so launch the children while this one is small.
    if args.part in ("all", "memory"):
        part_memory(out, args.device)
    if args.part in ("all", "throughput"):
        part_throughput(out, args.device, fused_lead=args.fused_lead == "on")
    if args.part in ("all", "stages"):
        part_stages(out, args.device)
    print(f"\nbenchmark wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
