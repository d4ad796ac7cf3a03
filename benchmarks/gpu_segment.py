"""The GPU machine's figures besides the completion stage (issue 12, items 4 and 5), Ray-free
like benchmarks/gpu_completion.py (the GPU machine has torch, numpy, opencv and
scikit-image; carry the diffusers and PyAV wheels; mediapipe and pydantic do not travel):

- stage1: Stage 1 frames/s at paper size for one 10 s segment decoded frame by frame as one
  sequence, in windows one at a time (the path before batching), in windows decoded as one
  batch, and for several segments in one batch;
- hubert: HuBERT-large (random weights, the real architecture) seconds of audio per second,
  through the stage's chunked path, per dtype, with each dtype's error against fp32;
- encode: the CPU cost per 1080p frame of libx264 per preset (medium, fast, veryfast) and
  its quality (PSNR against the source outside the mouth), and of decode and compose;
- segment: one 1080p segment through decode -> crop -> motion -> complete -> compose ->
  encode in one process, every step timed (the GPU ones synchronised), the fraction of the
  time the GPU is busy, and the CPU cores one GPU needs to be kept fed.

    python benchmarks/gpu_segment.py [--device cuda] [--size paper|tiny] [--parts stage1,hubert,encode,segment]

At tiny size on the CPU it checks itself (`--device cpu --size tiny --frames 12`).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from fractions import Fraction

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cv2
import numpy as np
import torch

from gpu_completion import mouth_mask, synchronize  # this folder is on sys.path when the script runs

FPS = 25
MOUTH_BOX = (slice(560, 860), slice(810, 1110))  # rows, cols of the 1080p frame the compose step pastes into


def face_module(name: str):
    """stages/face/<name>.py without the stages.face package, whose tracker needs mediapipe."""
    spec = importlib.util.spec_from_file_location(f"stages.face.{name}", os.path.join(ROOT, "stages", "face", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(fn, device: str = "cpu"):
    """(wall s, process CPU s over all threads, value) of fn(), the device synchronised."""
    synchronize(device)
    c0, w0 = time.process_time(), time.perf_counter()
    value = fn()
    synchronize(device)
    return time.perf_counter() - w0, time.process_time() - c0, value


# --------------------------------------------------------------------------- Stage 1


def stage1_model(size: str, device: str):
    from stages.motion.audio2motion import Audio2Motion, Audio2MotionConfig

    torch.manual_seed(0)
    # max_frames 25: the demo bundle's training clips (train stage1 records it); paper width
    cfg = Audio2MotionConfig(max_frames=25) if size == "paper" else Audio2MotionConfig(**{
        **Audio2MotionConfig.tiny().__dict__, "max_frames": 8})
    return Audio2Motion(cfg).to(device).eval()


def part_stage1(device: str, size: str, seconds: float, segments: int) -> None:
    from stages.motion.audio2motion import window_starts

    model = stage1_model(size, device)
    cfg, k = model.cfg, model.cfg.audio_steps_per_frame
    frames = int(seconds * FPS)
    g = torch.Generator().manual_seed(1)
    audio = torch.randn(segments, frames * k, cfg.audio_dim, generator=g).to(device)
    x_c = (0.1 * torch.randn(segments, cfg.num_kp, 3, generator=g)).to(device)
    neutral = (0.05 * torch.randn(segments, cfg.num_kp, 3, generator=g)).to(device)
    window, after = cfg.max_frames, cfg.audio_window_after
    overlap = max(window // 4, after + 1)

    def one_at_a_time():  # the windows' frame loops one after another, as before batching
        for start in window_starts(frames, window, overlap):
            model._generate(audio[:1, k * start: k * min(frames, start + window + after)], x_c[:1], neutral[:1])

    rows = (
        ("one segment, one sequence frame by frame (no windows)", 1, lambda: model._generate(audio[:1], x_c[:1], neutral[:1])),
        ("one segment, its windows one at a time", 1, one_at_a_time),
        ("one segment, its windows as one batch (generate)", 1, lambda: model.generate(audio[:1], x_c[:1], neutral[:1])),
        (f"{segments} segments in one batch (generate)", segments, lambda: model.generate(audio, x_c, neutral)),
    )
    print(f"\nStage 1 ({size}: d_model {cfg.d_model}, {cfg.n_layers} layers, max_frames {window}) on {device}, "
          f"{seconds:g} s segments ({frames} frames, {len(window_starts(frames, window, overlap))} windows), fp32")
    with torch.inference_mode():
        for label, batch, fn in rows:
            fn()  # warm-up
            wall = min(timed(fn, device)[0] for _ in range(3))
            print(f"  {label:<56} {batch * frames / wall:10.0f} frames/s  ({1000 * wall:.1f} ms per call)")


# --------------------------------------------------------------------------- HuBERT


def part_hubert(device: str, size: str, seconds: float) -> None:
    import transformers

    from stages.audio.hubert import HubertFeatures, hubert_large_config, tiny_hubert_config

    torch.manual_seed(0)
    model = transformers.HubertModel(hubert_large_config() if size == "paper" else tiny_hubert_config()).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    wave = (0.1 * np.random.default_rng(0).standard_normal(int(16000 * seconds))).astype(np.float32)
    print(f"\nHuBERT ({size}, attention {model.config._attn_implementation}) on {device}: the stage's chunked path "
          f"(20 s chunks + 2 s context each side), {seconds:g} s of audio")
    dtypes = (torch.float32, torch.bfloat16, torch.float16) if device.startswith("cuda") else (torch.float32, torch.bfloat16)
    reference = None
    for dtype in dtypes:
        model.load_state_dict(state)
        stage = HubertFeatures(model.float(), device=device, dtype=dtype)
        with torch.inference_mode():
            stage(wave[: 16000 * 3])  # warm-up
            wall, _, rows = timed(lambda: stage(wave), device)
        error = "" if reference is None else \
            f", relative error against fp32 {np.linalg.norm(rows - reference) / np.linalg.norm(reference):.2e}"
        reference = rows if reference is None else reference
        print(f"  {str(dtype).replace('torch.', ''):<9} {seconds / wall:8.1f} s of audio per s{error}")
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- CPU: decode, compose, encode


def source_frames(n: int, size: tuple[int, int]) -> list[np.ndarray]:
    """n RGB frames (H, W, 3): a real face (skimage's astronaut) on a textured background,
    panning 3 px and brightening slightly per frame, so the encoder sees motion and detail."""
    from skimage import data

    w, h = size
    face = cv2.resize(data.astronaut(), (h * 3 // 4, h * 3 // 4), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:h, 0:w + 3 * n]
    texture = (127 + 60 * np.sin(xx / 23.0) * np.cos(yy / 31.0) + 30 * np.sin((xx + yy) / 7.0)).astype(np.uint8)
    background = np.repeat(texture[..., None], 3, axis=2)
    frames = []
    for i in range(n):
        frame = np.ascontiguousarray(background[:, 3 * i: 3 * i + w])
        y0, x0 = (h - face.shape[0]) // 2, (w - face.shape[1]) // 2
        frame[y0: y0 + face.shape[0], x0: x0 + face.shape[1]] = face
        frames.append(cv2.add(frame, np.full_like(frame, i % 8)))
    return frames


def psnr_outside_mouth(decoded: list[np.ndarray], source: list[np.ndarray]) -> float:
    keep = np.ones(source[0].shape[:2], bool)
    keep[MOUTH_BOX] = False
    mse = np.mean([np.mean((d[keep].astype(np.float64) - s[keep]) ** 2) for d, s in zip(decoded, source)])
    return float(10 * np.log10(255.0**2 / mse))


def encode(path: str, frames: list[np.ndarray], preset: str, crf: int = 18) -> None:
    from stages.media import SegmentWriter

    h, w = frames[0].shape[:2]
    with SegmentWriter(path, w, h, Fraction(FPS), 0, codec="libx264", crf=crf, preset=preset) as writer:
        for frame in frames:
            writer.write(frame)


def crop_affine(size: tuple[int, int]) -> np.ndarray:
    """A source -> 256² crop affine around the frame's face (a stand-in for the face stage's)."""
    w, h = size
    scale = 256 / (h * 0.6)
    return np.array([[scale, 0, -scale * (w / 2 - h * 0.3)], [0, scale, -scale * (h / 2 - h * 0.3)]], np.float32)


def part_encode(frames: list[np.ndarray], workdir: str) -> dict[str, float]:
    """CPU ms per frame of each step, for the segment's sizing. Returns them."""
    from stages.media import decode_frames

    paste = face_module("paste")
    mask = mouth_mask()
    n, (h, w) = len(frames), frames[0].shape[:2]
    print(f"\nCPU per frame at {w}x{h} ({n} frames, {os.cpu_count()} cores; CPU ms = process CPU time over all threads)")
    cost = {}
    for preset in ("medium", "fast", "veryfast"):
        path = os.path.join(workdir, f"encoded_{preset}.mp4")
        wall, cpu, _ = timed(lambda: encode(path, frames, preset))
        decoded = [f for _, f in decode_frames(path, 0, n)]
        cost[f"encode {preset}"] = 1000 * cpu / n
        print(f"  encode libx264 crf 18 {preset:<9} {1000 * cpu / n:7.1f} CPU ms/frame, {n / wall:6.1f} frames/s wall, "
              f"{os.path.getsize(path) * 8 * FPS / n / 1e6:5.1f} Mbit/s, PSNR outside the mouth "
              f"{psnr_outside_mouth(decoded, frames):.2f} dB")
    path = os.path.join(workdir, "encoded_medium.mp4")
    wall, cpu, decoded = timed(lambda: [f for _, f in decode_frames(path, 0, n)])
    cost["decode"] = 1000 * cpu / n
    print(f"  decode (decode_frames)             {1000 * cpu / n:7.1f} CPU ms/frame, {n / wall:6.1f} frames/s wall")
    M = crop_affine((w, h))
    wall, cpu, crops = timed(lambda: [cv2.warpAffine(f, M, (256, 256), flags=cv2.INTER_LINEAR) for f in decoded])
    cost["crop"] = 1000 * cpu / n
    print(f"  crop (warpAffine to 256²)          {1000 * cpu / n:7.1f} CPU ms/frame")
    blend = mask.feathered(6.0)
    generated = [np.ascontiguousarray(255 - c) for c in crops]
    wall, cpu, _ = timed(lambda: [paste.paste_back(f, c, M, blend) for f, c in zip(decoded, generated)])
    cost["compose"] = 1000 * cpu / n
    print(f"  compose (paste_back, feathered)    {1000 * cpu / n:7.1f} CPU ms/frame")
    return cost


