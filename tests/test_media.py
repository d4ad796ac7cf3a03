"""Media stage: probe, segment plans, seeking decode, segment encode, concat, audio mux.

Test videos are made here with PyAV. Each frame carries its index as eight bright/dark
blocks (a binary number) over a moving gradient, so frame identity survives lossy coding.
"""

import os
import random
import threading
from fractions import Fraction

import av
import numpy as np
import pytest

from stages.media import (
    MediaError,
    SegmentWriter,
    VideoInfo,
    concat_segments,
    decode_frames,
    encode_frames,
    mux_audio,
    probe_video,
    segment_plan,
)
from stages.media.encode import _thread_policies
from stages.media.probe import codec_threads, open_media

W, H = 320, 240
NTSC = Fraction(30000, 1001)
BLOCK_W = W // 8


def pattern(index: int, width: int = W, height: int = H) -> np.ndarray:
    img = np.zeros((height, width, 3), np.uint8)
    ramp = (np.arange(width) * 2 + index * 3) % 256
    img[: height - 40, :, 0] = ramp[None, :]  # a moving gradient above the code blocks
    img[: height - 40, :, 1] = 60
    for bit in range(8):
        if (index >> bit) & 1:
            img[height - 40 :, bit * BLOCK_W : (bit + 1) * BLOCK_W] = 255
    return img


def index_of(img: np.ndarray) -> int:
    code = img[-30:-10]  # inside the code row, away from block edges
    return sum(1 << bit for bit in range(8) if code[:, bit * BLOCK_W + 8 : (bit + 1) * BLOCK_W - 8].mean() > 128)


def make_video(path, fps, n_frames, first_pts=0, container_format=None, audio_seconds=None):
    """A typical FFmpeg-made source: libx264 with B-frames, a keyframe every 12 frames."""
    out = av.open(str(path), "w", format=container_format)
    video = out.add_stream("libx264", rate=fps, options={"g": "12", "preset": "veryfast"})
    video.width, video.height, video.pix_fmt = W, H, "yuv420p"
    audio = out.add_stream("aac", rate=48000, layout="mono") if audio_seconds else None
    for i in range(n_frames):
        frame = av.VideoFrame.from_ndarray(pattern(i), format="rgb24")
        frame.pts = first_pts + i
        out.mux(video.encode(frame))
    out.mux(video.encode())
    if audio is not None:
        out.mux(audio.encode(sine_frame(audio_seconds, 48000, "mono")))
        out.mux(audio.encode())
    out.close()
    return str(path)


def sine_frame(seconds, rate, layout):
    t = np.arange(round(seconds * rate)) / rate
    wave = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    channels = 1 if layout == "mono" else 2
    frame = av.AudioFrame.from_ndarray(np.repeat(wave[None], channels, 0), format="fltp", layout=layout)
    frame.sample_rate, frame.pts = rate, 0
    return frame


def make_audio(path, seconds, rate=44100, layout="stereo", codec="aac"):
    out = av.open(str(path), "w")
    stream = out.add_stream(codec, rate=rate, layout=layout)
    out.mux(stream.encode(sine_frame(seconds, rate, layout)))
    out.mux(stream.encode())
    out.close()
    return str(path)


def audio_track(path):
    with av.open(path) as container:
        stream = container.streams.audio[0]
        duration = float(stream.duration * stream.time_base)
        samples = np.concatenate([f.to_ndarray()[0] for f in container.decode(stream)])
        return stream.codec_context.name, stream.rate, duration, samples


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    return {
        # 25 fps with an audio track; first pts 0.
        (25, "mp4"): make_video(folder / "src25.mp4", Fraction(25), 60, audio_seconds=2.4),
        # 29.97 fps whose first pts is 5 frames in (an edit list in mp4).
        ("ntsc", "mp4"): make_video(folder / "src2997.mp4", NTSC, 90, first_pts=5),
        # mpeg-ts: starts at 1.4 s-ish, no frame count in the container, byte-bisecting seek.
        ("ntsc", "ts"): make_video(folder / "src2997.ts", NTSC, 90, first_pts=5, container_format="mpegts"),
        # matroska: millisecond timestamps, so frame times are not exact multiples.
        ("ntsc", "mkv"): make_video(folder / "src2997.mkv", NTSC, 90, first_pts=5),
    }


