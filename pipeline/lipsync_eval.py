"""Does the dubbed mouth follow the new audio? Checks on sentences never trained on.

A held-out synthetic corpus (`imgtalk synth-corpus --heldout`: the training corpus's
speakers saying HELDOUT_SENTENCES) gives, per clip, a video of the speaker saying sentence
B, B's audio and B's ground-truth mouth (truth JSON). Two checks follow:

- **Stage 1 alone** (`stage1_keypoint_r`): Stage 1 runs free on B's HuBERT rows, from the
  video's neutral state, and its Δδ on the driven keypoints is compared with what the
  motion extractor reads off B's real frames (δ − δ_neutral on D): Pearson r over every
  frame and coordinate of the held-out clips (`pooled_r`, which the coordinates' different
  offsets inflate), and per clip along the lips' opening pattern U
  (stages/motion/extractor_training.py), the part of Δδ that is the mouth's motion
  (`opening_r`, the mean over clips).
- **The dub** (`sync_manifest` + `dub_figures`): another clip of the same speaker (saying
  something else) is dubbed with B's audio; its output video is measured by FaceMesh
  (stages/lipsync/measure.py) against B's truth jaw (padded with closed-mouth silence or
  trimmed to the source's length, as the dub pads or trims the audio). Also: the mouth's
  opening in B's silent frames against the speaker's neutral opening (FaceMesh on B's own
  video in its silent frames, where the mouth is closed by construction), how many silent
  frames show a mouth cavity to the pixels (stages/lipsync/measure.py's dark gap), and the
  jitter of the opening against that of B's own rendered video (the ground truth, measured
  the same way).
"""
from __future__ import annotations

import json
import math
import os

import numpy as np


def _clips_by_speaker(truth_folder: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for name in sorted(os.listdir(truth_folder)):
        if name.endswith(".truth.json"):
            with open(os.path.join(truth_folder, name)) as f:
                doc = json.load(f)
            out.setdefault(doc["speaker_id"], []).append(doc)
    return out


def sync_manifest(heldout_folder: str, out_folder: str, per_speaker: int = 1) -> list[dict]:
    """Dub rows for a held-out synthetic corpus: clip j+1 of a speaker dubbed with clip j's audio.
    Each row: video_uri, audio_uri, output_uri (manifest columns), truth, truth_video (clip j's)
    and source_truth (clip j+1's, whose video is dubbed)."""
    folder = os.path.abspath(heldout_folder)
    rows = []
    for speaker, clips in _clips_by_speaker(os.path.join(folder, "truth")).items():
        for j in range(min(per_speaker, len(clips) - 1)):
            dub, source = clips[j], clips[j + 1]
            rows.append({
                "video_uri": os.path.join(folder, "videos", f"{source['clip']}.mp4"),
                "audio_uri": os.path.join(folder, "audio", f"{dub['clip']}.wav"),
                "output_uri": os.path.join(os.path.abspath(out_folder), f"{source['clip']}.with.{dub['clip']}.mp4"),
                "truth": os.path.join(folder, "truth", f"{dub['clip']}.truth.json"),
                "truth_video": os.path.join(folder, "videos", f"{dub['clip']}.mp4"),
                "source_truth": os.path.join(folder, "truth", f"{source['clip']}.truth.json"),
            })
    if not rows:
        raise ValueError(f"{heldout_folder}: no speaker has two held-out clips (use --sentences 2 or more)")
    return rows


def _fit(series: np.ndarray, n: int, fill) -> np.ndarray:
    series = np.asarray(series)
    if len(series) >= n:
        return series[:n]
    return np.concatenate([series, np.full(n - len(series), fill, dtype=series.dtype)])


def silent_frames(truth: dict, n: int) -> np.ndarray:
    """(n,) bool: the truth's silent frames, for a series of n frames (past the truth's end the
    dubbed audio has run out: silent)."""
    return _fit(np.asarray(truth["is_silent"], bool), n, True)


def cavity_frames(dark_gap: np.ndarray, silent: np.ndarray) -> int:
    """How many of the silent frames show a mouth cavity (dark_gap > 0; NaN, no face, does not count)."""
    return int((np.nan_to_num(np.asarray(dark_gap, np.float64)[np.asarray(silent, bool)], nan=0.0) > 0).sum())


def pooled_ratio(per_output: list, draws: int = 2000, seed: int = 0) -> dict:
    """Silent frames' opening over their speaker's closed opening, pooled over every frame of
    every output (lists of per-frame ratios, NaN dropped): the mean, its 95% bootstrap
    interval over frames and the median. Per output a mean of 9-33 frames swings with
    FaceMesh's scatter on a closed mouth; pooled, the interval says what the data can tell."""
    values = np.concatenate([np.asarray(v, np.float64).reshape(-1) for v in per_output]) if per_output else np.zeros(0)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return {"frames": 0, "mean": math.nan, "low": math.nan, "high": math.nan, "median": math.nan}
    means = np.random.default_rng(seed).choice(values, (draws, len(values))).mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"frames": int(len(values)), "mean": float(values.mean()), "low": float(low), "high": float(high),
            "median": float(np.median(values))}


