"""The motion stage of a segment: source motion from the crops, Stage 1 from the audio,
and the driving expression Stage 2 is conditioned on, at the source frame timestamps.

The driving expression comes from the neutral frame only: δ_neutral + Δδ (Stage 1) on the
driven keypoints, δ_neutral everywhere else. The source frames' own expression is never
used, so the original mouth cannot steer the dub; the source crops only give the head pose
(for reference selection). Audio features arrive at k = stage1.cfg.audio_steps_per_frame
rows per 25 Hz frame (k=2: HuBERT's native 50 Hz)."""
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


# The neutral gate's RSCA reference is the neutral frame only for heads posed within this
# many degrees (pitch, yaw, roll together) of it.
NEUTRAL_REFERENCE_MAX_DEG = 10.0

# What a gated silent run shows (MotionConfig.silence_gate_mode).
SILENCE_GATE_MODES = ("neutral-pixels", "neutral", "stage1")


def silent_runs_25hz(level_db: np.ndarray, threshold_db: float, min_frames: int) -> list[tuple[int, int]]:
    """[(start, stop), ...] of 25 Hz frames in silence: speech level (dB against the track's
    loudest frame, stages/audio/speech_level.py) below `threshold_db`, runs of at least `min_frames`."""
    from stages.lipsync.measure import long_runs, true_runs

    return true_runs(long_runs(np.asarray(level_db) < threshold_db, min_frames))


def frame_centres(frame_indices: np.ndarray, frame_times: np.ndarray) -> np.ndarray:
    """The middle of each frame's display interval, from presentation times (frame starts,
    index / fps). A 25 Hz row stands for its 40 ms interval and is centred in it, so a frame
    is compared by its centre too: at 25 fps frame i then lands exactly on row i (the paper's
    one-to-one mapping), where its start time would land halfway between rows i-1 and i."""
    frame_indices = np.asarray(frame_indices)
    times = np.asarray(frame_times, dtype=np.float64)
    if len(times) == 0:
        return times
    span = frame_indices[-1] - frame_indices[0]
    if span != 0:
        period = (times[-1] - times[0]) / span
    elif frame_indices[0] > 0:
        period = times[0] / frame_indices[0]
    else:  # a lone frame 0, rate unknown: take 25 fps, which puts it on row 0
        period = 1.0 / FEATURE_RATE
    return times + 0.5 * period


