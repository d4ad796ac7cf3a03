"""Join encoded segments without re-encoding, and put the dubbed audio beside the video:
in one streaming pass (mux_segments, which can also carry the source video's other
streams along), or as two steps through a video-only file (concat_segments, then
mux_audio)."""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from .probe import MediaError, frame_rate_of, media_name, open_media, probe_video, video_stream_of

log = logging.getLogger(__name__)


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


# Encoders a dub may be delivered in (OutputConfig.audio_codec). PyAV's FFmpeg has them all.
AUDIO_CODECS = ("aac", "ac3", "eac3", "libopus")
_DEFAULT_BITRATE_PER_CHANNEL = 64_000  # 128 kb/s stereo AAC, as before; 384 kb/s for 5.1
_MAX_BITRATE = {"ac3": 640_000}  # the format's ceiling: a rich source's rate is capped to it


@dataclass(frozen=True)
class AudioOutput:
    """How the dub is encoded. None takes it from the dub itself: its sample rate (or the
    nearest one the codec has), its bit rate when it is lossy-coded (else 64 kb/s per
    channel); language: its own language tag."""

    codec: str = "aac"
    bitrate: int | None = None
    sample_rate: int | None = None
    language: str | None = None  # ISO 639-2, written on the dub track


@dataclass(frozen=True)
class KeepSource:
    """Streams of the source video carried into the output by packet copy (no re-encode).

    `source`: a path, a seekable file object or a callable returning a context manager
    that opens one (as a segment source). `audio`: its audio tracks, after the dub (the
    "add" audio mode). `other`: its subtitle and data streams, chapters, container and
    stream metadata (titles, language tags, the video's timecode)."""

    source: object
    audio: bool = False
    other: bool = False


@dataclass(frozen=True)
class _Track:
    """The dub track's encoding, resolved against the dub file."""

    codec: str
    layout: str
    channels: int
    sample_rate: int
    bitrate: int
    language: str | None


# FFmpeg's usual layout for a channel count, for a file that names none.
_LAYOUT_OF_COUNT = {1: "mono", 2: "stereo", 3: "3.0", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}


def _dub_layout(ctx, name: str) -> str:
    layout = ctx.layout.name
    if not layout.endswith("channels"):
        return layout
    # A WAV without a channel mask says "6 channels".
    if ctx.channels not in _LAYOUT_OF_COUNT:
        raise MediaError(f"audio {name!r}: {ctx.channels} channels without a channel layout cannot be encoded")
    return _LAYOUT_OF_COUNT[ctx.channels]


def _resolve_track(stream, name: str, settings: AudioOutput) -> _Track:
    """The encoding of the dub: its own channel layout, settings' codec, rate and bit rate
    or the dub's; MediaError naming the file when the codec cannot take them."""
    ctx = stream.codec_context
    codec = settings.codec
    if codec not in AUDIO_CODECS:
        raise MediaError(f"audio {name!r}: audio codec {codec!r} is not supported (use one of {', '.join(AUDIO_CODECS)})")
    layout = _dub_layout(ctx, name)
    channels = av.AudioLayout(layout).nb_channels
    rates = av.Codec(codec, "w").audio_rates
    rate = settings.sample_rate
    if rate is None:
        rate = ctx.sample_rate
        if rates and rate not in rates:  # e.g. 44.1 kHz to Opus: the next rate up it has, else its highest
            rate = min((r for r in rates if r >= rate), default=max(rates))
    elif rates and rate not in rates:
        raise MediaError(f"audio {name!r}: {codec} cannot encode at {rate} Hz (it takes {sorted(rates)})")
    bitrate = settings.bitrate
    if bitrate is None:
        source_rate = stream.bit_rate or ctx.bit_rate
        lossy = av.Codec(ctx.name, "r").lossy and not av.Codec(ctx.name, "r").lossless
        bitrate = source_rate if (lossy and source_rate) else _DEFAULT_BITRATE_PER_CHANNEL * channels
        bitrate = min(bitrate, _MAX_BITRATE.get(codec, bitrate))
    language = settings.language or stream.metadata.get("language")
    track = _Track(codec, layout, channels, rate, bitrate, None if language == "und" else language)
    _check_encoder(track, name)
    return track


