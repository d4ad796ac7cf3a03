"""The dubbed output's audio as delivered (issue 11, audio): the dub's start offset is
kept (the output plays what the lips were made from), its channel layout is kept in the
codec asked for, and the source video's other streams (audio tracks, subtitles, chapters,
tags, timecode) are carried along when asked, by packet copy in the one muxing pass.

All media are made here with PyAV: 320x240, 25 fps, 1 s."""
from __future__ import annotations

import os
import struct
from fractions import Fraction

import av
import numpy as np
import pytest

from stages.audio.load import load_audio
from stages.media import MediaError
from stages.media.mux import KeepSource, mux_audio, mux_segments

W, H, FPS, N_FRAMES = 320, 240, 25, 25
RATE = 48000
BURST_AT = 0.3  # seconds into the dub's audio stream
OFFSET = 0.5  # where the dub's audio stream starts on its container's clock
FRAME_S = 1 / FPS  # "within one frame": the lips move per video frame


def _video_frames(stream, n=N_FRAMES):
    for i in range(n):
        img = np.full((H, W, 3), (i * 9) % 256, np.uint8)
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts = i
        yield from stream.encode(frame)
    yield from stream.encode()


def _add_video(out):
    # No B-frames: the segments are joined by stream copy (SegmentWriter's rule).
    video = out.add_stream("libx264", rate=FPS, options={"bf": "0", "g": "25", "preset": "ultrafast"})
    video.width, video.height, video.pix_fmt = W, H, "yuv420p"
    return video


def make_segment(path) -> str:
    out = av.open(str(path), "w")
    video = _add_video(out)
    for packet in _video_frames(video):
        out.mux(packet)
    out.close()
    return str(path)


def burst_wave(seconds, channels, burst_at=BURST_AT, rate=RATE, noise=0.0) -> np.ndarray:
    """(channels, n) float32 silence (or quiet noise, which an encoder spends its bit rate
    on) with a 10 ms click at burst_at s, a different level per channel."""
    wave = (noise * np.random.default_rng(0).standard_normal((channels, round(seconds * rate)))).astype(np.float32)
    start = round(burst_at * rate)
    for c in range(channels):
        wave[c, start : start + rate // 100] = 0.8 - 0.05 * c
    return wave


def make_dub(path, *, offset=OFFSET, with_video=False, codec="aac", layout="mono", rate=RATE, seconds=1.0,
             noise=0.0) -> str:
    """A dub whose audio stream starts `offset` s into its container; with_video adds a
    video stream at 0 (a dub delivered as a video file), so the container starts before
    the audio."""
    out = av.open(str(path), "w")
    video = _add_video(out) if with_video else None
    audio = out.add_stream(codec, rate=rate, layout=layout)
    wave = burst_wave(seconds, av.AudioLayout(layout).nb_channels, rate=rate, noise=noise)
    # Interleaved: PyAV's planar ndarray bridge stops at 8 planes.
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave.T).reshape(1, -1), format="flt", layout=layout)
    frame.sample_rate, frame.time_base = rate, Fraction(1, rate)
    frame.pts = round(offset * rate)
    if video is not None:
        for packet in _video_frames(video):
            out.mux(packet)
    for packet in audio.encode(frame):
        out.mux(packet)
    for packet in audio.encode(None):
        out.mux(packet)
    out.close()
    return str(path)


def burst_time(path, stream_index=0) -> float:
    """When the click plays in `path`'s audio stream, on the file's clock (its 0 is the
    output's first video frame): each decoded frame placed by its own timestamp."""
    with av.open(path) as container:
        start = (container.start_time or 0) / av.time_base
        for frame in container.decode(container.streams.audio[stream_index]):
            loud = np.flatnonzero(np.abs(frame.to_ndarray()).max(axis=0) > 0.3)
            if len(loud):
                return frame.time - start + loud[0] / frame.sample_rate
    raise AssertionError(f"{path}: no click in the audio")


# ------------------------------------------------------------------ start offset