@pytest.mark.parametrize(
    "key, fps, n_frames, has_audio",
    [
        ((25, "mp4"), Fraction(25), 60, True),
        (("ntsc", "mp4"), NTSC, 90, False),
        (("ntsc", "ts"), NTSC, 90, False),
        (("ntsc", "mkv"), NTSC, 90, False),
    ],
)
def test_probe_reports_exact_rate_count_size(sources, key, fps, n_frames, has_audio):
    info = probe_video(sources[key])
    assert isinstance(info.fps, Fraction) and info.fps == fps
    assert info.n_frames == n_frames
    assert (info.width, info.height) == (W, H)
    assert info.duration_s == pytest.approx(n_frames / float(fps), abs=1e-9)
    assert info.has_audio is has_audio
    assert (info.codec, info.pix_fmt, info.rotation) == ("h264", "yuv420p", 0)


def test_probe_reads_rotation_and_mux_writes_it(tmp_path):
    path = str(tmp_path / "rot.mp4")
    out = av.open(path, "w")
    stream = out.add_stream("libx264", rate=25)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    stream.set_display_rotation(90)
    for i in range(3):
        frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 40 * i, np.uint8), format="rgb24")
        frame.pts = i
        out.mux(stream.encode(frame))
    out.mux(stream.encode())
    out.close()
    info = probe_video(path)
    assert (info.rotation, info.width, info.height) == (90, 64, 48)  # coded size kept

    audio = make_audio(tmp_path / "a.wav", 0.12, codec="pcm_s16le")
    kept = str(tmp_path / "kept.mp4")
    mux_audio(path, audio, kept)
    assert probe_video(kept).rotation == 90
    turned = str(tmp_path / "turned.mp4")
    mux_audio(path, audio, turned, rotation=270)
    assert probe_video(turned).rotation == 270


def _info(fps, n_frames):
    return VideoInfo(
        width=W, height=H, rotation=0, fps=fps, n_frames=n_frames, duration_s=float(n_frames / fps),
        codec="h264", pix_fmt="yuv420p", has_audio=False,
    )


def test_segment_plans_cover_every_frame_once_in_order():
    rng = random.Random(0)
    rates = [Fraction(25), NTSC, Fraction(24000, 1001), Fraction(50), Fraction(30)]
    for _ in range(300):
        fps = rng.choice(rates)
        n_frames = rng.randint(1, 3000)
        seconds = rng.choice([0.5, 1.0, 2.0, 3.3, 5.0])
        plan = segment_plan("vid", _info(fps, n_frames), seconds)
        seg_frames = round(Fraction(seconds) * fps)
        covered = [i for seg in plan for i in range(seg.frame_start, seg.frame_end)]
        assert covered == list(range(n_frames))
        assert [s.seg_idx for s in plan] == list(range(len(plan)))
        assert all(s.video_id == "vid" for s in plan)
        assert all(s.frame_end - s.frame_start == seg_frames for s in plan[:-1])
        last = plan[-1].frame_end - plan[-1].frame_start
        if len(plan) > 1:  # the tail is never under half a segment
            assert seg_frames / 2 <= last < seg_frames * 3 / 2
        for seg in plan:
            assert seg.t0 == pytest.approx(seg.frame_start / float(fps), abs=1e-9)
            assert seg.t1 == pytest.approx(seg.frame_end / float(fps), abs=1e-9)


def test_segment_plan_merges_a_tiny_tail():
    fps = Fraction(25)  # 2 s = 50 frames
    merged = segment_plan("v", _info(fps, 110), 2.0)  # tail of 10 < 25 joins the previous one
    assert [(s.frame_start, s.frame_end) for s in merged] == [(0, 50), (50, 110)]
    kept = segment_plan("v", _info(fps, 125), 2.0)  # tail of 25 is half a segment: kept
    assert [(s.frame_start, s.frame_end) for s in kept] == [(0, 50), (50, 100), (100, 125)]
    single = segment_plan("v", _info(fps, 7), 2.0)
    assert [(s.frame_start, s.frame_end) for s in single] == [(0, 7)]
    with pytest.raises(ValueError):
        segment_plan("v", _info(fps, 7), 0.0)