def _check_encoder(track: _Track, name: str) -> None:
    """Open the encoder once, before any output exists, so a layout or bit rate the codec
    refuses fails here with the file's name, not mid-file."""
    ctx = av.CodecContext.create(track.codec, "w")
    ctx.sample_rate, ctx.layout, ctx.bit_rate = track.sample_rate, track.layout, track.bitrate
    ctx.format = av.Codec(track.codec, "w").audio_formats[0]
    try:
        ctx.open()
    except (av.FFmpegError, ValueError) as exc:
        raise MediaError(f"audio {name!r}: {track.layout} at {track.sample_rate} Hz and {track.bitrate} b/s "
                         f"cannot be encoded as {track.codec} ({exc})") from exc


def _add_dub_stream(out, track: _Track, out_path: str):
    if track.codec not in out.supported_codecs:
        raise MediaError(f"output {out_path!r}: {out.format.name} cannot hold {track.codec} audio")
    stream = out.add_stream(track.codec, rate=track.sample_rate, layout=track.layout)
    stream.bit_rate = track.bitrate
    if track.language:
        stream.metadata["language"] = track.language
    stream.disposition = av.stream.Disposition.default
    return stream


def _with_dubbed_audio(audio_source, audio_name: str, out_path: str, settings: AudioOutput, mux):
    """mux(audio_in, audio_stream, track) over the dubbed track's first audio stream; a
    failure leaves no partial file at out_path and names it."""
    audio_in = open_media(audio_source, "audio")
    try:
        if not audio_in.streams.audio:
            raise MediaError(f"audio {audio_name!r}: has no audio stream")
        audio_stream = audio_in.streams.audio[0]
        track = _resolve_track(audio_stream, audio_name, settings)
        try:
            return mux(audio_in, audio_stream, track)
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
    audio_duration_s: float  # the dubbed audio as read, with its lead (silence before its start offset)
    video_duration_s: float  # n_frames / fps of the video
    padded_s: float  # silence appended to reach the video's duration
    trimmed_s: float  # audio cut off after the video's end


def _result(in_samples: int, video_duration: Fraction, target_samples: int, sample_rate: int) -> MuxResult:
    return MuxResult(
        audio_duration_s=in_samples / sample_rate,
        video_duration_s=float(video_duration),
        padded_s=max(0, target_samples - in_samples) / sample_rate,
        trimmed_s=max(0, in_samples - target_samples) / sample_rate,
    )


def _output_options(out_path: str) -> dict:
    # mp4/mov: the index up front (faststart) so the file streams; other muxers lack the flag.
    return {"movflags": "+faststart"} if out_path.lower().endswith((".mp4", ".m4v", ".mov")) else {}


def mux_audio(
    video_path: str,
    audio_path: str,
    out_path: str,
    bitrate: int | None = 128_000,
    sample_rate: int | None = 48_000,
    rotation: int | None = None,
    codec: str = "aac",
    language: str | None = None,
) -> MuxResult:
    """Copy the video stream of `video_path` (no re-encode) and add the dubbed audio of
    `audio_path` (any file PyAV reads; a video file's first audio stream) encoded as
    `codec` at `sample_rate` and `bitrate` (None: the dub's, see AudioOutput), with the
    dub's channel layout, exactly as long as the video: shorter audio is padded with
    silence, longer audio trimmed.

    Time: what plays at t seconds in the dub file (on its container's clock, from its
    earliest stream, as load_audio reads it) plays at t in the output, whose 0 is the
    video's first frame: an audio stream that starts after its container (0.5 s into a
    video file) gets that much silence first. Other streams of `video_path` (its old
    audio) are dropped. `rotation` (degrees counter-clockwise, VideoInfo.rotation) writes
    a display matrix; None keeps the video's own. The container follows out_path's
    extension; mp4 gets the index up front (faststart) for streaming.
    """
    video_info = probe_video(video_path)
    video_duration = Fraction(video_info.n_frames) / video_info.fps
    settings = AudioOutput(codec, bitrate, sample_rate, language)

    def mux(audio_in, audio_stream, track):
        target_samples = round(video_duration * track.sample_rate)
        stats = _mux(video_path, audio_in, audio_stream, audio_path, out_path, track, target_samples, rotation)
        return _result(stats["in_samples"], video_duration, target_samples, track.sample_rate)

    return _with_dubbed_audio(audio_path, audio_path, out_path, settings, mux)