@pytest.mark.parametrize("ext, with_video, codec, expected", [
    ("mp4", True, "aac", OFFSET + BURST_AT),  # a video file: its audio starts 0.5 s after the picture
    ("mkv", True, "aac", OFFSET + BURST_AT),
    ("mkv", False, "pcm_s16le", BURST_AT),  # an audio-only file starts with its audio: no lead
])
def test_dub_start_offset_is_kept_in_the_output(tmp_path, ext, with_video, codec, expected):
    dub = make_dub(tmp_path / f"dub.{ext}", with_video=with_video, codec=codec)
    features_burst = np.flatnonzero(np.abs(load_audio(dub)) > 0.3)[0] / 16000  # what the lips are made from
    assert features_burst == pytest.approx(expected, abs=FRAME_S)

    segment = make_segment(tmp_path / "seg.mp4")
    one_pass, two_step = str(tmp_path / "one.mp4"), str(tmp_path / "two.mp4")
    result = mux_segments([segment], dub, one_pass)
    mux_audio(segment, dub, two_step)
    for out in (one_pass, two_step):
        assert burst_time(out) == pytest.approx(expected, abs=FRAME_S)
        assert burst_time(out) == pytest.approx(features_burst, abs=FRAME_S)
    # The lead is part of the dub as read: 1 s of audio from 0.5 s (or 0) is trimmed to the video's 1 s.
    assert result.audio_duration_s == pytest.approx(expected - BURST_AT + 1.0, abs=0.03)
    assert result.trimmed_s == pytest.approx(expected - BURST_AT, abs=0.03)


# ------------------------------------------------------------------ layout, codec, rate


def _audio_out(path) -> dict:
    with av.open(path) as container:
        streams = container.streams.audio
        s = streams[0]
        return {"n": len(streams), "codec": s.codec_context.name, "layout": s.codec_context.layout.name,
                "channels": s.codec_context.channels, "rate": s.codec_context.sample_rate,
                "bit_rate": s.bit_rate or s.codec_context.bit_rate}


@pytest.mark.parametrize("layout, codec", [
    ("mono", "aac"), ("stereo", "aac"), ("5.1", "aac"), ("7.1", "aac"), ("5.1", "ac3"), ("5.1", "eac3"),
    ("stereo", "libopus"),
])
def test_dub_channel_layout_is_kept_in_the_codec_asked_for(tmp_path, layout, codec):
    dub = make_dub(tmp_path / "dub.wav", offset=0, codec="pcm_s16le", layout=layout, noise=0.05)
    out = str(tmp_path / "out.mp4")
    mux_segments([make_segment(tmp_path / "seg.mp4")], dub, out, codec=codec, bitrate=None, sample_rate=None)
    got = _audio_out(out)
    channels = av.AudioLayout(layout).nb_channels
    assert (got["n"], got["codec"], got["channels"]) == (1, codec.removeprefix("lib"), channels)
    assert av.AudioLayout(got["layout"]).nb_channels == channels and got["layout"].startswith(layout)
    assert got["rate"] == RATE  # the dub's own rate
    # A PCM dub has no lossy bit rate to keep: 64 kb/s per channel.
    assert got["bit_rate"] == pytest.approx(64_000 * channels, rel=0.35)
    # Each channel's own click, in its place: nothing was downmixed or shuffled.
    with av.open(out) as container:
        # Interleaved, as PyAV's planar bridge stops at 8 planes.
        packed = av.AudioResampler(format="flt")
        frames = [p for f in container.decode(audio=0) for p in packed.resample(f)] + packed.resample(None)
        wave = np.concatenate([p.to_ndarray().reshape(-1, channels).T for p in frames], axis=1)
    assert wave.shape[0] == channels
    assert all(np.abs(wave[c]).max() > 0.3 for c in range(channels))


def test_rate_and_bitrate_default_from_the_dub_or_follow_the_settings(tmp_path):
    segment = make_segment(tmp_path / "seg.mp4")
    dub = make_dub(tmp_path / "dub.m4a", offset=0, layout="stereo", rate=44100, noise=0.05)
    with av.open(dub) as container:
        source_bit_rate = container.streams.audio[0].bit_rate
    mux_segments([segment], dub, str(tmp_path / "own.mp4"), bitrate=None, sample_rate=None)
    own = _audio_out(str(tmp_path / "own.mp4"))
    assert (own["layout"], own["rate"]) == ("stereo", 44100)
    assert own["bit_rate"] == pytest.approx(source_bit_rate, rel=0.35)
    mux_segments([segment], dub, str(tmp_path / "set.mp4"), bitrate=96_000, sample_rate=48000)
    assert _audio_out(str(tmp_path / "set.mp4"))["rate"] == 48000
    # Opus has no 44.1 kHz: from the dub it takes the next rate up.
    mux_segments([segment], dub, str(tmp_path / "opus.mp4"), codec="libopus", bitrate=None, sample_rate=None)
    assert _audio_out(str(tmp_path / "opus.mp4"))["rate"] == 48000