@pytest.mark.parametrize("key", [(25, "mp4"), ("ntsc", "mp4"), ("ntsc", "ts"), ("ntsc", "mkv")])
def test_decode_range_yields_exact_indices_and_content(sources, key):
    path = sources[key]
    n_frames = probe_video(path).n_frames
    # gop is 12: none of these ranges but the first starts on a keyframe
    for start, end in [(0, 4), (17, 41), (37, 38), (n_frames - 7, n_frames)]:
        got = list(decode_frames(path, start, end))
        assert [i for i, _ in got] == list(range(start, end))
        assert [index_of(img) for _, img in got] == list(range(start, end))
        assert all(img.shape == (H, W, 3) and img.dtype == np.uint8 for _, img in got)
    with pytest.raises(MediaError, match=os.path.basename(path)):
        list(decode_frames(path, n_frames - 2, n_frames + 3))


@pytest.mark.parametrize("key, fps, n_frames", [(("ntsc", "mp4"), NTSC, 90), ((25, "mp4"), Fraction(25), 60)])
@pytest.mark.parametrize("rate", [25, 50])
def test_iter_at_rate_resamples_one_frame_at_a_time(sources, monkeypatch, key, fps, n_frames, rate):
    """29.97 -> 25 drops frames, 25 -> 50 repeats each: the frames are the source frames
    source_frames_at_rate picks, and the first comes out after one source frame's decode."""
    import stages.media.decode as decode_module
    from stages.media.decode import decode_at_rate, iter_at_rate, source_frames_at_rate

    path = sources[key]
    wanted = source_frames_at_rate(10, 40, fps, n_frames, rate).tolist()
    got = list(iter_at_rate(path, 10, 40, fps, n_frames, rate))
    assert [index_of(f) for f in got] == wanted and len(got) == 30
    assert (len(set(wanted)) == 30) == (rate == 25)  # at 50 fps some frames repeat
    assert [index_of(f) for f in decode_at_rate(path, 10, 40, fps, n_frames, rate)] == wanted

    decoded, decode_frames = [], decode_module.decode_frames

    def counting_decode_frames(*args, **kwargs):
        for item in decode_frames(*args, **kwargs):
            decoded.append(item[0])
            yield item

    monkeypatch.setattr(decode_module, "decode_frames", counting_decode_frames)
    frames = iter_at_rate(path, 10, 40, fps, n_frames, rate)
    assert index_of(next(frames)) == wanted[0] and decoded == [wanted[0]]


def test_full_chain_keeps_size_rate_count_and_order(sources, tmp_path):
    source = sources[("ntsc", "mp4")]
    info = probe_video(source)
    plan = segment_plan("v", info, 1.0)
    assert len(plan) == 3

    segment_paths = []
    for seg in plan:  # each segment on its own, as separate workers would
        path = str(tmp_path / f"seg{seg.seg_idx}.mp4")
        with SegmentWriter(path, info.width, info.height, info.fps, seg.frame_start, preset="veryfast") as writer:
            for _, img in decode_frames(source, seg.frame_start, seg.frame_end):
                writer.write(img)
        segment_paths.append(path)
        seg_info = probe_video(path)
        assert seg_info.n_frames == seg.frame_end - seg.frame_start
        with av.open(path) as container:  # starts with a keyframe, pts in frame units
            stream = container.streams.video[0]
            first = next(p for p in container.demux(stream) if p.pts is not None)
            assert first.is_keyframe
            assert first.pts * stream.time_base * info.fps == pytest.approx(seg.frame_start, abs=0.05)

    joined = str(tmp_path / "joined.mp4")
    concat_segments(segment_paths, joined)
    with av.open(joined) as container:  # one continuous timeline, exactly one frame apart
        stream = container.streams.video[0]
        packets = [p for p in container.demux(stream) if p.pts is not None]
        times = [(p.pts * stream.time_base, p.dts * stream.time_base) for p in packets]
    assert [t for t, _ in times] == [Fraction(i) / info.fps for i in range(info.n_frames)]
    dts = [d for _, d in times]
    assert all(a < b for a, b in zip(dts, dts[1:]))

    dubbed = make_audio(tmp_path / "dub.m4a", info.duration_s)
    final = str(tmp_path / "final.mp4")
    result = mux_audio(joined, dubbed, final)
    out = probe_video(final)
    assert (out.width, out.height, out.fps, out.n_frames) == (info.width, info.height, info.fps, info.n_frames)
    assert out.has_audio
    assert [index_of(img) for _, img in decode_frames(final, 0, out.n_frames)] == list(range(info.n_frames))
    codec, rate, duration, _ = audio_track(final)
    assert (codec, rate) == ("aac", 48000)
    assert duration == pytest.approx(info.duration_s, abs=0.02)
    assert result.video_duration_s == pytest.approx(info.duration_s, abs=1e-9)
    assert result.audio_duration_s == pytest.approx(info.duration_s, abs=0.02)
    assert result.padded_s < 0.02 and result.trimmed_s < 0.02


