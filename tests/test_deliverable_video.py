"""The output keeps the source's pixel format, bit depth and colour coding (issue 11).

Stage level, no Ray: sources are made here with PyAV (the astronaut at 320x240, 5 frames
at 25 fps), composed with a generated crop through a known affine, and the output is
compared with the source in the source's own samples (10-bit Y as uint16)."""
from __future__ import annotations

from dataclasses import replace
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest
from skimage.data import astronaut

from stages.compose import ComposeStage
from stages.face import MouthMask
from stages.face.paste import frame_planes
from stages.media import EncoderSettings, MediaError, decode_native_frames, frame_to_rgb, probe_video
from stages.media.mux import mux_segments

W, H, N, FPS = 320, 240, 5, Fraction(25)
# Source -> crop affine: the 128x128 source square at (100, 40) fills the 256x256 crop, so
# the mouth mask lands around x 134..194, y 121..159 (the astronaut's mouth).
AFFINE = np.array([[2.0, 0.0, -200.0], [0.0, 2.0, -80.0]])
HDR10 = dict(color_primaries=9, color_trc=16, colorspace=9, color_range=1)  # bt2020, smpte2084, bt2020nc, tv
BT709 = dict(color_primaries=1, color_trc=1, colorspace=1, color_range=1)
RED = np.array([255, 0, 0], np.uint8)
MASTERING = "G(13250,34500)B(7500,3000)R(34000,16000)WP(15635,16450)L(10000000,50)"  # P3 D65, 1000 nits


def source_frames() -> list[np.ndarray]:
    """N RGB frames: the astronaut, drifting a pixel a frame so the codec has motion."""
    base = cv2.resize(astronaut(), (W + N, H), interpolation=cv2.INTER_AREA)
    return [np.ascontiguousarray(base[:, i:i + W]) for i in range(N)]


def make_source(path, codec, pix_fmt, tags, options=None, gop=None, field_order=None, container=None, frames=None):
    """Encode `frames` (default source_frames()) as `pix_fmt` with the given colour tags
    (the frames' R'G'B' code values go through the tagged matrix and range, as a mastering
    tool would)."""
    frames = source_frames() if frames is None else frames
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=25, options=options or {})
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        ctx = stream.codec_context
        ctx.color_primaries, ctx.color_trc = tags["color_primaries"], tags["color_trc"]
        ctx.colorspace, ctx.color_range = tags["colorspace"], tags["color_range"]
        if gop:
            ctx.gop_size = gop
        if field_order is not None:
            ctx.field_order = field_order
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
                format=pix_fmt, dst_colorspace=tags["colorspace"], dst_color_range=tags["color_range"])
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return str(path)


def native(path) -> list[list[np.ndarray]]:
    """Every frame's planes as decoded, copied (uint8, or uint16 above 8 bits)."""
    return [[np.array(p) for p in frame_planes(f)] for _, f in decode_native_frames(path, 0, probe_video(path).n_frames)]


def mouth_alpha(blend_mask) -> np.ndarray:
    """(H, W) float: the blend mask warped into the frame."""
    return cv2.warpAffine(blend_mask.astype(np.float32), cv2.invertAffineTransform(AFFINE), (W, H),
                          flags=cv2.INTER_LINEAR)


@pytest.fixture(scope="module")
def blend_mask():
    return MouthMask().feathered(6.0)


def compose(source, out_path, blend_mask, has_face=None, crop_colour=RED, **stage_kwargs):
    stage_kwargs.setdefault("preset", "ultrafast")
    has_face = np.ones(N, bool) if has_face is None else has_face
    generated = np.broadcast_to(crop_colour, (N, 256, 256, 3)).copy()
    affines = np.where(has_face[:, None, None], AFFINE[None], np.nan)
    written = ComposeStage(blend_mask, threads=1, **stage_kwargs)(
        source, str(out_path), 0, N, W, H, FPS, generated, affines, has_face, video=probe_video(source))
    assert written == N
    return str(out_path)


def colour_of(info) -> tuple:
    return (info.pix_fmt, info.color_primaries, info.color_trc, info.colorspace, info.color_range)


