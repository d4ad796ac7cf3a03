"""An independent lip-sync measure of a video: no learned sync model, no downloaded weights.

The mouth is measured by mediapipe's 478-point face mesh (through the project's
FaceTracker, with temporal smoothing and gap filling turned off, so what is measured is
what each frame shows), and compared with what the mouth should do:

- with a ground-truth opening series (e.g. the jaw opening of the source video, or of a
  synthetic task), directly;
- otherwise with the speech energy of the audio: the RMS, per video frame, of the audio
  band-passed to 300-3000 Hz (where voiced speech has its formants; hum and hiss do not
  count). A mouth that opens when there is sound and closes when there is none correlates
  positively with it. This is a weak reference (plosives close the mouth while loud), so
  values are to be compared between systems on the same clip, not read as absolute.

Opening (per frame, dimensionless):

    opening = |mesh[13] - mesh[14]| / |mesh[10] - mesh[152]|

mesh 13 / 14 are the upper / lower inner-lip midpoints (the same pair as
stages/motion/selection.py's mouth_opening), mesh 10 the top of the forehead on the
midline and mesh 152 the chin. The face height rather than the mouth width is the
denominator because the mouth widens and narrows while speaking (smiles, "oo"), which would
move a width-normalised opening without the lips parting; the face height changes only
with the jaw (by a few percent), and is unaffected by the head's distance to the camera
and by yaw. Scale: the smiling astronaut (skimage.data.astronaut(), lips apart over the
teeth) measures 0.067, and 0.115 with her chin pulled down by 6 px of a 108 px face.

Closure, from the pixels (`mouth_series`'s dark_gap): the height of the dark band on the
lips' centre line over the mouth width (stages/motion/selection.py's dark_lip_gap), 0 where
no mouth cavity shows. On a closed mouth the mesh's opening is a fraction of a pixel and
scatters by as much from frame to frame; the dark band is exactly 0 there (all 79 pressed
frames of four synthetic held-out videos) and sees a cavity from about a pixel up.

Time: frame i of the video covers [i/fps, (i+1)/fps) on the container clock, which is also
load_audio's clock (sample j at j/16000 s), so energy frame i is the RMS of samples
[round(16000 i / fps), round(16000 (i+1) / fps)).

Lag convention: positive lag = the mouth moves after the sound (the opening at frame t+k
goes with the reference at frame t).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction

import numpy as np
from scipy.signal import butter, sosfiltfilt

SAMPLE_RATE = 16000

# Face-mesh indices (mediapipe canonical 468-point mesh, also the first 468 of the 478).
MESH_UPPER_INNER_LIP, MESH_LOWER_INNER_LIP = 13, 14
MESH_FOREHEAD_TOP, MESH_CHIN = 10, 152

SPEECH_BAND_HZ = (300.0, 3000.0)
MAX_LAG_FRAMES = 5
_DECODE_CHUNK_FRAMES = 250  # frames held in memory at once while measuring a video


# ---------------------------------------------------------------------------- the mouth

def opening_from_landmarks(landmarks: np.ndarray) -> np.ndarray:
    """(N, 478, 2) (or (N, >=468, 2)) mesh landmarks -> (N,) inner-lip gap over face height,
    |mesh13 - mesh14| / |mesh10 - mesh152|. NaN rows (no face) give NaN."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    gap = np.linalg.norm(landmarks[:, MESH_UPPER_INNER_LIP] - landmarks[:, MESH_LOWER_INNER_LIP], axis=-1)
    height = np.linalg.norm(landmarks[:, MESH_FOREHEAD_TOP] - landmarks[:, MESH_CHIN], axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(height > 1e-6, gap / height, np.nan)


@dataclass
class MouthSeries:
    opening: np.ndarray  # (N,) float64 inner-lip gap over face height; NaN where no face
    dark_gap: np.ndarray  # (N,) float64 dark_lip_gap: a visible cavity's height over mouth width; NaN where no face
    has_face: np.ndarray  # (N,) bool
    fps: Fraction


def mouth_series(video_path: str, tracker=None) -> MouthSeries:
    """Measure every frame of `video_path`: its mouth opening (the mesh) and its dark gap
    (the pixels).

    Frames are turned upright (the stream's display rotation) before the mesh sees them.
    Without `tracker`, a FaceTracker with smoothing_sigma_frames=0 and max_gap_frames=0 is
    built (and closed) here, so every value is that frame's own detection; a tracker passed
    in is used as configured (pass one to reuse its graphs across videos).
    """
    from stages.face.tracker import FaceTracker
    from stages.media.decode import decode_frames
    from stages.media.probe import probe_video
    from stages.motion.selection import dark_lip_gap

    info = probe_video(video_path)
    own = tracker is None
    if own:
        tracker = FaceTracker(smoothing_sigma_frames=0.0, max_gap_frames=0)
    openings, gaps, faces = [], [], []
    try:
        # Chunks bound the memory; each tracker call starts tracking afresh, which costs
        # one detection per chunk and changes nothing else without smoothing.
        for start in range(0, info.n_frames, _DECODE_CHUNK_FRAMES):
            stop = min(start + _DECODE_CHUNK_FRAMES, info.n_frames)
            frames = [np.ascontiguousarray(np.rot90(frame, k=info.rotation // 90))
                      for _, frame in decode_frames(video_path, start, stop)]
            track = tracker(frames)
            openings.append(opening_from_landmarks(track.landmarks))
            gaps.append(np.array([dark_lip_gap(f, lm) if face else math.nan
                                  for f, lm, face in zip(frames, track.landmarks, track.has_face)], np.float64))
            faces.append(np.asarray(track.has_face, dtype=bool))
    finally:
        if own:
            tracker.close()
    opening = np.concatenate(openings) if openings else np.zeros(0)
    dark_gap = np.concatenate(gaps) if gaps else np.zeros(0)
    has_face = np.concatenate(faces) if faces else np.zeros(0, dtype=bool)
    opening[~has_face] = np.nan
    return MouthSeries(opening, dark_gap, has_face, Fraction(info.fps))


def mouth_opening_series(video_path: str, tracker=None) -> tuple[np.ndarray, np.ndarray, Fraction]:
    """(opening (N,), has_face (N,), fps) of `mouth_series`."""
    series = mouth_series(video_path, tracker=tracker)
    return series.opening, series.has_face, series.fps


# ---------------------------------------------------------------------------- the sound

def frame_bounds(n_frames: int, fps, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """(n_frames + 1,) sample index where each frame's interval [i/fps, (i+1)/fps) starts
    (exact for Fraction rates such as 30000/1001)."""
    fps = Fraction(fps).limit_denominator(1_000_000) if not isinstance(fps, Fraction) else fps
    return np.array([round(Fraction(i * sample_rate) / fps) for i in range(n_frames + 1)],
                    dtype=np.int64)


def speech_energy(wave_16k: np.ndarray, n_frames: int, fps, band_hz=SPEECH_BAND_HZ,
                  sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """(n_frames,) RMS of the 300-3000 Hz band of a 16 kHz mono waveform over each video
    frame's interval [i/fps, (i+1)/fps). Frames past the end of the audio get 0.

    The band-pass is a 4th-order Butterworth run forwards and backwards (zero phase, so
    energy is not shifted in time, 8th-order slopes: -48 dB an octave outside the band)."""
    wave = np.asarray(wave_16k, dtype=np.float64).reshape(-1)
    energy = np.zeros(n_frames, dtype=np.float64)
    if n_frames == 0 or wave.size == 0:
        return energy
    sos = butter(4, band_hz, btype="bandpass", fs=sample_rate, output="sos")
    # sosfiltfilt pads by reflection; a very short wave is filtered without padding.
    padlen = min(3 * (2 * len(sos) + 1), wave.size - 1)
    band = sosfiltfilt(sos, wave, padlen=max(padlen, 0)) if wave.size > 1 else wave * 0
    bounds = np.clip(frame_bounds(n_frames, fps, sample_rate), 0, band.size)
    cumsum = np.concatenate([[0.0], np.cumsum(band ** 2)])
    counts = np.diff(bounds)
    sums = cumsum[bounds[1:]] - cumsum[bounds[:-1]]
    ok = counts > 0
    energy[ok] = np.sqrt(np.maximum(sums[ok], 0.0) / counts[ok])
    return energy


def silence_mask(energy: np.ndarray, threshold_db: float = -35.0, min_frames: int = 3) -> np.ndarray:
    """(N,) True on frames in silence: energy below `threshold_db` relative to the loudest
    frame (20 log10 of the RMS ratio), in runs of at least `min_frames` frames; shorter quiet
    runs (a stop consonant, a breath between words) count as speech. All silent when the
    audio is silent throughout."""
    energy = np.asarray(energy, dtype=np.float64)
    peak = np.nanmax(energy) if energy.size and np.isfinite(energy).any() else 0.0
    if peak <= 0:
        return np.ones(energy.shape, dtype=bool)
    quiet = ~(energy >= peak * 10.0 ** (threshold_db / 20.0))  # NaN counts as quiet
    return long_runs(quiet, min_frames)


def true_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[(start, stop), ...]: the runs of True in a (N,) bool mask, as half-open ranges."""
    edges = np.diff(np.concatenate([[0], np.asarray(mask, dtype=bool).astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def long_runs(mask: np.ndarray, min_frames: int) -> np.ndarray:
    """(N,) bool: `mask` with its runs of True shorter than `min_frames` cleared."""
    out = np.zeros(np.shape(mask), dtype=bool)
    for start, stop in true_runs(mask):
        if stop - start >= min_frames:
            out[start:stop] = True
    return out


# ---------------------------------------------------------------------------- statistics

def pearson_r(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation over the frames where both are finite; NaN with fewer than 3
    such frames or when either is constant there."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return math.nan
    if np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return math.nan
    x, y = a[ok] - a[ok].mean(), b[ok] - b[ok].mean()
    denom = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denom)


def lagged_r(opening: np.ndarray, reference: np.ndarray, lag: int) -> float:
    """Pearson r of opening[t + lag] against reference[t] (positive lag: mouth after sound)."""
    n = min(len(opening), len(reference))
    if abs(lag) >= n:
        return math.nan
    if lag >= 0:
        return pearson_r(opening[lag:n], reference[:n - lag])
    return pearson_r(opening[:n + lag], reference[-lag:n])


def best_lag(opening: np.ndarray, reference: np.ndarray, max_lag: int = MAX_LAG_FRAMES) -> tuple[int, float]:
    """(lag, r) with the highest r over lags -max_lag..max_lag; ties go to the smaller |lag|
    (then the negative one). (0, NaN) when no lag gives a finite r."""
    best = (0, math.nan)
    for lag in sorted(range(-max_lag, max_lag + 1), key=lambda k: (abs(k), k)):
        r = lagged_r(opening, reference, lag)
        if np.isfinite(r) and (not np.isfinite(best[1]) or r > best[1] + 1e-12):
            best = (lag, r)
    return best


def jitter(series: np.ndarray) -> float:
    """Mean |x[t+1] - 2 x[t] + x[t-1]| over the frames t whose both neighbours and itself
    are finite (have a face). A constant or linearly moving opening has jitter 0; an
    opening alternating +a, -a, +a, ... has jitter 4a. NaN when no such triple exists."""
    x = np.asarray(series, dtype=np.float64)
    if x.size < 3:
        return math.nan
    second = x[2:] - 2 * x[1:-1] + x[:-2]
    ok = np.isfinite(second)
    return float(np.abs(second[ok]).mean()) if ok.any() else math.nan


def _mean(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else math.nan


@dataclass
class LipSyncReport:
    pearson_r: float  # opening vs reference at lag 0, frames where both are finite
    best_lag_frames: int  # in -5..5; positive: the mouth moves after the sound
    r_at_best_lag: float
    silent_opening: float  # mean opening over silent frames with a face (NaN if none)
    speech_opening: float  # mean opening over speech frames with a face (NaN if none)
    silent_relative_to_neutral: float  # (silent_opening - neutral) / neutral; NaN without neutral
    # (silent_opening - neutral) / (speech_opening - neutral): how far open silence is on the
    # scale of the mouth's travel in speech, which a neutral of a fraction of a pixel (a
    # closed mouth) cannot give; NaN without neutral or when speech is no more open
    silent_share_of_speech_gap: float
    jitter: float  # mean |second difference| of the opening over frames with a face
    reference_jitter: float  # the same for a ground-truth opening reference; NaN for energy
    frames_used: int  # frames where opening and reference are both finite
    reference: str = "speech_energy"  # or "truth_opening"

    def to_dict(self) -> dict:
        return asdict(self)


def lip_sync_report(opening: np.ndarray, reference: np.ndarray | None, silent: np.ndarray | None = None,
                    neutral: float | None = None, reference_is_opening: bool = False,
                    max_lag: int = MAX_LAG_FRAMES) -> LipSyncReport:
    """Compare a measured opening series with a reference series of the same length.

    `reference`: speech energy per frame (default), or a ground-truth opening series when
    `reference_is_opening` (then reference_jitter is reported too); None: no reference,
    correlations NaN. `silent`: (N,) bool silent frames; when None and the reference is
    speech energy it is silence_mask(reference), otherwise silent/speech openings are NaN.
    `neutral`: the opening of the speaker's neutral (closed-mouth) frame.
    """
    opening = np.asarray(opening, dtype=np.float64).reshape(-1)
    n = opening.size
    if reference is None:
        ref = np.full(n, np.nan)
    else:
        ref = np.asarray(reference, dtype=np.float64).reshape(-1)
        if ref.size != n:
            raise ValueError(f"lipsync: opening has {n} frames but the reference has {ref.size}")
    if silent is None and reference is not None and not reference_is_opening:
        silent = silence_mask(ref)
    if silent is not None:
        silent = np.asarray(silent, dtype=bool).reshape(-1)
        if silent.size != n:
            raise ValueError(f"lipsync: opening has {n} frames but the silence mask has {silent.size}")
        silent_opening, speech_opening = _mean(opening[silent]), _mean(opening[~silent])
    else:
        silent_opening = speech_opening = math.nan
    relative = share = math.nan
    if neutral is not None and np.isfinite(neutral) and neutral > 0:
        relative = (silent_opening - neutral) / neutral
        if speech_opening > neutral:
            share = (silent_opening - neutral) / (speech_opening - neutral)
    lag, r_lag = best_lag(opening, ref, max_lag)
    return LipSyncReport(
        pearson_r=pearson_r(opening, ref),
        best_lag_frames=int(lag),
        r_at_best_lag=r_lag,
        silent_opening=silent_opening,
        speech_opening=speech_opening,
        silent_relative_to_neutral=float(relative),
        silent_share_of_speech_gap=float(share),
        jitter=jitter(opening),
        reference_jitter=jitter(ref) if reference_is_opening and reference is not None else math.nan,
        frames_used=int((np.isfinite(opening) & np.isfinite(ref)).sum()),
        reference="truth_opening" if reference_is_opening else "speech_energy",
    )


# ---------------------------------------------------------------------------- a video

def measure_video(video_path: str, audio_path: str | None = None, truth_opening: np.ndarray | None = None,
                  neutral: float | None = None, tracker=None) -> LipSyncReport:
    """Measure a (dubbed) video's lip sync.

    Audio comes from `audio_path`, else from the video's own audio stream (none: no speech
    energy). The reference is `truth_opening` ((N,) per video frame) when given, else the
    speech energy; silent spans always come from the audio when there is some.
    """
    from stages.audio.load import AudioError, load_audio

    opening, _, fps = mouth_opening_series(video_path, tracker=tracker)
    n = opening.size
    energy = None
    try:
        wave = load_audio(audio_path if audio_path is not None else video_path, SAMPLE_RATE)
    except AudioError:
        if audio_path is not None:
            raise
        wave = None
    if wave is not None:
        energy = speech_energy(wave, n, fps)
    silent = silence_mask(energy) if energy is not None else None
    if truth_opening is not None:
        truth = np.asarray(truth_opening, dtype=np.float64).reshape(-1)
        if truth.size != n:
            raise ValueError(f"lipsync: {video_path} has {n} frames but truth_opening has {truth.size}")
        return lip_sync_report(opening, truth, silent=silent, neutral=neutral, reference_is_opening=True)
    return lip_sync_report(opening, energy, silent=silent, neutral=neutral)