def _mux(video_path, audio_in, audio_stream, audio_path, out_path, track: _Track, target_samples, rotation) -> dict:
    stats = {"in_samples": 0}
    with open_media(video_path, "video") as video_in:
        video_stream = video_stream_of(video_in, video_path)
        out = _create_output(out_path, options=_output_options(out_path))
        try:
            video_out = out.add_stream_from_template(video_stream)
            if rotation is not None:
                video_out.set_display_rotation(rotation)
            audio_out = _add_dub_stream(out, track, out_path)

            # Interleave by time so a player streaming the file finds audio and video
            # together, instead of leaving it to the muxer's buffering.
            video_packets = _video_packets(video_in, video_stream, video_out)
            audio_frames = _fit(_audio_chunks(audio_in, audio_stream, audio_path, track, stats), 0, target_samples, track)
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


def _audio_frame(samples: np.ndarray, start: int, track: _Track) -> av.AudioFrame:
    """samples: (channels, n) float32 starting at sample `start` of the output track."""
    # Interleaved: PyAV's planar ndarray bridge stops at 8 planes (7.1 breaks it).
    packed = np.ascontiguousarray(samples.T).reshape(1, -1)
    frame = av.AudioFrame.from_ndarray(packed, format="flt", layout=track.layout)
    frame.sample_rate = track.sample_rate
    frame.pts = start
    frame.time_base = Fraction(1, track.sample_rate)
    return frame


def _fit(chunks: Iterable[np.ndarray], written: int, target_samples: int, track: _Track):
    """Frames of `chunks` from output sample `written` on, cut at target_samples, then
    silence up to it. Every chunk is consumed, also past the cut."""
    for samples in chunks:
        keep = min(samples.shape[1], target_samples - written)
        if keep > 0:
            yield _audio_frame(samples[:, :keep], written, track)
            written += keep
    while written < target_samples:
        n = min(track.sample_rate, target_samples - written)
        yield _audio_frame(np.zeros((track.channels, n), np.float32), written, track)
        written += n


def _lead_seconds(container, first_frame_time: float | None) -> float:
    """stages.audio.load.lead_seconds, the features' rule, restated here so the mux does
    not import the audio package (it loads torch): silence before the stream's first
    sample, from the container's start (its earliest stream); never negative."""
    if first_frame_time is None:
        return 0.0
    start = container.start_time / av.time_base if container.start_time is not None else 0.0
    return max(0.0, first_frame_time - start)


def _planar(frame: av.AudioFrame, channels: int) -> np.ndarray:
    """A packed float frame as (channels, n)."""
    return frame.to_ndarray().reshape(-1, channels).T


