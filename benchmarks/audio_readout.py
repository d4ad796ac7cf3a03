"""How much of the synthetic corpus's mouth a HuBERT's features carry: a linear read-out.

For each bundle's HuBERT (and, as a reference, 39 MFCCs of the same 20 ms frames), the 25 Hz
features of every training sentence, stacked over ±2 frames, are fitted to the truth's jaw
opening by ridge regression (the ridge picked on the held-out set from five values, so the
figure is an upper guide); the fit is scored on sentences no training corpus contains
(`imgtalk synth-corpus --heldout`): Pearson r per clip (mean) and pooled over all frames.

    .venv/bin/python benchmarks/audio_readout.py --corpus demo_train/corpus --heldout HELDOUT \\
        --weights random=BUNDLE_A --weights trained=BUNDLE_B

CPU only, a minute or two; no Ray.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stages.audio.hubert import pair_mean  # noqa: E402
from stages.audio.load import load_audio  # noqa: E402


def clips(folder: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(waveform, jaw per frame) of every sentence of a synth-corpus folder."""
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "truth", "*.truth.json"))):
        with open(path) as f:
            truth = json.load(f)
        out.append((load_audio(os.path.join(folder, "audio", f"{truth['clip']}.wav")), np.asarray(truth["jaw"], np.float64)))
    if not out:
        raise SystemExit(f"{folder}: no truth/*.truth.json (a folder written by imgtalk synth-corpus)")
    return out


def stacked(features: np.ndarray, frames: int, k: int = 2) -> np.ndarray:
    """(frames, (2k+1) D): each frame's features with k neighbours each side (edges repeated)."""
    f = features[:frames]
    index = np.clip(np.arange(len(f))[:, None] + np.arange(-k, k + 1)[None], 0, len(f) - 1)
    return f[index].reshape(len(f), -1)


def readout(featurise, train, heldout) -> tuple[float, float]:
    """(mean r per held-out clip, pooled r) of the best ridge fit."""
    xs = [stacked(featurise(w), len(j)) for w, j in train]
    x, y = np.concatenate(xs), np.concatenate([j[: len(a)] for a, (_, j) in zip(xs, train)])
    mean, std = x.mean(0), x.std(0) + 1e-6
    design = np.c_[(x - mean) / std, np.ones(len(x))]
    tests = [(np.c_[(stacked(featurise(w), len(j)) - mean) / std, np.ones(len(j))], j) for w, j in heldout]
    best = (-2.0, 0.0)
    for ridge in (0.1, 1.0, 10.0, 100.0, 1000.0):
        weights = np.linalg.solve(design.T @ design + ridge * np.eye(design.shape[1]), design.T @ y)
        predicted = [(d @ weights, j[: len(d)]) for d, j in tests]
        per_clip = float(np.mean([np.corrcoef(p, j)[0, 1] for p, j in predicted]))
        pooled = float(np.corrcoef(np.concatenate([p for p, _ in predicted]), np.concatenate([j for _, j in predicted]))[0, 1])
        best = max(best, (per_clip, pooled))
    return best


def mfcc_50hz(wave: np.ndarray) -> np.ndarray:
    """(rows, 39) MFCCs with deltas of the 20 ms frames HubertFeatures returns (its 40-sample
    edge pads, whole 40 ms frames), from the log-mel of stages/audio/hubert_training.py."""
    from scipy.fft import dct

    from stages.audio.hubert import SAMPLES_PER_FEATURE, num_feature_frames
    from stages.audio.hubert_training import LogMel

    n = num_feature_frames(len(wave))
    padded = np.zeros(n * SAMPLES_PER_FEATURE + 80, np.float32)
    padded[40: 40 + len(wave)] = wave
    with torch.no_grad():
        mel = LogMel(40)(torch.from_numpy(padded)[None], standardise=False)[0].numpy()  # (2n, 40)
    cepstra = dct(mel, type=2, norm="ortho", axis=1)[:, :13]
    delta = np.gradient(cepstra, axis=0)
    return np.c_[cepstra, delta, np.gradient(delta, axis=0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True, help="the training sentences (imgtalk synth-corpus folder)")
    parser.add_argument("--heldout", required=True, help="held-out sentences (imgtalk synth-corpus --heldout folder)")
    parser.add_argument("--weights", action="append", default=[], help="[LABEL=]BUNDLE whose HuBERT is read out")
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))

    from pipeline.weights import load_hubert, read_bundle_info

    train, heldout = clips(args.corpus), clips(args.heldout)
    seconds = sum(len(w) for w, _ in train) / 16000
    print(f"linear read-out (ridge, ±2 frames) of the true jaw opening: {len(train)} training sentences "
          f"({seconds:.0f} s), {len(heldout)} held-out")
    print(f"{'features':52s}{'r per clip':>12s}{'pooled r':>10s}")
    for spec in args.weights:
        label, _, uri = spec.rpartition("=")
        hubert = load_hubert(read_bundle_info(uri))
        per_clip, pooled = readout(lambda w: pair_mean(hubert(w)), train, heldout)
        print(f"{(label or uri) + ' HuBERT (' + str(hubert.hidden_size) + '-d)':52s}{per_clip:12.3f}{pooled:10.3f}")
    per_clip, pooled = readout(lambda w: pair_mean(mfcc_50hz(w)), train, heldout)
    print(f"{'39 MFCCs (reference)':52s}{per_clip:12.3f}{pooled:10.3f}")


if __name__ == "__main__":
    main()
