"""A synthetic talking-head training corpus whose mouth is a known function of the speech.

`make_synth_corpus` speaks sentences with espeak-ng (several voices and rates), computes
the per-frame mouth ground truth with `stages.synth.speaker.mouth_track` and renders a face
photograph whose real mouth follows it (`render_frame`). Several speakers differ by their
look (colour, scale, mirroring, background, head sway) and voice, so a split by speaker is
meaningful. Layout under `folder`:

    videos/<clip>.mp4         25 fps H.264 (libx264, yuv420p), no audio stream
    audio/<clip>.wav          16 kHz mono 16-bit PCM, a whole number of 40 ms frames long
    truth/<clip>.truth.json   per-frame jaw, width (and their parts loud, openness, spread),
                              is_silent, bilabial; phonemes, text, voice, rate, formulas version
    corpus.parquet            video_uri, audio_uri, speaker_id (what `imgtalk prepare --corpus` reads)
    speakers.json             each speaker's identity and voice

Every frame count agrees: truth rows == video frames == round(audio seconds * 25).
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import av
import numpy as np

from stages.synth.speaker import (FORMULAS_VERSION, FPS, SAMPLE_RATE, SpeakerIdentity, mouth_track, quantize,
                                  render_frame, speak, write_wav)

SENTENCES = (
    "Papa bought a big blue boat.",
    "My mother made a marmalade pie.",
    "We keep the green fields clean.",
    "Who knew the blue moon would bloom?",
    "Bob may buy more maps in March.",
    "She sees three sheep by the sea.",
    "Put the pen back on the bench, please.",
    "A warm wind moved over the lake at noon.",
    "Please pass me the bread and the butter.",
    "Every evening we watch the boats come home.",
    "The baby smiled at the bubbles.",
    "Open the window and breathe the morning air.",
)
# Never spoken in a training corpus: the dubbed tracks of the demo and of the learning checks.
HELDOUT_SENTENCES = (
    "Many people walk to the market on Monday.",
    "The big brown dog jumped over a puddle.",
    "Bring me a cup of warm milk, my friend.",
    "Open your mouth wide and say aah.",
    "Maybe the rain will stop before the evening.",
    "A small boy played a tune on his pipe.",
)
VOICES = ("en-us", "en-gb", "en-gb+f3", "en-us+m3", "en-gb+f2", "en-us+f4")
RATES = (135, 185)  # words per minute, drawn per clip
LEAD_S, TAIL_S = 0.24, 0.24  # silence around each sentence (the mouth is closed there)


def _layout(folder: str) -> dict[str, str]:
    folder = os.path.abspath(folder)
    dirs = {k: os.path.join(folder, k) for k in ("videos", "audio", "truth")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    return {"folder": folder, **dirs}


def _pad_wave(wave: np.ndarray) -> np.ndarray:
    """Lead and tail silence, then zeros up to a whole number of video frames."""
    hop = SAMPLE_RATE // FPS
    lead, tail = int(round(LEAD_S * SAMPLE_RATE)), int(round(TAIL_S * SAMPLE_RATE))
    n = lead + len(wave) + tail
    n = -(-n // hop) * hop
    out = np.zeros(n, dtype=np.float32)
    out[lead:lead + len(wave)] = wave
    return out


def write_video(path: str, frames_iter, size: tuple[int, int]) -> int:
    """Encode RGB frames at 25 fps with libx264 and no audio stream; returns the count."""
    w, h = size
    count = 0
    with av.open(path, "w") as out:
        stream = out.add_stream("libx264", rate=Fraction(FPS))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        stream.thread_count = 1
        for rgb in frames_iter:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
            count += 1
        for packet in stream.encode():
            out.mux(packet)
    return count


def _round(xs, nd=5) -> list:
    return [round(float(x), nd) for x in xs]


def make_synth_corpus(folder: str, speakers: int = 4, sentences_per_speaker: int = 3, seed: int = 0,
                      size: tuple[int, int] = (320, 240), face_image: np.ndarray | str | None = None,
                      heldout: bool = False) -> dict:
    """Render the corpus under `folder` (layout in the module docstring); returns
    {"folder", "corpus", "speakers", "clips": [{clip, speaker_id, video, audio, truth, frames}], "seconds"}.
    heldout: speak HELDOUT_SENTENCES, never SENTENCES (for checks on sentences never trained on);
    the speakers (looks and voices) are the same as the training corpus's with the same seed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if speakers < 1 or sentences_per_speaker < 1:
        raise ValueError("synth corpus: speakers and sentences_per_speaker must be >= 1")
    w, h = size
    if w % 2 or h % 2 or w < 64 or h < 64:
        raise ValueError(f"synth corpus: size {size} must be even and at least 64x64 (yuv420p)")
    face = _load_face(face_image)
    paths = _layout(folder)
    started = time.perf_counter()
    rows, clips, speaker_meta, plan = [], [], [], []
    for k in range(speakers):
        rng = np.random.default_rng([int(seed), k, 0xC0])
        identity = SpeakerIdentity.from_seed(seed, k)
        voice = VOICES[(k + int(seed)) % len(VOICES)]
        speaker_id = f"synth{int(seed)}_spk{k:02d}"
        texts = HELDOUT_SENTENCES if heldout else SENTENCES
        picks = rng.permutation(len(texts))
        speaker_meta.append({"speaker_id": speaker_id, "voice": voice, "identity": identity.as_dict()})
        for j in range(sentences_per_speaker):
            text = texts[int(picks[j % len(texts)])]
            rate = int(rng.integers(RATES[0], RATES[1] + 1))
            plan.append((speaker_id, identity, voice, f"{speaker_id}_{'h' if heldout else 's'}{j:02d}", text, rate))
    # each utterance is spoken in its own process (see stages.synth.speaker.speak): run a few at once
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        speeches = list(pool.map(lambda p: speak(p[4], p[2], p[5]), plan))
    for (speaker_id, identity, voice, clip, text, rate), speech in zip(plan, speeches):
        wave = _pad_wave(speech.wave)
        wave = quantize(wave).astype(np.float32) / 32768.0  # exactly what the wav file holds
        phonemes = None
        if speech.phonemes is not None:
            phonemes = [(round(t + LEAD_S, 4), m) for t, m in speech.phonemes]
        truth = mouth_track(wave, FPS, phonemes)
        n = truth["frames"]
        video = os.path.join(paths["videos"], f"{clip}.mp4")
        audio = os.path.join(paths["audio"], f"{clip}.wav")
        truth_path = os.path.join(paths["truth"], f"{clip}.truth.json")
        write_wav(audio, wave)
        frames = (render_frame(face, identity, float(truth["jaw"][i]), float(truth["width"][i]), i / FPS, size)
                  for i in range(n))
        written = write_video(video, frames, size)
        assert written == n
        doc = {
            "clip": clip, "speaker_id": speaker_id, "text": text, "voice": voice, "rate_wpm": rate,
            "fps": FPS, "sample_rate": SAMPLE_RATE, "frames": n, "audio_samples": int(len(wave)),
            "size": [w, h], "formulas_version": FORMULAS_VERSION, "speech_source": speech.source,
            "phonemes": None if phonemes is None else [[t, m] for t, m in phonemes],
            "jaw": _round(truth["jaw"]), "width": _round(truth["width"]),
            "loud": _round(truth["loud"]), "openness": _round(truth["openness"]), "spread": _round(truth["spread"]),
            "is_silent": [bool(x) for x in truth["is_silent"]],
            "bilabial": [bool(x) for x in truth["bilabial"]],
            "identity": identity.as_dict(),
        }
        with open(truth_path, "w") as f:
            json.dump(doc, f, indent=None, separators=(",", ":"))
        rows.append({"video_uri": video, "audio_uri": audio, "speaker_id": speaker_id})
        clips.append({"clip": clip, "speaker_id": speaker_id, "video": video, "audio": audio,
                      "truth": truth_path, "frames": n, "speech_source": speech.source})
    corpus = os.path.join(paths["folder"], "corpus.parquet")
    table = pa.table({k: pa.array([r[k] for r in rows], pa.string()) for k in ("video_uri", "audio_uri", "speaker_id")})
    pq.write_table(table, corpus)
    speakers_json = os.path.join(paths["folder"], "speakers.json")
    with open(speakers_json, "w") as f:
        json.dump({"seed": int(seed), "formulas_version": FORMULAS_VERSION, "speakers": speaker_meta}, f, indent=1)
    return {"folder": paths["folder"], "corpus": corpus, "speakers": speakers_json, "clips": clips,
            "seconds": round(time.perf_counter() - started, 2)}


def _load_face(face_image) -> np.ndarray | None:
    if face_image is None:
        return None
    if isinstance(face_image, str):
        import cv2

        bgr = cv2.imread(face_image, cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"synth corpus: cannot read the face image {face_image}")
        img = np.ascontiguousarray(bgr[:, :, ::-1])
    else:
        img = np.asarray(face_image)
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"synth corpus: the face image must be HxWx3 uint8 RGB, got {img.shape} {img.dtype}")
        img = img.copy()
    img.flags.writeable = False  # render_frame then hashes it once, not per frame
    return img
