"""Join encoded segments without re-encoding, and put the dubbed audio beside the video:
in one streaming pass (mux_segments), or as two steps through a video-only file
(concat_segments, then mux_audio)."""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from .probe import MediaError, frame_rate_of, media_name, open_media, probe_video, video_stream_of


def _remove_partial(path: str) -> None:
    if os.path.exists(path):
        os.remove(path)


def _create_output(path: str, **options):
    try:
        return av.open(path, "w", **options)
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(f"output {path!r}: cannot be created ({exc})") from exc


def _stream_signature(stream, path: str) -> dict:
    """What must agree for packets of several files to share one stream (one avcC)."""
    ctx = stream.codec_context
    return {
        "codec": ctx.name,
        "size": (ctx.width, ctx.height),
        "pix_fmt": ctx.pix_fmt,
        "fps": frame_rate_of(stream, path),
        "extradata": bytes(ctx.extradata or b""),
    }


def concat_segments(segment_paths: list[str], out_path: str) -> None:
    """Stream-copy the segments' video packets, in list order, into one file.

    Each segment is re-timed onto the running timeline from its own first timestamp and
    frame count (so it does not matter where a segment's own timestamps start), pts and
    dts shifted alike. The segments must share codec, size, pixel format, frame rate and
    codec parameter sets (SegmentWriter with the same settings gives that), each must
    start with a keyframe, and dts must rise across joins; otherwise MediaError.
    """
    if not segment_paths:
        raise MediaError(f"concat {out_path!r}: no segments given")
    try:
        _concat(segment_paths, out_path)
    except (av.FFmpegError, OSError) as exc:
        _remove_partial(out_path)
        raise MediaError(f"concat {out_path!r}: writing failed ({exc})") from exc
    except BaseException:
        _remove_partial(out_path)
        raise


def _concat(segment_paths: list[str], out_path: str) -> None:
    out = _create_output(out_path)
    try:
        with open_media(segment_paths[0], "segment") as first:
            template = video_stream_of(first, segment_paths[0])
            reference = _stream_signature(template, segment_paths[0])
            out_stream = out.add_stream_from_template(template)
            out.start_encoding()
        for packet in _joined_packets(segment_paths, reference, out_stream):
            out.mux(packet)
    finally:
        out.close()


@contextlib.contextmanager
def _opened(source):
    """A segment source as open_media takes it: a path or file object as it is, or a
    callable's context manager (so a long list of remote segments is opened one by one)."""
    if callable(source):
        with source() as opened:
            yield opened
    else:
        yield source


def _joined_packets(sources: Iterable, reference: dict, out_stream) -> Iterator[av.Packet]:
    """The segments' video packets, in order, re-timed onto one timeline in out_stream's
    time base (the rules of concat_segments); their count so far is out_stream's frames."""
    fps = reference["fps"]
    out_tb = Fraction(out_stream.time_base)  # the muxer's choice, known after the header
    timeline = Fraction(0)  # seconds at which the next segment starts
    last_dts = None
    first_name = None
    for source in sources:
        with _opened(source) as opened, open_media(opened, "segment") as container:
            path = media_name(opened)
            first_name = first_name or path
            stream = video_stream_of(container, path)
            signature = _stream_signature(stream, path)
            for key, value in reference.items():
                if signature[key] != value:
                    shown = "codec parameter sets" if key == "extradata" else f"{signature[key]} vs {value}"
                    raise MediaError(f"segment {path!r}: {key} differs from {first_name!r} ({shown})")
            tb = Fraction(stream.time_base)
            origin = stream.start_time or 0
            n_packets = 0
            for packet in container.demux(stream):
                if packet.pts is None or packet.dts is None:
                    continue  # demuxer's end-of-stream flush packet
                if packet.is_discard:
                    continue  # hidden by an edit list: not a presented frame
                if n_packets == 0 and not packet.is_keyframe:
                    raise MediaError(f"segment {path!r}: does not start with a keyframe")
                pts = round((timeline + (packet.pts - origin) * tb) / out_tb)
                dts = round((timeline + (packet.dts - origin) * tb) / out_tb)
                if last_dts is not None and dts <= last_dts:
                    raise MediaError(
                        f"segment {path!r}: decode timestamps overlap the previous segment "
                        f"(encode segments without B-frames)"
                    )
                packet.pts, packet.dts = pts, dts
                packet.duration = round(1 / fps / out_tb)
                packet.time_base = out_tb
                packet.stream = out_stream
                last_dts = dts
                n_packets += 1
                yield packet
            if n_packets == 0:
                raise MediaError(f"segment {path!r}: has no video packets")
            timeline += Fraction(n_packets) / fps


