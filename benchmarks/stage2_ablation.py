"""Stage 2 ablation table (paper Table 3's rows): what RSCA, L_motion and the implicit-motion
condition each buy, on a prepared corpus, Ray-free.

    .venv/bin/python benchmarks/stage2_ablation.py --shards SHARDS --weights BUNDLE \\
        --heldout-shards HELDOUT [--config deploy/demo/stage2.more.yaml] [--steps 300] [--batch 4] \\
        [--seeds 0,1,2] [--rows ROW,...] [--out table.json]
    .venv/bin/python benchmarks/stage2_ablation.py --merge A.json,B.json [--out table.json]

Rows (each a Stage 2 trained from scratch with the same steps, batch and seed):

- "full model": the paper's IMC-UNet (motion cross-attention + RSCA, L_motion on);
- "w/o RSCA (concatenation)": stage2.use_rsca = False (reference latent concatenated, MuseTalk's input);
- "w/o L_motion": stage2.motion = 0;
- "audio-conditioned IMC-UNet": stage2.condition = "audio" (HuBERT rows of frames t-w..t+w by
  cross-attention instead of the 21 motion tokens, MuseTalk's conditioning).

With --config the rows start from that training config (its stage2 options, batch, steps and
warm-up; --steps/--batch/--warmup-steps override) and each row changes only its own switch,
so the full-model row is that recipe trained from scratch; without it they start from
TrainConfig's defaults.

Training is what `imgtalk train stage2` runs, minus Ray: the trainer, model config and
sampler are pipeline/train/tasks.py's Stage2Task (its model_config / sampler / build_trainer /
to_batch, wrap = identity, CPU, no autocast), the samples are drawn once per seed from every
train-split chunk of --shards, and each step's batch is drawn from them by a seeded numpy RNG.

Evaluation, on --heldout-shards (held-out sentences of the same speakers, every split): per
video, the reference is its neutral crop (videos.parquet) and every face frame's masked crop
is completed and decoded. The condition is what dubbing would give: motion rows get
δ_neutral + Stage 1's free-running Δδ (weights/stage1, `generate` on the video's audio) on
the driven keypoints, δ_neutral elsewhere (stages/motion/stage.py); the audio row gets the
frame's audio window. Metrics:

- psnr_mouth (dB): pixel MSE inside the mouth mask against the real frame, pooled over all
  held-out frames, peak 1;
- lip_r: Pearson r between the mouth opening of the generated crops and of the real crops
  (|mesh13 - mesh14| / |mesh10 - mesh152|, mediapipe face mesh through FaceTracker with no
  smoothing or gap filling, as stages/lipsync/measure.py), per video over the frames where
  both have a face, then averaged over videos (NaN where no video has 3 such frames);
- psnr_mouth_true_motion, lip_r_true_motion (motion rows): the same, with the same trained
  UNet driven by the extractor's keypoints of the real held-out frames (the condition it is
  trained on) instead of Stage 1's, which separates Stage 1's error from the conditioning
  itself; NaN for the audio row.

Printed as a markdown table (mean ± std over seeds, and the count of seeds), and written as
JSON with --out (every seed's numbers too). --merge trains nothing: it joins the --out files
of runs split by row or seed (same settings, no row and seed twice) into one table. The weights bundle gives vae/, liveportrait/
(the L_motion extractor), hubert/ (the audio width) and a trained stage1/.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROWS: dict[str, dict] = {
    "full model": {},
    "w/o RSCA (concatenation)": {"use_rsca": False},
    "w/o L_motion": {"motion": 0.0},
    "audio-conditioned IMC-UNet": {"condition": "audio"},
}
METRICS = ("psnr_mouth", "lip_r")
# motion rows only: the same trained UNet driven by the extractor's keypoints of the real
# held-out frames (the condition it was trained on) instead of Stage 1's; NaN for the audio row
TRUE_MOTION_METRICS = ("psnr_mouth_true_motion", "lip_r_true_motion")


# ----------------------------------------------------------------------------- pure helpers


def frame_conditions(kind: str, neutral_exp: np.ndarray, offsets: np.ndarray | None = None,
                     audio: np.ndarray | None = None, window_frames: int = 2,
                     driven: tuple | None = None) -> np.ndarray:
    """Per-frame Stage 2 conditions of one video of n frames.

    kind "motion": (n, K, 3) δ_neutral + Δδ on the driven keypoints, δ_neutral elsewhere;
    offsets (n, |driven|, 3) Stage 1's raw Δδ. kind "audio": (n, 2*(2w+1), A) the audio window
    of every frame, audio (n, 2, A) the video's two 50 Hz HuBERT rows per frame."""
    if kind == "motion":
        import torch

        from stages.motion.audio2motion import DRIVEN_KEYPOINTS, driving_expression

        driven = tuple(DRIVEN_KEYPOINTS if driven is None else driven)
        out = driving_expression(torch.from_numpy(np.asarray(neutral_exp, np.float32)),
                                 torch.from_numpy(np.asarray(offsets, np.float32)), driven)
        return out.numpy().astype(np.float32)
    if kind == "audio":
        from stages.completion.training import audio_window

        audio = np.asarray(audio)
        return np.stack([audio_window(audio, t, window_frames) for t in range(len(audio))])
    raise ValueError(f"frame_conditions: kind must be 'motion' or 'audio', got {kind!r}")


