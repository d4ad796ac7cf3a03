"""GPU speed of the completion stage (issue 12): VAE encode + IMC-UNet + VAE decode at paper
size on random weights and random (smooth, never constant) crops, per batch size and
variant, against the fp32 eager reference, with MuseTalk's UNet + the same VAE run
MuseTalk's way in the same script. Imports no Ray, PyAV or mediapipe (the GPU machine has
torch, numpy and opencv; carry diffusers' wheel): it is meant to be the one prepared script
of a GPU device run.

    python benchmarks/gpu_completion.py [--device cuda] [--size paper|tiny]
                                        [--batches 8,16,32,64,128,256] [--compile default,max-autotune]

Per variant and batch: frames/s (after warm-up, at least --seconds of timed calls, the
device synchronised around them) and peak memory; per variant, at batch 8, the relative L2
error of the decoded crops against fp32 eager and, for the mouth-window decode, PSNR inside
the pasted region. Then the roofline ratio (FLOPs per frame counted on the meta device
against --peak-tflops, default 790: bf16 matmuls measured on the H200) and the MuseTalk
ratios. With --compile the best eager variant is also compiled (torch.compile
max-autotune, without and with CUDA graphs) at --compile-batch only: compiling every batch
size would not fit a 15-minute device budget.

Run on the CPU at tiny size it checks itself (`--device cpu --size tiny --batches 2,4`).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch
import torch.nn.functional as F

# MuseTalk's UNet: UNet2DConditionModel(**musetalk/models/musetalk.json) (the file's numbers
# as ../shared/reference/musetalk-and-peers.md records them, §1 "UNet"): SD 1.x layout, 8 input
# channels (masked latent ⊕ reference latent), 384-d Whisper cross-attention, one step at t=0.
MUSETALK_UNET = dict(
    sample_size=32,
    in_channels=8,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=384,
)
MUSETALK_AUDIO_TOKENS = 50  # whisper: 10 steps x 5 layers around each frame, 384-d
MUSETALK_BATCH = {"normal": 8, "realtime": 20}  # its inference scripts' batch sizes


def mouth_mask():
    """stages/face/mouth_mask.py's MouthMask(), loaded without the stages.face package, whose
    other modules need PyAV and mediapipe (this one needs cv2 and numpy only)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mouth_mask", os.path.join(ROOT, "stages", "face", "mouth_mask.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MouthMask()


@dataclass(frozen=True)
class Variant:
    name: str
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    decode: str = "full"  # or "mouth" (complete.decode)
    compile_mode: str | None = None
    autocast: bool = False  # fp32 weights run under bf16 autocast (CompletionStage's precision "bf16")
    graph: bool = False  # captured as one CUDA graph for a fixed batch


EAGER = (
    Variant("fp32 eager"),
    Variant("fp32 weights + bf16 autocast", autocast=True),
    Variant("bf16 weights", torch.bfloat16),
    Variant("bf16 + channels_last", torch.bfloat16, True),
    Variant("bf16 + channels_last + decode mouth", torch.bfloat16, True, "mouth"),
    Variant("bf16 + decode mouth", torch.bfloat16, False, "mouth"),
)


def tiny_musetalk_unet() -> dict:
    return dict(MUSETALK_UNET, block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8,
                attention_head_dim=2, cross_attention_dim=32)


def build(size: str):
    """(vae, our IMC-UNet, MuseTalk's UNet, MuseTalk's audio width), fp32 on the CPU, seeded."""
    from diffusers import UNet2DConditionModel

    from stages.completion.imc_unet import IMCUNet, IMCUNetConfig
    from stages.completion.vae import LatentVAE, sd_vae_config, tiny_vae_config

    torch.manual_seed(0)
    paper = size == "paper"
    vae = LatentVAE.from_config(sd_vae_config() if paper else tiny_vae_config()).eval()
    unet = IMCUNet(IMCUNetConfig() if paper else IMCUNetConfig.tiny()).eval()
    musetalk_config = MUSETALK_UNET if paper else tiny_musetalk_unet()
    musetalk = UNet2DConditionModel(**musetalk_config).eval()
    return vae, unet, musetalk, musetalk_config["cross_attention_dim"]


