"""A synthetic talking head whose mouth is a documented, deterministic function of its speech.

Used to prove that the models learn the audio -> mouth mapping (issue "Prove it learns"):
the ground truth (`mouth_track`) is computed from the waveform (and espeak-ng's phoneme
timings) by the fixed formulas below, and `render_frame` moves the REAL mouth of a face
photograph (skimage's astronaut by default) to that ground truth with a smooth geometric
warp, so a model that learns lip-sync from these clips must learn these formulas.

Ground truth, per 25 fps video frame i (samples [640 i, 640 (i+1)) of the 16 kHz wave),
FORMULAS_VERSION "synth-mouth-v2"; S(.) below is the 3-tap smoothing over frames
S(a)_i = 0.25 a_{i-1} + 0.5 a_i + 0.25 a_{i+1} (zero outside the clip):

  band      y = 4th-order Butterworth band-pass 300-3000 Hz of the wave, zero-phase (sosfiltfilt)
  level     L_i = 10 log10(S(e)_i + 1e-12), e_i = mean(y[640 i : 640 (i+1)]^2)  (last frame
            zero-padded) [dB re full scale^2]
  reference R = max_i L_i (the clip's loudest frame); floor F = max(R - 30 dB, -70 dB)
  loud      clip((L_i - F) / (R - 3 dB - F), 0, 1): 0 at or below the floor (so silence,
            espeak's digital silence in particular, is exactly 0), 1 within 3 dB of the
            loudest frame, linear in dB between.
  spectrum  P_i(f) = |rfft(hann(640) * x[640 i : 640 (i+1)], 1024)|^2; band sums
            B_i[a, b] = S(sum_{a <= f <= b} P(f))_i
  openness  o_i = clip((log10(B_i[550, 1100] / B_i[200, 4000]) + 2.0) / 1.7, 0, 1): the share
            of the first-formant region of open vowels; ~1 for /a/, /O/, /V/, ~0 for /i/, /u/
            (0 where B_i[200, 4000] = 0)
  jaw_raw   loud_i * (0.45 + 0.55 o_i)
  is_silent loud_i == 0
  closure   when phoneme events are given: each p, b or m phoneme lasts from its start to
            the next phoneme's start (or +80 ms when last); every frame whose centre
            (i + 0.5)/25 s lies in that interval gets jaw 0 (lips pressed), and when no
            centre does, the frame containing the interval's midpoint does.
  jaw       jaw_raw with the closures applied: 0 = closed, 1 = wide open.
  spread    w_i = clip((log10(B_i[1500, 4000] / B_i[200, 4000]) + 1.5) / 1.1, 0, 1): the
            high-frequency share, high for /i/, /e/ (high second formant), low for /u/, /o/
            (measured on espeak's he/hay vs who/hoe/hood)
  width     0.5 + (w_i - 0.5) * clip(loud_i / 0.25, 0, 1): lip spreading, neutral 0.5 in
            silence, departing from it only as the sound becomes audible.

Rendering (`render_frame`, geometry in source-image pixels, W = mouth-corner distance):
the inner lips' upper and lower contours of the source are read from mediapipe's face mesh
(cached per image). The output's upper inner-lip edge is lifted by 0.08 W jaw and the
lower one placed 0.42 W jaw below the source's upper edge, both times a lens profile
(1 - (u/h)^2)^0.7 across the mouth (h = half the output mouth width), so jaw 0 presses the
lips together (closing the astronaut's own parted smile) and jaw 1 opens them by 0.5 W.
The lower lip moves rigidly with its edge; below it the displacement blends (smoothstep
over the lip-to-chin distance) into the jaw's, (jaw - jaw_src) 0.42 W times a broad
profile across the face, which fades out under the chin, so the chin drops with the jaw.
The mouth's half-width is W/2 (1 + 0.3 (width - 0.5) - 0.06 jaw), corners moving out with
width and the skin around them following. The gap between the lips is shaded as a mouth
cavity (dark red, darker towards the back, a band of upper teeth under the upper lip, a
lighter tongue at the bottom), feathered over one output pixel. Head sway is a small
rotation (<= 3 deg), zoom (<= 2.4 %) and translation (<= 2.4 % of the frame) that depend on
time and the identity only. A `SpeakerIdentity` (seed-derived) sets per-channel colour
gains, the face's scale (its width is 0.36 of the frame height times 0.9-1.12), mirroring
and a background colour that replaces 75 % of the image outside a soft head-and-shoulders
region. The face sits upright in the frame (the source's roll is undone).

Measured (tests/test_synth_corpus.py, and mediapipe on the default 4-speaker corpus after
H.264): the tracker's inner-lip gap (mesh 13-14) over face height follows jaw with Pearson
r 0.99 on a jaw sweep and 0.965-0.991 per clip; mouth-corner distance follows width with
r 0.80-0.94; the eyes change by < 0.5 grey levels on average between jaw 0 and 1.

Speech: libespeak-ng is global and stateful (pitch flutter, noise), so the same utterance
spoken twice in one process differs by a few samples; `speak` therefore runs each
utterance in a fresh Python process (`python speaker.py --espeak-worker`), which makes the
corpus deterministic.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import threading
import wave as wavelib
from dataclasses import dataclass, field

import numpy as np

FORMULAS_VERSION = "synth-mouth-v2"
SAMPLE_RATE = 16000
FPS = 25
BILABIALS = frozenset({"p", "b", "m"})

# jaw / width formula constants (see the module docstring)
BAND_HZ = (300.0, 3000.0)
RANGE_DB = 30.0
HEADROOM_DB = 3.0
ABS_FLOOR_DB = -70.0
SPECTRUM_HZ = (200.0, 4000.0)
OPEN_HZ, OPEN_LOG_LO, OPEN_LOG_SPAN = (550.0, 1100.0), -2.0, 1.7
SPREAD_HZ, SPREAD_LOG_LO, SPREAD_LOG_SPAN = (1500.0, 4000.0), -1.5, 1.1
JAW_BASE = 0.45
LAST_PHONEME_S = 0.08

# render constants (fractions of the mouth-corner distance W)
K_UP, K_LO = 0.08, 0.42
K_WIDTH, K_JAW_NARROW = 0.30, 0.06


class SynthError(RuntimeError):
    pass


class UnknownVoiceError(SynthError):
    """libespeak-ng works but has no such voice: a caller's mistake, not a reason to fall
    back to the CLI (which would quietly pick some other language's voice)."""


# ---------------------------------------------------------------------------------------------
# Ground truth from speech
# ---------------------------------------------------------------------------------------------

def frame_count(num_samples: int, fps: int = FPS, sample_rate: int = SAMPLE_RATE) -> int:
    return int(round(num_samples / sample_rate * fps))


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _smooth3(a: np.ndarray) -> np.ndarray:
    ext = np.concatenate([[0.0], a, [0.0]])
    return 0.25 * ext[:-2] + 0.5 * ext[1:-1] + 0.25 * ext[2:]


def is_bilabial(mnemonic: str) -> bool:
    return mnemonic.strip("#-:;'`,!_") in BILABIALS


def mouth_track(wave_16k: np.ndarray, fps: int = FPS, phonemes=None) -> dict:
    """Per-frame ground truth of the mouth for a 16 kHz mono wave (formulas in the module
    docstring). phonemes: [(start_s, mnemonic), ...] from `espeak_phonemes`, or None.

    Returns {"fps", "frames", "jaw", "width", "jaw_raw", "loud", "openness", "spread",
    "is_silent", "bilabial", "level_db", "formulas_version"}; arrays have one row per frame,
    round(duration * fps) rows."""
    from scipy.signal import butter, sosfiltfilt

    x = np.asarray(wave_16k, dtype=np.float64).reshape(-1)
    hop = SAMPLE_RATE / fps
    if abs(hop - round(hop)) > 1e-9:
        raise ValueError(f"synth/speaker.py: fps {fps} must divide {SAMPLE_RATE}")
    hop = int(round(hop))
    n = frame_count(len(x), fps)
    padded = np.zeros(n * hop + hop, dtype=np.float64)
    padded[:len(x)] = x[:len(padded)]
    if len(x) > 27:
        sos = butter(4, BAND_HZ, btype="bandpass", fs=SAMPLE_RATE, output="sos")
        y = np.zeros_like(padded)
        y[:len(x)] = sosfiltfilt(sos, x)[:len(padded)]
    else:
        y = padded
    frames_y = y[:n * hop].reshape(n, hop)
    level = 10.0 * np.log10(_smooth3((frames_y ** 2).mean(1)) + 1e-12)
    ref = float(level.max()) if n else 0.0
    floor = max(ref - RANGE_DB, ABS_FLOOR_DB)
    span = max(ref - HEADROOM_DB - floor, 1e-6)
    loud = np.clip((level - floor) / span, 0.0, 1.0) if ref > floor else np.zeros(n)
    is_silent = loud <= 0.0

    frames_x = padded[:n * hop].reshape(n, hop) * np.hanning(hop)[None, :]
    spec = np.abs(np.fft.rfft(frames_x, n=1024, axis=1)) ** 2
    freqs = np.fft.rfftfreq(1024, 1.0 / SAMPLE_RATE)

    def band(lo, hi):
        return _smooth3(spec[:, (freqs >= lo) & (freqs <= hi)].sum(1))

    total = band(*SPECTRUM_HZ)
    ok = total > 0

    def log_share(lo, hi, log_lo, log_span):
        share = np.where(ok, band(lo, hi) / np.where(ok, total, 1.0), 0.0)
        return np.where(ok, np.clip((np.log10(np.maximum(share, 1e-12)) - log_lo) / log_span, 0.0, 1.0), 0.0)

    openness = log_share(*OPEN_HZ, OPEN_LOG_LO, OPEN_LOG_SPAN)
    spread = np.where(ok, log_share(*SPREAD_HZ, SPREAD_LOG_LO, SPREAD_LOG_SPAN), 0.5)
    jaw_raw = loud * (JAW_BASE + (1.0 - JAW_BASE) * openness)
    width = 0.5 + (spread - 0.5) * np.clip(loud / 0.25, 0.0, 1.0)

    jaw = jaw_raw.copy()
    bilabial = np.zeros(n, dtype=bool)
    if phonemes:
        events = sorted((float(t), str(m)) for t, m in phonemes)
        centres = (np.arange(n) + 0.5) / fps
        for k, (start, name) in enumerate(events):
            if not is_bilabial(name):
                continue
            end = events[k + 1][0] if k + 1 < len(events) else start + LAST_PHONEME_S
            end = max(end, start + 1e-3)
            hit = (centres >= start) & (centres < end)
            if not hit.any():
                i = int(math.floor((start + end) / 2 * fps))
                if 0 <= i < n:
                    hit[i] = True
            bilabial |= hit
        jaw[bilabial] = 0.0
    return {
        "fps": fps,
        "frames": n,
        "jaw": jaw.astype(np.float32),
        "width": width.astype(np.float32),
        "jaw_raw": jaw_raw.astype(np.float32),
        "loud": loud.astype(np.float32),
        "openness": openness.astype(np.float32),
        "spread": spread.astype(np.float32),
        "is_silent": is_silent,
        "bilabial": bilabial,
        "level_db": level.astype(np.float32),
        "formulas_version": FORMULAS_VERSION,
    }


# ---------------------------------------------------------------------------------------------
# espeak-ng: speech and phoneme timings
# ---------------------------------------------------------------------------------------------

class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", _EventId)]


class _VoiceSpec(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("languages", ctypes.c_void_p), ("identifier", ctypes.c_char_p),
                ("gender", ctypes.c_ubyte), ("age", ctypes.c_ubyte), ("variant", ctypes.c_ubyte),
                ("xx1", ctypes.c_ubyte), ("score", ctypes.c_int), ("spare", ctypes.c_void_p)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INIT_PHONEME_EVENTS = 0x0001
_INIT_DONT_EXIT = 0x8000
_EVENT_LIST_TERMINATED, _EVENT_PHONEME = 0, 7
_POS_CHARACTER, _CHARS_UTF8 = 1, 1
_PARAM_RATE = 1


def _libespeak_synth(text: str, voice: str, rate: int) -> tuple[int, bytes, list[tuple[int, str]]]:
    """(sample rate, int16 PCM bytes, [(start ms, mnemonic)]) from libespeak-ng through ctypes:
    initialised with espeakINITIALIZE_PHONEME_EVENTS and synchronous output, a synth callback
    collecting the audio and the espeakEVENT_PHONEME events (type 7; mnemonic in id.string,
    start in audio_position ms). Raises SynthError. Call it in a fresh process (`speak` does):
    the library keeps state between utterances (its pitch flutter and noise), so a second
    utterance in one process differs by a few samples from the same one spoken first."""
    name = ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError as e:
        raise SynthError(f"cannot load libespeak-ng ({e})") from e
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
    lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_VoiceSpec))
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                 ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    sample_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, None, _INIT_PHONEME_EVENTS | _INIT_DONT_EXIT)
    if sample_rate <= 0:
        raise SynthError(f"espeak_Initialize failed ({sample_rate})")
    chunks: list[bytes] = []
    events: list[tuple[int, str]] = []

    def on_synth(wav, count, evs) -> int:
        if count > 0 and wav:
            chunks.append(ctypes.string_at(wav, 2 * count))
        i = 0
        while evs[i].type != _EVENT_LIST_TERMINATED:
            if evs[i].type == _EVENT_PHONEME:
                events.append((int(evs[i].audio_position), evs[i].id.string.decode("ascii", "replace")))
            i += 1
        return 0

    callback = _CALLBACK(on_synth)
    lib.espeak_SetSynthCallback(callback)
    if lib.espeak_SetVoiceByName(voice.encode()) != 0:
        # a language code ("en-gb", "en-gb+f3") rather than a voice name: the best-priority
        # espeak (not MBROLA) voice that lists that language, with the variant kept
        base, plus, variant = voice.partition("+")
        ident = _voice_for_language(lib, base.lower())
        if ident is None or lib.espeak_SetVoiceByName((ident + plus + variant).encode()) != 0:
            raise UnknownVoiceError(f"libespeak-ng has no voice {voice!r}")
    if lib.espeak_SetParameter(_PARAM_RATE, int(rate), 0) != 0:
        raise SynthError(f"libespeak-ng refused rate {rate}")
    data = text.encode("utf-8") + b"\0"
    err = lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
    if err != 0:
        raise SynthError(f"espeak_Synth failed ({err})")
    lib.espeak_Synchronize()
    if not chunks:
        raise SynthError("espeak_Synth produced no audio")
    return sample_rate, b"".join(chunks), events