def assert_kept_outside_and_changed_inside(source, output, blend_mask, bits, has_face):
    """Outside the mouth the output's samples are the source's up to codec loss; inside
    the mouth of a face frame they changed; frames without a face match everywhere."""
    src, out = native(source), native(output)
    alpha = mouth_alpha(blend_mask)
    far = cv2.dilate((alpha > 0).astype(np.uint8), np.ones((9, 9))) == 0
    inside = alpha > 0.99
    assert inside.sum() > 500 and far.mean() > 0.9
    unit = 1 << (bits - 8)  # one 8-bit step in these samples
    for i in range(N):
        y_src, y_out = src[i][0].astype(np.int32), out[i][0].astype(np.int32)
        assert y_out.dtype == y_src.dtype and y_out.shape == (H, W)
        diff = np.abs(y_out - y_src)
        assert diff[far].mean() < 1.5 * unit, f"frame {i}: pixels far from the mouth changed"
        if has_face[i]:
            assert diff[inside].mean() > 20 * unit, f"frame {i}: the mouth was not pasted"
        else:
            assert diff.mean() < 1.5 * unit, f"frame {i} has no face and must be the source's"
    return src, out


@pytest.mark.parametrize("name,codec,pix_fmt,tags,options", [
    ("hdr10_x265.mp4", "libx265", "yuv420p10le", HDR10, {"x265-params": "log-level=error"}),
    ("hdr10_x264.mp4", "libx264", "yuv420p10le", HDR10, {}),
    ("sdr_422_10bit_x264.mov", "libx264", "yuv422p10le", BT709, {}),
])
def test_compose_writes_the_source_format_and_colour_back(tmp_path, blend_mask, name, codec, pix_fmt, tags, options):
    source = make_source(tmp_path / name, codec, pix_fmt, tags, dict(options, crf="10", preset="ultrafast"))
    info = probe_video(source)
    assert colour_of(info) == (pix_fmt, *tags.values()) and info.bit_depth == 10
    has_face = np.array([True, True, False, True, True])
    output = compose(source, tmp_path / f"out-{name}", blend_mask, has_face=has_face, codec=codec, crf=10)
    out_info = probe_video(output)
    assert colour_of(out_info) == colour_of(info)
    assert (out_info.width, out_info.height, out_info.n_frames, out_info.bit_depth) == (W, H, N, 10)
    src, out = assert_kept_outside_and_changed_inside(source, output, blend_mask, 10, has_face)
    # Real 10-bit samples, not 8-bit ones shifted up: most are not multiples of 4.
    assert (out[0][0] % 4 != 0).mean() > 0.5
    # Chroma keeps the source's subsampling.
    cw, ch = (W // 2, H // 2) if pix_fmt == "yuv420p10le" else (W // 2, H)
    assert out[0][1].shape == src[0][1].shape == (ch, cw)
    # The mouth is the generated red when decoded with the source's own matrix and range.
    with av.open(output) as container:
        rgb = frame_to_rgb(next(container.decode(video=0))).astype(np.float32)
    inside = cv2.erode((mouth_alpha(blend_mask) > 0.99).astype(np.uint8), np.ones((5, 5))).astype(bool)
    r, g, b = (rgb[inside][:, c].mean() for c in range(3))
    assert r > 220 and g < 40 and b < 40, (r, g, b)


def test_full_range_8bit_source_keeps_its_range_and_matrix(tmp_path, blend_mask):
    tags = dict(color_primaries=6, color_trc=6, colorspace=6, color_range=2)  # smpte170m, pc range
    source = make_source(tmp_path / "full.mp4", "libx264", "yuv420p", tags, {"crf": "10", "preset": "ultrafast"})
    output = compose(source, tmp_path / "out-full.mp4", blend_mask, crf=10)
    assert colour_of(probe_video(output)) == colour_of(probe_video(source))
    src, out = assert_kept_outside_and_changed_inside(source, output, blend_mask, 8, np.ones(N, bool))
    # Full range reaches below 16 / above 235 where the source does (no squeeze to tv range).
    assert out[0][0].max() > 235 and (src[0][0].max() - out[0][0].max()) <= 3
    with av.open(output) as container:
        rgb = frame_to_rgb(next(container.decode(video=0))).astype(np.float32)
    inside = cv2.erode((mouth_alpha(blend_mask) > 0.99).astype(np.uint8), np.ones((5, 5))).astype(bool)
    assert rgb[inside][:, 0].mean() > 220 and rgb[inside][:, 1:].mean() < 40


def test_interlaced_source_is_refused_naming_file_and_field_order(tmp_path, blend_mask):
    source = make_source(tmp_path / "interlaced.mp4", "libx264", "yuv420p", BT709,
                         {"flags": "+ilme+ildct", "preset": "ultrafast"}, field_order=2)
    with pytest.raises(MediaError, match=r"interlaced\.mp4.*interlaced \(top field first\)"):
        probe_video(source)
    with pytest.raises(MediaError, match=r"interlaced\.mp4.*interlaced"):
        ComposeStage(blend_mask)(source, str(tmp_path / "never.mp4"), 0, N, W, H, FPS,
                                 np.zeros((N, 256, 256, 3), np.uint8), np.full((N, 2, 3), np.nan), np.zeros(N, bool))
    assert not (tmp_path / "never.mp4").exists()


def test_formats_that_cannot_be_kept_are_refused_naming_file_and_format(tmp_path, blend_mask):
    twelve = make_source(tmp_path / "twelve.mkv", "libx265", "yuv420p12le", HDR10,
                         {"x265-params": "log-level=error", "preset": "ultrafast"})
    assert probe_video(twelve).bit_depth == 12
    with pytest.raises(MediaError, match=r"twelve\.mkv.*yuv420p12le.*not one compose can keep"):
        compose(twelve, tmp_path / "never.mkv", blend_mask, codec="libx265")
    assert not (tmp_path / "never.mkv").exists()
    # 4:4:4 10-bit is kept by x265, but SVT-AV1 writes only 4:2:0: refused, not converted.
    full = make_source(tmp_path / "full444.mkv", "libx265", "yuv444p10le", BT709,
                       {"x265-params": "log-level=error", "preset": "ultrafast"})
    with pytest.raises(MediaError, match=r"full444\.mkv.*yuv444p10le.*cannot be written by libsvtav1"):
        compose(full, tmp_path / "never.mkv", blend_mask, codec="libsvtav1")


def test_pyav_encoders_write_the_10bit_formats_we_keep():
    writes = {name: {f.name for f in av.codec.Codec(name, "w").video_formats} for name in ("libx264", "libx265", "libsvtav1")}
    assert {"yuv420p10le", "yuv422p10le"} <= writes["libx264"]
    assert {"yuv420p10le", "yuv422p10le"} <= writes["libx265"]
    assert "yuv420p10le" in writes["libsvtav1"]


def test_every_encoder_gets_a_quality_or_a_bitrate():
    assert EncoderSettings("libx264", crf=20).options("yuv420p") == ({"preset": "medium", "crf": "20"}, None)
    assert EncoderSettings("libx265", crf=22).options("yuv420p10le")[0]["crf"] == "22"
    svt, rate = EncoderSettings("libsvtav1", crf=30, preset="veryfast").options("yuv420p10le")
    assert (svt["crf"], svt["preset"], rate) == ("30", "10", None)
    vp9, rate = EncoderSettings("libvpx-vp9", crf=31).options("yuv420p")
    assert (vp9["crf"], vp9["b"], rate) == ("31", "0", None)
    prores, rate = EncoderSettings("prores_ks", qscale=9).options("yuv422p10le")
    assert (prores["profile"], prores["flags"], prores["global_quality"], rate) == ("3", "+qscale", str(9 * 118), None)
    assert EncoderSettings("prores_ks").options("yuv444p10le")[0]["profile"] == "4"
    assert EncoderSettings("mpeg4", qscale=3).options("yuv420p")[0] == {"qmin": "3", "qmax": "3"}
    options, rate = EncoderSettings("libx264", bitrate=2_000_000).options("yuv420p")
    assert rate == 2_000_000 and "crf" not in options
    with pytest.raises(ValueError, match="prores_ks has no bitrate"):
        EncoderSettings("prores_ks", bitrate=1_000_000).options("yuv422p10le")


def test_match_source_picks_the_family_bitrate_and_gop_of_the_source(tmp_path, blend_mask):
    source = make_source(tmp_path / "gop3.mkv", "libx265", "yuv420p10le", HDR10,
                         {"x265-params": "log-level=error", "preset": "ultrafast", "crf": "12"}, gop=3)
    info = probe_video(source, measure_gop=True)
    assert info.codec == "hevc" and info.gop == 3
    settings = EncoderSettings("match-source", crf=18).for_source(info)
    assert (settings.codec, settings.gop) == ("libx265", 3)
    assert settings.bitrate == (info.bit_rate or None)
    with pytest.raises(MediaError, match="gop3.mkv.*no encoder for the source codec 'rawvideo'"):
        EncoderSettings("match-source").for_source(replace(info, codec="rawvideo"), source)
    # Compose with match-source: HEVC out, keyframes every 3 frames, the source's colour.
    output = str(tmp_path / "out.mkv")
    ComposeStage(blend_mask, codec="match-source", preset="ultrafast", threads=1)(
        source, output, 0, N, W, H, FPS, np.broadcast_to(RED, (N, 256, 256, 3)).copy(),
        np.repeat(AFFINE[None], N, 0), np.ones(N, bool))
    out = probe_video(output, measure_gop=True)
    assert out.codec == "hevc" and out.gop == 3 and colour_of(out) == colour_of(info)


@pytest.mark.parametrize("container,codec,pix_fmt", [
    ("mkv", "libx265", "yuv420p10le"),
    ("mov", "prores_ks", "yuv422p10le"),
])
def test_segments_in_mov_and_mkv_keep_colour_through_the_final_mux(tmp_path, blend_mask, container, codec, pix_fmt):
    options = {"x265-params": "log-level=error", "preset": "ultrafast", "crf": "10"} if codec == "libx265" else {}
    source = make_source(tmp_path / f"src.{container}", codec, pix_fmt, HDR10, options)
    segment = compose(source, tmp_path / f"seg.{container}", blend_mask, codec=codec, crf=10, container=container)
    audio = tmp_path / "tone.wav"
    with av.open(str(audio), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=48000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 9600), np.int16), format="s16", layout="mono")
        frame.sample_rate = 48000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    final = str(tmp_path / f"final.{container}")
    mux_segments([segment], str(audio), final)
    with av.open(final) as c:
        assert c.format.name.split(",")[0] in ({"mkv": "matroska", "mov": "mov"}[container],)
    assert colour_of(probe_video(final)) == colour_of(probe_video(source)) == (pix_fmt, *HDR10.values())
    assert probe_video(final).n_frames == N