# --------------------------------------------------------------------------- the segment path


def part_segment(device: str, size: str, frames: list[np.ndarray], workdir: str, batch: int,
                 face_ms: float) -> None:
    from stages.completion.imc_unet import IMCUNet, IMCUNetConfig
    from stages.completion.vae import LatentVAE, sd_vae_config, tiny_vae_config
    from stages.media import decode_frames
    from stages.motion.extractor import MotionExtractor, MotionExtractorConfig, extract_motion

    paste = face_module("paste")
    mask = mouth_mask()
    paper = size == "paper"
    n, (h, w) = len(frames), frames[0].shape[:2]
    source = os.path.join(workdir, "segment_source.mp4")
    encode(source, frames, "veryfast", crf=12)
    gpu_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    memory = torch.channels_last if device.startswith("cuda") else torch.contiguous_format
    torch.manual_seed(0)
    extractor = MotionExtractor(MotionExtractorConfig() if paper else MotionExtractorConfig.tiny()).to(device).eval()
    stage1 = stage1_model(size, device)
    vae = LatentVAE.from_config(sd_vae_config() if paper else tiny_vae_config()).eval()
    vae = vae.to(device=device, dtype=gpu_dtype, memory_format=memory)
    unet = IMCUNet(IMCUNetConfig() if paper else IMCUNetConfig.tiny()).eval().to(device=device, dtype=gpu_dtype,
                                                                               memory_format=memory)
    keep = torch.from_numpy(1.0 - mask.array()).to(device, gpu_dtype)[None, None]
    blend = mask.feathered(6.0)
    M = crop_affine((w, h))
    features = torch.randn(1, n * stage1.cfg.audio_steps_per_frame, stage1.cfg.audio_dim).to(device)

    def motion(crops):
        info = extract_motion(extractor, crops, batch_size=batch)
        x_c = torch.from_numpy(info["x_c"][:1]).to(device)
        exp = torch.from_numpy(info["exp"][:1]).to(device)
        offsets = stage1.generate(features, x_c, exp)[0]  # (n, |D|, 3)
        # the driving keypoints stand-in: the crops' own (the dub adds Stage 1's offsets to them)
        return torch.from_numpy(info["x_d"]).to(device), offsets

    def complete(crops, kp):
        out = []
        reference = None
        for start in range(0, len(crops), batch):
            images = torch.from_numpy(crops[start: start + batch]).to(device).permute(0, 3, 1, 2)
            images = (images.to(gpu_dtype) / 255).contiguous(memory_format=memory)
            latent = vae.encode(images * keep)
            if reference is None:
                reference = vae.encode(images[:1])
            completed = unet(latent, kp[start: start + batch].to(gpu_dtype), reference.expand(len(images), -1, -1, -1))
            pixels = vae.decode(completed)
            out.append((pixels.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
        return np.concatenate(out)

    output = os.path.join(workdir, "segment_out.mp4")
    steps = {}
    with torch.inference_mode():
        motion(np.stack([cv2.warpAffine(frames[0], M, (256, 256))] * 2))  # warm-up: cuDNN, cuBLAS
        complete(np.stack([cv2.warpAffine(frames[0], M, (256, 256))] * batch), torch.zeros(batch, 21, 3, device=device))
        t0 = time.perf_counter()
        steps["decode"] = timed(lambda: [f for _, f in decode_frames(source, 0, n)])
        decoded = steps["decode"][2]
        steps["crop"] = timed(lambda: np.stack([cv2.warpAffine(f, M, (256, 256)) for f in decoded]))
        crops = steps["crop"][2]
        steps["motion (GPU)"] = timed(lambda: motion(crops), device)
        kp = steps["motion (GPU)"][2][0]
        steps["complete (GPU)"] = timed(lambda: complete(crops, kp), device)
        generated = steps["complete (GPU)"][2]
        steps["compose"] = timed(lambda: [paste.paste_back(f, c, M, blend) for f, c in zip(decoded, generated)])
        composed = steps["compose"][2]
        steps["encode medium"] = timed(lambda: encode(output, composed, "medium"))
        total = time.perf_counter() - t0
        # Once more each, after the segment: steady state against first use of these shapes
        # (CUDA loads kernels lazily; the warm-up ran other batch sizes).
        again = {"motion (GPU)": timed(lambda: motion(crops), device)[0],
                 "complete (GPU)": timed(lambda: complete(crops, kp), device)[0]}
    print(f"\nOne {w}x{h} segment of {n} frames through decode -> crop -> motion -> complete -> compose -> encode, "
          f"serial, one process, {device} ({'bf16 weights, channels_last' if device.startswith('cuda') else 'fp32'}, "
          f"batch {batch})")
    gpu = 0.0
    for name, (wall, cpu, _) in steps.items():
        gpu += wall if "GPU" in name else 0.0
        rerun = f" ({1000 * again[name] / n:.2f} run again)" if name in again else ""
        print(f"  {name:<16} {1000 * wall / n:8.2f} wall ms/frame {1000 * cpu / n:8.2f} CPU ms/frame{rerun}")
    print(f"  total {1000 * total / n:.2f} wall ms/frame ({n / total:.1f} frames/s); the GPU steps take "
          f"{gpu / total:.0%} of the time (an upper bound on how busy the GPU is in this serial path)")
    cpu_ms = sum(1000 * cpu / n for name, (_, cpu, _) in steps.items() if "GPU" not in name) + face_ms
    gpu_fps = n / gpu
    print(f"  CPU steps (decode, crop, compose, encode medium) + the face stage's {face_ms:.1f} CPU ms/frame (measured "
          f"on the CPU VM, mediapipe does not travel): {cpu_ms:.1f} CPU ms/frame; the GPU steps run {gpu_fps:.0f} "
          f"frames/s here, so feeding them takes {cpu_ms * gpu_fps / 1000:.1f} cores "
          f"({'within' if cpu_ms * gpu_fps / 1000 <= (os.cpu_count() or 1) else 'more than'} this machine's "
          f"{os.cpu_count()})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=["paper", "tiny"], default="paper")
    ap.add_argument("--parts", default="stage1,hubert,encode,segment")
    ap.add_argument("--frames", type=int, default=200, help="1080p frames for encode and segment")
    ap.add_argument("--resolution", default="1920x1080")
    ap.add_argument("--segments", type=int, default=16, help="Stage 1 segments batched together")
    ap.add_argument("--hubert-seconds", type=float, default=60.0)
    ap.add_argument("--batch", type=int, default=64, help="the segment path's GPU batch")
    ap.add_argument("--face-ms", type=float, default=17.0,
                    help="the face stage's CPU ms per 1080p frame (benchmarks/pipeline_bench.py --part stages)")
    args = ap.parse_args(argv)
    parts = args.parts.split(",")
    print(f"gpu_segment: {args.size} size on {args.device} "
          f"({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}), torch {torch.__version__}, "
          f"{os.cpu_count()} CPU cores")
    if "stage1" in parts:
        part_stage1(args.device, args.size, 10.0, args.segments)
    if "hubert" in parts:
        part_hubert(args.device, args.size, args.hubert_seconds)
    if "encode" in parts or "segment" in parts:
        w, h = (int(v) for v in args.resolution.split("x"))
        frames = source_frames(args.frames, (w, h))
        with tempfile.TemporaryDirectory() as workdir:
            cost = part_encode(frames, workdir) if "encode" in parts else {}
            if "segment" in parts:
                part_segment(args.device, args.size, frames, workdir, args.batch, args.face_ms)
            if cost:
                # The job decodes each segment twice (face, then compose); --face-ms includes the crops.
                fixed = 2 * cost["decode"] + cost["compose"] + args.face_ms
                print("\nCPU ms per 1080p frame, 2 x decode + face (with its crops, --face-ms) + compose + encode, per preset:")
                for preset in ("medium", "fast", "veryfast"):
                    total = fixed + cost[f"encode {preset}"]
                    print(f"  {preset:<9} {total:6.1f} CPU ms/frame: {total * 370 / 1000:5.1f} cores for 370 frames/s, "
                          f"{total * 100 / 1000:5.1f} for 100")


if __name__ == "__main__":
    main()