def _voice_for_language(lib, language: str) -> str | None:
    voices = lib.espeak_ListVoices(None)
    best = None
    i = 0
    while voices[i]:
        v = voices[i].contents
        i += 1
        ident = (v.identifier or b"").decode("utf-8", "replace")
        if not v.languages or ident.startswith("mb/"):
            continue
        p = v.languages
        while True:  # (priority byte, language, NUL)*, then a 0 priority byte
            priority = ctypes.string_at(p, 1)[0]
            if priority == 0:
                break
            lang = ctypes.string_at(p + 1)
            if lang.decode("ascii", "replace").lower() == language and (best is None or priority < best[0]):
                best = (priority, ident)
            p += 2 + len(lang)
    return None if best is None else best[1]


def _worker_main() -> None:
    """`python speaker.py --espeak-worker`: one utterance from libespeak-ng in a fresh process.
    stdin: {"text", "voice", "rate"} JSON; stdout: one JSON header line, then int16 PCM."""
    import json
    import sys

    req = json.loads(sys.stdin.read())
    out = sys.stdout.buffer
    try:
        rate, pcm, events = _libespeak_synth(req["text"], req["voice"], int(req["rate"]))
    except SynthError as e:
        out.write((json.dumps({"error": str(e), "unknown_voice": isinstance(e, UnknownVoiceError)}) + "\n").encode())
    else:
        out.write((json.dumps({"sample_rate": rate, "events": events, "bytes": len(pcm)}) + "\n").encode() + pcm)
    out.flush()


