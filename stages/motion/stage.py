"""The motion stage of a segment: source motion from the crops, Stage 1 from the audio,
and the driving expression Stage 2 is conditioned on, at the source frame timestamps."""
from __future__ import annotations

import numpy as np
import torch

from stages.audio.hubert import FEATURE_RATE
from stages.motion.audio2motion import Audio2Motion, driving_expression
from stages.motion.extractor import MotionExtractor, extract_motion
from stages.motion.selection import choose_references


def resample_25hz(values: np.ndarray, first_index: int, times_s: np.ndarray) -> np.ndarray:
    """Linear interpolation of 25 Hz rows (row j centred at (first_index + j + 0.5)/25 s)
    at arbitrary timestamps; clamped at the ends. values (F, ...) -> (len(times), ...)."""
    pos = times_s * FEATURE_RATE - 0.5 - first_index
    pos = np.clip(pos, 0, len(values) - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, len(values) - 1)
    w = (pos - lo).reshape(-1, *([1] * (values.ndim - 1))).astype(values.dtype)
    return values[lo] * (1 - w) + values[hi] * w


class MotionStage:
    """Constructor holds the motion extractor and Stage 1; `__call__` maps one segment."""

    def __init__(
        self,
        extractor: MotionExtractor,
        stage1: Audio2Motion,
        batch_frames: int = 64,
        min_reference_gap_frames: int = 12,
        device: str = "cpu",
    ):
        self.extractor = extractor.to(device).eval()
        self.stage1 = stage1.to(device).eval()
        self.batch_frames = batch_frames
        self.min_gap = min_reference_gap_frames
        self.device = device

    def offsets_25hz(self, features: np.ndarray, neutral_x_c: np.ndarray, neutral_exp: np.ndarray) -> np.ndarray:
        """Stage 1 over a window of 25 Hz features (F, D) -> Δδ (F, 21, 3)."""
        if len(features) == 0:
            return np.zeros((0, *neutral_exp.shape), np.float32)
        k = self.stage1.cfg.audio_steps_per_frame
        audio = torch.from_numpy(np.repeat(features, k, axis=0)[None]).float().to(self.device)
        x_c = torch.from_numpy(neutral_x_c[None]).float().to(self.device)
        exp = torch.from_numpy(neutral_exp[None]).float().to(self.device)
        with torch.no_grad():
            out = self.stage1.generate(audio, x_c, exp)
        return out[0].float().cpu().numpy()

    def __call__(
        self,
        crops: np.ndarray,  # (N, 256, 256, 3) uint8
        has_face: np.ndarray,  # (N,) bool
        frame_indices: np.ndarray,  # (N,) source frame indices
        frame_times: np.ndarray,  # (N,) seconds
        features: np.ndarray,  # (F, D) 25 Hz features, row 0 = feature frame `first_feature`
        first_feature: int,
        audio_duration_s: float,
        neutral_x_c: np.ndarray,
        neutral_exp: np.ndarray,
        ref_frames: np.ndarray,
        ref_pose: np.ndarray,
    ) -> dict[str, np.ndarray]:
        n = len(crops)
        driving = np.zeros((n, *neutral_exp.shape), np.float32)
        ref_index = np.zeros(n, np.int64)
        pose = np.zeros((n, 3), np.float32)
        face = np.flatnonzero(has_face)
        if len(face) == 0:
            return {"driving": driving, "ref_index": ref_index, "pose": pose}
        source = extract_motion(self.extractor, crops[face], batch_size=self.batch_frames)
        pose[face] = np.stack([source["pitch"], source["yaw"], source["roll"]], axis=-1)
        offsets = resample_25hz(self.offsets_25hz(features, neutral_x_c, neutral_exp), first_feature, frame_times[face])
        # Past the end of the dubbed track the audio is padded silence: hold the neutral
        # (closed) mouth rather than trusting Stage 1 on padding.
        offsets[frame_times[face] >= audio_duration_s] = 0.0
        driving[face] = driving_expression(
            torch.from_numpy(source["exp"]), torch.from_numpy(neutral_exp)[None], torch.from_numpy(offsets)
        ).numpy()
        ref_index[face] = choose_references(frame_indices[face], pose[face], ref_frames, ref_pose, self.min_gap)
        return {"driving": driving, "ref_index": ref_index, "pose": pose}