@pytest.mark.parametrize("audio_seconds", [1.0, 5.0])
def test_mux_pads_short_and_trims_long_audio(sources, tmp_path, audio_seconds):
    video = sources[(25, "mp4")]  # 2.4 s, and its own audio track is replaced
    video_s = 2.4
    dubbed = make_audio(tmp_path / "dub.wav", audio_seconds, rate=22050, layout="mono", codec="pcm_s16le")
    final = str(tmp_path / "final.mp4")
    result = mux_audio(video, dubbed, final)
    assert result.video_duration_s == pytest.approx(video_s)
    assert result.audio_duration_s == pytest.approx(audio_seconds, abs=1e-3)
    assert result.padded_s == pytest.approx(max(0.0, video_s - audio_seconds), abs=1e-3)
    assert result.trimmed_s == pytest.approx(max(0.0, audio_seconds - video_s), abs=1e-3)
    assert probe_video(final).n_frames == 60
    _, _, duration, samples = audio_track(final)
    assert duration == pytest.approx(video_s, abs=0.02)
    loud = np.abs(samples[: int(0.9 * 48000)])
    assert loud.max() > 0.3  # the tone is there
    if audio_seconds < video_s:  # and silence after it ends
        assert np.abs(samples[int(1.1 * 48000) : int(2.3 * 48000)]).max() < 0.01


def test_odd_size_keeps_exact_resolution(tmp_path):
    path = str(tmp_path / "odd.mp4")
    frames = [pattern(i, 161, 121) for i in range(4)]
    assert encode_frames(path, frames, 161, 121, Fraction(25), preset="veryfast") == 4
    info = probe_video(path)
    assert (info.width, info.height, info.n_frames, info.pix_fmt) == (161, 121, 4, "yuv444p")
    decoded = [img for _, img in decode_frames(path, 0, 4)]
    assert all(img.shape == (121, 161, 3) for img in decoded)
    assert np.abs(decoded[2].astype(int) - frames[2]).mean() < 3


def test_writer_checks_frames_and_removes_partial_file(tmp_path):
    path = str(tmp_path / "partial.mp4")
    with pytest.raises(ValueError, match="partial.mp4"):
        with SegmentWriter(path, 64, 48, Fraction(25), 0) as writer:
            writer.write(np.zeros((48, 64, 3), np.uint8))
            writer.write(np.zeros((64, 48, 3), np.uint8))  # wrong size
    assert not os.path.exists(path)


def test_concat_rejects_segments_that_cannot_share_a_stream(tmp_path):
    a, b = str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4")
    encode_frames(a, [np.zeros((48, 64, 3), np.uint8)] * 2, 64, 48, Fraction(25))
    encode_frames(b, [np.zeros((48, 80, 3), np.uint8)] * 2, 80, 48, Fraction(25), frame_start=2)
    out = str(tmp_path / "out.mp4")
    with pytest.raises(MediaError, match="b.mp4"):
        concat_segments([a, b], out)
    assert not os.path.exists(out)


