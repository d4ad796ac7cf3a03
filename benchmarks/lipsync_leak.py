"""Does the dubbed mouth follow the new audio, or the source video's mouth? (README, "Proving it learns")

    .venv/bin/python benchmarks/lipsync_leak.py --weights BUNDLE --heldout-shards HELDOUT_SHARDS [--out leak.json]

HELDOUT_SHARDS is a held-out synthetic corpus (`imgtalk synth-corpus --heldout`, two or more
sentences per speaker) run through `imgtalk prepare` with the same bundle. For each speaker,
A is its first held-out sentence and B its second; Stage 2 (Ray-free, on the stored crops,
the first min(len A, len B) frames) completes the mouth in four settings, and FaceMesh
measures the opening of every completed crop (pasted into the real crop through the
network's hole):

- self / Stage 1: A's crops, driven by Stage 1 on A's audio (what training looks like);
- self / oracle: A's crops, driven by the extractor's own keypoints of A's real frames;
- cross / Stage 1: B's crops, driven by Stage 1 on A's audio (what a dub looks like);
- cross / oracle: B's crops, driven by A's real keypoints.

Each is correlated (Pearson r per speaker, then the mean) with the opening of A's real crops
(the mouth it should show) and of B's (the mouth of the source it was given). A model that
reads its motion condition scores high against A in every row; one that reads the mouth's
state from the unmasked pixels of its input scores high against B in the cross rows. The
VAE round trip of A's crops (no Stage 2) is the ceiling.

With --heldout (the held-out corpus folder itself, whose truth/ marks the silent frames) each
setting is also measured in A's silent frames, against the closed opening of A's real crops
there (their median): the opening over it, minus 1, and as a share of the way to the
setting's mean speech opening, the figures `lipsync_heldout.py` gives the dubbed video. That
splits a mouth left open in silence between the VAE (round trip), Stage 2 (oracle) and Stage 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stage2_ablation import _rows, frame_conditions, load_heldout, mouth_openings, pearson, stage1_offsets  # noqa: E402


def sentence_pairs(shards: str) -> list[tuple[str, str, str]]:
    """(speaker, video A, video B): each speaker's first two held-out sentences by file name."""
    from pipeline.storage import join_uri

    by_speaker = defaultdict(list)
    for row in _rows(join_uri(shards, "videos.parquet")):
        by_speaker[row["speaker_id"]].append((os.path.basename(row["video_uri"]), row["video_id"]))
    return [(spk, *[vid for _, vid in sorted(videos)[:2]]) for spk, videos in sorted(by_speaker.items())
            if len(videos) >= 2]


def silence_figures(opening: np.ndarray, silent: np.ndarray, closed: float) -> tuple[float, float]:
    """(silent opening / closed - 1, its share of the gap from closed to the speech opening)."""
    from stages.lipsync.measure import lip_sync_report

    report = lip_sync_report(opening, None, silent=silent, neutral=closed)
    return report.silent_relative_to_neutral, report.silent_share_of_speech_gap


def keypoints(shards: str, video_ids: set[str]) -> dict[str, np.ndarray]:
    """The extractor's δ (n, K, 3) of every frame of the given videos, from the shards."""
    from pipeline.storage import Storage
    from pipeline.train.job import load_corpus
    from pipeline.train.tasks import decode_chunk

    _, _, files = load_corpus(Storage(), shards)
    chunks = defaultdict(list)
    for path in [p for split in files.values() for p in split]:
        for row in _rows(path):
            if row["video_id"] in video_ids:
                chunks[row["video_id"]].append(row)
    return {vid: np.concatenate([decode_chunk(r)["exp"] for r in sorted(rows, key=lambda r: int(r["chunk_idx"]))])
            .astype(np.float32) for vid, rows in chunks.items()}