@dataclass
class Speech:
    wave: np.ndarray  # float32 mono, 16 kHz
    phonemes: list[tuple[float, str]] | None  # (start seconds, espeak mnemonic); None without the library
    source: str  # "libespeak-ng" or "espeak-ng CLI (no phoneme events): <why>"
    voice: str = ""
    rate: int = 0
    meta: dict = field(default_factory=dict)


def _resample(x: np.ndarray, rate: int) -> np.ndarray:
    if rate == SAMPLE_RATE:
        return x.astype(np.float32)
    import soxr

    return soxr.resample(x.astype(np.float32), rate, SAMPLE_RATE, quality="HQ").astype(np.float32)


def read_wav(path: str) -> tuple[np.ndarray, int]:
    with wavelib.open(path, "rb") as f:
        if f.getsampwidth() != 2:
            raise SynthError(f"{path}: only 16-bit PCM wav is read here")
        raw = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
        channels, rate = f.getnchannels(), f.getframerate()
    x = raw.reshape(-1, channels).mean(1).astype(np.float32) / 32768.0
    return x, rate


def write_wav(path: str, wave_16k: np.ndarray) -> None:
    pcm = quantize(wave_16k)
    with wavelib.open(path, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(SAMPLE_RATE)
        f.writeframes(pcm.astype("<i2").tobytes())


def quantize(wave: np.ndarray) -> np.ndarray:
    """int16 PCM of a float wave (what the wav file will hold)."""
    return np.clip(np.round(np.asarray(wave, dtype=np.float64) * 32768.0), -32768, 32767).astype(np.int16)


def _library_speech(text: str, voice: str, rate: int) -> tuple[int, np.ndarray, list[tuple[int, str]]]:
    import json
    import sys

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PROJECT_ROOT, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--espeak-worker"],
                          input=json.dumps({"text": text, "voice": voice, "rate": int(rate)}).encode(),
                          capture_output=True, env=env, timeout=120)
    header, _, body = proc.stdout.partition(b"\n")
    if proc.returncode != 0 or not header:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        raise SynthError(f"libespeak-ng worker failed: {tail[0]}")
    meta = json.loads(header)
    if "error" in meta:
        raise (UnknownVoiceError if meta.get("unknown_voice") else SynthError)(meta["error"])
    if len(body) != meta["bytes"]:
        raise SynthError("libespeak-ng worker returned truncated audio")
    pcm = np.frombuffer(body, dtype="<i2").astype(np.float32) / 32768.0
    return int(meta["sample_rate"]), pcm, [(int(ms), str(m)) for ms, m in meta["events"]]


