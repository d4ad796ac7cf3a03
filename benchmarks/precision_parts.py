"""Where the bf16 error of the completion stage comes from (issue 12's output check): each
part (VAE encode, IMC-UNet, VAE decode, the mouth-window decode) at paper size on the
random weights benchmarks/gpu_completion.py builds (same seed), in float32 and bfloat16,
against float64, each part fed the float64 reference's own input, so the errors are the
part's and not its input's. Runs on the CPU (oneDNN's bf16 convolutions accumulate in
float32, as cuDNN's do); a few minutes at --batch 4.

    .venv/bin/python benchmarks/precision_parts.py [--batch 4] [--size paper|tiny] [--bundle weights/demo]

With --bundle it also runs CompletionStage at precision fp32 and bf16 on that bundle's
trained VAE and IMC-UNet (the demo's are tiny) over 16 astronaut crops, and prints the PSNR
between the two inside the pasted region: random weights amplify rounding as trained ones
need not.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from gpu_completion import build, mouth_mask, psnr_inside, relative_error, smooth_crops


def trained_bundle(bundle: str) -> None:
    import copy

    import numpy as np

    from decode_window import astronaut_crops
    from pipeline.weights import load_stage2, load_vae, read_bundle_info
    from stages.completion.stage import CompletionStage

    info = read_bundle_info(bundle)
    vae, unet = load_vae(info).eval(), load_stage2(info).eval()
    crops = astronaut_crops(16)
    n, rng = len(crops), np.random.default_rng(0)
    x = dict(crops=crops, has_face=np.ones(n, bool), driving=rng.normal(scale=0.02, size=(n, 21, 3)).astype(np.float32),
             ref_index=np.zeros(n, int), ref_crops=crops[[0]].copy())
    mask = mouth_mask()
    pasted = mask.feathered(6.0) > 0
    out = {p: CompletionStage(copy.deepcopy(vae), copy.deepcopy(unet), mask.array(), device="cpu", precision=p,
                              batch_frames=8)("v", **x).astype(float) for p in ("fp32", "bf16")}
    diff = (out["bf16"] - out["fp32"])[:, pasted]
    print(f"{bundle}'s trained VAE + IMC-UNet, CompletionStage, {n} astronaut crops: bf16 against fp32 inside the "
          f"pasted region {10 * np.log10(255**2 / np.mean(diff**2)):.1f} dB (mean |diff| {np.abs(diff).mean():.2f} "
          f"of 255)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", choices=["paper", "tiny"], default="paper")
    ap.add_argument("--bundle", help="also compare the stage in bf16 and fp32 on this bundle's trained networks")
    args = ap.parse_args()
    if args.bundle:
        trained_bundle(args.bundle)
    from stages.completion.stage import decode_pasted, latent_window

    vae, unet, _, _ = build(args.size)
    mask = mouth_mask()
    window = latent_window(mask.feathered(6.0), vae.downsample, 4)
    pasted = torch.from_numpy(mask.feathered(6.0) > 0)[None, None]
    g = torch.Generator().manual_seed(1)
    images = smooth_crops(args.batch, "cpu", 1)
    motion = torch.randn(args.batch, unet.config.num_kp, 3, generator=g) * 0.05
    reference = torch.randn(args.batch, 4, 32, 32, generator=g)
    keep = torch.from_numpy(1.0 - mask.array())[None, None]

    def parts(dtype):
        vae.to(dtype), unet.to(dtype)
        c = lambda t: t.to(dtype)  # noqa: E731
        with torch.inference_mode():
            out = {"encode": vae.encode(c(images * keep)).double()}
            out["unet"] = unet(c(latents64["encode"]), c(motion), c(reference)).double()
            out["decode"] = vae.decode(c(latents64["unet"])).double()
            statistics = vae.window_statistics(c(latents64["unet"][:1]), *window)
            out["decode mouth"] = decode_pasted(vae, c(latents64["unet"]), c(images), window, statistics).double()
            z = vae.encode(c(images * keep))
            out["end to end"] = vae.decode(unet(z, c(motion), c(reference))).double()
        return out

    latents64 = {}
    vae.double(), unet.double()
    with torch.inference_mode():
        latents64["encode"] = vae.encode((images * keep).double())
        latents64["unet"] = unet(latents64["encode"], motion.double(), reference.double())
    ref = parts(torch.float64)
    print(f"{args.size} size, batch {args.batch}, random weights (seed 0), each part against float64 on float64 inputs")
    print(f"  {'part':<14}{'fp32 rel L2':>13}{'bf16 rel L2':>13}{'bf16 PSNR in pasted':>21}")
    results = {dtype: parts(dtype) for dtype in (torch.float32, torch.bfloat16)}
    for name in ref:
        if name == "decode mouth":  # outside its window the crop is the source by design
            row = [psnr_inside(results[d][name], ref["decode"], pasted) for d in (torch.float32, torch.bfloat16)]
            print(f"  {name:<14}{'':>13}{'':>13}{row[1]:>20.1f}   (fp32 mouth window vs fp64 full decode: {row[0]:.1f} dB)")
            continue
        e32, e16 = (relative_error(results[d][name], ref[name]) for d in (torch.float32, torch.bfloat16))
        psnr = psnr_inside(results[torch.bfloat16][name], ref[name], pasted) if ref[name].shape[1] == 3 else float("nan")
        print(f"  {name:<14}{e32:>13.2e}{e16:>13.2e}{psnr:>20.1f}")


if __name__ == "__main__":
    main()