def test_prores_in_mp4_is_refused_with_the_segment_named(tmp_path, blend_mask):
    source = make_source(tmp_path / "pr.mov", "prores_ks", "yuv422p10le", BT709)
    with pytest.raises(MediaError, match=r"seg\.mp4.*prores_ks"):
        compose(source, tmp_path / "seg.mp4", blend_mask, codec="prores_ks")


def test_plan_and_compose_operators_carry_the_source_format_to_the_segment(tmp_path):
    """PlanOp and ComposeOp outside Ray: the probe's format and colour travel in the row to
    the encoded segment, which is in the output's container (.mkv here); a 12-bit source
    fails at plan, naming the file and the format."""
    from pipeline.config import JobConfig
    from pipeline.dub.operators import ComposeOp, PlanOp
    from pipeline.dub.rows import new_row, pack

    source = make_source(tmp_path / "hdr.mp4", "libx265", "yuv420p10le", HDR10, {
        "x265-params": f"log-level=error:master-display={MASTERING}:max-cll=1000,400", "preset": "ultrafast", "crf": "10"})
    audio = tmp_path / "dub.wav"
    audio.write_bytes(b"not read by plan")
    config = JobConfig(cache_uri=str(tmp_path / "cache"), output={"codec": "libx265", "preset": "ultrafast"}).model_dump()
    row = new_row(job_id="job", row_index=0, video_id="hdr", video_uri=source, audio_uri=str(audio),
                  output_uri=str(tmp_path / "out.mkv"), segment_seconds=1.0, work_key="wk")
    planned = PlanOp(config)(row)
    assert planned["error"] == "", planned["error"]
    assert (planned["pix_fmt"], planned["color_primaries"], planned["color_trc"], planned["colorspace"],
            planned["color_range"], planned["bit_depth"], planned["source_codec"]) == ("yuv420p10le", 9, 16, 9, 1, 10, "hevc")
    segment_row = dict(planned, audio_sha256="sha", seg_idx=0, n_segments=1, frame_start=0, frame_end=N, face_frames=N,
                       generated=pack(np.broadcast_to(RED, (N, 256, 256, 3)).copy()),
                       affines=pack(np.repeat(AFFINE[None], N, 0)), has_face=pack(np.ones(N, bool)))
    composed = ComposeOp(config)(segment_row)
    assert composed["error"] == "", composed["error"]
    segment = composed["segment_uri"]
    with av.open(segment) as c:
        assert c.format.name.startswith("matroska")
    out = probe_video(segment)
    assert colour_of(out) == ("yuv420p10le", 9, 16, 9, 1) and out.codec == "hevc" and out.n_frames == N
    assert (planned["mastering_display"], out.mastering_display, out.content_light) == (MASTERING, MASTERING, "1000,400")

    twelve = make_source(tmp_path / "twelve.mp4", "libx265", "yuv420p12le", HDR10,
                         {"x265-params": "log-level=error", "preset": "ultrafast"})
    failed = PlanOp(config)(dict(row, video_uri=twelve))
    assert failed["error_stage"] == "plan" and "twelve.mp4" in failed["error"] and "yuv420p12le" in failed["error"]


