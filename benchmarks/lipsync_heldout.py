"""Lip-sync of a weights bundle on sentences never used in training (README, "Proving it learns").

    .venv/bin/python benchmarks/lipsync_heldout.py --weights weights/demo --heldout DIR [--work DIR]
        [--prepared HELDOUT_SHARDS] [--per-speaker N] [--silence-gate-db DB|off] [--silence-gate-frames N]
        [--silence-gate-mode neutral-pixels|neutral|stage1]

--heldout is a held-out synthetic corpus (`imgtalk synth-corpus --heldout`, the training
corpus's speakers and seed). Each speaker's clip 1 is dubbed with its clip 0's audio (with
--per-speaker 2 also clip 2 with clip 1's, and so on) by
`imgtalk dub`'s job on a local Ray; every output is measured by FaceMesh against the true
mouth of the dubbed sentence (pipeline/lipsync_eval.py). With --prepared (that corpus run
through `imgtalk prepare` with the same bundle) Stage 1 alone is scored too: its Δδ on the
driven keypoints against what the bundle's extractor reads off the real frames.
Prints one line per output and the means.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    from pipeline.config import JobConfig
    from pipeline.dub.job import run_dub
    from pipeline.dub.schemas import write_manifest
    from pipeline.lipsync_eval import dub_figures, pooled_ratio, stage1_keypoint_r, sync_manifest
    from pipeline.storage import Storage
    from stages.face.tracker import FaceTracker
    from stages.media.probe import probe_video

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", required=True)
    p.add_argument("--heldout", required=True)
    p.add_argument("--work", default="lipsync_heldout_out")
    p.add_argument("--prepared")
    p.add_argument("--per-speaker", type=int, default=1,
                   help="dubs per speaker: clip j+1 with clip j's audio for j < this (the corpus's sentences - 1 at most)")
    p.add_argument("--out", help="write the figures as JSON here")
    p.add_argument("--silence-gate-db", default="default",
                   help="the dub's motion.silence_gate_db: a number, 'off', or 'default' (the job's default)")
    p.add_argument("--silence-gate-frames", type=int, help="the dub's motion.silence_gate_frames (default: the job's)")
    p.add_argument("--silence-gate-mode", choices=("neutral-pixels", "neutral", "stage1"),
                   help="the dub's motion.silence_gate_mode (default: the job's)")
    args = p.parse_args(argv)
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    rows = sync_manifest(args.heldout, os.path.join(work, "outputs"), per_speaker=args.per_speaker)
    for r in rows:
        if os.path.exists(r["output_uri"]):
            os.remove(r["output_uri"])
    manifest = os.path.join(work, "manifest.parquet")
    write_manifest([{k: r[k] for k in ("video_uri", "audio_uri", "output_uri")} | {"options": None} for r in rows],
                   manifest, Storage())
    config = JobConfig(cache_uri=os.path.join(work, "cache"))
    if args.silence_gate_db != "default":
        gate = None if args.silence_gate_db == "off" else float(args.silence_gate_db)
        config = config.model_copy(update={"motion": config.motion.model_copy(update={"silence_gate_db": gate})})
    if args.silence_gate_frames:
        config = config.model_copy(update={"motion": config.motion.model_copy(update={"silence_gate_frames": args.silence_gate_frames})})
    if args.silence_gate_mode:
        config = config.model_copy(update={"motion": config.motion.model_copy(update={"silence_gate_mode": args.silence_gate_mode})})
    print(f"silence gate: {config.motion.silence_gate_db} dB, {config.motion.silence_gate_frames} frames, "
          f"mode {config.motion.silence_gate_mode}")
    result = run_dub(manifest, args.weights, os.path.join(work, "report.parquet"), config)
    figures = []
    with FaceTracker(smoothing_sigma_frames=0, max_gap_frames=0) as tracker:
        for r, rep in zip(rows, sorted(result.rows, key=lambda x: x.row_index)):
            if rep.status != "ok":
                print(f"FAILED {r['video_uri']}: {rep.error}")
                continue
            f = dub_figures(r["output_uri"], r["truth"], r["truth_video"], tracker=tracker,
                            source_video=r["video_uri"], source_truth_json=r["source_truth"])
            src, out = probe_video(r["video_uri"]), probe_video(r["output_uri"])
            f["kept_frames_size_fps"] = (src.n_frames, src.width, src.height, src.fps) == \
                (out.n_frames, out.width, out.height, out.fps)
            figures.append(f)
            print(f"{os.path.basename(r['output_uri'])}: r {f['pearson_r']:.3f} (best lag {f['best_lag_frames']:+d}: "
                  f"{f['r_at_best_lag']:.3f}), silent/neutral {1 + f['silent_relative_to_neutral']:.3f} "
                  f"(over the source's closed opening {f['silent_over_source_neutral']:.3f}) "
                  f"({f['silent_share_of_speech_gap']:.3f} of the speech gap; the truth video "
                  f"{1 + f['truth_video_silent_relative_to_neutral']:.3f}), "
                  f"cavity in {f['silent_frames_with_cavity']} of {f['silent_frames_measured']} silent frames "
                  f"(the truth video {f['truth_video_silent_frames_with_cavity']}), "
                  f"jitter {f['jitter']:.4f} vs truth video {f['truth_video_jitter']:.4f}, kept {f['kept_frames_size_fps']}")
    summary = {
        "outputs": len(figures),
        "silence_gate_db": config.motion.silence_gate_db,
        "silence_gate_mode": config.motion.silence_gate_mode,
        "silence_gate_frames": config.motion.silence_gate_frames,
        "mean_r": float(np.mean([f["pearson_r"] for f in figures])),
        "min_r": float(np.min([f["pearson_r"] for f in figures])),
        "mean_silent_relative_to_neutral": float(np.mean([f["silent_relative_to_neutral"] for f in figures])),
        "max_abs_silent_relative_to_neutral": float(np.max([abs(f["silent_relative_to_neutral"]) for f in figures])),
        "mean_silent_share_of_speech_gap": float(np.mean([f["silent_share_of_speech_gap"] for f in figures])),
        # the measure's floor: the truth video's own silent frames against their median
        "mean_truth_video_silent_relative_to_neutral": float(np.mean(
            [f["truth_video_silent_relative_to_neutral"] for f in figures])),
        "silent_frames_with_cavity": int(sum(f["silent_frames_with_cavity"] for f in figures)),
        "silent_frames_measured": int(sum(f["silent_frames_measured"] for f in figures)),
        "truth_video_silent_frames_with_cavity": int(sum(f["truth_video_silent_frames_with_cavity"] for f in figures)),
        # every silent frame of every output at once, and the truth videos' the same way
        "pooled_silent_over_neutral": pooled_ratio([f["silent_frame_ratios"] for f in figures]),
        "truth_video_pooled_silent_over_neutral": pooled_ratio([f["truth_video_silent_frame_ratios"] for f in figures]),
        "pooled_silent_over_source_neutral": pooled_ratio([f["silent_frame_ratios_source"] for f in figures]),
        "mean_silent_over_source_neutral": float(np.mean([f["silent_over_source_neutral"] for f in figures])),
        "mean_jitter": float(np.mean([f["jitter"] for f in figures])),
        "mean_truth_video_jitter": float(np.mean([f["truth_video_jitter"] for f in figures])),
        "all_kept": all(f["kept_frames_size_fps"] for f in figures),
    }
    if args.prepared:
        bundle = args.weights
        summary["stage1"] = stage1_keypoint_r(os.path.join(bundle, "stage1"), args.prepared)
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"summary": summary, "outputs": figures}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