def true_motion_conditions(exp: np.ndarray, neutral_exp: np.ndarray, driven: tuple) -> np.ndarray:
    """(n, K, 3) the training condition of every frame (stage2_condition): δ_neutral with the
    driven keypoints taken from the extractor's δ of the real frame."""
    from stages.completion.training import stage2_condition

    return np.stack([stage2_condition(e, neutral_exp, driven) for e in np.asarray(exp, np.float32)])


def pearson(a: np.ndarray, b: np.ndarray, min_frames: int = 3) -> float:
    """Pearson r over the entries where both are finite; NaN with fewer than `min_frames`
    such entries or a constant series."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < min_frames:
        return float("nan")
    a, b = a[ok] - a[ok].mean(), b[ok] - b[ok].mean()
    denom = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 1e-12 else float("nan")


def masked_psnr(squared_error_sum: float, count: float) -> float:
    """dB, peak 1, from a pooled squared-error sum over `count` masked pixel values."""
    if count <= 0:
        return float("nan")
    return 10.0 * math.log10(1.0 / max(squared_error_sum / count, 1e-12))


def summarise(results: dict[str, list[dict]]) -> dict[str, dict]:
    """{row: [per-seed metrics]} -> {row: {metric: {"mean", "std"}, "seeds": n}}; NaN seeds
    are left out of a metric's mean (std over seeds, ddof 0; NaN when none is finite)."""
    out = {}
    for row, per_seed in results.items():
        entry: dict = {"seeds": len(per_seed)}
        for metric in METRICS + TRUE_MOTION_METRICS:
            # runs from before the true-motion metrics have no such key: NaN, not counted
            values = np.array([r.get(metric, np.nan) for r in per_seed], np.float64)
            values = values[np.isfinite(values)]
            entry[metric] = {"mean": float(values.mean()) if len(values) else float("nan"),
                             "std": float(values.std()) if len(values) else float("nan"),
                             "finite_seeds": int(len(values))}
        out[row] = entry
    return out


# settings that must agree for runs to share a table
_SHARED_SETTINGS = ("steps", "batch", "warmup_steps", "config", "stage2", "shards", "heldout_shards", "weights",
                    "heldout_videos")


def merge_reports(reports: list[dict]) -> dict[str, list[dict]]:
    """{row: per-seed metrics} of several --out reports, rows in ROWS order and seeds in
    order. Raises ValueError when their shared settings differ or a row and seed repeats."""
    if not reports:
        raise ValueError("merge: no reports")
    first = reports[0]["settings"]
    for report in reports[1:]:
        differ = [k for k in _SHARED_SETTINGS if report["settings"].get(k) != first.get(k)]
        if differ:
            raise ValueError(f"merge: the reports' settings differ in {differ}")
    merged: dict[str, dict[int, dict]] = defaultdict(dict)
    for report in reports:
        for row, per_seed in report["per_seed"].items():
            for metrics in per_seed:
                if metrics["seed"] in merged[row]:
                    raise ValueError(f"merge: {row!r} seed {metrics['seed']} is in more than one report")
                merged[row][metrics["seed"]] = metrics
    order = [r for r in ROWS if r in merged] + [r for r in merged if r not in ROWS]
    return {row: [merged[row][seed] for seed in sorted(merged[row])] for row in order}


