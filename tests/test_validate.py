"""`imgtalk validate`: a catalogue made here, with one row for each problem a dub would hit
and good rows, probed on one local Ray through the CLI. Each problem row is reported with
its problem, good rows are ok, the printed estimate counts the report's frames; and the
estimate's arithmetic from known numbers (no Ray)."""
import os
import re
import wave
from fractions import Fraction

import numpy as np
import pytest
import yaml

from pipeline.cli import main
from pipeline.config import JobConfig, PoolConfig
from pipeline.dub.schemas import write_manifest
from pipeline.sample_catalogue import SampleVideo, write_video
from pipeline.storage import Storage
from pipeline.validate.estimate import estimate, format_estimate
from pipeline.validate.schemas import read_validation_report

SMALL = (320, 240)


def _rgba_video(path: str, frames: int = 25) -> int:
    """A face video in a format no output keeps: PNG frames with an alpha channel."""
    import av

    from pipeline.sample_catalogue import _face_plate, render_frame

    plate = _face_plate()
    with av.open(path, "w") as out:
        stream = out.add_stream("png", rate=25)
        stream.width, stream.height, stream.pix_fmt = SMALL[0], SMALL[1], "rgba"
        for i in range(frames):
            rgb = render_frame(plate, i / 25, SMALL, face=True)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="rgba")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return frames


def _tone(path: str, seconds: float) -> None:
    """A mono 16 kHz tone of an exact length (the dub only needs a readable track)."""
    t = np.arange(int(round(seconds * 16000))) / 16000
    with wave.open(path, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16).tobytes())


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate")
    inside, outside, out = root / "in", root / "elsewhere", root / "out"
    for d in (inside, outside, out):
        d.mkdir()
    face = str(inside / "face.mp4")
    frames = {"face": write_video(face, SampleVideo("face", Fraction(25), 1.0, "", size=SMALL))}
    ntsc = str(inside / "ntsc.mp4")
    frames["ntsc"] = write_video(ntsc, SampleVideo("ntsc", Fraction(30000, 1001), 1.2, "", size=SMALL))
    faceless = str(inside / "faceless.mp4")
    frames["faceless"] = write_video(faceless, SampleVideo("faceless", Fraction(25), 1.0, "", no_face=(0.0, 1.0), size=SMALL))
    rgba = str(inside / "alpha.mov")
    frames["alpha"] = _rgba_video(rgba)
    stray = str(outside / "stray.mp4")
    write_video(stray, SampleVideo("stray", Fraction(25), 1.0, "", size=SMALL))
    broken = str(inside / "broken.mp4")
    with open(broken, "wb") as f:
        f.write(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 50)
    for name, seconds in (("one", 1.0), ("ntsc", 1.4), ("long", 3.5)):
        _tone(str(inside / f"{name}.wav"), seconds)
    a = lambda name: str(inside / f"{name}.wav")  # noqa: E731
    rows = [  # (video, audio, expected problem kinds)
        (face, a("one"), []),  # 0 good
        (ntsc, a("ntsc"), []),  # 1 good: 0.2 s longer audio is within qc.max_audio_fit_s
        (str(inside / "gone.mp4"), a("one"), ["missing_video"]),  # 2
        (broken, a("one"), ["unreadable_video"]),  # 3
        (face, str(inside / "gone.wav"), ["missing_audio"]),  # 4
        (face, a("long"), ["length_mismatch"]),  # 5
        (faceless, a("one"), ["no_face"]),  # 6
        (stray, a("one"), ["outside_allowed_prefixes"]),  # 7
        (rgba, a("one"), ["unsupported_format"]),  # 8
    ]
    manifest = str(root / "manifest.parquet")
    write_manifest([{"video_uri": v, "audio_uri": au, "output_uri": str(out / f"{i}.mp4")} for i, (v, au, _) in enumerate(rows)],
                   manifest, Storage())
    config = str(root / "job.yaml")
    with open(config, "w") as f:
        yaml.safe_dump({"security": {"allowed_input_prefixes": [str(inside)], "allowed_output_prefixes": [str(out)]},
                        "pools": {"analyse": {"size": 2, "num_cpus": 0.5}}}, f)
    return dict(root=root, manifest=manifest, config=config, rows=rows, frames=frames)