def _audio_chunks(container, stream, path, track: _Track, stats) -> Iterator[np.ndarray]:
    """The track's samples on its container's clock (silence for the lead before the
    stream's start offset, as load_audio has it), resampled to planar float at the
    track's rate and layout, as (channels, n) float32 blocks; stats["in_samples"] counts them.

    Decoders do not drop the encoder padding at the end of an AAC/MP3 track (up to a
    codec frame or two past the length the container declares), so samples past the
    declared length are held back, and dropped if the stream ends within 0.1 s of it;
    if it goes on longer, the declaration was an estimate and they are kept."""
    sample_rate = track.sample_rate
    resampler = av.AudioResampler(format="flt", layout=track.layout, rate=sample_rate)
    declared = None
    if stream.duration and stream.time_base:
        declared = round(Fraction(stream.duration) * stream.time_base * sample_rate)
    tolerance = sample_rate // 10
    held: list[np.ndarray] = []  # samples past the declared length, maybe padding

    def accepted(samples: np.ndarray):
        stats["in_samples"] += samples.shape[1]
        yield samples

    def resampled():  # (is_lead, samples): the lead's silence first, once the first frame's time is known
        first = True
        for frame in container.decode(stream):
            if first:
                first = False
                n = round(_lead_seconds(container, frame.time) * sample_rate)
                if n > 0:
                    yield True, np.zeros((track.channels, n), np.float32)
            for out in resampler.resample(frame):
                yield False, _planar(out, track.channels)
        for out in resampler.resample(None):
            yield False, _planar(out, track.channels)

    seen = 0
    try:
        for is_lead, samples in resampled():
            if is_lead:  # not the stream's own samples: outside the declared length
                yield from accepted(samples)
                continue
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
    bitrate: int | None = 128_000,
    sample_rate: int | None = 48_000,
    rotation: int | None = None,
    codec: str = "aac",
    language: str | None = None,
    keep: KeepSource | None = None,
) -> MuxResult:
    """concat_segments then mux_audio in one pass, without the video-only file between
    them: the segments' packets are stream-copied onto one timeline (the rules, checks and
    errors of concat_segments) and the dubbed audio is encoded and fitted to the video's
    length as mux_audio does it (its codec, rate, bit rate, layout and clock), into
    `out_path` only. Same frames, packets and audio as the two steps.

    `keep` carries streams of the source video along in the same pass, packets copied and
    re-timed so the source's first video frame is the output's 0 (KeepSource): the dub is
    the first audio track and the default one, the source's audio tracks follow it.
    A kept audio or subtitle stream the output container cannot hold is a MediaError
    naming the source (an .mkv output holds srt/ass); a data stream it cannot hold is left
    out (mp4's timecode and chapter tracks are written anew from the tags and chapters).

    A segment source is a local path, a seekable file object, or a callable returning a
    context manager that opens one (an fsspec file of a remote segment: ranged reads,
    opened one segment at a time); `audio_source` a path or file object. Nothing is read
    whole: the audio is encoded as the video passes its time, and only once the last
    segment is in is the video's length known, so only then is the audio cut or padded."""
    if not segment_sources:
        raise MediaError(f"concat {out_path!r}: no segments given")
    audio_name = media_name(audio_source)
    settings = AudioOutput(codec, bitrate, sample_rate, language)
    return _with_dubbed_audio(audio_source, audio_name, out_path, settings, lambda audio_in, audio_stream, track: _mux_segments(
        segment_sources, audio_in, audio_stream, audio_name, out_path, track, rotation, keep))


def _mux_segments(segment_sources, audio_in, audio_stream, audio_name, out_path, track: _Track, rotation,
                  keep: KeepSource | None) -> MuxResult:
    stats = {"in_samples": 0}
    out = _create_output(out_path, options=_output_options(out_path))
    try:
        with _opened(segment_sources[0]) as opened, open_media(opened, "segment") as first:
            template = video_stream_of(first, media_name(opened))
            reference = _stream_signature(template, media_name(opened))
            video_out = out.add_stream_from_template(template)
        if rotation is not None:
            video_out.set_display_rotation(rotation)
        audio_out = _add_dub_stream(out, track, out_path)
        with _source_streams(keep, out, video_out, out_path) as source:
            out.start_encoding()
            fps = reference["fps"]
            sample_rate = track.sample_rate

            chunks = _audio_chunks(audio_in, audio_stream, audio_name, track, stats)
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
                    for audio_packet in audio_out.encode(_audio_frame(pending, written, track)):
                        out.mux(audio_packet)
                    written += pending.shape[1]
                    pending = None
                if source is not None:
                    for kept in source.until(Fraction(n_frames) / fps):
                        out.mux(kept)
            video_duration = Fraction(n_frames) / fps
            target_samples = round(video_duration * sample_rate)
            rest = itertools.chain([pending] if pending is not None else [], chunks)
            for frame in _fit(rest, written, target_samples, track):
                for audio_packet in audio_out.encode(frame):
                    out.mux(audio_packet)
            for audio_packet in audio_out.encode(None):
                out.mux(audio_packet)
            if source is not None:
                for kept in source.until(video_duration, last=True):
                    out.mux(kept)
    finally:
        out.close()
    return _result(stats["in_samples"], video_duration, target_samples, track.sample_rate)


# Tags that describe the source file's encoding or muxing rather than its content, and would
# be false on the output (mkvmerge's statistics, FFmpeg's encoder, mp4's brands).
_STALE_TAGS = ("encoder", "duration", "major_brand", "minor_version", "compatible_brands", "_statistics",
               "bps", "number_of_frames", "number_of_bytes")