_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def speak(text: str, voice: str = "en-us", rate: int = 160) -> Speech:
    """Speech at 16 kHz with phoneme timings from libespeak-ng (spoken in a fresh process, so
    the same text, voice and rate always give the same samples); the espeak-ng CLI (no
    phonemes) only when the library call fails, which `source` then says."""
    try:
        native, wav, events = _library_speech(text, voice, rate)
        phonemes = [(ms / 1000.0, name) for ms, name in events]
        return Speech(_resample(wav, native), phonemes, "libespeak-ng", voice, rate,
                      {"native_sample_rate": native, "phoneme_events": len(phonemes)})
    except UnknownVoiceError:
        raise
    except (OSError, SynthError, subprocess.SubprocessError, ValueError) as e:
        why = f"{type(e).__name__}: {e}"
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SynthError(f"libespeak-ng failed ({why}) and the espeak-ng CLI is not installed "
                         "(apt-get install espeak-ng)")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "speech.wav")
        proc = subprocess.run([exe, "-v", voice, "-s", str(int(rate)), "-w", path, text], capture_output=True)
        if proc.returncode != 0 or not os.path.exists(path):
            raise SynthError(f"libespeak-ng failed ({why}) and so did the espeak-ng CLI: "
                             f"{proc.stderr.decode(errors='replace').strip() or proc.returncode}")
        x, native = read_wav(path)
    return Speech(_resample(x, native), None, f"espeak-ng CLI (no phoneme events): {why}", voice, rate,
                  {"native_sample_rate": native, "phoneme_events": 0})