def test_validate_reports_each_problem_and_estimates_the_readable_frames(local_ray, catalogue, capsys):
    report = str(catalogue["root"] / "validation.parquet")
    code = main(["validate", catalogue["manifest"], "--config", catalogue["config"], "--report", report])
    out = capsys.readouterr().out
    assert code == 3, out  # problems found

    rows = read_validation_report(report, Storage())
    assert [r.row_index for r in rows] == list(range(len(catalogue["rows"])))
    for r, (video, _, expected) in zip(rows, catalogue["rows"]):
        assert r.problem_kinds == expected, (r.row_index, r.problems)
        assert r.status == ("problem" if expected else "ok")
        assert r.video_uri == video
        for p in r.problems:  # every problem is printed with its row
            assert f"row {r.row_index} {p}" in out
    by_index = {r.row_index: r for r in rows}
    frames = catalogue["frames"]
    assert (by_index[0].frames, by_index[1].frames, by_index[6].frames) == (frames["face"], frames["ntsc"], frames["faceless"])
    assert by_index[0].sampled_face_frames == by_index[0].sampled_frames == 3
    assert by_index[6].sampled_frames == 3 and by_index[6].sampled_face_frames == 0
    assert by_index[5].audio_duration_s == pytest.approx(3.5, abs=0.01) and by_index[5].duration_s == pytest.approx(1.0)
    assert "3.50 s vs video 1.00 s" in by_index[5].problems[0]
    assert "gone.mp4" in by_index[2].problems[0] and "broken.mp4" in by_index[3].problems[0]
    assert "gone.wav" in by_index[4].problems[0]
    assert "allowed_input_prefixes" in by_index[7].problems[0]
    # A refused row is never opened: nothing about its video is known.
    assert by_index[7].frames is None and by_index[7].audio_duration_s is None
    assert [r.frames for r in rows if r.row_index in (2, 3)] == [None, None]

    printed = int(re.search(r"^\s*frames:\s+(\d+)$", out, re.M).group(1))
    assert printed == sum(r.frames for r in rows if r.frames is not None)
    assert re.search(r"^\s*GPU-hours:", out, re.M) and re.search(r"^\s*wall time: \d+:\d\d", out, re.M)
    assert "rgba" in by_index[8].problems[0] and by_index[8].pix_fmt == "rgba" and by_index[8].frames == frames["alpha"]
    assert "validated 9 rows: 2 ok, 7 with problems" in out


def test_estimate_from_known_numbers():
    config = JobConfig(pools={"complete": PoolConfig(size=4, num_cpus=1, num_gpus=1), "compose": PoolConfig(size=8, num_cpus=1),
                              "face": PoolConfig(size=4), "audio": PoolConfig(size=2)})
    est = estimate(config, videos=10, frames=36_000, video_s=1440.0, audio_s=1500.0)
    by_stage = {s.stage: s for s in est.stages}
    # complete: 36,000 frames x 0.01 s on 4 GPUs; compose: 36,000 x 0.128 s on 8 actors
    assert by_stage["complete"].busy_s == pytest.approx(360.0) and by_stage["complete"].wall_s == pytest.approx(90.0)
    assert by_stage["compose"].wall_s == pytest.approx(36_000 * 0.128 / 8)
    assert by_stage["audio"].busy_s == pytest.approx(1500.0 * 0.5)
    assert est.gpu_hours == pytest.approx(360.0 / 3600)  # only complete reserves a GPU here
    assert est.bottleneck.stage == "compose" and est.wall_s == pytest.approx(576.0)
    text = format_estimate(est, config)
    assert "frames:    36000" in text and "wall time: 9:36" in text and "bottleneck: compose, 8 actors" in text

    slower = config.model_copy(update={"cost": config.cost.model_copy(update={"complete_s_per_frame": 0.5})})
    assert estimate(slower, 10, 36_000, 1440.0, 1500.0).bottleneck.stage == "complete"
    assert estimate(JobConfig(), 0, 0, 0.0, 0.0).gpu_hours == 0.0