def format_table(summary: dict[str, dict]) -> str:
    """Markdown table: row, mean ± std of each metric, seeds; the true-motion columns give
    their own count of seeds, "n/a" where none has them."""
    lines = ["| row | PSNR mouth (dB) | lip r | seeds | PSNR mouth, true keypoints | lip r, true keypoints |",
             "|---|---|---|---|---|---|"]
    for row, entry in summary.items():
        def cell(m: str) -> str:
            e, digits = entry.get(m), 2 if m.startswith("psnr") else 3
            if not e or not e["finite_seeds"]:
                return "n/a"
            spread = f"{e['mean']:.{digits}f} ± {e['std']:.{digits}f}"
            return spread if m in METRICS else f"{spread} ({e['finite_seeds']})"
        cells = [cell(m) for m in METRICS + TRUE_MOTION_METRICS]
        lines.append(f"| {row} | {cells[0]} | {cells[1]} | {entry['seeds']} | {cells[2]} | {cells[3]} |")
    return "\n".join(lines)


def mouth_openings(tracker, crops: np.ndarray) -> np.ndarray:
    """(n,) mouth opening of each (S,S,3) uint8 crop, NaN where the mesh finds no face."""
    from stages.lipsync.measure import opening_from_landmarks

    if len(crops) == 0:
        return np.zeros(0)
    track = tracker([np.ascontiguousarray(c) for c in crops])
    opening = opening_from_landmarks(track.landmarks)
    opening[~np.asarray(track.has_face, bool)] = np.nan
    return opening


def collate(samples: list[dict]) -> dict:
    import torch

    return {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]}


# ----------------------------------------------------------------------------- corpus


def _rows(path: str) -> list[dict]:
    import pyarrow.parquet as pq

    from pipeline.storage import strip_file_scheme

    return pq.read_table(strip_file_scheme(path)).to_pylist()


def load_heldout(shards: str, max_videos: int | None = None) -> list[dict]:
    """Every video of a prepared corpus, all splits: its frames (chunks in order), neutral
    state and neutral crop."""
    from pipeline.storage import Storage, join_uri
    from pipeline.train.job import load_corpus
    from pipeline.train.tasks import decode_chunk
    from stages.corpus.chunk import decode_crop

    _, videos, files = load_corpus(Storage(), shards)
    neutral_crops = {r["video_id"]: decode_crop(r["neutral_crop"]) for r in _rows(join_uri(shards, "videos.parquet"))}
    chunks = defaultdict(list)
    for path in [p for split in files.values() for p in split]:
        for row in _rows(path):
            chunks[row["video_id"]].append(row)
    out = []
    for video_id in sorted(chunks)[:max_videos]:
        decoded = [decode_chunk(r, crops=True) for r in sorted(chunks[video_id], key=lambda r: int(r["chunk_idx"]))]
        out.append({
            "video_id": video_id,
            "crops": np.concatenate([c["crops"] for c in decoded]),
            "has_face": np.concatenate([np.asarray(c["has_face"], bool) for c in decoded]),
            "audio": np.concatenate([np.asarray(c["audio"], np.float32) for c in decoded]),
            "exp": np.concatenate([np.asarray(c["exp"], np.float32) for c in decoded]),
            "neutral_exp": np.asarray(videos[video_id]["neutral_exp"], np.float32),
            "neutral_x_c": np.asarray(videos[video_id]["neutral_x_c"], np.float32),
            "neutral_crop": neutral_crops[video_id],
        })
    return out


def stage1_offsets(stage1, video: dict) -> np.ndarray:
    """Stage 1's free-running raw Δδ (n, |D|, 3) from the video's audio, as MotionStage does."""
    import torch

    audio = video["audio"]  # (n, 2, A)
    k = stage1.cfg.audio_steps_per_frame
    features = audio.reshape(-1, audio.shape[-1]) if k == 2 else audio.mean(axis=1)
    with torch.no_grad():
        out = stage1.generate(torch.from_numpy(np.ascontiguousarray(features)[None]).float(),
                              torch.from_numpy(video["neutral_x_c"][None]), torch.from_numpy(video["neutral_exp"][None]))
    return out[0].float().numpy()[: len(audio)]


# ----------------------------------------------------------------------------- one row, one seed