def espeak_phonemes(text: str, voice: str = "en-us", rate: int = 160):
    """(wave float32 at 16 kHz, [(start_s, mnemonic), ...]) from libespeak-ng; phonemes is None
    when the library failed and the CLI spoke instead (use `speak` for the reason)."""
    s = speak(text, voice, rate)
    return s.wave, s.phonemes


# ---------------------------------------------------------------------------------------------
# Identity and rendering
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SpeakerIdentity:
    """How one synthetic speaker looks: per-channel colour gains, face scale in the frame,
    mirroring, a background colour, and the phases/amplitudes of the head sway."""

    colour_gain: tuple[float, float, float] = (1.0, 1.0, 1.0)
    scale: float = 1.0
    mirror: bool = False
    background: tuple[int, int, int] = (60, 90, 140)
    sway_phase: tuple[float, float, float, float] = (0.0, 1.0, 2.0, 3.0)
    sway_amp: float = 1.0

    @classmethod
    def from_seed(cls, seed: int, index: int = 0) -> "SpeakerIdentity":
        rng = np.random.default_rng([int(seed), int(index), 0x5e1f])
        gain = tuple(float(g) for g in np.round(1.0 + rng.uniform(-0.18, 0.18, 3), 4))
        scale = float(np.round(rng.uniform(0.9, 1.12), 4))
        mirror = bool((index + int(rng.integers(2))) % 2)
        background = tuple(int(c) for c in rng.integers(20, 236, 3))
        phase = tuple(float(p) for p in np.round(rng.uniform(0, 2 * math.pi, 4), 4))
        amp = float(np.round(rng.uniform(0.6, 1.2), 4))
        return cls(gain, scale, mirror, background, phase, amp)

    def as_dict(self) -> dict:
        return {"colour_gain": list(self.colour_gain), "scale": self.scale, "mirror": self.mirror,
                "background": list(self.background), "sway_phase": list(self.sway_phase), "sway_amp": self.sway_amp}


def default_face() -> np.ndarray:
    from skimage import data

    return data.astronaut()


_LANDMARKS: dict[str, np.ndarray] = {}
_LANDMARK_LOCK = threading.Lock()


_LAST_KEY: list = [None, None]  # [the array last hashed (kept alive, so its id stays unique), its key]


def _image_key(img: np.ndarray) -> str:
    if _LAST_KEY[0] is img and not img.flags.writeable:
        return _LAST_KEY[1]
    key = _image_key_uncached(img)
    if not img.flags.writeable:
        _LAST_KEY[:] = [img, key]
    return key


def _image_key_uncached(img: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(img).tobytes() + str(img.shape).encode()).hexdigest()