def smooth_crops(batch: int, device: str, seed: int) -> torch.Tensor:
    """(B,3,256,256) in [0,1]: random 16x16 colour fields upsampled, so the VAE sees image-like
    content (never constant, never white noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 16, 16, generator=g)
    return F.interpolate(coarse, size=256, mode="bicubic", align_corners=False).clamp(0, 1).to(device)


class OurStage:
    """CompletionStage's forward (stages/completion/stage.py) on tensors, in one variant."""

    def __init__(self, vae, unet, variant: Variant, device: str):
        from stages.completion.stage import decode_pasted, latent_window

        self.decode_pasted = decode_pasted
        self.variant, self.device = variant, device
        memory = torch.channels_last if variant.channels_last else torch.contiguous_format
        self.vae = vae.to(device=device, dtype=variant.dtype, memory_format=memory)
        self.unet = unet.to(device=device, dtype=variant.dtype, memory_format=memory)
        mask = mouth_mask()
        self.keep = torch.from_numpy(1.0 - mask.array()).to(device, variant.dtype)[None, None]
        self.window = latent_window(mask.feathered(6.0), vae.downsample, 4) if variant.decode == "mouth" else None
        self.statistics = None
        self.forward = self._autocast_forward if variant.autocast else self._forward
        if variant.compile_mode:
            self.forward = torch.compile(self._forward, mode=variant.compile_mode, fullgraph=False)
        if variant.graph:
            self.forward = GraphedCall(self.forward, device)

    def _autocast_forward(self, *args):
        with torch.autocast("cuda" if self.device.startswith("cuda") else "cpu", dtype=torch.bfloat16):
            return self._forward(*args)

    def prepare(self, images: torch.Tensor, motion: torch.Tensor, reference: torch.Tensor):
        memory = torch.channels_last if self.variant.channels_last else torch.contiguous_format
        cast = lambda t: t.to(self.device, self.variant.dtype)  # noqa: E731
        return (cast(images).contiguous(memory_format=memory), cast(motion),
                cast(reference).contiguous(memory_format=memory))

    def _forward(self, images, motion, reference_latent):
        masked = self.vae.encode(images * self.keep)  # (B,4,32,32)
        completed = self.unet(masked, motion, reference_latent)
        if self.window is None:
            return self.vae.decode(completed)
        # The dub takes a segment's first face frame's statistics, one full decode of one
        # frame per segment (hundreds of frames): taken once here, outside the timing.
        if self.statistics is None:
            self.statistics = self.vae.window_statistics(completed[:1], *self.window)
        return self.decode_pasted(self.vae, completed, images, self.window, self.statistics)