def test_bad_inputs_raise_media_error_naming_the_file(sources, tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    audio_only = make_audio(tmp_path / "voice.m4a", 0.5)
    missing = str(tmp_path / "missing.mp4")
    for path, problem in [(str(junk), "cannot be opened"), (audio_only, "no video stream"), (missing, "no such file")]:
        name = os.path.basename(path)
        with pytest.raises(MediaError, match=f"{name}.*{problem}"):
            probe_video(path)
        with pytest.raises(MediaError, match=name):
            list(decode_frames(path, 0, 2))

    video = sources[(25, "mp4")]
    out = str(tmp_path / "out.mp4")
    with pytest.raises(MediaError, match="audio.*junk.mp4"):
        mux_audio(video, str(junk), out)
    with pytest.raises(MediaError, match="audio.*src2997.mp4.*no audio stream"):
        mux_audio(video, sources[("ntsc", "mp4")], out)
    assert not os.path.exists(out)


def decoder_threads_after_decoding(path, threads):
    """The thread count the opened decoder holds, read back from PyAV after a decode."""
    with open_media(path, "video", threads) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        next(container.decode(stream))
        return stream.codec_context.thread_count


def test_open_media_caps_decoder_threads(sources):
    path = sources[(25, "mp4")]
    assert decoder_threads_after_decoding(path, 1) == 1
    assert decoder_threads_after_decoding(path, 2) == 2
    with pytest.raises(ValueError, match="threads"):
        open_media(path, "video", 0)


def test_decode_with_one_thread_gives_the_same_frames_and_asks_for_one(sources, monkeypatch):
    import stages.media.decode as decode

    asked = []

    def recording_open_media(path, role="file", threads=None):
        asked.append(threads)
        return open_media(path, role, threads)

    monkeypatch.setattr(decode, "open_media", recording_open_media)
    path = sources[("ntsc", "mp4")]
    automatic = [(i, img) for i, img in decode_frames(path, 17, 41)]
    single = [(i, img) for i, img in decode_frames(path, 17, 41, threads=1)]
    assert [i for i, _ in single] == [i for i, _ in automatic] == list(range(17, 41))
    for (_, a), (_, b) in zip(automatic, single):
        np.testing.assert_array_equal(a, b)
    assert asked[0] is None and asked[-1] == 1 and set(asked) == {None, 1}
    assert probe_video(path, threads=1) == probe_video(path)


def test_codec_threads_follow_the_pool_reservation():
    assert [codec_threads(c) for c in (0.25, 1, 1.5, 4)] == [1, 1, 2, 4]


def test_writer_with_one_thread_encodes_the_same_frames(tmp_path):
    frames = [pattern(i) for i in range(6)]
    decoded = {}
    for threads in (None, 1):
        path = str(tmp_path / f"threads-{threads}.mp4")
        # crf 0 is lossless, so any difference between thread counts would show in the pixels.
        with SegmentWriter(path, W, H, Fraction(25), 0, crf=0, preset="veryfast", threads=threads) as writer:
            for frame in frames:
                writer.write(frame)
            held = writer.threads
        assert held == (0 if threads is None else threads)  # 0: x264 picks from the node's cores
        decoded[threads] = np.stack([img for _, img in decode_frames(path, 0, len(frames))])
    np.testing.assert_array_equal(decoded[1], decoded[None])
    with pytest.raises(ValueError, match="threads"):
        SegmentWriter(str(tmp_path / "zero.mp4"), W, H, Fraction(25), 0, threads=0)


def _real_time_threads() -> set[int]:
    return {tid for tid, policy in _thread_policies().items() if policy in (os.SCHED_FIFO, os.SCHED_RR)}


def test_an_av1_segment_leaves_every_thread_in_its_own_scheduling_class(tmp_path):
    """SVT-AV1 run as root (as these machines and most containers run) makes the thread
    that opens it, and every thread it starts, SCHED_FIFO; the writer puts them back, the
    opening thread in its own class (an idle-class fused actor stays idle) and the new
    threads in the one they would have inherited, so an encoding worker never runs ahead of
    everything else on its node. (Not as root, the library leaves the threads alone and
    this holds anyway.)"""
    before = _real_time_threads()

    def encode(name: str) -> int:
        path = str(tmp_path / f"{name}.mkv")
        written = encode_frames(path, [pattern(i) for i in range(4)], W, H, Fraction(25), codec="libsvtav1", preset="12")
        assert written == 4 and probe_video(path).n_frames == 4
        return os.sched_getscheduler(0)

    assert encode("ordinary") == os.SCHED_OTHER
    assert _real_time_threads() <= before
    seen = {}

    def idle_thread():
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        started = set(os.listdir("/proc/self/task"))
        seen["after"] = encode("idle")
        seen["started"] = {int(t): os.sched_getscheduler(int(t)) for t in set(os.listdir("/proc/self/task")) - started}

    thread = threading.Thread(target=idle_thread)
    thread.start()
    thread.join()
    assert seen["after"] == os.SCHED_IDLE
    assert _real_time_threads() <= before
    # Threads the encoder started here (none when an earlier encode's are reused) are idle too.
    assert set(seen["started"].values()) <= {os.SCHED_IDLE}
