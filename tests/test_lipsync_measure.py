"""Lip-sync measure: statistics against hand-computed values on synthetic series, the speech
band energy on tones, and the mouth opening measured by the face mesh on a real video made
here (the astronaut with her chin pulled down on some frames)."""
import math
import wave
from fractions import Fraction

import cv2
import numpy as np
import pytest
from skimage import data

from stages.face import FaceTracker
from stages.lipsync import (LipSyncReport, best_lag, jitter, lip_sync_report, measure_video,
                            mouth_opening_series, opening_from_landmarks, pearson_r,
                            silence_mask, speech_energy)
from stages.lipsync.measure import frame_bounds
from stages.media.encode import encode_frames

SR = 16000


# ---------------------------------------------------------------- statistics, by hand

def test_pearson_r_excludes_nan_frames():
    a = np.array([1.0, 2.0, np.nan, 4.0, 5.0, 3.0])
    b = np.array([2.0, 1.0, 7.0, np.nan, 6.0, 4.0])
    # Frames 0, 1, 4, 5 are used: a = 1 2 5 3 (mean 2.75), b = 2 1 6 4 (mean 3.25).
    x = np.array([-1.75, -0.75, 2.25, 0.25])
    y = np.array([-1.25, -2.25, 2.75, 0.75])
    expected = (x * y).sum() / math.sqrt((x * x).sum() * (y * y).sum())
    assert pearson_r(a, b) == pytest.approx(expected, abs=1e-12)
    assert pearson_r(a, b) == pytest.approx(10.25 / math.sqrt(8.75 * 14.75), abs=1e-12)
    assert math.isnan(pearson_r(np.ones(6), b))  # constant: undefined
    assert math.isnan(pearson_r(a[:2], b[:2]))  # too few frames


def test_known_lag_is_recovered_both_ways():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=80)
    for k in (3, -2, 5, 0):
        opening = np.roll(reference, k)  # opening[t + k] = reference[t]: mouth k frames late
        lag, r = best_lag(opening, reference)
        assert lag == k and r == pytest.approx(1.0, abs=1e-12)
        report = lip_sync_report(opening, reference, silent=np.zeros(80, bool))
        assert report.best_lag_frames == k and report.r_at_best_lag == pytest.approx(1.0)
        if k:
            assert report.pearson_r < 0.5  # at lag 0 a random series hardly correlates
    # r at a lag is the plain correlation of the shifted slices.
    opening = reference + 0.5 * rng.normal(size=80)
    lag, r = best_lag(np.roll(opening, 2), reference)
    assert lag == 2 and r == pytest.approx(np.corrcoef(opening[:78], reference[:78])[0, 1], abs=1e-12)
    # A lag beyond the search range is not found.
    lag, _ = best_lag(np.roll(reference, 8), reference)
    assert abs(lag) <= 5


def test_jitter_is_mean_absolute_second_difference():
    assert jitter(np.linspace(0.1, 0.4, 20)) == pytest.approx(0.0, abs=1e-15)  # constant motion
    assert jitter(np.full(10, 0.3)) == 0.0
    a = 0.05
    alternating = a * (-1.0) ** np.arange(12)
    assert jitter(alternating) == pytest.approx(4 * a)  # a - 2(-a) + a
    # Triples touching a frame without a face are skipped:
    x = np.array([0.0, 1.0, 0.0, np.nan, 0.0, 0.0, 3.0])
    # second differences: t=1: 0-2+0=-2; t=2,3,4: NaN; t=5: 3-0+0=3 -> mean(2, 3)
    assert jitter(x) == pytest.approx(2.5)
    assert math.isnan(jitter(np.array([1.0, np.nan, 1.0])))


def test_silent_and_speech_statistics_and_neutral():
    opening = np.array([0.02, 0.04, np.nan, 0.20, 0.30, 0.25, 0.03, 0.05])
    silent = np.array([True, True, True, False, False, False, True, True])
    report = lip_sync_report(opening, None, silent=silent, neutral=0.025)
    assert isinstance(report, LipSyncReport)
    assert report.silent_opening == pytest.approx((0.02 + 0.04 + 0.03 + 0.05) / 4)  # NaN skipped
    assert report.speech_opening == pytest.approx(0.25)
    assert report.silent_relative_to_neutral == pytest.approx((0.035 - 0.025) / 0.025)
    assert report.silent_share_of_speech_gap == pytest.approx((0.035 - 0.025) / (0.25 - 0.025))
    assert math.isnan(report.pearson_r) and report.frames_used == 0
    # Without a neutral, the relative values are NaN; so is the share when speech is no more open.
    assert math.isnan(lip_sync_report(opening, None, silent=silent).silent_relative_to_neutral)
    assert math.isnan(lip_sync_report(opening, None, silent=silent).silent_share_of_speech_gap)
    assert math.isnan(lip_sync_report(opening, None, silent=silent, neutral=0.3).silent_share_of_speech_gap)