def row_config(base, row: str, *, steps: int, batch: int, warmup: int, seed: int):
    """The TrainConfig of one row and seed: `base` (a TrainConfig, or None for the defaults)
    with the row's Stage 2 switch on top of its stage2 options, and the run's steps, batch,
    warm-up and seed."""
    from pipeline.train.config import Stage2Options, TrainConfig

    base = base or TrainConfig()
    stage2 = Stage2Options.model_validate({**base.stage2.model_dump(), **ROWS[row]})
    return base.model_copy(update={"steps": steps, "warmup_steps": warmup, "batch_size": batch, "seed": seed,
                                   "stage2": stage2})


def train_row(task, bundle, videos, train_rows, steps: int, batch: int, seed: int):
    """Stage2Task's trainer for this row and seed after `steps` steps, and its model config."""
    model_config = task.model_config(bundle)
    sampler = task.sampler(videos, seed, model_config)
    samples = [s for row in train_rows for s in sampler(row)]
    if not samples:
        raise SystemExit("stage2_ablation: the training split gave no Stage 2 pairs")
    trainer = task.build_trainer(bundle, model_config, wrap=lambda m: m, device="cpu", autocast_dtype=None, seed=seed)
    rng = np.random.default_rng(seed)
    for step in range(steps):
        chosen = rng.choice(len(samples), size=batch, replace=len(samples) < batch)
        trainer.step(task.to_batch(collate([samples[i] for i in chosen])), step)
    return trainer, model_config