def test_unsupported_codec_layout_or_rate_names_the_dub_and_writes_nothing(tmp_path):
    segment = make_segment(tmp_path / "seg.mp4")
    wide = make_dub(tmp_path / "wide71.wav", offset=0, codec="pcm_s16le", layout="7.1")
    out = str(tmp_path / "out.mp4")
    with pytest.raises(MediaError, match=r"wide71\.wav.*7\.1.*ac3"):
        mux_segments([segment], wide, out, codec="ac3", bitrate=None, sample_rate=None)
    stereo = make_dub(tmp_path / "stereo.wav", offset=0, codec="pcm_s16le", layout="stereo")
    with pytest.raises(MediaError, match=r"stereo\.wav.*'mp3' is not supported"):
        mux_segments([segment], stereo, out, codec="mp3")
    with pytest.raises(MediaError, match=r"stereo\.wav.*ac3 cannot encode at 22050 Hz"):
        mux_segments([segment], stereo, out, codec="ac3", sample_rate=22050)
    assert not os.path.exists(out)


# ------------------------------------------------------------------ the source's other streams


def make_source(path) -> str:
    """A source video as a studio delivers it: two audio tracks (eng, fra), a subtitle
    track (deu; mov_text in mp4, srt in mkv), two chapters, a title and a timecode."""
    out = av.open(str(path), "w")
    out.metadata["title"] = "Episode 1"
    video = _add_video(out)
    video.metadata["timecode"] = "01:00:00:00"
    tracks = []
    for lang in ("eng", "fra"):
        audio = out.add_stream("aac", rate=RATE, layout="stereo")
        audio.metadata["language"] = lang
        tracks.append(audio)
    mp4 = str(path).endswith(".mp4")
    subtitle = out.add_mux_stream("mov_text" if mp4 else "subrip")
    subtitle.metadata["language"] = "deu"
    out.set_chapters([
        {"id": 1, "start": 0, "end": 12, "time_base": Fraction(1, FPS), "metadata": {"title": "Cold open"}},
        {"id": 2, "start": 12, "end": 25, "time_base": Fraction(1, FPS), "metadata": {"title": "Titles"}},
    ])
    for packet in _video_frames(video):
        out.mux(packet)
    for audio in tracks:
        frame = av.AudioFrame.from_ndarray(np.zeros((2, RATE), np.float32), format="fltp", layout="stereo")
        frame.sample_rate, frame.pts = RATE, 0
        for packet in list(audio.encode(frame)) + list(audio.encode(None)):
            out.mux(packet)
    text = b"Hallo Welt"
    packet = av.Packet(struct.pack(">H", len(text)) + text if mp4 else text)  # mov_text: length-prefixed
    packet.stream, packet.time_base = subtitle, Fraction(1, 1000)
    packet.pts = packet.dts = 200
    packet.duration = 500
    out.mux(packet)
    out.close()
    return str(path)


def _streams(path) -> dict:
    with av.open(path) as container:
        subtitles = []
        for s in container.streams.subtitles:
            texts = [(float(p.pts * p.time_base), bytes(p)) for p in container.demux(s) if p.size > 2]  # mov_text: 2-byte length
            subtitles.append((s.codec_context.name, s.metadata.get("language"), texts))
        return {
            "audio": [(s.metadata.get("language"), bool(s.disposition & av.stream.Disposition.default))
                      for s in container.streams.audio],
            "subtitles": subtitles,
            "chapters": [c["metadata"].get("title") for c in container.chapters()],
            "title": container.metadata.get("title"),
            "timecode": container.streams.video[0].metadata.get("timecode"),
        }


def _finalize(tmp_path, source, name, audio_mode, keep, language="spa"):
    from pipeline.config import JobConfig
    from pipeline.dub.finalize import finalize_video

    config = JobConfig.model_validate({"output": {"keep_source_streams": keep}}).model_dump()
    dub = make_dub(tmp_path / "dub.wav", offset=0, codec="pcm_s16le", layout="stereo")
    video = {"video_uri": source, "audio_uri": dub, "output_uri": str(tmp_path / "out" / name), "rotation": 0,
             "audio_mode": audio_mode, "audio_language": language}
    fields = finalize_video(config, video, [{"seg_idx": 0, "segment_uri": make_segment(tmp_path / "seg.mp4")}])
    assert fields["output_frames"] == N_FRAMES
    return video["output_uri"]


def test_finalize_add_mode_keeps_audio_tracks_subtitles_chapters_and_tags(tmp_path):
    source = make_source(tmp_path / "source.mp4")
    out = _finalize(tmp_path, source, "dubbed.mp4", "add", keep=True)
    got = _streams(out)
    # The dub first (players and the sync check take the first), tagged and the default; the source's after it.
    assert got["audio"] == [("spa", True), ("eng", False), ("fra", False)]
    assert got["subtitles"] == [("mov_text", "deu", [(0.2, struct.pack(">H", 10) + b"Hallo Welt")])]
    assert got["chapters"] == ["Cold open", "Titles"]
    assert (got["title"], got["timecode"]) == ("Episode 1", "01:00:00:00")
    with av.open(out) as container:
        kept = container.streams.audio[1]
        assert (kept.codec_context.name, kept.codec_context.channels) == ("aac", 2)