def test_report_with_truth_opening_and_with_energy():
    truth = np.array([0.0, 0.1, 0.3, 0.2, 0.0, 0.0, 0.1, 0.2, 0.1, 0.0])
    measured = truth * 0.8 + 0.01 + np.array([0, 0.01, 0, -0.01, 0, 0.01, 0, 0, 0, 0])
    measured[4] = np.nan
    report = lip_sync_report(measured, truth, reference_is_opening=True)
    ok = np.isfinite(measured)
    assert report.pearson_r == pytest.approx(np.corrcoef(measured[ok], truth[ok])[0, 1])
    assert report.frames_used == 9
    assert report.reference == "truth_opening"
    assert report.reference_jitter == pytest.approx(np.abs(np.diff(truth, 2)).mean())
    assert report.jitter == pytest.approx(np.nanmean(np.abs(np.diff(measured, 2))))
    assert math.isnan(report.silent_opening)  # no silence mask given, no audio to derive one

    # Energy reference: the silence mask is derived from it (-35 dB, runs of >= 3 frames).
    energy = np.array([0.0, 0.0, 0.0, 1.0, 0.8, 0.9, 0.0, 0.0, 0.0, 0.0])
    opening = np.array([0.05, 0.04, 0.05, 0.3, 0.25, 0.3, 0.06, 0.05, 0.04, 0.05])
    report = lip_sync_report(opening, energy)
    assert report.reference == "speech_energy" and math.isnan(report.reference_jitter)
    assert report.silent_opening == pytest.approx(np.mean([0.05, 0.04, 0.05, 0.06, 0.05, 0.04, 0.05]))
    assert report.speech_opening == pytest.approx(np.mean([0.3, 0.25, 0.3]))
    assert report.pearson_r > 0.95 and report.best_lag_frames == 0
    with pytest.raises(ValueError, match="frames"):
        lip_sync_report(opening, energy[:-1])


def test_silence_mask_threshold_and_minimum_run():
    loud, quiet = 1.0, 10 ** (-40 / 20)  # -40 dB
    just_above = 10 ** (-34 / 20)
    energy = np.array([quiet] * 4 + [loud] * 3 + [quiet] * 2 + [loud, just_above, loud] + [quiet] * 3)
    expected = [True] * 4 + [False] * 3 + [False] * 2 + [False] * 3 + [True] * 3  # a 2-frame dip is speech
    assert silence_mask(energy).tolist() == expected
    assert silence_mask(energy, min_frames=2)[7:9].all()
    assert not silence_mask(energy, threshold_db=-30)[10]  # quiet against -30 dB, but 1 frame
    assert silence_mask(energy, threshold_db=-30, min_frames=1)[10]
    assert silence_mask(np.zeros(5)).all()


def test_opening_from_landmarks_uses_inner_lips_over_face_height():
    pts = np.zeros((2, 478, 2))
    pts[:, 10] = (100, 50)
    pts[:, 152] = (100, 250)  # face height 200
    pts[:, 13] = (100, 180)
    pts[:, 14] = [(100, 190), (100, 220)]  # gaps 10 and 40
    np.testing.assert_allclose(opening_from_landmarks(pts), [0.05, 0.2])
    pts[1] = np.nan
    assert math.isnan(opening_from_landmarks(pts)[1])


# ---------------------------------------------------------------- speech energy on tones

def tone(hz, seconds, amplitude=0.5):
    t = np.arange(int(round(seconds * SR))) / SR
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def test_speech_energy_is_zero_in_silence_and_follows_frame_intervals():
    fps = Fraction(25)
    wave_ = np.concatenate([np.zeros(int(0.4 * SR), np.float32), tone(1000, 0.4), np.zeros(int(0.4 * SR), np.float32)])
    energy = speech_energy(wave_, 30, fps)  # 30 frames = 1.2 s; the wave covers exactly that
    assert energy.shape == (30,)
    # Frames 0-9 silent, 10-19 tone, 20-29 silent; a frame next to the edge may get a
    # little filter ringing, the others none.
    assert energy[:9].max() < 1e-3 and energy[21:].max() < 1e-3
    np.testing.assert_allclose(energy[11:19], 0.5 / np.sqrt(2), rtol=0.02)  # RMS of the sine
    # Past the end of the audio: 0.
    assert (speech_energy(wave_, 40, fps)[30:] == 0).all()
    # Exact bounds at NTSC rates.
    bounds = frame_bounds(4, Fraction(30000, 1001))
    assert bounds.tolist() == [0, 534, 1068, 1602, 2135]  # round(i * 16000 * 1001 / 30000)