def _with_dubbed_audio(audio_source, audio_name: str, out_path: str, mux):
    """mux(audio_in, audio_stream, layout) over the dubbed track's first audio stream; a
    failure leaves no partial file at out_path and names it."""
    audio_in = open_media(audio_source, "audio")
    try:
        if not audio_in.streams.audio:
            raise MediaError(f"audio {audio_name!r}: has no audio stream")
        audio_stream = audio_in.streams.audio[0]
        layout = "mono" if audio_stream.codec_context.channels == 1 else "stereo"
        try:
            return mux(audio_in, audio_stream, layout)
        except (av.FFmpegError, OSError) as exc:
            _remove_partial(out_path)
            raise MediaError(f"output {out_path!r}: muxing failed ({exc})") from exc
        except BaseException:
            _remove_partial(out_path)
            raise
    finally:
        audio_in.close()


@dataclass(frozen=True)
class MuxResult:
    audio_duration_s: float  # the dubbed audio as read
    video_duration_s: float  # n_frames / fps of the video
    padded_s: float  # silence appended to reach the video's duration
    trimmed_s: float  # audio cut off after the video's end


def mux_audio(
    video_path: str,
    audio_path: str,
    out_path: str,
    bitrate: int = 128_000,
    sample_rate: int = 48_000,
    rotation: int | None = None,
) -> MuxResult:
    """Copy the video stream of `video_path` (no re-encode) and add the dubbed audio of
    `audio_path` (any file PyAV reads; a video file's first audio stream) as AAC at
    `sample_rate`, exactly as long as the video: shorter audio is padded with silence,
    longer audio trimmed. The audio is aligned sample by sample from its first decoded
    sample to the video's first frame. Mono stays mono, anything else becomes stereo.
    Other streams of `video_path` (its old audio) are dropped. `rotation` (degrees
    counter-clockwise, VideoInfo.rotation) writes a display matrix; None keeps the
    video's own. The file goes to mp4 with the index up front (faststart) for streaming.
    """
    video_info = probe_video(video_path)
    video_duration = Fraction(video_info.n_frames) / video_info.fps
    target_samples = round(video_duration * sample_rate)

    result = _with_dubbed_audio(audio_path, audio_path, out_path, lambda audio_in, audio_stream, layout: _mux(
        video_path, audio_in, audio_stream, audio_path, out_path, layout, bitrate, sample_rate, target_samples, rotation))
    return MuxResult(
        audio_duration_s=result["in_samples"] / sample_rate,
        video_duration_s=float(video_duration),
        padded_s=max(0, target_samples - result["in_samples"]) / sample_rate,
        trimmed_s=max(0, result["in_samples"] - target_samples) / sample_rate,
    )


def _mux(video_path, audio_in, audio_stream, audio_path, out_path, layout, bitrate,
         sample_rate, target_samples, rotation) -> dict:
    stats = {"in_samples": 0}
    with open_media(video_path, "video") as video_in:
        video_stream = video_stream_of(video_in, video_path)
        out = _create_output(out_path, options={"movflags": "+faststart"})
        try:
            video_out = out.add_stream_from_template(video_stream)
            if rotation is not None:
                video_out.set_display_rotation(rotation)
            audio_out = out.add_stream("aac", rate=sample_rate, layout=layout)
            audio_out.bit_rate = bitrate

            # Interleave by time so a player streaming the file finds audio and video
            # together, instead of leaving it to the muxer's buffering.
            video_packets = _video_packets(video_in, video_stream, video_out)
            audio_frames = _fitted_audio(audio_in, audio_stream, audio_path, layout,
                                         sample_rate, target_samples, stats)
            audio_packets = _encoded(audio_frames, audio_out)
            for _, packet in heapq.merge(video_packets, audio_packets, key=lambda item: item[0]):
                out.mux(packet)
        finally:
            out.close()
    return stats


