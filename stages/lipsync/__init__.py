"""Lip-sync measure of an output video that needs no downloaded weights: the mouth opening
measured by mediapipe's face mesh, compared with the speech energy of the audio (or with a
ground-truth opening), plus silent-span and jitter statistics."""
from .measure import (LipSyncReport, best_lag, jitter, lip_sync_report, measure_video,
                      mouth_opening_series, opening_from_landmarks, pearson_r, silence_mask,
                      speech_energy)

__all__ = [
    "LipSyncReport", "best_lag", "jitter", "lip_sync_report", "measure_video",
    "mouth_opening_series", "opening_from_landmarks", "pearson_r", "silence_mask",
    "speech_energy",
]