@pytest.mark.parametrize("codec,pix_fmt,better,worse", [
    ("libx264", "yuv420p10le", dict(crf=4), dict(crf=40)),
    ("libx265", "yuv422p10le", dict(crf=4), dict(crf=40)),
    ("libsvtav1", "yuv420p10le", dict(crf=4), dict(crf=60)),
    ("libvpx-vp9", "yuv420p", dict(crf=4), dict(crf=60)),
    ("prores_ks", "yuv422p10le", dict(qscale=1), dict(qscale=31)),
    ("mpeg4", "yuv420p", dict(qscale=1), dict(qscale=31)),
    ("libx264", "yuv420p", dict(bitrate=4_000_000), dict(bitrate=100_000)),
])
def test_each_encoder_takes_its_quality_setting(tmp_path, codec, pix_fmt, better, worse):
    """FFmpeg ignores an option an encoder does not know, so each setting is shown to work
    by what it does: the better setting gives a clearly larger file."""
    from stages.media import SegmentWriter

    sizes = []
    for n, quality in enumerate((better, worse)):
        settings = EncoderSettings(codec, preset="ultrafast" if codec.startswith("libx") else "veryfast", **quality)
        path = tmp_path / f"{n}.{'mov' if codec == 'prores_ks' else 'mkv'}"
        with SegmentWriter(str(path), W, H, FPS, 0, pix_fmt=pix_fmt, settings=settings, threads=1) as writer:
            for rgb in source_frames():
                writer.write(rgb)
        info = probe_video(str(path))
        assert (info.pix_fmt, info.n_frames) == (pix_fmt, N)
        sizes.append(path.stat().st_size)
    assert sizes[0] > 1.5 * sizes[1], sizes


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_a_face_found_upright_is_pasted_in_coded_orientation(tmp_path, blend_mask, rotation):
    """Phone video: the frames are coded turned; the face is found in the upright view and
    its affine mapped back (coded_affine), so compose pastes in coded orientation and the
    upright view of the output has the mouth where the upright affine put it."""
    from stages.face.paste import coded_affine

    k = rotation // 90
    coded = [np.ascontiguousarray(np.rot90(rgb, -k)) for rgb in source_frames()]  # np.rot90(coded, k) is upright
    ch, cw = coded[0].shape[:2]
    path = make_source(tmp_path / f"turned{rotation}.mp4", "libx264", "yuv420p", BT709,
                       options={"crf": "10", "preset": "ultrafast"}, frames=coded)
    M = coded_affine(AFFINE, rotation, cw, ch)
    output = str(tmp_path / f"out{rotation}.mp4")
    ComposeStage(blend_mask, preset="ultrafast", crf=10, threads=1)(
        path, output, 0, N, cw, ch, FPS, np.broadcast_to(RED, (N, 256, 256, 3)).copy(), np.repeat(M[None], N, 0),
        np.ones(N, bool))
    with av.open(output) as container:
        upright = np.rot90(frame_to_rgb(next(container.decode(video=0))), k).astype(np.float32)
    assert upright.shape == (H, W, 3)
    alpha = mouth_alpha(blend_mask)  # where the upright affine puts the mouth
    inside = cv2.erode((alpha > 0.99).astype(np.uint8), np.ones((5, 5))).astype(bool)
    far = cv2.dilate((alpha > 0).astype(np.uint8), np.ones((9, 9))) == 0
    assert upright[inside][:, 0].mean() > 220 and upright[inside][:, 1:].mean() < 40
    assert np.abs(upright[far] - source_frames()[0].astype(np.float32)[far]).mean() < 3