def complete(vae, unet, hole, crops: np.ndarray, reference: np.ndarray, conditions: np.ndarray | None,
             batch: int = 16) -> np.ndarray:
    """(n, S, S, 3) uint8: each crop with its hole filled by Stage 2 (or, with conditions None,
    by the VAE's round trip of the crop)."""
    import torch

    out = []
    ref = torch.from_numpy(reference).permute(2, 0, 1).float()[None] / 255.0
    for start in range(0, len(crops), batch):
        x = torch.from_numpy(crops[start:start + batch]).permute(0, 3, 1, 2).float() / 255.0
        with torch.no_grad():
            if conditions is None:
                y = vae.decode(vae.encode(x)).float()
            else:
                motion = torch.from_numpy(conditions[start:start + batch]).float()
                y = vae.decode(unet(vae.encode(x * (1 - hole)), motion, vae.encode(ref.expand(len(x), -1, -1, -1))))
                y = y.float()
        y = x * (1 - hole) + y.clamp(0, 1) * hole
        out.append((y.permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8))
    return np.concatenate(out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="trained bundle: vae/, stage1/, stage2/")
    parser.add_argument("--heldout-shards", required=True)
    parser.add_argument("--heldout", default=None,
                        help="the held-out corpus folder (truth/): each setting's opening in A's silent frames too")
    parser.add_argument("--out", default=None)
    parser.add_argument("--torch-threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    from pipeline.lipsync_eval import silent_frames
    from pipeline.storage import join_uri
    from pipeline.weights import load_stage2, load_vae, read_bundle_info
    from stages.face import MouthMask
    from stages.face.tracker import FaceTracker
    from stages.motion.audio2motion import Audio2Motion

    torch.set_num_threads(args.torch_threads)
    bundle = read_bundle_info(args.weights)
    vae, unet = load_vae(bundle).eval(), load_stage2(bundle).eval()
    stage1 = Audio2Motion.from_pretrained(bundle.path("stage1")).eval()
    driven = list(stage1.cfg.driven_keypoints)
    hole = torch.from_numpy(MouthMask().array())[None, None]
    pairs = sentence_pairs(args.heldout_shards)
    if not pairs:
        raise SystemExit(f"lipsync_leak: {args.heldout_shards} has no speaker with two sentences")
    videos = {v["video_id"]: v for v in load_heldout(args.heldout_shards)}
    exp = keypoints(args.heldout_shards, {vid for _, a, b in pairs for vid in (a, b)})

    names = {r["video_id"]: os.path.splitext(os.path.basename(r["video_uri"]))[0]  # to find each truth
             for r in _rows(join_uri(args.heldout_shards, "videos.parquet"))} if args.heldout else {}

    rows = ("vae round trip", "self / Stage 1", "self / oracle", "cross / Stage 1", "cross / oracle")
    results: dict[str, dict[str, list[float]]] = {row: {"A": [], "B": []} for row in rows}
    silence: dict[str, dict[str, list[float]]] = {row: {"relative": [], "share": []} for row in ("real crops",) + rows}
    with FaceTracker(smoothing_sigma_frames=0.0, max_gap_frames=0) as tracker:
        for speaker, a_id, b_id in pairs:
            a, b = videos[a_id], videos[b_id]
            n = min(len(a["crops"]), len(b["crops"]))
            real = {"A": mouth_openings(tracker, a["crops"][:n]), "B": mouth_openings(tracker, b["crops"][:n])}
            heard = frame_conditions("motion", a["neutral_exp"], offsets=stage1_offsets(stage1, a)[:n], driven=driven)
            seen = frame_conditions("motion", a["neutral_exp"], driven=driven,
                                    offsets=exp[a_id][:n][:, driven] - a["neutral_exp"][driven])
            settings = {"vae round trip": (a, None), "self / Stage 1": (a, heard), "self / oracle": (a, seen),
                        "cross / Stage 1": (b, heard), "cross / oracle": (b, seen)}
            line = [speaker]
            silent = closed = None
            if args.heldout:
                with open(os.path.join(args.heldout, "truth", f"{names[a_id]}.truth.json")) as f:
                    silent = silent_frames(json.load(f), n)
                closed = float(np.nanmedian(real["A"][silent]))
                for key, value in zip(("relative", "share"), silence_figures(real["A"], silent, closed)):
                    silence["real crops"][key].append(value)
            for row, (source, conditions) in settings.items():
                opening = mouth_openings(tracker, complete(vae, unet, hole, source["crops"][:n], a["neutral_crop"],
                                                           conditions))
                for target in ("A", "B"):
                    results[row][target].append(pearson(opening, real[target]))
                line.append(f"{row}: A {results[row]['A'][-1]:+.2f} B {results[row]['B'][-1]:+.2f}")
                if silent is not None:
                    for key, value in zip(("relative", "share"), silence_figures(opening, silent, closed)):
                        silence[row][key].append(value)
                    line[-1] += f" silent/closed {1 + silence[row]['relative'][-1]:.2f}"
            print(" | ".join(line), file=sys.stderr, flush=True)

    summary = {row: {t: float(np.nanmean(v)) for t, v in targets.items()} for row, targets in results.items()}
    if not args.heldout:
        print("| setting | r with A (the audio's mouth) | r with B (the source's mouth) |")
        print("|---|---|---|")
        for row in rows:
            print(f"| {row} | {summary[row]['A']:.2f} | {summary[row]['B']:.2f} |")
    else:
        silence_summary = {row: {k: float(np.nanmean(v)) for k, v in figures.items()} for row, figures in silence.items()}
        print("| setting | r with A (the audio's mouth) | r with B (the source's mouth) "
              "| A's silent frames: opening / closed | share of the speech gap |")
        print("|---|---|---|---|---|")
        for row in ("real crops",) + rows:
            r_cells = ("1", "—") if row == "real crops" else (f"{summary[row]['A']:.2f}", f"{summary[row]['B']:.2f}")
            print(f"| {row} | {r_cells[0]} | {r_cells[1]} | {1 + silence_summary[row]['relative']:.2f} "
                  f"| {silence_summary[row]['share']:.3f} |")
    report = {"summary": summary, "per_speaker": results, "speakers": [p[0] for p in pairs],
              "weights": args.weights, "heldout_shards": args.heldout_shards}
    if args.heldout:
        report.update(silence=silence_summary, silence_per_speaker=silence)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