def _video_packets(container, stream, out_stream) -> Iterator[tuple[Fraction, av.Packet]]:
    origin = stream.start_time or 0  # the output video starts at 0, with the audio
    for packet in container.demux(stream):
        if packet.pts is None or packet.dts is None:
            continue
        packet.pts -= origin
        packet.dts -= origin
        packet.stream = out_stream
        yield packet.dts * packet.time_base, packet


def _encoded(frames, stream) -> Iterator[tuple[Fraction, av.Packet]]:
    for frame in frames:
        for packet in stream.encode(frame):
            yield packet.dts * packet.time_base, packet
    for packet in stream.encode(None):
        yield packet.dts * packet.time_base, packet


def _fitted_audio(container, stream, path, layout, sample_rate, target_samples, stats):
    """Resampled planar-float frames of the whole track, cut or padded with silence to
    target_samples (decoding goes on past the cut so the full input length is known)."""
    yield from _fit(_audio_chunks(container, stream, path, layout, sample_rate, stats), 0, target_samples, layout, sample_rate)


def _audio_frame(samples: np.ndarray, start: int, layout: str, sample_rate: int) -> av.AudioFrame:
    """samples: (channels, n) float32 starting at sample `start` of the output track."""
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples), format="fltp", layout=layout)
    frame.sample_rate = sample_rate
    frame.pts = start
    frame.time_base = Fraction(1, sample_rate)
    return frame


def _fit(chunks: Iterable[np.ndarray], written: int, target_samples: int, layout: str, sample_rate: int):
    """Frames of `chunks` from output sample `written` on, cut at target_samples, then
    silence up to it. Every chunk is consumed, also past the cut."""
    channels = 1 if layout == "mono" else 2
    for samples in chunks:
        keep = min(samples.shape[1], target_samples - written)
        if keep > 0:
            yield _audio_frame(samples[:, :keep], written, layout, sample_rate)
            written += keep
    while written < target_samples:
        n = min(sample_rate, target_samples - written)
        yield _audio_frame(np.zeros((channels, n), np.float32), written, layout, sample_rate)
        written += n


def _audio_chunks(container, stream, path, layout, sample_rate, stats) -> Iterator[np.ndarray]:
    """The track's samples, resampled to planar float at sample_rate, as (channels, n)
    blocks; stats["in_samples"] counts them.

    Decoders do not drop the encoder padding at the end of an AAC/MP3 track (up to a
    codec frame or two past the length the container declares), so samples past the
    declared length are held back, and dropped if the stream ends within 0.1 s of it;
    if it goes on longer, the declaration was an estimate and they are kept."""
    resampler = av.AudioResampler(format="fltp", layout=layout, rate=sample_rate)
    declared = None
    if stream.duration and stream.time_base:
        declared = round(Fraction(stream.duration) * stream.time_base * sample_rate)
    tolerance = sample_rate // 10
    held: list[np.ndarray] = []  # samples past the declared length, maybe padding

    def accepted(samples: np.ndarray):
        stats["in_samples"] += samples.shape[1]
        yield samples

    def resampled():
        for frame in container.decode(stream):
            yield from resampler.resample(frame)
        yield from resampler.resample(None)

    seen = 0
    try:
        for frame in resampled():
            samples = frame.to_ndarray()
            if declared is not None and seen + samples.shape[1] > declared:
                split = max(0, declared - seen)
                head, tail = samples[:, :split], samples[:, split:]
                seen += samples.shape[1]
                if head.shape[1]:
                    yield from accepted(head)
                held.append(tail)
                if seen - declared > tolerance:  # not padding: the declaration was wrong
                    declared = None
                    for chunk in held:
                        yield from accepted(chunk)
                    held.clear()
                continue
            seen += samples.shape[1]
            yield from accepted(samples)
    except av.FFmpegError as exc:
        raise MediaError(f"audio {path!r}: decoding failed ({exc})") from exc
    if seen == 0:
        raise MediaError(f"audio {path!r}: audio stream has no samples")