def test_replace_mode_leaves_exactly_one_audio_stream(tmp_path):
    source = make_source(tmp_path / "source.mp4")
    kept = _streams(_finalize(tmp_path, source, "kept.mp4", "replace", keep=True))
    assert kept["audio"] == [("spa", True)]
    assert len(kept["subtitles"]) == 1 and kept["timecode"] == "01:00:00:00"  # the rest is still kept
    bare = _streams(_finalize(tmp_path, source, "bare.mp4", "replace", keep=False, language=None))
    assert len(bare["audio"]) == 1 and bare["audio"][0][0] in (None, "und")  # mp4 says "und" for none
    assert (bare["subtitles"], bare["chapters"], bare["timecode"]) == ([], [], None)


def test_srt_subtitles_need_an_mkv_output(tmp_path):
    source = make_source(tmp_path / "source.mkv")
    segment = make_segment(tmp_path / "seg.mp4")
    dub = make_dub(tmp_path / "dub.wav", offset=0, codec="pcm_s16le", layout="stereo")
    keep = KeepSource(source, audio=True, other=True)
    mp4 = str(tmp_path / "out.mp4")
    with pytest.raises(MediaError, match=r"source\.mkv.*subtitle stream #3.*mp4.*\.mkv"):
        mux_segments([segment], dub, mp4, keep=keep)
    assert not os.path.exists(mp4)
    mkv = str(tmp_path / "out.mkv")
    mux_segments([segment], dub, mkv, keep=keep, language="spa")
    got = _streams(mkv)
    assert got["audio"] == [("spa", True), ("eng", False), ("fra", False)]
    assert got["subtitles"] == [("srt", "deu", [(0.2, b"Hallo Welt")])]
    assert got["chapters"] == ["Cold open", "Titles"]


def test_manifest_audio_options_reach_the_row_and_the_identity():
    from pipeline.dub.rows import new_row
    from pipeline.dub.schemas import ManifestRow

    m = ManifestRow.model_validate({"video_uri": "v.mp4", "audio_uri": "a.wav", "output_uri": "o.mp4",
                                    "options": '{"audio_mode": "add", "audio_language": "spa"}'})
    assert (m.options.audio_mode, m.options.audio_language) == ("add", "spa")
    row = new_row(audio_mode=m.options.audio_mode, audio_language=m.options.audio_language)
    assert (row["audio_mode"], row["audio_language"]) == ("add", "spa")
    settings = {"output.crf": 18}
    assert m.options.output_settings(settings) == {"output.crf": 18, "row_audio": {"audio_mode": "add", "audio_language": "spa"}}
    plain = ManifestRow.model_validate({"video_uri": "v.mp4", "audio_uri": "a.wav", "output_uri": "o.mp4"})
    assert plain.options.output_settings(settings) == settings  # unchanged for rows without the options
    for bad in ('{"audio_mode": "mix"}', '{"audio_language": "spanish"}'):
        with pytest.raises(ValueError):
            ManifestRow.model_validate({"video_uri": "v", "audio_uri": "a", "output_uri": "o", "options": bad})


def test_kept_streams_are_timed_from_the_sources_first_frame(tmp_path):
    # A source whose picture starts 0.2 s into its container and a caption at 0.6 s: the
    # caption is 0.4 s into the picture, so 0.4 s into the output (whose 0 is that picture).
    source = str(tmp_path / "late.mkv")
    out = av.open(source, "w")
    video = _add_video(out)
    subtitle = out.add_mux_stream("subrip")
    for packet in _video_frames(video):
        packet.pts += 5  # 5 frames = 0.2 s
        packet.dts += 5
        out.mux(packet)
    caption = av.Packet(b"Later")
    caption.stream, caption.time_base = subtitle, Fraction(1, 1000)
    caption.pts = caption.dts = 600
    caption.duration = 300
    out.mux(caption)
    out.close()
    dub = make_dub(tmp_path / "dub.wav", offset=0, codec="pcm_s16le", layout="mono")
    result = str(tmp_path / "out.mkv")
    mux_segments([make_segment(tmp_path / "seg.mp4")], dub, result, keep=KeepSource(source, other=True))
    with av.open(result) as container:
        picture = container.streams.video[0]
        zero = (picture.start_time or 0) * picture.time_base
        captions = [(p.pts * p.time_base - zero, bytes(p)) for p in container.demux(container.streams.subtitles[0]) if p.size]
    assert [(float(t), text) for t, text in captions] == [(pytest.approx(0.4, abs=0.002), b"Later")]
    assert burst_time(result) == pytest.approx(BURST_AT + float(zero), abs=FRAME_S)  # and the dub with the picture