class MotionStage:
    """Constructor holds the motion extractor and Stage 1; `__call__` maps one segment."""

    def __init__(
        self,
        extractor: MotionExtractor,
        stage1: Audio2Motion,
        batch_frames: int = 64,
        min_reference_gap_frames: int = 12,
        device: str = "cpu",
        silence_gate_db: float | None = None,
        silence_gate_frames: int = 3,
        silence_gate_mode: str = "neutral-pixels",
    ):
        if silence_gate_mode not in SILENCE_GATE_MODES:
            raise ValueError(f"silence_gate_mode must be one of {SILENCE_GATE_MODES}, got {silence_gate_mode!r}")
        self.extractor = extractor.to(device).eval()
        self.silence_gate_db = silence_gate_db
        self.silence_gate_frames = silence_gate_frames
        self.silence_gate_mode = silence_gate_mode
        self.stage1 = stage1.to(device).eval()
        self.batch_frames = batch_frames
        self.min_gap = min_reference_gap_frames
        self.device = device

    def check_features(self, features: np.ndarray) -> None:
        """Features must be (F*k, D): k rows per 25 Hz frame, never repeated to fake k."""
        k = self.stage1.cfg.audio_steps_per_frame
        if features.ndim != 2 or len(features) % k:
            raise ValueError(
                f"stage.py: features of shape {features.shape} are not (F*k, D) rows at k={k} audio steps "
                f"per 25 Hz frame ({len(features)} rows is not a multiple of {k})"
            )

    def offsets_25hz(self, features: np.ndarray, neutral_x_c: np.ndarray, neutral_exp: np.ndarray) -> np.ndarray:
        """Stage 1 over a window of features (F*k, D), k rows per 25 Hz frame -> raw Δδ (F, |D|, 3)."""
        self.check_features(features)
        if len(features) == 0:
            return np.zeros((0, len(self.stage1.cfg.driven_keypoints), 3), np.float32)
        audio = torch.from_numpy(np.ascontiguousarray(features)[None]).float().to(self.device)
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
        frame_times: np.ndarray,  # (N,) presentation times in seconds (frame starts, index / fps)
        features: np.ndarray,  # (F*k, D) features, k rows per 25 Hz frame; rows 0..k-1 = 25 Hz frame `first_feature`
        first_feature: int,  # in 25 Hz frame units
        audio_duration_s: float,
        neutral_x_c: np.ndarray,
        neutral_exp: np.ndarray,
        ref_frames: np.ndarray,
        ref_pose: np.ndarray,
        speech_level_db: np.ndarray | None = None,  # (F,) dB per 25 Hz frame from `first_feature`; None: no gate
        neutral_frame: int | None = None,  # a member of ref_frames; the "neutral" gate's RSCA reference
    ) -> dict[str, np.ndarray]:
        self.check_features(features)
        n = len(crops)
        driving = np.zeros((n, *neutral_exp.shape), np.float32)
        ref_index = np.zeros(n, np.int64)
        pose = np.zeros((n, 3), np.float32)
        face = np.flatnonzero(has_face)
        shows_reference = np.zeros(n, bool)
        if len(face) == 0:
            return {"driving": driving, "ref_index": ref_index, "pose": pose, "shows_reference": shows_reference}
        source = extract_motion(self.extractor, crops[face], batch_size=self.batch_frames)
        pose[face] = np.stack([source["pitch"], source["yaw"], source["roll"]], axis=-1)
        centres = frame_centres(frame_indices, frame_times)[face]
        offsets_25hz = self.offsets_25hz(features, neutral_x_c, neutral_exp)
        gated_25hz = np.zeros(len(offsets_25hz), bool)
        if self.silence_gate_db is not None and speech_level_db is not None:
            # Stage 1 shuts a frame or two late after speech (its own fed-back motion carries
            # the opening on), and a still-open mouth in a pause reads as a wrong lip shape at
            # once. "neutral" (the default) shows the neutral frame's own mouth over each
            # silent run; "stage1" decodes Stage 1 afresh over the run's audio alone, which
            # shuts on time but still opens a little on some silent audio. The neutral frame
            # is the analysis' most frontal closed mouth, closed by the pixels as well as the
            # mesh (selection.dark_lip_gap): the mesh alone once picked parted lips, and the
            # neutral mouth was then as open as speech (README, Proving it learns). The run
            # test leaves short quiet spans (stops, breaths between words) to Stage 1.
            level = np.full(len(offsets_25hz), np.inf, np.float32)  # frames past the level's end: not gated here
            level[: min(len(level), len(speech_level_db))] = speech_level_db[: len(level)]
            k = self.stage1.cfg.audio_steps_per_frame
            for start, stop in silent_runs_25hz(level, self.silence_gate_db, self.silence_gate_frames):
                gated_25hz[start:stop] = True
                if self.silence_gate_mode == "stage1":
                    offsets_25hz[start:stop] = self.offsets_25hz(features[start * k: stop * k], neutral_x_c, neutral_exp)
                else:  # the neutral frame's own mouth
                    offsets_25hz[start:stop] = 0.0
        offsets = resample_25hz(offsets_25hz, first_feature, centres)
        # Past the end of the dubbed track the audio is padded silence: hold the neutral
        # (closed) mouth rather than trusting Stage 1 on padding.
        past_end = frame_times[face] >= audio_duration_s
        offsets[past_end] = 0.0
        driving[face] = driving_expression(
            torch.from_numpy(neutral_exp).float(), torch.from_numpy(offsets), self.stage1.cfg.driven_keypoints
        ).numpy()
        ref_index[face] = choose_references(frame_indices[face], pose[face], ref_frames, ref_pose, self.min_gap)
        if self.silence_gate_mode != "stage1" and neutral_frame is not None and neutral_frame in ref_frames:
            # A gated frame shows the neutral mouth, and the neutral frame shows exactly
            # that: RSCA copies its closed lips, not a pose-matched reference's open ones. Its
            # time gap does not matter here: what it could leak is the mouth wanted. Not for
            # a head turned far from the neutral frame's pose (another shot, a profile): there
            # the pose-matched reference's appearance matters more. Frames past the track's
            # end (Δδ = 0 too) show the neutral crop in "neutral-pixels"; in "neutral" they
            # keep their pose-matched reference: Stage 2 drawing from the neutral one there
            # measured more open on the held-out speaker it touched.
            neutral_at = int(np.flatnonzero(ref_frames == neutral_frame)[0])
            gated = resample_25hz(gated_25hz.astype(np.float32), first_feature, centres) >= 0.5
            if self.silence_gate_mode == "neutral-pixels":
                gated |= past_end  # the real closed mouth once the track has ended too
            gated &= np.linalg.norm(pose[face] - ref_pose[neutral_at], axis=-1) <= NEUTRAL_REFERENCE_MAX_DEG
            ref_index[face[gated]] = neutral_at
            # "neutral-pixels": those frames show the neutral crop itself, never drawn by
            # Stage 2. Stage 2 draws a closed mouth through the VAE, whose round trip alone
            # reads a third more open than the real lips (README, Proving it learns).
            shows_reference[face[gated]] = self.silence_gate_mode == "neutral-pixels"
        return {"driving": driving, "ref_index": ref_index, "pose": pose, "shows_reference": shows_reference}
