"""How soon Stage 1 alone shuts the mouth when speech stops (README, "The gate's shortest run").

    .venv/bin/python benchmarks/stage1_silence_edges.py --shards HELDOUT_SHARDS STAGE1 [STAGE1 ...] [--out JSON]

HELDOUT_SHARDS: `imgtalk prepare` of a held-out synthetic corpus (`imgtalk synth-corpus
--heldout`), whose truth files sit in the corpus's `truth/` beside its `videos/`. STAGE1: a
bundle's `stage1/` folder. For each video, Stage 1 decodes the whole sentence free-running
(pipeline/lipsync_eval.py, as the held-out r is measured) and both its Δδ and the extractor's
Δδ of the real frames are read along the lips' opening pattern U, each as a share of that
video's mean over its speech frames. The truth's silent frames (`is_silent`) are split three
ways: the first two of a silence after speech (`edge`: how late it shuts), those of a pause
of 1-2 frames between sounds (`short`: the runs the silence gate leaves to Stage 1), and the
rest. Prints, per STAGE1, the means of each for the prediction and the extractor, with their
frame counts, and the held-out r (stage1_keypoint_r).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHORT_PAUSE_FRAMES = 2  # a pause this long or shorter, between sounds, is `short`
EDGE_FRAMES = 2  # the first frames of a longer silence after speech are `edge`


def silence_kinds(silent: np.ndarray) -> np.ndarray:
    """Per frame: "" (speech), "edge", "short" or "rest" (see the module's note)."""
    from stages.lipsync.measure import true_runs

    kinds = np.full(len(silent), "", dtype=object)
    for start, stop in true_runs(silent):
        if 0 < start and stop < len(silent) and stop - start <= SHORT_PAUSE_FRAMES:
            kinds[start:stop] = "short"
            continue
        kinds[start:stop] = "rest"
        if start > 0:  # after speech, not the clip's opening silence
            kinds[start:min(stop, start + EDGE_FRAMES)] = "edge"
    return kinds


def edges(stage1_folder: str, shards: str) -> dict:
    from pipeline.lipsync_eval import stage1_heldout_series, stage1_keypoint_r

    shares = {f"{who}_{kind}": [] for who in ("stage1", "extractor") for kind in ("edge", "short", "rest")}
    for row, pred, truth, usable, along in stage1_heldout_series(stage1_folder, shards):
        name = os.path.splitext(os.path.basename(row["video_uri"]))[0]
        corpus = os.path.dirname(os.path.dirname(row["video_uri"]))
        with open(os.path.join(corpus, "truth", name + ".truth.json")) as f:
            silent = np.asarray(json.load(f)["is_silent"], bool)[: len(pred)]
        n = len(silent)
        kinds, keep = silence_kinds(silent), usable[:n]
        for who, series in (("stage1", pred), ("extractor", truth)):
            opening = (series[:n] * along).sum(axis=(1, 2))
            speech = opening[~silent & keep].mean()
            for kind in ("edge", "short", "rest"):
                shares[f"{who}_{kind}"] += list(opening[(kinds == kind) & keep] / speech)
    out = {k: {"mean_share_of_speech": float(np.mean(v)) if v else float("nan"), "frames": len(v)} for k, v in shares.items()}
    out["heldout_r"] = stage1_keypoint_r(stage1_folder, shards)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage1", nargs="+", help="bundle stage1/ folders")
    p.add_argument("--shards", required=True)
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args()
    results = {}
    for folder in args.stage1:
        fig = results[folder] = edges(folder, args.shards)
        line = "  ".join(f"{kind} {fig['stage1_' + kind]['mean_share_of_speech']:+.3f} (extractor "
                         f"{fig['extractor_' + kind]['mean_share_of_speech']:+.3f}, {fig['stage1_' + kind]['frames']} frames)"
                         for kind in ("edge", "short", "rest"))
        r = fig["heldout_r"]
        print(f"{folder}: {line}  pooled r {r['pooled_r']:.3f}, along the opening {r['opening_r']:.3f} (min {r['min_opening_r']:.3f})",
              flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"shards": args.shards, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