@pytest.mark.parametrize("codec,container", [("libx265", "mp4"), ("libx264", "mp4"), ("libsvtav1", "mkv")])
def test_hdr10_static_metadata_goes_to_the_output(tmp_path, blend_mask, codec, container):
    source = make_source(tmp_path / "hdr10.mp4", "libx265", "yuv420p10le", HDR10, {
        "x265-params": f"log-level=error:master-display={MASTERING}:max-cll=1000,400", "preset": "ultrafast"})
    info = probe_video(source)
    assert (info.mastering_display, info.content_light) == (MASTERING, "1000,400")
    output = compose(source, tmp_path / f"out.{container}", blend_mask, codec=codec, crf=20,
                     preset="ultrafast" if codec != "libsvtav1" else "12")
    out = probe_video(output)
    assert (out.mastering_display, out.content_light) == (MASTERING, "1000,400")
    assert colour_of(out) == colour_of(info)


def test_odd_sized_10bit_source_is_written_444_at_the_same_depth_and_colour(tmp_path, blend_mask):
    """4:2:0 cannot be coded at an odd size by x265: the output is the 4:4:4 format of the
    same depth with the source's tags, and outside the mouth its Y samples are the source's.
    (FFV1 stores the odd-sized 4:2:0 source losslessly.)"""
    w, h = 161, 121
    rgb = cv2.resize(astronaut(), (w, h), interpolation=cv2.INTER_AREA)
    path = make_source(tmp_path / "odd.mkv", "ffv1", "yuv420p10le", HDR10, frames=[rgb, rgb])
    info = probe_video(path)
    assert (info.pix_fmt, info.width, info.height) == ("yuv420p10le", w, h)
    output = str(tmp_path / "out.mkv")
    M = AFFINE * np.array([[2.0], [2.0]])  # the mouth inside the half-size frame
    M[:, 2] = AFFINE[:, 2] + [100.0, 40.0]
    ComposeStage(blend_mask, codec="libx265", crf=4, preset="ultrafast", threads=1)(
        path, output, 0, 2, w, h, FPS, np.broadcast_to(RED, (2, 256, 256, 3)).copy(), np.repeat(M[None], 2, 0),
        np.ones(2, bool), video=info)
    out = probe_video(output)
    assert colour_of(out) == ("yuv444p10le", *HDR10.values()) and (out.width, out.height) == (w, h)
    alpha = cv2.warpAffine(blend_mask.astype(np.float32), cv2.invertAffineTransform(M), (w, h), flags=cv2.INTER_LINEAR)
    far = cv2.dilate((alpha > 0).astype(np.uint8), np.ones((9, 9))) == 0
    inside = alpha > 0.99
    y_src, y_out = native(path)[0][0].astype(np.int32), native(output)[0][0].astype(np.int32)
    assert inside.sum() > 100 and far.mean() > 0.7
    assert np.abs(y_out - y_src)[far].mean() < 4 and np.abs(y_out - y_src)[inside].mean() > 80