class GraphedCall:
    """fn captured as one CUDA graph per input shape: the inputs are copied into static
    buffers and the graph replayed, so a batch costs one launch instead of ~1,000 kernels'.
    On the CPU (the tiny self-check) it calls fn."""

    def __init__(self, fn, device: str):
        self.fn, self.device, self.graphs = fn, device, {}

    def __call__(self, *args):
        if not self.device.startswith("cuda"):
            return self.fn(*args)
        key = tuple((tuple(a.shape), a.dtype) for a in args)
        if key not in self.graphs:
            static = [a.clone() for a in args]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture: cuDNN/cuBLAS pick their kernels
                for _ in range(2):
                    self.fn(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.fn(*static)
            self.graphs[key] = (graph, static, out)
        graph, static, out = self.graphs[key]
        for buffer, a in zip(static, args):
            buffer.copy_(a)
        graph.replay()
        return out


class MuseTalkWay:
    """MuseTalk's per-frame work (musetalk/models/vae.py, scripts/inference.py): normal mode
    encodes the lower-half-masked frame and the frame itself, concatenates the latents,
    one UNet step at t=0 with the audio tokens, decodes; realtime mode has the latents cached
    and runs only the UNet and the decoder."""

    def __init__(self, vae, unet, audio_dim: int, dtype: torch.dtype, device: str, realtime: bool):
        self.vae = vae.to(device=device, dtype=dtype)
        self.unet = unet.to(device=device, dtype=dtype)
        self.audio_dim, self.dtype, self.device, self.realtime = audio_dim, dtype, device, realtime

    def inputs(self, batch: int, seed: int):
        images = smooth_crops(batch, self.device, seed).to(self.dtype)
        audio = torch.randn(batch, MUSETALK_AUDIO_TOKENS, self.audio_dim, generator=torch.Generator().manual_seed(seed))
        audio = audio.to(self.device, self.dtype)
        if not self.realtime:
            return images, audio
        with torch.inference_mode():
            return self._latents(images), audio

    def _latents(self, images):
        masked = images.clone()
        masked[:, :, images.shape[2] // 2 :] = 0.0
        return torch.cat([self.vae.encode(masked), self.vae.encode(images)], dim=1)  # (B,8,32,32)

    def forward(self, first, audio):
        latents = first if self.realtime else self._latents(first)
        out = self.unet(latents, 0, encoder_hidden_states=audio).sample
        return self.vae.decode(out)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def throughput(fn, args, batch: int, device: str, seconds: float, clock=time.perf_counter) -> tuple[float, float]:
    """(frames/s, peak GiB) of fn(*args) after two warm-up calls."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        for _ in range(2):
            fn(*args)
        synchronize(device)
        calls, start = 0, clock()
        while True:
            fn(*args)
            calls += 1
            synchronize(device)
            elapsed = clock() - start
            if elapsed >= seconds:
                break
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    return batch * calls / elapsed, peak


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    out, reference = out.double().cpu(), reference.double().cpu()
    return float((out - reference).norm() / reference.norm())


def psnr_inside(out: torch.Tensor, reference: torch.Tensor, region: torch.Tensor) -> float:
    diff = (out.double().cpu() - reference.double().cpu()) * region.double()
    mse = float(diff.square().sum() / (region.sum() * out.shape[0] * out.shape[1]))
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def flops_per_frame(size: str) -> dict[str, float]:
    """FLOPs of one frame through each part, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from stages.completion.imc_unet import IMCUNet, IMCUNetConfig
    from stages.completion.vae import LatentVAE, sd_vae_config, tiny_vae_config

    with torch.device("meta"):
        vae = LatentVAE.from_config(sd_vae_config() if size == "paper" else tiny_vae_config()).eval()
        unet = IMCUNet(IMCUNetConfig() if size == "paper" else IMCUNetConfig.tiny()).eval()
        image, latent = torch.empty(1, 3, 256, 256), torch.empty(1, 4, 32, 32)
        motion = torch.empty(1, unet.config.num_kp, 3)
    counts = {}
    for name, fn in (("encode", lambda: vae.encode(image)), ("unet", lambda: unet(latent, motion, latent)),
                     ("decode", lambda: vae.decode(latent))):
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            fn()
        counts[name] = float(counter.get_total_flops())
    return counts


def part_times(stage: "OurStage", inputs, device: str, repeats: int = 5) -> dict[str, float]:
    """Milliseconds per call of each part (encode, UNet, decode) at one batch, by CUDA events."""
    images, motion, reference = inputs
    parts = {
        "encode": lambda: stage.vae.encode(images * stage.keep),
        "unet": lambda: stage.unet(latent, motion, reference),
        "decode": lambda: stage.vae.decode(latent) if stage.window is None
        else stage.decode_pasted(stage.vae, latent, images, stage.window, stage.statistics),
    }
    times = {}
    with torch.inference_mode():
        latent = stage.vae.encode(images * stage.keep)
        for name, fn in parts.items():
            for _ in range(2):
                fn()
            synchronize(device)
            if device.startswith("cuda"):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(repeats):
                    fn()
                end.record()
                torch.cuda.synchronize()
                times[name] = start.elapsed_time(end) / repeats
            else:
                t0 = time.perf_counter()
                for _ in range(repeats):
                    fn()
                times[name] = 1000 * (time.perf_counter() - t0) / repeats
    return times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=["paper", "tiny"], default="paper")
    ap.add_argument("--batches", default="8,16,32,64,128,256")
    ap.add_argument("--fp32-batches", default="8,32", help="fp32 runs ~10x slower: fewer batch sizes")
    ap.add_argument("--seconds", type=float, default=2.0, help="timed calls per measurement, at least this long")
    ap.add_argument("--graph-batches", default="64,256", help="CUDA-graph batch sizes ('' for none)")
    ap.add_argument("--compile", default="", help="comma-separated torch.compile modes, run last, e.g. "
                    "default,max-autotune-no-cudagraphs,max-autotune")
    ap.add_argument("--compile-batch", type=int, default=64)
    ap.add_argument("--peak-tflops", type=float, default=790.0)
    ap.add_argument("--eager", default=",".join(str(i) for i in range(len(EAGER))),
                    help="indices into EAGER to measure (0, fp32 eager, is always the reference)")
    ap.add_argument("--graph-of", default="3,4", help="indices into EAGER captured as CUDA graphs")
    ap.add_argument("--compile-of", type=int, default=3, help="index into EAGER that --compile compiles")
    args = ap.parse_args(argv)
    device, batches = args.device, [int(b) for b in args.batches.split(",")]
    fp32_batches = [int(b) for b in args.fp32_batches.split(",")]
    graph_batches = [int(b) for b in args.graph_batches.split(",") if b]

    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    print(f"gpu_completion: {args.size} size on {device} ({name}), torch {torch.__version__}")
    flops = flops_per_frame(args.size)
    total = sum(flops.values())
    print("GFLOPs per frame: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in flops.items()) + f", total {total / 1e9:.1f}")
    roofline = args.peak_tflops * 1e12 / total
    print(f"roofline at {args.peak_tflops:.0f} TFLOP/s: {roofline:.0f} frames/s (goal: half of it)")

    vae, unet, musetalk_unet, audio_dim = build(args.size)
    from diffusers.models.attention_processor import Attention

    processors = {type(m.processor).__name__ for net in (vae, unet, musetalk_unet) for m in net.modules()
                  if isinstance(m, Attention)}
    print(f"fp32 settings (torch's defaults): cuDNN TF32 {torch.backends.cudnn.allow_tf32}, matmul TF32 "
          f"{torch.backends.cuda.matmul.allow_tf32}; the fp32 reference check runs with cuDNN TF32 off")
    print(f"attention processors (AttnProcessor2_0 is torch's SDPA, flash where it applies): {sorted(processors)}")
    num_kp = unet.config.num_kp

    def inputs_for(stage: OurStage, batch: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        return stage.prepare(smooth_crops(batch, "cpu", seed), torch.randn(batch, num_kp, 3, generator=g) * 0.05,
                             torch.randn(batch, 4, 32, 32, generator=g))

    check_batch = min(8, batches[0])
    pasted = torch.from_numpy(mouth_mask().feathered(6.0) > 0)[None, None]
    reference_out = None
    results = {}  # variant name -> {batch: frames/s}
    best = (0.0, None, 0)  # frames/s, variant, batch

    def measure(variant: Variant, variant_batches: list[int]) -> "OurStage":
        nonlocal reference_out, best
        stage = OurStage(vae, unet, variant, device)
        # The reference in true fp32: cuDNN convolutions default to TF32 on the GPU.
        tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = reference_out is not None and tf32
        with torch.inference_mode():
            out = stage.forward(*inputs_for(stage, check_batch, 1)).float().clone()
        torch.backends.cudnn.allow_tf32 = tf32
        if reference_out is None:
            reference_out = out
        elif variant.decode == "mouth":  # outside the window the crop is the source, by design
            print(f"  check {variant.name}: PSNR inside the pasted region against fp32 eager "
                  f"{psnr_inside(out, reference_out, pasted):.1f} dB")
        else:
            print(f"  check {variant.name}: relative L2 error against fp32 eager {relative_error(out, reference_out):.2e}")
        for batch in variant_batches:
            fps, peak = throughput(stage.forward, inputs_for(stage, batch, 2), batch, device, args.seconds)
            print(f"{variant.name:<52} {batch:>5} {fps:>9.1f} {peak:>8.2f}", flush=True)
            results.setdefault(variant.name, {})[batch] = fps
            if fps > best[0]:
                best = (fps, variant, batch)
        return stage

    def restore():
        nonlocal vae, unet
        vae, unet = vae.float().to(memory_format=torch.contiguous_format), unet.float().to(memory_format=torch.contiguous_format)

    print(f"{'variant':<52} {'batch':>5} {'frames/s':>9} {'peak GiB':>8}")
    for variant in [EAGER[0]] + [EAGER[int(i)] for i in args.eager.split(",") if i and int(i) != 0]:
        stage = measure(variant, fp32_batches if variant.dtype == torch.float32 else batches)
        if variant.dtype != torch.float32 and not variant.autocast:
            best_batch = max(results[variant.name], key=results[variant.name].get)
            ms = part_times(stage, inputs_for(stage, best_batch, 4), device)
            parts = ", ".join(f"{k} {v / best_batch:.3f} ms/frame ({flops[k] * best_batch / (v / 1e3) / 1e12:.0f} TFLOP/s)"
                              for k, v in ms.items())
            print(f"  where the time goes ({variant.name}, batch {best_batch}): {parts}")
        del stage
        restore()

    for base in [EAGER[int(i)] for i in args.graph_of.split(",") if i]:
        variant = Variant(f"{base.name} + CUDA graph", base.dtype, base.channels_last, base.decode, graph=True)
        try:
            measure(variant, graph_batches)
        except Exception as e:  # noqa: BLE001 - reported, and the other results stand
            print(f"{variant.name}: failed: {type(e).__name__}: {str(e)[:300]}")
        restore()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

    half = torch.float16 if device.startswith("cuda") else torch.float32  # fp16 convolutions are CUDA's
    musetalk = {}
    for mode, realtime in (("normal", False), ("realtime", True)):
        batch = MUSETALK_BATCH[mode]
        way = MuseTalkWay(vae, musetalk_unet, audio_dim, half, device, realtime)
        fps, peak = throughput(way.forward, way.inputs(batch, 3), batch, device, args.seconds)
        musetalk[mode] = fps
        print(f"MuseTalk's way ({mode} mode: {str(half).replace('torch.', '')}, eager, batch {batch}): "
              f"{fps:.1f} frames/s, peak {peak:.2f} GiB", flush=True)
        vae = vae.float()
    # MuseTalk's UNet with our best eager settings (bf16 weights, channels_last, our batch)
    ours_way = best[1]
    way = MuseTalkWay(vae, musetalk_unet.to(memory_format=torch.channels_last) if ours_way.channels_last else musetalk_unet,
                      audio_dim, torch.bfloat16 if device.startswith("cuda") else torch.float32, device, realtime=False)
    fps, peak = throughput(way.forward, way.inputs(best[2], 3), best[2], device, args.seconds)
    print(f"MuseTalk's UNet + VAE with bf16 weights, eager, batch {best[2]} (normal mode's work): {fps:.1f} frames/s, "
          f"peak {peak:.2f} GiB", flush=True)
    del way
    musetalk_unet.cpu()
    restore()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    def report():
        fps, variant, batch = best
        # With decode "mouth" the decoder does about half its FLOPs, so against the full-decode
        # roofline the ratio is an effective one (frames delivered), not the hardware's use.
        effective = " (effective: full-decode FLOPs)" if variant.decode == "mouth" else ""
        print(f"best: {variant.name} at batch {batch}: {fps:.1f} frames/s, {fps / roofline:.2f} of the roofline{effective}")
        for mode, mt in musetalk.items():
            print(f"ours best / MuseTalk's way ({mode} mode) {fps / mt:.2f}", flush=True)

    report()
    for mode in [m for m in args.compile.split(",") if m]:
        base = EAGER[args.compile_of]
        variant = Variant(f"{base.name} + compile {mode}", base.dtype, base.channels_last, base.decode, mode)
        t0 = time.perf_counter()
        try:
            measure(variant, [args.compile_batch])
        except Exception as e:  # noqa: BLE001 - reported, and the other results stand
            print(f"{variant.name}: failed: {type(e).__name__}: {str(e)[:300]}")
        print(f"  (compiling and measuring took {time.perf_counter() - t0:.0f} s)")
        restore()
        report()


if __name__ == "__main__":
    main()
