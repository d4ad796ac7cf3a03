"""The dubbed track's speech level per 25 Hz frame, in dB against the track's loudest frame:
what the motion stage's silence gate reads (stages/motion/stage.py, `silent_runs_25hz`).

The level is the 300-3000 Hz band's RMS over each 40 ms frame (stages/lipsync's
speech_energy, the same definition the lip-sync measure uses when it has no ground truth),
so hum, rumble and hiss below or above the voice do not count as speech. It is relative to
the whole track's loudest frame, not to a segment's, so every segment of a video gates
against the same level whatever its own loudness."""
from __future__ import annotations

import numpy as np

from stages.audio.hubert import FEATURE_RATE, num_feature_frames

FLOOR_DB = -120.0  # digital silence, and any frame a million times quieter than the loudest


def speech_level_db_25hz(wave_16k: np.ndarray) -> np.ndarray:
    """(F,) float32 dB of each 25 Hz frame's speech-band RMS against the loudest frame's
    (0 at the loudest, FLOOR_DB at digital silence); F = num_feature_frames(len(wave)), the
    frames HuBERT's features cover. A silent track is FLOOR_DB throughout."""
    from stages.lipsync.measure import speech_energy

    wave = np.asarray(wave_16k, dtype=np.float32).reshape(-1)
    energy = speech_energy(wave, num_feature_frames(len(wave)), FEATURE_RATE)
    peak = float(energy.max()) if energy.size else 0.0
    if peak <= 0.0:
        return np.full(energy.shape, FLOOR_DB, np.float32)
    ratio = np.maximum(energy / peak, 10.0 ** (FLOOR_DB / 20.0))
    return (20.0 * np.log10(ratio)).astype(np.float32)