def test_speech_band_passes_speech_frequencies_only():
    inside = speech_energy(tone(1000, 1.0), 25, 25)[2:-2].mean()
    for hz in (60, 100, 6000):  # hum and hiss, same power as the 1 kHz tone
        outside = speech_energy(tone(hz, 1.0), 25, 25)[2:-2].mean()
        assert outside < 0.1 * inside, hz


# ---------------------------------------------------------------- a real video

ASTRONAUT = data.astronaut()  # 512x512 RGB, mouth at about (223, 147)
FPS = Fraction(30000, 1001)
N_FRAMES = 30
OPENED = np.array([(i // 5) % 2 == 1 for i in range(N_FRAMES)])  # frames 5-9, 15-19, 25-29
PULL_PX = 6.0


def pull_chin_down(image, pts, pixels):
    """Move everything below the inner-lip line (mouth width, down to the chin) down by
    `pixels`, fading out below the chin and towards the cheeks: the jaw drops, the lips part."""
    h, w = image.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    lip_y = (pts[13, 1] + pts[14, 1]) / 2
    chin_y = pts[152, 1]
    cx, half = (pts[61, 0] + pts[291, 0]) / 2, abs(pts[291, 0] - pts[61, 0]) * 0.9
    shift = np.clip((yy - lip_y + 1) / 2, 0, 1) * pixels
    shift *= np.clip(1 - (yy - chin_y) / 30, 0, 1)
    shift *= np.clip(1.5 - np.abs(xx - cx) / half, 0, 1)
    return cv2.remap(image, xx, yy - shift, cv2.INTER_LINEAR)


@pytest.fixture(scope="module")
def tracker():
    with FaceTracker(smoothing_sigma_frames=0.0, max_gap_frames=0) as t:
        yield t


@pytest.fixture(scope="module")
def talking_video(tmp_path_factory, tracker):
    pts = tracker([ASTRONAUT]).landmarks[0]
    opened = pull_chin_down(ASTRONAUT, pts, PULL_PX)
    frames = [opened if o else ASTRONAUT for o in OPENED]
    path = str(tmp_path_factory.mktemp("lipsync") / "talking.mp4")
    assert encode_frames(path, frames, 512, 512, FPS, preset="veryfast") == N_FRAMES
    return path


def write_wav(path, samples):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


def test_mouth_opening_series_sees_the_opened_frames(talking_video, tracker):
    opening, has_face, fps = mouth_opening_series(talking_video, tracker=tracker)
    assert fps == FPS and isinstance(fps, Fraction)
    assert opening.shape == (N_FRAMES,) and has_face.tolist() == [True] * N_FRAMES
    assert np.isfinite(opening).all()
    # Every opened frame measures wider than every untouched one.
    assert opening[OPENED].min() > opening[~OPENED].max(), opening
    assert opening[OPENED].mean() > 1.3 * opening[~OPENED].mean()
    # The tracker's defaults are built here when none is passed.
    again, _, _ = mouth_opening_series(talking_video)
    np.testing.assert_allclose(again, opening, atol=2e-3)


def test_mouth_series_dark_gap_is_zero_on_pressed_lips_and_sees_parted_ones(tracker, tmp_path):
    """The pixels' closure through an encoded video: a synthetic speaker's pressed lips read
    exactly 0 (the mesh's opening there is a fraction of a pixel and scatters), lips a few
    pixels apart and wide open read more; cavity_frames counts the silent frames that show one."""
    from pipeline.lipsync_eval import cavity_frames
    from stages.lipsync.measure import mouth_series
    from stages.synth.speaker import SpeakerIdentity, render_frame

    jaws = np.array([0.0, 0.0, 0.15, 0.5, 0.0, 0.3, 0.0, 0.0])
    frames = [render_frame(None, SpeakerIdentity.from_seed(0, 2), float(j), 0.5, i / 25) for i, j in enumerate(jaws)]
    path = str(tmp_path / "speaker.mp4")
    assert encode_frames(path, frames, 320, 240, Fraction(25), preset="veryfast") == len(jaws)
    series = mouth_series(path, tracker=tracker)
    assert series.has_face.all() and series.fps == 25
    closed, opened = jaws == 0, jaws > 0
    print(f"dark gap {np.round(series.dark_gap, 3).tolist()}, opening {np.round(series.opening, 4).tolist()}")
    assert (series.dark_gap[closed] == 0).all() and (series.dark_gap[opened] > 0.02).all()
    assert series.dark_gap[3] > series.dark_gap[5] > series.dark_gap[2]  # in the order of the jaw
    opening, has_face, fps = mouth_opening_series(path, tracker=tracker)  # the same measurement
    np.testing.assert_array_equal(opening, series.opening)
    assert cavity_frames(series.dark_gap, closed) == 0 and cavity_frames(series.dark_gap, ~closed) == 3
    assert cavity_frames(np.array([np.nan, 0.1, 0.0]), np.array([True, True, False])) == 1  # no face: no cavity


def test_measure_video_against_speech_and_truth(talking_video, tracker, tmp_path):
    # Speech (a 1 kHz tone) exactly on the opened frames, silence elsewhere.
    bounds = frame_bounds(N_FRAMES, FPS)
    samples = np.zeros(bounds[-1], np.float32)
    full = tone(1000, bounds[-1] / SR, amplitude=0.3)
    for i in np.flatnonzero(OPENED):
        samples[bounds[i]:bounds[i + 1]] = full[bounds[i]:bounds[i + 1]]
    audio = tmp_path / "speech.wav"
    write_wav(audio, samples)

    report = measure_video(talking_video, audio_path=str(audio), tracker=tracker, neutral=0.06)
    assert report.reference == "speech_energy" and report.frames_used == N_FRAMES
    assert report.pearson_r > 0.9 and report.best_lag_frames == 0
    assert report.speech_opening > report.silent_opening
    assert report.silent_relative_to_neutral == pytest.approx((report.silent_opening - 0.06) / 0.06)
    assert np.isfinite(report.jitter) and math.isnan(report.reference_jitter)

    # The same mouth with the sound 2 frames earlier: the mouth is 2 frames late.
    late = np.zeros_like(samples)
    for i in np.flatnonzero(OPENED):
        j = i - 2
        late[bounds[j]:bounds[j + 1]] = full[bounds[j]:bounds[j + 1]]
    write_wav(tmp_path / "early.wav", late)
    report = measure_video(talking_video, audio_path=str(tmp_path / "early.wav"), tracker=tracker)
    assert report.best_lag_frames == 2 and report.r_at_best_lag > 0.9 > report.pearson_r + 0.3

    truth = OPENED.astype(float) * 0.1
    report = measure_video(talking_video, truth_opening=truth, tracker=tracker)  # no audio stream
    assert report.reference == "truth_opening" and report.pearson_r > 0.9
    assert report.reference_jitter == pytest.approx(np.abs(np.diff(truth, 2)).mean())
    assert math.isnan(report.silent_opening)  # the video has no audio to find silence in
    with pytest.raises(ValueError, match="truth_opening"):
        measure_video(talking_video, truth_opening=truth[:-1], tracker=tracker)


def test_pooled_ratio_pools_every_frame_and_brackets_its_mean():
    from pipeline.lipsync_eval import pooled_ratio

    rng = np.random.default_rng(1)
    a, b = rng.gamma(2.0, 0.5, 40), rng.gamma(2.0, 0.5, 9)
    pooled = pooled_ratio([a.tolist(), list(b) + [math.nan]])
    values = np.concatenate([a, b])
    assert pooled["frames"] == 49
    assert pooled["mean"] == pytest.approx(values.mean()) and pooled["median"] == pytest.approx(np.median(values))
    # Not the mean of the two outputs' means: every frame weighs the same.
    assert abs(pooled["mean"] - (a.mean() + b.mean()) / 2) > 1e-3
    assert pooled["low"] < pooled["mean"] < pooled["high"]
    assert pooled == pooled_ratio([a.tolist(), list(b)])  # seeded: the same interval every time
    # The interval narrows as frames are added (the standard error's 1/sqrt(n)).
    wide = pooled_ratio([a[:10]])
    assert pooled["high"] - pooled["low"] < wide["high"] - wide["low"]
    constant = pooled_ratio([[1.0] * 12])
    assert constant["low"] == constant["high"] == constant["mean"] == 1.0
    assert pooled_ratio([])["frames"] == 0 and math.isnan(pooled_ratio([[math.nan]])["mean"])
