"""Any audio a user may hand us -> mono float32 at 16 kHz, with errors that name the file.

PyAV (FFmpeg) decodes every container and codec we meet (wav, flac, mp3, aac/m4a, the
audio stream of a video) and its `AudioResampler` (swresample) converts to 16 kHz mono
float. The resampler is flushed at the end, so its filter delay costs no samples: a
clip of D seconds comes back as round(D * 16000) samples (±1).

Time axis: sample i of the result is at i / sample_rate seconds on the container's clock,
counted from the container's start (the earliest stream). Audio that starts after the
video is therefore preceded by silence, so feature frame j lines up with the video frames
at [j/25, (j+1)/25). Gaps inside a stream are not filled.

Two decoder quirks are handled:
- AAC pads its last 1024-sample frame; when the stream declares its exact duration
  (mp4/m4a do), the padding is cut so the length matches the duration.
- swresample's stereo -> mono downmix sums the channels at -3 dB, 0.707 * (L + R), so
  loud in-phase stereo can exceed 1.0. We clip to [-1, 1]; HuBERT normalises the level
  of the whole utterance anyway, and only samples that were over full scale change.
"""
from __future__ import annotations

import io
import os
from typing import BinaryIO, Union

import av
import numpy as np

SAMPLE_RATE = 16000

# AAC's trailing padding is at most one 1024-sample frame (2 for HE-AAC's 2048).
_MAX_CODEC_PADDING_SOURCE_SAMPLES = 2048

AudioSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]


class AudioError(ValueError):
    """An audio source is missing, corrupt, empty, or has no audio stream."""


def _describe(source: AudioSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return str(getattr(source, "name", "<file-like object>"))


def _open(source: AudioSource) -> tuple[av.container.InputContainer, str]:
    name = _describe(source)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if "://" in path:
            raise AudioError(f"{path}: only local files are read here; fetch remote URIs first")
        if not os.path.exists(path):
            raise AudioError(f"{path}: no such file")
        if os.path.isdir(path):
            raise AudioError(f"{path}: is a directory, not an audio file")
        target = path
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise AudioError(f"{name}: empty input")
        target = io.BytesIO(bytes(source))
    elif hasattr(source, "read"):
        target = source
    else:
        raise AudioError(f"{name}: expected a path, bytes or a binary file object, got {type(source).__name__}")
    try:
        container = av.open(target, mode="r")
    except av.error.FFmpegError as e:
        raise AudioError(f"{name}: not a readable media file ({e})") from e
    return container, name


def _audio_stream(container, name: str):
    if not container.streams.audio:
        container.close()
        raise AudioError(f"{name}: no audio stream")
    return container.streams.audio[0]


def _seconds(value, time_base) -> float | None:
    if value is None or time_base is None:
        return None
    return float(value * time_base)


def _container_start(container) -> float:
    # container.start_time is in AV_TIME_BASE (microseconds); None for raw wav.
    return container.start_time / av.time_base if container.start_time is not None else 0.0


def lead_seconds(container, first_frame_time: float | None) -> float:
    """Silence before a stream's first decoded sample on the container's clock: how far
    it starts after the container does (the earliest stream, e.g. a video at 0 with its
    audio at 0.5 s). Never negative: a stream that starts before the container's start is
    not cut. The mux (stages.media.mux) pads the dub by the same amount, so the output's
    audio lines up with these features."""
    if first_frame_time is None:
        return 0.0
    return max(0.0, first_frame_time - _container_start(container))


def _declared_end(container, stream) -> float | None:
    """Where the audio stream says it ends, on the container's clock, or None."""
    duration = _seconds(stream.duration, stream.time_base)
    if duration is None:
        return None
    start = _seconds(stream.start_time, stream.time_base)
    start = start if start is not None else _container_start(container)
    return start - _container_start(container) + duration


def _decode(container, stream, name: str, sample_rate: int) -> np.ndarray:
    resampler = None
    resampler_input = None
    pieces: list[np.ndarray] = []
    first_time = None
    try:
        for frame in container.decode(stream):
            if first_time is None and frame.time is not None:
                first_time = frame.time
            # swresample is set up for one input format; a mid-stream change (rare, e.g.
            # concatenated broadcasts) gets a fresh resampler after flushing the old one.
            frame_input = (frame.format.name, frame.layout.name, frame.sample_rate)
            if frame_input != resampler_input:
                if resampler is not None:
                    pieces += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
                resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
                resampler_input = frame_input
            pieces += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
        if resampler is not None:
            pieces += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    except av.error.FFmpegError as e:
        raise AudioError(f"{name}: corrupt audio stream ({e})") from e
    if sum(len(p) for p in pieces) == 0:
        raise AudioError(f"{name}: audio stream holds no samples")
    waveform = np.concatenate(pieces).astype(np.float32, copy=False)

    lead_samples = int(round(lead_seconds(container, first_time) * sample_rate))
    if lead_samples > 0:
        waveform = np.concatenate([np.zeros(lead_samples, np.float32), waveform])

    end = _declared_end(container, stream)
    if end is not None:
        expected = int(round(end * sample_rate))
        surplus = len(waveform) - expected
        if 0 < surplus <= _MAX_CODEC_PADDING_SOURCE_SAMPLES * sample_rate / stream.rate:
            waveform = waveform[:expected]
    return np.clip(waveform, -1.0, 1.0)


def load_audio(source: AudioSource, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode the first audio stream of `source` to mono float32 in [-1, 1] at `sample_rate`.

    `source` is a local path, the file's bytes, or a binary file object. Raises AudioError
    naming the file when it is missing, unreadable, corrupt, has no audio stream or no
    audio samples.
    """
    container, name = _open(source)
    with container:
        return _decode(container, _audio_stream(container, name), name, sample_rate)


def audio_duration(source: AudioSource) -> float:
    """Length in seconds of the first audio stream, as `load_audio` would return it.

    Reads container metadata when the stream declares its duration; otherwise decodes.
    """
    container, name = _open(source)
    with container:
        stream = _audio_stream(container, name)
        end = _declared_end(container, stream)
        if end is not None and end > 0:
            return end
        return len(_decode(container, stream, name, SAMPLE_RATE)) / SAMPLE_RATE