def _neutral_opening(series, truth: dict) -> float:
    """The median FaceMesh opening over a video's silent frames, where its mouth is closed by construction."""
    silent = np.asarray(truth["is_silent"], bool)[: len(series.opening)]
    return float(np.nanmedian(series.opening[: len(silent)][silent])) if silent.any() else math.nan


def dub_figures(output_video: str, truth_json: str, truth_video: str, tracker=None,
                source_video: str | None = None, source_truth_json: str | None = None) -> dict:
    """The lip-sync figures of one dubbed output against the truth of its dubbed audio.
    With the dubbed source video and its truth, also the silent frames against the source
    video's own closed opening (the mouth the output shows is the source speaker's)."""
    from stages.lipsync.measure import jitter, lip_sync_report, mouth_series

    with open(truth_json) as f:
        truth = json.load(f)
    output = mouth_series(output_video, tracker=tracker)
    opening = output.opening
    n = len(opening)
    jaw = _fit(np.asarray(truth["jaw"], np.float64), n, 0.0)
    silent = silent_frames(truth, n)
    true_video = mouth_series(truth_video, tracker=tracker)
    truth_opening = true_video.opening
    truth_silent = np.asarray(truth["is_silent"], bool)[: len(truth_opening)]
    neutral = _neutral_opening(true_video, truth)
    report = lip_sync_report(opening, jaw, silent=silent, neutral=neutral, reference_is_opening=True)
    # The truth video measured as the output is: its own silent/neutral is the measure's floor
    # (a closed mouth's FaceMesh opening scatters, so the mean over silent frames sits above
    # their median).
    truth_report = lip_sync_report(truth_opening, np.asarray(truth["jaw"], np.float64)[: len(truth_opening)],
                                   silent=truth_silent, neutral=neutral, reference_is_opening=True)
    source_neutral = math.nan
    if source_video is not None and source_truth_json is not None:
        with open(source_truth_json) as f:
            source_neutral = _neutral_opening(mouth_series(source_video, tracker=tracker), json.load(f))
    return {
        "output": output_video,
        "pearson_r": report.pearson_r,
        "r_at_best_lag": report.r_at_best_lag,
        "best_lag_frames": report.best_lag_frames,
        "silent_opening": report.silent_opening,
        "speech_opening": report.speech_opening,
        "neutral_opening": neutral,
        "silent_relative_to_neutral": report.silent_relative_to_neutral,
        "silent_share_of_speech_gap": report.silent_share_of_speech_gap,
        "jitter": report.jitter,
        "truth_video_jitter": jitter(truth_opening),
        "truth_video_r": truth_report.pearson_r,
        "truth_video_silent_relative_to_neutral": truth_report.silent_relative_to_neutral,
        # The pixels' view of silence: silent frames (with a face) whose lips show a dark
        # cavity between them, where the truth video shows none by construction.
        "silent_frames_measured": int((silent & output.has_face).sum()),
        "silent_frames_with_cavity": cavity_frames(output.dark_gap, silent),
        "truth_video_silent_frames_with_cavity": cavity_frames(true_video.dark_gap, truth_silent),
        # per silent frame, for pooled_ratio over all outputs
        "silent_frame_ratios": (opening[silent] / neutral).tolist(),
        # The same closed mouth reads differently in two renders of one speaker (FaceMesh at
        # this scale): against the dubbed source's own closed opening as well.
        "source_neutral_opening": source_neutral,
        "silent_over_source_neutral": report.silent_opening / source_neutral,
        "silent_frame_ratios_source": (opening[silent] / source_neutral).tolist(),
        "truth_video_silent_frame_ratios": (truth_opening[truth_silent] / neutral).tolist(),
        "frames": n,
    }


