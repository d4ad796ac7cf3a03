"""Speaker-disjoint splits and the corpus card (counts, hours, splits, per-keypoint
statistics of δ, Δδ = δ - δ_neutral and x_c over the training split).

The statistics are exact, computed from per-video sums (Σx, Σx² over usable frames) and
each video's neutral δ, so no frame is read twice: Σ(δ - δn) = Σδ - n δn and
Σ(δ - δn)² = Σδ² - 2 δn Σδ + n δn².
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

SPLITS = ("train", "val", "test")


def assign_splits(speakers: list[str], seed: int, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                  fixed: dict[str, str] | None = None) -> dict[str, str]:
    """speaker -> split, disjoint by construction (a speaker has one split). Speakers named
    in `fixed` keep theirs; the rest are ordered by a seeded hash and cut by `fractions`,
    with at least one speaker in val and in test whenever there are three or more free
    speakers. The same speakers and seed always give the same split."""
    fixed = dict(fixed or {})
    for speaker, split in fixed.items():
        if split not in SPLITS:
            raise ValueError(f"speaker {speaker!r}: split {split!r} is not one of {SPLITS}")
    free = sorted({s for s in speakers if s not in fixed},
                  key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
    n = len(free)
    n_val = int(round(fractions[1] * n))
    n_test = int(round(fractions[2] * n))
    if n >= 3:
        n_val, n_test = max(1, n_val), max(1, n_test)
    n_val, n_test = min(n_val, n), min(n_test, max(0, n - n_val))
    out = dict(fixed)
    for i, speaker in enumerate(free):
        out[speaker] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    return out


def _mean_std(s1: np.ndarray, s2: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    if n == 0:
        return np.zeros_like(s1), np.ones_like(s1)
    mean = s1 / n
    var = np.maximum(s2 / n - mean ** 2, 0.0)
    return mean, np.sqrt(var)


def keypoint_statistics(videos: list[dict]) -> dict[str, dict[str, list]]:
    """Per-keypoint mean/std (21x3 lists) of δ ("exp"), Δδ ("offset") and x_c over the
    usable frames of `videos` (their `sums` and `neutral`)."""
    acc = {k: np.zeros((21, 3)) for k in ("exp", "exp2", "x_c", "x_c2", "off", "off2")}
    n = 0
    for v in videos:
        s = v["sums"]
        if not s["n"] or not v.get("neutral"):
            continue
        exp, exp2 = np.asarray(s["exp"], np.float64), np.asarray(s["exp2"], np.float64)
        dn = np.asarray(v["neutral"]["exp"], np.float64)
        acc["exp"] += exp
        acc["exp2"] += exp2
        acc["x_c"] += np.asarray(s["x_c"], np.float64)
        acc["x_c2"] += np.asarray(s["x_c2"], np.float64)
        acc["off"] += exp - s["n"] * dn
        acc["off2"] += exp2 - 2 * dn * exp + s["n"] * dn ** 2
        n += int(s["n"])
    out = {}
    for name, (a, b) in (("exp", ("exp", "exp2")), ("offset", ("off", "off2")), ("x_c", ("x_c", "x_c2"))):
        mean, std = _mean_std(acc[a], acc[b], n)
        out[name] = {"mean": mean.round(8).tolist(), "std": std.round(8).tolist()}
    out["frames"] = n
    return out


def corpus_card(videos: list[dict], splits: dict[str, str], settings: dict) -> dict:
    """The dataset card: counts, hours, speakers, splits and training-split statistics.
    Its `id` is a hash of its content, so a bundle can name the corpus it was trained on."""
    per_split = {}
    for split in SPLITS:
        chosen = [v for v in videos if splits.get(v["speaker_id"]) == split]
        per_split[split] = {
            "videos": len(chosen),
            "speakers": sorted({v["speaker_id"] for v in chosen}),
            "frames": int(sum(v["counts"]["frames"] for v in chosen)),
            "usable_frames": int(sum(v["counts"]["usable"] for v in chosen)),
            "hours": round(sum(v["counts"]["frames"] for v in chosen) / 25.0 / 3600.0, 6),
        }
    totals = {key: int(sum(v["counts"][key] for v in videos)) for key in ("frames", "face", "usable", "small", "turned", "silent")}
    card = {
        "format": "imgtalk-corpus",
        "version": 1,
        "videos": len(videos),
        "speakers": len({v["speaker_id"] for v in videos}),
        "hours": round(totals["frames"] / 25.0 / 3600.0, 6),
        "frame_rate": 25,
        "frames": totals,
        "splits": per_split,
        "statistics": keypoint_statistics([v for v in videos if splits.get(v["speaker_id"]) == "train"]),
        "settings": settings,
    }
    card["id"] = hashlib.sha256(json.dumps(card, sort_keys=True).encode()).hexdigest()[:16]
    return card