def mux_segments(
    segment_sources: list,
    audio_source,
    out_path: str,
    bitrate: int = 128_000,
    sample_rate: int = 48_000,
    rotation: int | None = None,
) -> MuxResult:
    """concat_segments then mux_audio in one pass, without the video-only file between
    them: the segments' packets are stream-copied onto one timeline (the rules, checks and
    errors of concat_segments) and the dubbed audio is encoded and fitted to the video's
    length as mux_audio does it, into `out_path` only. Same frames, packets and audio as
    the two steps.

    A segment source is a local path, a seekable file object, or a callable returning a
    context manager that opens one (an fsspec file of a remote segment: ranged reads,
    opened one segment at a time); `audio_source` a path or file object. Nothing is read
    whole: the audio is encoded as the video passes its time, and only once the last
    segment is in is the video's length known, so only then is the audio cut or padded."""
    if not segment_sources:
        raise MediaError(f"concat {out_path!r}: no segments given")
    audio_name = media_name(audio_source)
    return _with_dubbed_audio(audio_source, audio_name, out_path, lambda audio_in, audio_stream, layout: _mux_segments(
        segment_sources, audio_in, audio_stream, audio_name, out_path, layout, bitrate, sample_rate, rotation))


def _mux_segments(segment_sources, audio_in, audio_stream, audio_name, out_path, layout, bitrate,
                  sample_rate, rotation) -> MuxResult:
    stats = {"in_samples": 0}
    out = _create_output(out_path, options={"movflags": "+faststart"})
    try:
        with _opened(segment_sources[0]) as opened, open_media(opened, "segment") as first:
            template = video_stream_of(first, media_name(opened))
            reference = _stream_signature(template, media_name(opened))
            video_out = out.add_stream_from_template(template)
        if rotation is not None:
            video_out.set_display_rotation(rotation)
        audio_out = out.add_stream("aac", rate=sample_rate, layout=layout)
        audio_out.bit_rate = bitrate
        out.start_encoding()
        fps = reference["fps"]

        chunks = _audio_chunks(audio_in, audio_stream, audio_name, layout, sample_rate, stats)
        pending: np.ndarray | None = None  # the next block, pulled but past the video so far
        written = n_frames = 0
        for packet in _joined_packets(segment_sources, reference, video_out):
            out.mux(packet)
            n_frames += 1
            # Audio up to where the video has got: it ends at or after this, so no block
            # encoded here can need the cut, and the frames fed are those mux_audio feeds.
            reached = round(Fraction(n_frames) / fps * sample_rate)
            while True:
                if pending is None:
                    pending = next(chunks, None)
                if pending is None or written + pending.shape[1] > reached:
                    break
                if pending.shape[1] == 0:  # nothing to encode (mux_audio's cut skips it too)
                    pending = None
                    continue
                for audio_packet in audio_out.encode(_audio_frame(pending, written, layout, sample_rate)):
                    out.mux(audio_packet)
                written += pending.shape[1]
                pending = None
        video_duration = Fraction(n_frames) / fps
        target_samples = round(video_duration * sample_rate)
        rest = itertools.chain([pending] if pending is not None else [], chunks)
        for frame in _fit(rest, written, target_samples, layout, sample_rate):
            for audio_packet in audio_out.encode(frame):
                out.mux(audio_packet)
        for audio_packet in audio_out.encode(None):
            out.mux(audio_packet)
    finally:
        out.close()
    return MuxResult(
        audio_duration_s=stats["in_samples"] / sample_rate,
        video_duration_s=float(video_duration),
        padded_s=max(0, target_samples - stats["in_samples"]) / sample_rate,
        trimmed_s=max(0, stats["in_samples"] - target_samples) / sample_rate,
    )