def test_pasted_chroma_is_filtered_onto_left_sited_chroma_samples():
    """4:2:0 chroma sits on the even luma columns (MPEG-2/H.264/HEVC's default): a mask
    edge at luma column 128 gives chroma column 64 three quarters of the crop ([1, 2, 1]/4
    over columns 127..129), column 63 none, column 65 all of it."""
    from stages.face.paste import paste_back_planes
    from stages.media.colour import Coding, rgb_to_ycbcr

    coding = Coding.of("yuv420p", 6, 1, 256)
    planes = [np.full((256, 256), 100, np.uint8), np.full((128, 128), 128, np.uint8), np.full((128, 128), 128, np.uint8)]
    mask = np.zeros((256, 256), np.float32)
    mask[:, 128:] = 1.0
    crop = np.broadcast_to(RED, (256, 256, 3)).copy()
    out = paste_back_planes(planes, crop, np.array([[1.0, 0, 0], [0, 1.0, 0]]), mask, coding)
    cr = float(rgb_to_ycbcr(RED.astype(np.float32), coding)[2])
    row = out[2][40].astype(np.float32)
    assert row[63] == 128 and row[65] == round(cr)
    assert row[64] == round(128 + 0.75 * (cr - 128))
    np.testing.assert_array_equal(out[0][:, :128], planes[0][:, :128])  # luma left of the edge untouched
