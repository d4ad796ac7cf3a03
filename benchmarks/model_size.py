"""Parameter counts and FLOPs per 256² frame of every IMGTalk network at paper size.

    .venv/bin/python benchmarks/model_size.py [--device cpu|cuda] [--time]

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode (matmuls and convolutions,
2 FLOPs per multiply-add) on one frame. HuBERT is counted per second of audio (25 frames);
Stage 1 per 25 frames (teacher-forced). With --time, each network's forward is also timed
(median of 3 after one warm-up) on the chosen device.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def timed(fn, device: str, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--time", action="store_true")
    args = ap.parse_args()
    device = args.device
    torch.manual_seed(0)

    from transformers import HubertModel

    from stages.audio.hubert import hubert_large_config
    from stages.completion.imc_unet import IMCUNet, IMCUNetConfig
    from stages.completion.vae import LatentVAE, sd_vae_config
    from stages.motion.audio2motion import Audio2Motion, Audio2MotionConfig
    from stages.motion.extractor import MotionExtractor

    rows = []
    with torch.no_grad():  # FlopCounterMode trips over weight-norm parametrizations under inference_mode
        me = MotionExtractor().to(device).eval()
        x = torch.rand(1, 3, 256, 256, device=device)
        rows.append(("motion extractor (per frame)", params(me), count_flops(lambda: me(x)), lambda: me(x)))

        vae = LatentVAE.from_config(sd_vae_config()).to(device).eval()
        z = vae.encode(x)
        rows.append(("SD VAE encode (per frame)", params(vae.vae.encoder) + params(vae.vae.quant_conv), count_flops(lambda: vae.encode(x)), lambda: vae.encode(x)))
        rows.append(("SD VAE decode (per frame)", params(vae.vae.decoder) + params(vae.vae.post_quant_conv), count_flops(lambda: vae.decode(z)), lambda: vae.decode(z)))

        unet = IMCUNet(IMCUNetConfig()).to(device).eval()
        motion = torch.randn(1, 21, 3, device=device) * 0.02
        rows.append(("IMC-UNet (per frame)", params(unet), count_flops(lambda: unet(z, motion, z)), lambda: unet(z, motion, z)))

        cfg1 = Audio2MotionConfig()
        a2m = Audio2Motion(cfg1).to(device).eval()
        audio = torch.randn(1, 25 * cfg1.audio_steps_per_frame, 1024, device=device)
        xc, d0 = torch.randn(1, 21, 3, device=device), torch.randn(1, 21, 3, device=device)
        prev = torch.zeros(1, 25, len(cfg1.driven_keypoints), 3, device=device)
        rows.append(("Stage 1 (per 25 frames)", params(a2m), count_flops(lambda: a2m(audio, xc, d0, prev)), lambda: a2m(audio, xc, d0, prev)))

        hubert = HubertModel(hubert_large_config()).to(device).eval()
        wave = torch.randn(1, 16000 + 80, device=device)
        rows.append(("HuBERT-large (per 1 s audio)", params(hubert), count_flops(lambda: hubert(wave)), lambda: hubert(wave)))

        print(f"device: {device} ({torch.cuda.get_device_name() if device == 'cuda' else os.cpu_count()} {'GPU' if device == 'cuda' else 'CPU cores'}), torch {torch.__version__}")
        header = f"{'network':34s} {'params':>14s} {'GFLOPs':>9s}" + (f" {'ms':>9s}" if args.time else "")
        print(header)
        print("-" * len(header))
        per_frame_total = 0
        for name, n, flops, fn in rows:
            line = f"{name:34s} {n:14,d} {flops / 1e9:9.1f}"
            if args.time:
                line += f" {timed(fn, device) * 1e3:9.1f}"
            print(line)
            if "per frame" in name and "motion" not in name:
                per_frame_total += flops
        print("-" * len(header))
        print(f"{'completion per frame (VAE enc+UNet+VAE dec)':44s} {per_frame_total / 1e9:9.1f} GFLOPs")


if __name__ == "__main__":
    main()