def face_landmarks(face_rgb: np.ndarray) -> np.ndarray:
    """(478, 2) mediapipe mesh of the face in an RGB image, computed once per image content."""
    key = _image_key(face_rgb)
    with _LANDMARK_LOCK:
        if key not in _LANDMARKS:
            from stages.face.tracker import FaceTracker

            with FaceTracker(smoothing_sigma_frames=0) as tracker:
                track = tracker([np.ascontiguousarray(face_rgb, dtype=np.uint8)])
            if not track.has_face[0]:
                raise SynthError("synth/speaker.py: mediapipe finds no face in the face image")
            _LANDMARKS[key] = track.landmarks[0].astype(np.float64)
        return _LANDMARKS[key]


UPPER_INNER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
LOWER_INNER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308)


@dataclass
class _FaceGeometry:
    centre: np.ndarray  # mouth centre (mean of 13, 14), source px
    ux: np.ndarray
    uy: np.ndarray
    mouth_w: float
    face_w: float
    face_centre: np.ndarray
    up_u: np.ndarray  # sorted u of the upper-inner contour
    up_v: np.ndarray
    lo_u: np.ndarray
    lo_v: np.ndarray
    v_chin: float
    v_nose: float
    gap0: float  # source inner-lip gap at the centre
    head_axes: tuple[float, float]

    def up(self, u):
        return np.interp(u, self.up_u, self.up_v)

    def lo(self, u):
        return np.interp(u, self.lo_u, self.lo_v)

    @property
    def jaw_src(self) -> float:
        return self.gap0 / ((K_UP + K_LO) * self.mouth_w)


def _geometry(lm: np.ndarray) -> _FaceGeometry:
    from stages.face.align import eye_lip_anchors

    eye_r, eye_l, lip = eye_lip_anchors(lm)
    uy = lip - (eye_r + eye_l) / 2
    uy = uy / np.linalg.norm(uy)
    ux = np.array([uy[1], -uy[0]])  # image-right when the face is upright (as in face/align.py)
    centre = (lm[13] + lm[14]) / 2

    def uv(idx):
        d = lm[list(idx)] - centre
        return d @ ux, d @ uy

    def contour(idx):
        u, v = uv(idx)
        order = np.argsort(u)
        return u[order], v[order]

    up_u, up_v = contour(UPPER_INNER)
    lo_u, lo_v = contour(LOWER_INNER)
    mouth_w = float(np.linalg.norm(lm[291] - lm[61]))
    face_w = float(abs((lm[454] - lm[234]) @ ux))
    v_chin = float((lm[152] - centre) @ uy)
    v_nose = float((lm[2] - centre) @ uy)
    gap0 = float(max(np.interp(0.0, lo_u, lo_v) - np.interp(0.0, up_u, up_v), 0.0))
    mesh = lm[:468]
    face_h = float(np.ptp((mesh - centre) @ uy))
    return _FaceGeometry(centre, ux, uy, mouth_w, face_w, mesh.mean(0), up_u, up_v, lo_u, lo_v,
                         v_chin, v_nose, gap0, (0.5 * face_w, 0.5 * face_h))


@dataclass
class _Prepared:
    image: np.ndarray  # identity-coloured, mirrored, background-blended source
    geo: _FaceGeometry


_PREPARED: dict[tuple, _Prepared] = {}


def _prepare(face_rgb: np.ndarray, identity: SpeakerIdentity) -> _Prepared:
    key = (_image_key(face_rgb), identity)
    hit = _PREPARED.get(key)
    if hit is not None:
        return hit
    lm = face_landmarks(face_rgb).copy()
    img = np.asarray(face_rgb, dtype=np.float32)
    if identity.mirror:
        img = img[:, ::-1]
        lm[:, 0] = face_rgb.shape[1] - 1 - lm[:, 0]
    geo = _geometry(lm)
    img = img * np.asarray(identity.colour_gain, dtype=np.float32)[None, None, :]
    # background: outside a soft head-and-shoulders region, mostly the identity's colour
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d = np.stack([xx - geo.face_centre[0], yy - geo.face_centre[1]], -1)
    a, b = geo.head_axes
    hu, hv = d @ geo.ux, d @ geo.uy
    head = ((hu / (1.55 * a)) ** 2 + ((hv + 0.25 * b) / (1.35 * b)) ** 2)
    torso = np.where(hv > 0.6 * b, (hu / (3.2 * a)) ** 2 + ((hv - 2.6 * b) / (2.2 * b)) ** 2, 9.0)
    r = np.minimum(head, torso)
    keep = 1.0 - _smoothstep((r - 0.8) / 0.5)
    bg = np.asarray(identity.background, dtype=np.float32)[None, None, :]
    mixed = keep[..., None] * img + (1 - keep[..., None]) * (0.25 * img + 0.75 * bg)
    prepared = _Prepared(np.clip(mixed + 0.5, 0, 255).astype(np.uint8), geo)
    if len(_PREPARED) > 64:
        _PREPARED.clear()
    _PREPARED[key] = prepared
    return prepared


