"""Synthetic talking-head corpus: the mouth ground truth follows the documented formulas
(silence closed, bilabials closed at espeak's phoneme times), the rendered mouth really
opens as mediapipe measures it while the rest of the face stays put, and the corpus files
agree with each other and are deterministic."""
from __future__ import annotations

import json
import os
import shutil
import wave

import av
import numpy as np
import pyarrow.parquet as pq
import pytest

from stages.synth.speaker import (FORMULAS_VERSION, FPS, SAMPLE_RATE, SpeakerIdentity, SynthError, is_bilabial,
                                  mouth_track, render_frame, speak)

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


def _tone(freq: float, seconds: float, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_mouth_track_silence_is_closed_and_width_follows_the_spectrum():
    silence = np.zeros(int(0.4 * SAMPLE_RATE), np.float32)
    wave = np.concatenate([silence, _tone(800, 0.4), silence, _tone(2400, 0.4), silence])
    tr = mouth_track(wave)
    n = tr["frames"]
    assert n == round(len(wave) / SAMPLE_RATE * FPS) == len(tr["jaw"]) == len(tr["width"])
    jaw, width = tr["jaw"], tr["width"]
    # 10 frames per 0.4 s block: silence blocks are exactly closed away from the edges (the
    # 3-tap smoothing reaches one frame into the silence)
    for a, b in ((0, 9), (21, 29), (41, 50)):
        assert np.all(jaw[a:b] == 0.0) and np.all(tr["is_silent"][a:b])
        assert np.all(width[a:b] == 0.5)
    # 800 Hz sits in the open-vowel first-formant band, 2400 Hz in the spread-lips band
    assert jaw[11:19].min() > 0.9 and 0.3 < jaw[31:39].max() < 0.6
    assert width[31:39].min() > 0.9 and width[11:19].max() < 0.1
    assert mouth_track(np.zeros(8000, np.float32))["jaw"].max() == 0.0


@pytest.fixture(scope="module")
def papa():
    speech = speak("Papa bought a big blue boat.", "en-us", 150)
    lead = np.zeros(int(0.24 * SAMPLE_RATE), np.float32)
    wave = np.concatenate([lead, speech.wave, lead])
    wave = wave[: len(wave) // 640 * 640]
    phonemes = [(t + 0.24, m) for t, m in speech.phonemes] if speech.phonemes else None
    return speech, wave, phonemes


@needs_espeak
def test_libespeak_gives_phoneme_events_and_bilabials_close(papa):
    speech, wave, phonemes = papa
    assert speech.source == "libespeak-ng", speech.source
    names = [m for _, m in speech.phonemes]
    assert len(names) >= 15 and names.count("p") >= 2 and names.count("b") >= 4, names
    starts = [t for t, _ in speech.phonemes]
    assert starts == sorted(starts) and 0 <= starts[0] < 0.2 and starts[-1] <= len(speech.wave) / SAMPLE_RATE

    tr = mouth_track(wave, FPS, phonemes)
    jaw = tr["jaw"]
    n = tr["frames"]
    assert n == round(len(wave) / SAMPLE_RATE * FPS)
    events = sorted(phonemes)
    closed_events = 0
    for k, (start, name) in enumerate(events):
        if not is_bilabial(name):
            continue
        end = events[k + 1][0] if k + 1 < len(events) else start + 0.08
        frames = [i for i in range(n) if start <= (i + 0.5) / FPS < end] or [int((start + end) / 2 * FPS)]
        assert all(jaw[i] == 0.0 for i in frames), (name, start, end, [float(jaw[i]) for i in frames])
        assert all(tr["bilabial"][i] for i in frames)
        closed_events += 1
    assert closed_events >= 6
    # without phonemes the same frames are open (the closure comes from the phoneme times)
    open_tr = mouth_track(wave, FPS, None)
    assert open_tr["jaw"][tr["bilabial"]].max() > 0.3
    assert np.array_equal(open_tr["jaw"][~tr["bilabial"]], jaw[~tr["bilabial"]])


@needs_espeak
def test_leading_and_trailing_silence_closed_speech_open(papa):
    _, wave, phonemes = papa
    tr = mouth_track(wave, FPS, phonemes)
    jaw = tr["jaw"]
    voiced = np.flatnonzero(np.abs(wave) > 1e-3)
    first, last = voiced[0] / SAMPLE_RATE, voiced[-1] / SAMPLE_RATE
    lead = [i for i in range(len(jaw)) if (i + 1) / FPS < first - 0.04]
    tail = [i for i in range(len(jaw)) if i / FPS > last + 0.04]
    assert len(lead) >= 4 and len(tail) >= 4
    assert np.all(jaw[lead] == 0.0) and np.all(jaw[tail] == 0.0)
    speech = [i for i in range(len(jaw)) if first <= i / FPS and (i + 1) / FPS <= last]
    assert jaw.max() > 0.8
    open_frac = np.mean(jaw[speech] > 0)
    assert open_frac > 0.6, open_frac


@pytest.fixture(scope="module")
def tracker():
    from stages.face.tracker import FaceTracker

    with FaceTracker(smoothing_sigma_frames=0) as t:
        yield t


@pytest.mark.parametrize("identity", [SpeakerIdentity(), SpeakerIdentity.from_seed(0, 1)], ids=["plain", "seeded"])
def test_rendered_mouth_opens_with_jaw_and_the_eyes_stay(tracker, identity):
    jaws = np.linspace(0.0, 1.0, 11)
    frames = [render_frame(None, identity, float(j), 0.5, 0.0) for j in jaws]
    track = tracker(frames)
    assert track.has_face.all()
    lm = track.landmarks.astype(np.float64)
    face_h = np.linalg.norm(lm[:, 152] - lm[:, 10], axis=1)
    gap = np.linalg.norm(lm[:, 14] - lm[:, 13], axis=1) / face_h
    r = np.corrcoef(jaws, gap)[0, 1]
    print(f"{identity}: inner-lip gap / face height {np.round(gap, 3).tolist()}, r = {r:.3f}")
    assert r > 0.9, (r, gap)
    assert gap[-1] - gap[0] > 0.08 and gap[0] < 0.03
    # far from the mouth nothing moves: the eyes, the forehead
    eyes = lm[0, [33, 133, 159, 145, 362, 263, 386, 374]]
    x0, y0 = np.floor(eyes.min(0) - 6).astype(int)
    x1, y1 = np.ceil(eyes.max(0) + 6).astype(int)
    a = frames[0][y0:y1, x0:x1].astype(np.float32)
    b = frames[-1][y0:y1, x0:x1].astype(np.float32)
    assert a.size > 0 and np.abs(a - b).mean() < 0.5 and np.abs(a - b).max() <= 8
    # and the mouth region does change
    m = lm[0, [61, 291, 152]]
    mx0, my0 = np.floor(m.min(0)).astype(int)
    mx1, my1 = np.ceil(m.max(0)).astype(int)
    assert np.abs(frames[0][my0:my1, mx0:mx1].astype(np.float32)
                  - frames[-1][my0:my1, mx0:mx1].astype(np.float32)).mean() > 10


def test_dark_lip_gap_sees_parted_lips_that_the_mesh_reads_as_closed(tracker):
    from stages.motion.selection import dark_lip_gap, mouth_opening

    identity = SpeakerIdentity.from_seed(0, 1)
    jaws = [0.0, 0.0, 0.1, 0.14, 0.4]
    frames = [render_frame(None, identity, j, 0.5, t) for j, t in zip(jaws, [0.0, 1.3, 0.0, 0.0, 0.0])]
    track = tracker(frames)
    assert track.has_face.all()
    mesh = mouth_opening(track.landmarks)
    gap = np.array([dark_lip_gap(f, lm) for f, lm in zip(frames, track.landmarks)])
    print(f"mesh {np.round(mesh, 4).tolist()}, dark gap {np.round(gap, 3).tolist()}")
    assert gap[0] == 0.0 and gap[1] == 0.0  # pressed lips, two head poses
    assert 0.02 < gap[2] <= gap[3] < gap[4]  # 2-3 pixels apart, then wide open
    # the mesh reads lips 2-3 pixels apart about as closed as pressed ones (not so the pixels)
    assert mesh[2] < 3 * max(mesh[0], mesh[1]) and gap[2] > 0.02 + max(gap[0], gap[1])


def test_width_moves_the_corners(tracker):
    frames = [render_frame(None, SpeakerIdentity(), 0.4, w, 0.0) for w in (0.0, 0.5, 1.0)]
    lm = tracker(frames).landmarks.astype(np.float64)
    mouth_w = np.linalg.norm(lm[:, 291] - lm[:, 61], axis=1)
    assert mouth_w[0] < mouth_w[1] < mouth_w[2], mouth_w


def _video_info(path):
    with av.open(path) as c:
        assert len(c.streams.audio) == 0
        vs = c.streams.video[0]
        n = sum(1 for _ in c.decode(vs))
        return n, float(vs.average_rate), (vs.codec_context.width, vs.codec_context.height), vs.codec_context.name


@needs_espeak
def test_corpus_files_agree_and_are_deterministic(tmp_path):
    from pipeline.prepare.config import read_corpus
    from pipeline.storage import Storage
    from pipeline.synth_corpus import make_synth_corpus

    out = make_synth_corpus(str(tmp_path / "a"), speakers=2, sentences_per_speaker=2, seed=3, size=(160, 128))
    table = pq.read_table(out["corpus"])
    assert table.column_names == ["video_uri", "audio_uri", "speaker_id"]
    rows = read_corpus(out["corpus"], Storage())
    assert len(rows) == 4 and all(err is None for _, _, err in rows)
    assert len({r.speaker for _, r, _ in rows}) == 2
    for clip in out["clips"]:
        truth = json.load(open(clip["truth"]))
        n_video, fps, size, codec = _video_info(clip["video"])
        with wave.open(clip["audio"]) as w:
            assert w.getframerate() == SAMPLE_RATE and w.getnchannels() == 1
            seconds = w.getnframes() / w.getframerate()
        assert codec == "h264" and fps == 25.0 and size == (160, 128)
        assert len(truth["jaw"]) == len(truth["width"]) == len(truth["is_silent"]) == n_video == round(seconds * 25)
        assert truth["formulas_version"] == FORMULAS_VERSION and truth["speech_source"] == "libespeak-ng"
        assert truth["phonemes"] and any(is_bilabial(m) for _, m in truth["phonemes"])
        assert truth["jaw"][0] == 0.0 and truth["jaw"][-1] == 0.0 and max(truth["jaw"]) > 0.7
    texts = [json.load(open(c["truth"]))["voice"] for c in out["clips"]]
    assert texts[0] != texts[2]  # the speakers speak with different voices
    ids = [json.load(open(c["truth"]))["identity"] for c in out["clips"]]
    assert ids[0] == ids[1] != ids[2]
    # the same seed gives the same clips (a speaker's clips do not depend on how many speakers
    # or sentences are asked for, so one clip again is enough)
    again = make_synth_corpus(str(tmp_path / "b"), speakers=1, sentences_per_speaker=1, seed=3, size=(160, 128))
    c1, c2 = out["clips"][0], again["clips"][0]
    assert c1["clip"] == c2["clip"]
    assert open(c1["truth"], "rb").read() == open(c2["truth"], "rb").read()
    assert open(c1["audio"], "rb").read() == open(c2["audio"], "rb").read()
    assert SpeakerIdentity.from_seed(4, 0).as_dict() != ids[0]


@needs_espeak
def test_speech_is_deterministic_and_an_unknown_voice_is_an_error():
    a, b = speak("Bob may buy more maps.", "en+f3", 170), speak("Bob may buy more maps.", "en+f3", 170)
    assert a.source == "libespeak-ng" and np.array_equal(a.wave, b.wave) and a.phonemes == b.phonemes
    with pytest.raises(SynthError, match="no voice"):
        speak("Hello.", "no-such-voice", 150)


@needs_espeak
def test_cli_synth_corpus(tmp_path, capsys):
    from pipeline.cli import main

    folder = tmp_path / "corpus"
    assert main(["synth-corpus", "--folder", str(folder), "--speakers", "1", "--sentences", "1", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    assert f"corpus: {folder / 'corpus.parquet'}" in out and "wrote 1 clips" in out
    assert pq.read_table(folder / "corpus.parquet").num_rows == 1
    bad = tmp_path / "not_a_face.png"
    bad.write_bytes(b"not an image")
    assert main(["synth-corpus", "--folder", str(tmp_path / "x"), "--face", str(bad)]) == 2
    assert "cannot read the face image" in capsys.readouterr().err


def test_heldout_corpus_speaks_only_sentences_never_trained_on_and_pairs_for_dubbing(tmp_path):
    from pipeline.lipsync_eval import sync_manifest
    from pipeline.synth_corpus import HELDOUT_SENTENCES, SENTENCES, make_synth_corpus

    assert not set(HELDOUT_SENTENCES) & set(SENTENCES)
    out = make_synth_corpus(str(tmp_path / "h"), speakers=2, sentences_per_speaker=2, seed=0, size=(160, 128),
                            heldout=True)
    texts = []
    for clip in out["clips"]:
        with open(clip["truth"]) as f:
            doc = json.load(f)
        texts.append(doc["text"])
        assert "_h" in clip["clip"]
    assert set(texts) <= set(HELDOUT_SENTENCES) and len(set(texts)) >= 2
    # the same speakers (looks and voices) as the training corpus of the same seed
    train = make_synth_corpus(str(tmp_path / "t"), speakers=2, sentences_per_speaker=1, seed=0, size=(160, 128))
    with open(out["speakers"]) as f, open(train["speakers"]) as g:
        assert json.load(f)["speakers"] == json.load(g)["speakers"]
    rows = sync_manifest(out["folder"], str(tmp_path / "outputs"))
    assert len(rows) == 2  # one per speaker: clip 1 dubbed with clip 0's audio
    for row in rows:
        source = os.path.basename(row["video_uri"])[:-4]
        dubbed = os.path.basename(row["audio_uri"])[:-4]
        assert source.endswith("_h01") and dubbed.endswith("_h00") and source[:-4] == dubbed[:-4]
        assert row["truth"].endswith(f"{dubbed}.truth.json") and row["truth_video"].endswith(f"{dubbed}.mp4")
        assert row["output_uri"].startswith(str(tmp_path / "outputs"))
        assert row["source_truth"].endswith(f"{source}.truth.json") and os.path.exists(row["source_truth"])
    # The silence figures' known answer: the truth video measured as if it were the output,
    # and as its own source, reads exactly as the truth video against its own neutral.
    from pipeline.lipsync_eval import dub_figures
    from stages.face.tracker import FaceTracker

    row = rows[0]
    with FaceTracker(smoothing_sigma_frames=0, max_gap_frames=0) as tracker:
        f = dub_figures(row["truth_video"], row["truth"], row["truth_video"], tracker=tracker,
                        source_video=row["truth_video"], source_truth_json=row["truth"])
        g = dub_figures(row["truth_video"], row["truth"], row["truth_video"], tracker=tracker,
                        source_video=row["video_uri"], source_truth_json=row["source_truth"])
    assert f["source_neutral_opening"] == f["neutral_opening"] > 0
    assert f["silent_over_source_neutral"] == pytest.approx(1 + f["silent_relative_to_neutral"])
    assert f["silent_over_source_neutral"] == pytest.approx(1 + f["truth_video_silent_relative_to_neutral"])
    assert f["silent_frame_ratios_source"] == pytest.approx(f["silent_frame_ratios"])
    assert len(f["silent_frame_ratios"]) == len(f["truth_video_silent_frame_ratios"]) > 0
    # The other clip's own closed mouth: a neutral of its own, the same silent frames over it.
    assert g["source_neutral_opening"] > 0 and g["neutral_opening"] == f["neutral_opening"]
    np.testing.assert_allclose(np.asarray(g["silent_frame_ratios_source"]) * g["source_neutral_opening"],
                               np.asarray(f["silent_frame_ratios"]) * f["neutral_opening"], rtol=1e-9)
