"""What the silence bar's measure reads on a closed mouth pasted the way the dub job pastes
one (README, "The neutral frame at rest").

    .venv/bin/python benchmarks/silence_paste_floor.py --heldout DIR [--clips N] [--out JSON]

For each held-out truth video (`imgtalk synth-corpus --heldout`), no model at all: its own
typical closed mouth (the silent frame whose FaceMesh opening is the median of its silent
frames) is cut out through the job's 256 crop and pasted into every silent frame of the
same video through the job's paste-back (crop_transforms, paste_back, the job's feathered
mouth mask). A perfect silence gate can show nothing more closed, nor more like the
speaker's neutral mouth, than this. FaceMesh then measures those frames as it measures a
dub (pipeline/lipsync_eval.py): the mean silent opening over the video's closed median
(the bar's figure), its median, and the same for the untouched truth video. Prints one
line per clip and the means.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pasted_closed_mouth(frames: list[np.ndarray], silent: np.ndarray, feather_px: float, tracker_factory):
    """(frames with the typical closed mouth pasted into every silent frame, that mouth's
    frame index, the untouched frames' FaceMesh openings)."""
    from stages.face import MouthMask
    from stages.face.align import crop_transforms, warp_crop
    from stages.face.paste import paste_back
    from stages.lipsync.measure import opening_from_landmarks

    with tracker_factory(measure=False) as tracker:
        affines = crop_transforms(tracker(frames))  # (N, 2, 3), as the dub's face stage crops
    with tracker_factory(measure=True) as tracker:
        opening = opening_from_landmarks(tracker(frames).landmarks)
    candidates = np.flatnonzero(silent & np.isfinite(opening) & np.isfinite(affines).all(axis=(1, 2)))
    median = np.median(opening[candidates])
    closed = int(candidates[np.argmin(np.abs(opening[candidates] - median))])
    mouth = warp_crop(frames[closed], affines[closed])
    blend = MouthMask().feathered(feather_px)
    pasted = [paste_back(f, mouth, affines[i], blend) if silent[i] and i != closed else f for i, f in enumerate(frames)]
    return pasted, closed, opening


def main(argv=None) -> int:
    import av

    from pipeline.config import JobConfig
    from stages.face.tracker import FaceTracker
    from stages.lipsync.measure import opening_from_landmarks

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--heldout", required=True)
    p.add_argument("--clips", type=int, default=1, help="clips per speaker")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)

    def tracker_factory(measure: bool):
        # the measure's tracker (pipeline/lipsync_eval.py) or the dub's face stage's
        return FaceTracker(smoothing_sigma_frames=0, max_gap_frames=0) if measure else FaceTracker()

    feather = JobConfig().face.feather_px
    rows = []
    for name in sorted(os.listdir(os.path.join(args.heldout, "truth"))):
        clip = name.removesuffix(".truth.json")
        if int(clip.rsplit("_h", 1)[1]) >= args.clips:
            continue
        with open(os.path.join(args.heldout, "truth", name)) as f:
            truth = json.load(f)
        with av.open(os.path.join(args.heldout, "videos", f"{clip}.mp4")) as container:
            frames = [fr.to_ndarray(format="rgb24") for fr in container.decode(video=0)]
        silent = np.zeros(len(frames), bool)
        silent[: len(truth["is_silent"])] = np.asarray(truth["is_silent"], bool)[: len(frames)]
        pasted, closed, opening = pasted_closed_mouth(frames, silent, feather, tracker_factory)
        with tracker_factory(measure=True) as tracker:
            after = opening_from_landmarks(tracker(pasted).landmarks)
        neutral = float(np.nanmedian(opening[silent]))  # the bar's neutral (lipsync_eval._neutral_opening)
        others = silent.copy()
        others[closed] = False
        row = {
            "clip": clip,
            "silent_frames": int(others.sum()),
            "closed_frame": closed,
            "truth_mean_over_neutral": float(np.nanmean(opening[others]) / neutral),
            "pasted_mean_over_neutral": float(np.nanmean(after[others]) / neutral),
            "pasted_median_over_neutral": float(np.nanmedian(after[others]) / neutral),
            "pasted_frame_ratios": (after[others] / neutral).tolist(),
        }
        rows.append(row)
        print(f"{clip}: {row['silent_frames']} silent frames; truth video {row['truth_mean_over_neutral']:.3f}, "
              f"its closed mouth pasted: mean {row['pasted_mean_over_neutral']:.3f}, "
              f"median {row['pasted_median_over_neutral']:.3f}, frames "
              f"{np.nanmin(row['pasted_frame_ratios']):.2f}-{np.nanmax(row['pasted_frame_ratios']):.2f}", flush=True)
    pooled = np.concatenate([r["pasted_frame_ratios"] for r in rows])
    summary = {
        "clips": len(rows),
        "mean_truth_over_neutral": float(np.mean([r["truth_mean_over_neutral"] for r in rows])),
        "mean_pasted_over_neutral": float(np.mean([r["pasted_mean_over_neutral"] for r in rows])),
        # the bar's count, as the README's tables give it: not more than 10% above the closed opening
        "clips_pasted_within_1_1": int(sum(r["pasted_mean_over_neutral"] <= 1.1 for r in rows)),
        "pooled_pasted_over_neutral": float(np.nanmean(pooled)),
        "pooled_pasted_median_over_neutral": float(np.nanmedian(pooled)),
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"summary": summary, "clips": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