def output_affine(geo: _FaceGeometry, identity: SpeakerIdentity, t: float, size: tuple[int, int]) -> np.ndarray:
    """(2,3) source -> output pixels: the face centred, its width 0.36 of the frame height
    times the identity's scale, with a gentle sway (rotation, zoom, translation) in time."""
    w, h = size
    ph, amp = identity.sway_phase, identity.sway_amp
    angle = amp * 2.5 * math.sin(2 * math.pi * 0.23 * t + ph[0])
    zoom = 1.0 + amp * 0.02 * math.sin(2 * math.pi * 0.17 * t + ph[1])
    tx = amp * 0.02 * w * math.sin(2 * math.pi * 0.29 * t + ph[2])
    ty = amp * 0.012 * h * math.sin(2 * math.pi * 0.37 * t + ph[3])
    s = identity.scale * zoom * 0.36 * h / geo.face_w
    # align the face's up axis with the image (undo its roll), then the sway
    roll = math.degrees(math.atan2(geo.uy[0], geo.uy[1]))
    import cv2

    M = cv2.getRotationMatrix2D((float(geo.face_centre[0]), float(geo.face_centre[1])), angle - roll, s)
    M[0, 2] += w / 2 - geo.face_centre[0] + tx
    M[1, 2] += 0.47 * h - geo.face_centre[1] + ty
    return M