def _content_tags(metadata) -> dict:
    return {k: v for k, v in dict(metadata).items() if not k.lower().startswith(_STALE_TAGS)}


@contextlib.contextmanager
def _source_streams(keep: KeepSource | None, out, video_out, out_path: str):
    """The open source video's kept streams (_SourceStreams), added to `out`; None when
    nothing is kept."""
    if keep is None or not (keep.audio or keep.other):
        yield None
        return
    with _opened(keep.source) as opened, open_media(opened, "video") as container:
        yield _SourceStreams(container, media_name(opened), keep, out, video_out, out_path)


class _SourceStreams:
    """A source video's kept streams, set up in `out` (before its header is written), and
    their packets re-timed onto the output's clock, handed out in time order."""

    def __init__(self, container, name: str, keep: KeepSource, out, video_out, out_path: str):
        video = video_stream_of(container, name)
        # The output's 0 is the source's first video frame (the segments are its frames).
        self.origin = Fraction(video.start_time or 0) * Fraction(video.time_base)
        self.mapping = {}  # source stream index -> output stream
        for stream in container.streams:
            kind = stream.type
            wanted = (kind == "audio" and keep.audio) or (kind in ("subtitle", "data") and keep.other)
            if not wanted:
                continue
            codec = stream.codec_context.name if stream.codec_context is not None else None
            if codec is None or codec not in out.supported_codecs:
                if kind == "data":  # device metadata, or mp4's timecode/chapter tracks (rewritten below)
                    log.info("video %r: data stream #%d (%s) cannot go into %s; left out", name, stream.index, codec, out.format.name)
                    continue
                raise MediaError(f"video {name!r}: its {kind} stream #{stream.index} ({codec}) cannot be kept in "
                                 f"{out.format.name} output {out_path!r}"
                                 + (" (an .mkv output holds it)" if kind == "subtitle" else ""))
            copy = out.add_stream_from_template(stream)
            copy.metadata.update(_content_tags(stream.metadata))
            disposition = stream.disposition
            if kind == "audio":  # the dub is the default track: the one that matches the lips
                disposition &= ~av.stream.Disposition.default
            copy.disposition = disposition
            self.mapping[stream.index] = copy
        if keep.other:
            video_out.metadata.update(_content_tags(video.metadata))  # language, title, timecode
            out.metadata.update(_content_tags(container.metadata))
            chapters = self._chapters(container.chapters())
            if chapters:
                out.set_chapters(chapters)
        self.packets = self._retimed(container) if self.mapping else iter(())
        self.pending = None

    def _chapters(self, chapters: list[dict]) -> list[dict]:
        kept = []
        for chapter in chapters:
            tb = Fraction(chapter["time_base"])
            shift = round(self.origin / tb)
            start, end = chapter["start"] - shift, chapter["end"] - shift
            if end <= 0:
                continue
            kept.append(dict(chapter, id=len(kept) + 1, start=max(0, start), end=end))
        return kept

    def _retimed(self, container) -> Iterator[tuple[Fraction, av.Packet]]:
        streams = [container.streams[i] for i in self.mapping]
        for packet in container.demux(streams):
            if packet.pts is None and packet.dts is None:
                continue  # the demuxer's end-of-stream flush packet
            tb = Fraction(packet.time_base)
            shift = round(self.origin / tb)
            if packet.pts is not None:
                packet.pts -= shift
            if packet.dts is not None:
                packet.dts -= shift
            kind = packet.stream.type
            if kind != "audio" and (packet.pts if packet.pts is not None else packet.dts) < 0:
                continue  # a caption or datum before the video's first frame: nothing shows it
            at = (packet.dts if packet.dts is not None else packet.pts) * tb
            packet.stream = self.mapping[packet.stream.index]
            yield at, packet

    def until(self, seconds: Fraction, last: bool = False) -> Iterator[av.Packet]:
        """The packets due by `seconds` on the output's clock; with last, those that start
        before it (the output ends with its video), and the rest of the source is not read."""
        while True:
            if self.pending is None:
                self.pending = next(self.packets, None)
            if self.pending is None:
                return
            at, packet = self.pending
            if at > seconds or (last and at >= seconds):
                if last:
                    self.pending, self.packets = None, iter(())
                return
            self.pending = None
            yield packet