def stage1_heldout_series(stage1_folder: str, shards_uri: str):
    """Stage 1 alone on a prepared (held-out) corpus, video by video: yields (the video's
    row of videos.parquet, free-running Δδ on the driven keypoints (F, |D|, 3), the
    extractor's Δδ of the real frames (F, |D|, 3), the frames usable (a face, a shot), the
    lips' opening pattern U (|D|, 3) to read both along)."""
    import io

    import pyarrow.parquet as pq
    import torch

    from pipeline.storage import Storage, join_uri
    from pipeline.train.job import load_corpus
    from pipeline.train.tasks import decode_chunk
    from stages.motion.audio2motion import Audio2Motion
    from stages.motion.extractor_training import opening_direction

    model = Audio2Motion.from_pretrained(stage1_folder).eval()
    cfg = model.cfg
    driven = list(cfg.driven_keypoints)
    along = opening_direction(cfg.num_kp, tuple(driven))[driven]  # (|D|, 3)
    storage = Storage()
    _, videos, _ = load_corpus(storage, shards_uri)
    for row in pq.read_table(join_uri(shards_uri, "videos.parquet")).to_pylist():
        video = videos[row["video_id"]]
        chunks = [decode_chunk(pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pylist()[0])
                  for uri in row["chunk_uris"]]
        exp = np.concatenate([c["exp"] for c in chunks])
        audio = np.concatenate([c["audio"] for c in chunks])
        usable = np.concatenate([c["has_face"].astype(bool) & (c["shot"] >= 0) for c in chunks])
        feats = audio.reshape(-1, audio.shape[-1]) if cfg.audio_steps_per_frame == 2 else audio.mean(axis=1)
        with torch.no_grad():
            pred = model.generate(torch.from_numpy(np.ascontiguousarray(feats, np.float32))[None],
                                  torch.from_numpy(video["neutral_x_c"][None]).float(),
                                  torch.from_numpy(video["neutral_exp"][None]).float())[0].numpy()
        yield row, pred, exp[:, driven] - video["neutral_exp"][driven], usable, along


def stage1_keypoint_r(stage1_folder: str, shards_uri: str) -> dict:
    """Stage 1 alone on a prepared (held-out) corpus: free-running Δδ on the driven keypoints
    against the extractor's Δδ of the real frames. Returns pooled r, the mean per-video r,
    the mean per-video r along the opening pattern U (with its minimum) and the number of
    values."""
    preds, truths, per_video, opening, videos = [], [], [], [], 0
    for _, pred, truth, usable, along in stage1_heldout_series(stage1_folder, shards_uri):
        videos += 1
        p, t = pred[usable].reshape(-1), truth[usable].reshape(-1)
        preds.append(p)
        truths.append(t)
        if len(p) > 2:
            per_video.append(float(np.corrcoef(p, t)[0, 1]))
        po, to = ((x[usable] * along).sum(axis=(1, 2)) for x in (pred, truth))
        if usable.sum() > 2 and po.std() > 0 and to.std() > 0:
            opening.append(float(np.corrcoef(po, to)[0, 1]))
    p, t = np.concatenate(preds), np.concatenate(truths)
    return {"pooled_r": float(np.corrcoef(p, t)[0, 1]), "mean_video_r": float(np.mean(per_video)),
            "opening_r": float(np.mean(opening)) if opening else float("nan"),
            "min_opening_r": float(np.min(opening)) if opening else float("nan"),
            "videos": videos, "values": int(len(p))}