def render_frame(face_rgb: np.ndarray | None, identity: SpeakerIdentity, jaw: float, width: float, t: float,
                 size: tuple[int, int] = (320, 240)) -> np.ndarray:
    """One HxWx3 uint8 RGB frame (size = (width, height)) of the face image with its real
    mouth warped to (jaw, width) and the head swayed at time t (see the module docstring)."""
    if face_rgb is None:
        face_rgb = _default_face_cached()
    prep = _prepare(face_rgb, identity)
    geo = prep.geo
    import cv2

    out_w, out_h = size
    jaw = float(np.clip(jaw, 0.0, 1.0))
    width = float(np.clip(width, 0.0, 1.0))
    M = output_affine(geo, identity, t, size)
    Minv = cv2.invertAffineTransform(M).tolist()  # python floats keep the grids float32
    px_per_src = math.sqrt(abs(np.linalg.det(M[:, :2])))

    # the whole frame by the affine; then the region the mouth warp affects (with a margin)
    # again, through the warp
    frame = cv2.warpAffine(prep.image, M, (out_w, out_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    W = geo.mouth_w
    fall = 0.6 * W + 2 * K_LO * W
    u_box = 0.65 * geo.face_w
    v_box = (geo.v_nose - 0.1 * W, geo.v_chin + K_LO * W + fall + 0.1 * W)
    corners = np.array([geo.centre + geo.ux * uu + geo.uy * vv for uu in (-u_box, u_box) for vv in v_box])
    oc = corners @ M[:, :2].T + M[:, 2]
    x0, y0 = np.maximum(np.floor(oc.min(0)).astype(int) - 1, 0)
    x1, y1 = np.minimum(np.ceil(oc.max(0)).astype(int) + 2, (out_w, out_h))
    if x1 > x0 and y1 > y0:
        gx, gy = np.meshgrid(np.arange(x0, x1, dtype=np.float32), np.arange(y0, y1, dtype=np.float32))
        c = geo.centre
        (a00, a01, a02), (a10, a11, a12) = Minv
        # output pixel -> source pixel by the inverse affine, relative to the mouth centre
        dx = a00 * gx + a01 * gy + (a02 - float(c[0]))
        dy = a10 * gx + a11 * gy + (a12 - float(c[1]))
        (ux0, ux1), (uy0, uy1) = geo.ux.tolist(), geo.uy.tolist()
        u = dx * ux0 + dy * ux1
        v = dx * uy0 + dy * uy1

        s = 1.0 + K_WIDTH * (width - 0.5) - K_JAW_NARROW * jaw
        hw = s * W / 2
        g_lip = np.clip(1.0 - (u / hw) ** 2, 0.0, None) ** 0.7
        g_jaw = np.exp(-(u / (0.42 * geo.face_w)) ** 4)
        # horizontal: stretch about the mouth centre, fading away from the mouth
        spread = np.exp(-((u / (1.1 * W)) ** 4 + ((v - 0.5 * geo.gap0) / (0.7 * W)) ** 4))
        u_in = u / (1.0 + (s - 1.0) * spread)

        up_in, lo_in = geo.up(u_in), geo.lo(u_in)
        gap_src = np.maximum(lo_in - up_in, 0.0)
        lift = K_UP * W * jaw
        upper_edge = up_in - lift * g_lip
        lower_edge = up_in + K_LO * W * jaw * g_lip

        # upper region: the upper lip lifts, fading towards the nose
        nose_span = max(up_in.min() - geo.v_nose, 1.0) if np.size(up_in) else 1.0
        rise = 1.0 - _smoothstep((upper_edge - v) / (0.9 * nose_span))
        v_upper = v + lift * g_lip * rise
        # lower region: the lower lip moves rigidly with its edge, blending into the jaw's
        # displacement by the chin, which fades out below it
        d_lip = lower_edge - (up_in + gap_src)  # = K_LO W jaw g_lip - gap_src
        d_jaw = (jaw - geo.jaw_src) * K_LO * W * g_jaw
        chin_span = max(geo.v_chin - float(np.interp(0.0, geo.lo_u, geo.lo_v)), 1.0)
        b = _smoothstep((v - lower_edge) / chin_span)
        chin_out = geo.v_chin + d_jaw
        f = 1.0 - _smoothstep((v - chin_out) / fall)
        d = (d_lip * (1 - b) + d_jaw * b) * f
        v_lower = v - d
        v_in = np.where(v <= upper_edge, v_upper, np.where(v >= lower_edge, v_lower, up_in))

        map_x = (c[0] + u_in * geo.ux[0] + v_in * geo.uy[0]).astype(np.float32)
        map_y = (c[1] + u_in * geo.ux[1] + v_in * geo.uy[1]).astype(np.float32)
        frame[y0:y1, x0:x1] = cv2.remap(prep.image, map_x, map_y, interpolation=cv2.INTER_LINEAR,
                                        borderMode=cv2.BORDER_REFLECT)

        # the cavity between the lips, feathered over one output pixel
        dist = np.minimum(v - upper_edge, lower_edge - v) * px_per_src
        alpha = np.where(g_lip > 0, np.clip(dist + 0.5, 0.0, 1.0), 0.0)
        rows, cols = np.nonzero(alpha > 0)
        if rows.size:
            r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
            sub = (slice(r0, r1), slice(c0, c1))
            ue, le, vv = upper_edge[sub], lower_edge[sub], v[sub]
            gap = np.maximum(le - ue, 1e-6)
            depth = np.clip((vv - ue) / gap, 0.0, 1.0)  # 0 at the upper lip, 1 at the lower
            colour = _cavity_colour(u[sub] / hw, depth, vv - ue, gap, W)
            colour *= np.asarray(identity.colour_gain, dtype=np.float32)[None, None, :]
            out = frame[y0 + r0:y0 + r1, x0 + c0:x0 + c1]
            a = alpha[sub][..., None].astype(np.float32)
            out[:] = np.clip(out.astype(np.float32) * (1 - a) + colour * a + 0.5, 0, 255).astype(np.uint8)
    return frame


def _cavity_colour(un, depth, below_upper, gap, W) -> np.ndarray:
    """Mouth-cavity RGB: dark red, darkest mid-way back, upper teeth under the upper lip, a
    lighter tongue at the bottom, darker towards the corners."""
    base = np.array([88.0, 30.0, 34.0], dtype=np.float32)
    corner = np.clip(1.0 - np.abs(un), 0.0, 1.0)[..., None]
    shade = 0.55 + 0.45 * (np.abs(depth - 0.45) / 0.55)[..., None]
    col = base * shade * (0.6 + 0.4 * corner)
    tongue = _smoothstep((depth - 0.62) / 0.38)[..., None] * (np.abs(un) < 0.75)[..., None]
    col = col * (1 - 0.7 * tongue) + np.array([150.0, 62.0, 66.0]) * 0.7 * tongue * (0.5 + 0.5 * corner)
    teeth_h = np.minimum(0.12 * W, 0.33 * gap)
    teeth = (1.0 - _smoothstep((below_upper - teeth_h) / np.maximum(0.35 * teeth_h, 0.3)))
    teeth = teeth * _smoothstep((0.62 - np.abs(un)) / 0.2) * _smoothstep(gap / (0.08 * W) - 0.5)
    teeth_col = np.array([212.0, 204.0, 188.0]) * (0.75 + 0.25 * corner)
    col = col * (1 - teeth[..., None]) + teeth_col * teeth[..., None]
    return col.astype(np.float32)


_DEFAULT_FACE = None


def _default_face_cached() -> np.ndarray:
    global _DEFAULT_FACE
    if _DEFAULT_FACE is None:
        face = np.ascontiguousarray(default_face())
        face.flags.writeable = False
        _DEFAULT_FACE = face
    return _DEFAULT_FACE


if __name__ == "__main__" and "--espeak-worker" in __import__("sys").argv:
    _worker_main()
