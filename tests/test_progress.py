"""The terminal progress line and summary table: known numbers in, known text out; and
the tracker's counting (each manifest row once, ETA from the work left)."""
import io
import re

import pytest

from pipeline.progress import (
    JobTracker, Report, Snapshot, format_duration, format_progress, format_summary, progress_display, render_text,
)
from pipeline.dub.schemas import ReportRow


def test_format_duration():
    assert format_duration(None) == "--:--"
    assert format_duration(0) == "0:00"
    assert format_duration(59.4) == "0:59"
    assert format_duration(61) == "1:01"
    assert format_duration(3600 + 2 * 60 + 3) == "1:02:03"


def test_progress_line_from_known_numbers():
    snap = Snapshot(videos_total=4, ok=1, failed=1, skipped=0, frames_done=52, fraction=0.5, elapsed_s=13.0)
    assert snap.videos_done == 2
    assert snap.frames_per_second == pytest.approx(4.0)
    assert snap.eta_s == pytest.approx(13.0)  # half done in 13 s: 13 s to go
    assert format_progress(snap) == " 50%  2/4 videos (1 failed)  52 frames  4.0 frames/s  0:13 elapsed  ETA 0:13"
    start = Snapshot(videos_total=3)
    assert start.eta_s is None
    assert format_progress(start) == "  0%  0/3 videos  0 frames  0.0 frames/s  0:00 elapsed  ETA --:--"
    done = Snapshot(videos_total=3, ok=2, skipped=1, frames_done=90, fraction=1.0, elapsed_s=30.0)
    assert format_progress(done) == "100%  3/3 videos  90 frames  3.0 frames/s  0:30 elapsed  ETA 0:00"
    # The display is rich's bar then those figures, on one line.
    line = render_text(progress_display(snap, bar_width=10))
    assert "\n" not in line and line.endswith(format_progress(snap).strip())
    assert line.startswith("━" * 5 + " " * 5 + "  50%")


def test_progress_bar_fills_with_the_fraction():
    """Without colour the bar's filled part is drawn and the rest is blank."""
    def bar(fraction: float) -> str:
        return render_text(progress_display(Snapshot(videos_total=2, fraction=fraction), bar_width=20)).ljust(20)[:20]

    assert bar(0.0).strip() == ""
    assert bar(0.5).rstrip() == "━" * 10
    assert bar(1.0) == "━" * 20


def test_summary_table_from_known_numbers():
    text = format_summary({"ok": 12, "failed": 3, "skipped": 100}, seconds=125.04, frames=4500)
    cells = [line.split() for line in text.splitlines() if line.strip() and not set(line.strip()) <= set("─━- ")]
    assert cells == [
        ["status", "videos"],
        ["ok", "12"],
        ["failed", "3"],
        ["skipped", "100"],
        ["total", "115"],
        ["time", "125.0", "s"],
        ["frames", "4500"],
        ["frames/s", "35.99"],
    ]
    # numbers are right-aligned in one column
    lines = [line for line in text.splitlines() if line.split() and line.split()[0] in ("ok", "skipped", "frames")]
    assert len({len(line) for line in lines}) == 1
    # nothing done, no time: no division by zero
    assert format_summary({}, 0.0, 0).splitlines()[-1].split() == ["frames/s", "0.00"]


def _row(i: int, status: str, frames: int | None = None) -> ReportRow:
    return ReportRow(
        job_id="j", row_index=i, video_id=f"v{i}", video_uri=f"/in/v{i}.mp4", audio_uri="/in/a.wav",
        output_uri=f"/out/v{i}.mp4", status=status, output_frames=frames,
    )


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_tracker_counts_each_row_once_and_estimates_from_work_left():
    clock = Clock()
    stream = io.StringIO()
    tracker = JobTracker("j", videos_total=4, stream=stream, clock=clock, redraw_s=0.0, force_terminal=True, width=120)
    report = Report(tracker)
    report[0] = _row(0, "skipped")  # already done: not part of the work left
    clock.now += 10
    # video 1 has 2 segments; one is back (25 frames)
    tracker.segment({"video_id": "v1", "n_segments": 2, "frame_start": 0, "frame_end": 25, "error": ""})
    snap = tracker.snapshot()
    assert (snap.skipped, snap.frames_done, snap.elapsed_s) == (1, 25, 10.0)
    assert snap.fraction == pytest.approx(0.5 / 3)  # half a video of the 3 to dub
    assert snap.eta_s == pytest.approx(50.0)

    graph = Report(tracker)  # the graph's own dict, merged into the job's later
    graph[1] = _row(1, "ok", 50)
    graph[2] = _row(2, "failed")
    report.update(graph)  # the same rows again: not counted twice
    snap = tracker.snapshot()
    assert (snap.ok, snap.failed, snap.skipped, snap.videos_done) == (1, 1, 1, 3)
    assert snap.fraction == pytest.approx(2 / 3)
    assert sorted(report) == [0, 1, 2]
    # redrawn in place (rich moves the cursor back up and erases the line)
    assert "\x1b[2K" in stream.getvalue() and "3/4 videos (1 failed)" in _plain(stream.getvalue())
    report[3] = _row(3, "ok", 10)
    tracker.close()
    tracker.close()  # idempotent
    assert _plain(stream.getvalue()).rstrip(" ").endswith(
        "100%  4/4 videos (1 failed)  25 frames  2.5 frames/s  0:10 elapsed  ETA 0:00\n")
    # the display has ended: later events are counted but draw nothing after it
    before = stream.getvalue()
    tracker.segment({"video_id": "v9", "n_segments": 1, "frame_start": 0, "frame_end": 5, "error": ""})
    assert stream.getvalue() == before and tracker.snapshot().frames_done == 30


def _plain(text: str) -> str:
    """Terminal output without its control sequences (colours, cursor moves)."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def test_tracker_on_a_file_prints_only_the_final_display():
    """Not a terminal (a log file, CI): no redraws, one final line."""
    clock = Clock()
    stream = io.StringIO()
    tracker = JobTracker("j", videos_total=2, stream=stream, clock=clock, redraw_s=0.0, width=120)
    report = Report(tracker)
    clock.now += 4
    report[0] = _row(0, "ok", 20)
    tracker.segment({"video_id": "v1", "n_segments": 1, "frame_start": 0, "frame_end": 20, "error": ""})
    report[1] = _row(1, "failed")
    tracker.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and "\x1b" not in stream.getvalue()
    assert lines[0].rstrip().endswith("100%  2/2 videos (1 failed)  20 frames  5.0 frames/s  0:04 elapsed  ETA 0:00")