def evaluate_row(trainer, heldout: list[dict], conditions: dict[str, np.ndarray], tracker,
                 real_openings: dict[str, np.ndarray], batch: int) -> dict:
    """psnr_mouth, lip_r (see the module docstring) and videos_with_r of one trained row.
    conditions: per video (n, ...) per-frame UNet conditions; real_openings: per video the
    real crops' openings over its face frames."""
    import torch

    mask = trainer.mask  # (1,1,S,S)
    squared, count, rs = 0.0, 0.0, []
    trainer.unet.eval()
    for video in heldout:
        frames = np.flatnonzero(video["has_face"])
        generated = np.zeros((len(frames), *video["crops"].shape[1:]), np.uint8)
        reference = torch.from_numpy(video["neutral_crop"]).permute(2, 0, 1).float()[None] / 255.0
        for start in range(0, len(frames), batch):
            idx = frames[start:start + batch]
            target = torch.from_numpy(video["crops"][idx]).permute(0, 3, 1, 2).float() / 255.0
            inputs = {"target": target, "reference": reference.expand(len(idx), -1, -1, -1),
                      "motion": torch.from_numpy(conditions[video["video_id"]][idx]).float()}
            with torch.no_grad():
                image = trainer.vae.decode(trainer.complete(inputs, model=trainer.unet)).float().clamp(0, 1)
            weight = mask.expand_as(image)
            squared += float((((image - target) ** 2) * weight).sum())
            count += float(weight.sum())
            generated[start:start + len(idx)] = (image.permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)
        rs.append(pearson(mouth_openings(tracker, generated), real_openings[video["video_id"]]))
    finite = [r for r in rs if np.isfinite(r)]
    return {"psnr_mouth": masked_psnr(squared, count), "lip_r": float(np.mean(finite)) if finite else float("nan"),
            "videos_with_r": len(finite)}


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", help="prepared training corpus (imgtalk prepare)")
    parser.add_argument("--weights", help="bundle folder: vae/, liveportrait/, hubert/, trained stage1/")
    parser.add_argument("--heldout-shards", help="prepared corpus of held-out sentences, same speakers")
    parser.add_argument("--merge", default=None, help="comma-separated --out files to join into one table (no training)")
    parser.add_argument("--config", default=None, help="training config the rows start from (e.g. deploy/demo/*.yaml)")
    parser.add_argument("--steps", type=int, default=None, help="default: the config's, else 300")
    parser.add_argument("--batch", type=int, default=None, help="default: the config's, else 4")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--warmup-steps", type=int, default=None, help="default: the config's, else steps // 10")
    parser.add_argument("--rows", default=None, help="comma-separated subset of the rows (default: all)")
    parser.add_argument("--max-videos", type=int, default=None, help="evaluate only the first N held-out videos")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the table and every seed's numbers as JSON here")
    args = parser.parse_args(argv)
    if args.merge:
        reports = []
        for path in [p.strip() for p in args.merge.split(",") if p.strip()]:
            with open(path) as f:
                reports.append(json.load(f))
        return _publish(merge_reports(reports), reports[0]["settings"] | {"merged": args.merge}, args.out)
    missing = [name for name in ("shards", "weights", "heldout_shards") if not getattr(args, name)]
    if missing:
        parser.error(f"--{', --'.join(m.replace('_', '-') for m in missing)} required (or --merge)")

    import torch

    from pipeline.storage import Storage
    from pipeline.train.config import load_train_config
    from pipeline.train.job import load_corpus
    from pipeline.train.tasks import Stage2Task
    from pipeline.weights import read_bundle_info
    from stages.face.tracker import FaceTracker
    from stages.motion.audio2motion import Audio2Motion

    torch.set_num_threads(args.torch_threads)
    base = load_train_config(args.config) if args.config else None
    steps = args.steps or (base.steps if base else 300)
    batch = args.batch or (base.batch_size if base else 4)
    warmup = args.warmup_steps if args.warmup_steps is not None else (base.warmup_steps if base else steps // 10)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    rows = list(ROWS) if not args.rows else [r.strip() for r in args.rows.split(",")]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"stage2_ablation: unknown rows {unknown}; choose from {list(ROWS)}")

    bundle = read_bundle_info(args.weights)
    card, videos, files = load_corpus(Storage(), args.shards)
    train_rows = [row for path in files["train"] for row in _rows(path)]
    if not train_rows:
        raise SystemExit(f"stage2_ablation: {args.shards} has no train-split chunks")
    heldout = load_heldout(args.heldout_shards, args.max_videos)
    if not heldout:
        raise SystemExit(f"stage2_ablation: {args.heldout_shards} has no chunks")

    stage1 = Audio2Motion.from_pretrained(bundle.path("stage1")).eval()
    driven = tuple(stage1.cfg.driven_keypoints)
    motion_conditions = {
        v["video_id"]: frame_conditions("motion", v["neutral_exp"], offsets=stage1_offsets(stage1, v), driven=driven)
        for v in heldout
    }
    true_conditions = {v["video_id"]: true_motion_conditions(v["exp"], v["neutral_exp"], driven) for v in heldout}
    tracker = FaceTracker(smoothing_sigma_frames=0.0, max_gap_frames=0)
    try:
        real_openings = {v["video_id"]: mouth_openings(tracker, v["crops"][v["has_face"]]) for v in heldout}
        results: dict[str, list[dict]] = {}
        for row in rows:
            results[row] = []
            for seed in seeds:
                cfg = row_config(base, row, steps=steps, batch=batch, warmup=warmup, seed=seed)
                task = Stage2Task(cfg, card)
                trainer, model_config = train_row(task, bundle, videos, train_rows, steps, batch, seed)
                if model_config.condition == "audio":
                    conditions = {v["video_id"]: frame_conditions("audio", v["neutral_exp"], audio=v["audio"],
                                                                  window_frames=model_config.audio_window_frames)
                                  for v in heldout}
                else:
                    conditions = motion_conditions
                metrics = evaluate_row(trainer, heldout, conditions, tracker, real_openings, batch)
                if model_config.condition == "audio":
                    metrics.update({m: float("nan") for m in TRUE_MOTION_METRICS})
                else:
                    truth = evaluate_row(trainer, heldout, true_conditions, tracker, real_openings, batch)
                    metrics.update({"psnr_mouth_true_motion": truth["psnr_mouth"],
                                    "lip_r_true_motion": truth["lip_r"]})
                metrics["seed"] = seed
                print(f"{row} seed {seed}: psnr_mouth {metrics['psnr_mouth']:.2f} dB, lip_r {metrics['lip_r']:.3f}; "
                      f"true keypoints: psnr_mouth {metrics['psnr_mouth_true_motion']:.2f} dB, "
                      f"lip_r {metrics['lip_r_true_motion']:.3f}", file=sys.stderr, flush=True)
                results[row].append(metrics)
    finally:
        tracker.close()

    return _publish(results, {"steps": steps, "batch": batch, "warmup_steps": warmup, "config": args.config,
                              "stage2": base.stage2.model_dump() if base else None, "seeds": seeds,
                              "shards": args.shards, "heldout_shards": args.heldout_shards, "weights": args.weights,
                              "heldout_videos": len(heldout)}, args.out)


def _publish(results: dict[str, list[dict]], settings: dict, out: str | None) -> dict:
    """Print the table; write it, the summary, every seed's numbers and the settings to `out`."""
    summary = summarise(results)
    table = format_table(summary)
    print(table)
    report = {"table": table, "summary": summary, "per_seed": results, "settings": settings}
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
