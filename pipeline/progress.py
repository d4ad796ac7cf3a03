"""What the person at the terminal sees: a live progress display on stderr while `imgtalk dub`
runs (videos and frames done, frames/s, ETA), drawn with rich, and a summary table at the end.

The driver tells a JobTracker what settles (a video's report row) and what comes back
(a composed segment); the tracker keeps the counts, feeds the driver's metrics
(pipeline.metrics.JobMetrics) and, when given a stream, redraws the display on it in place
(rich's Live). The content is pure (Snapshot in, text or a rich renderable out) so it is
tested with known numbers.
"""
from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass
from typing import TextIO

from rich import box
from rich.console import Console, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table


@dataclass(frozen=True)
class Snapshot:
    videos_total: int
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    frames_done: int = 0  # frames of composed segments back at the driver
    fraction: float = 0.0  # of the work (videos not skipped), part-done videos by segments
    elapsed_s: float = 0.0

    @property
    def videos_done(self) -> int:
        return self.ok + self.failed + self.skipped

    @property
    def frames_per_second(self) -> float:
        return self.frames_done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the pace so far; None before anything has finished."""
        if self.fraction >= 1.0:
            return 0.0
        if self.fraction <= 0.0 or self.elapsed_s <= 0.0:
            return None
        return self.elapsed_s * (1.0 - self.fraction) / self.fraction


def format_duration(seconds: float | None) -> str:
    """H:MM:SS, or M:SS under an hour; --:-- when unknown."""
    if seconds is None:
        return "--:--"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_progress(snap: Snapshot) -> str:
    """The figures of the progress display, e.g.
    `50%  2/4 videos (1 failed)  52 frames  4.0 frames/s  0:13 elapsed  ETA 0:13`."""
    failed = f" ({snap.failed} failed)" if snap.failed else ""
    return (
        f"{int(snap.fraction * 100):>3d}%  {snap.videos_done}/{snap.videos_total} videos{failed}  {snap.frames_done} frames  "
        f"{snap.frames_per_second:.1f} frames/s  {format_duration(snap.elapsed_s)} elapsed  ETA {format_duration(snap.eta_s)}"
    )


def progress_display(snap: Snapshot, bar_width: int = 20) -> RenderableType:
    """One line: rich's bar for the fraction of the work done, then format_progress."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(no_wrap=True, overflow="ellipsis")  # one line, even on a narrow terminal
    grid.add_row(ProgressBar(total=1.0, completed=snap.fraction, width=bar_width), format_progress(snap))
    return grid


def summary_table(counts: dict[str, int], seconds: float, frames: int) -> Table:
    """The table `imgtalk dub` ends with: videos by status, total time, frames/s."""
    fps = frames / seconds if seconds > 0 else 0.0
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("status")
    table.add_column("videos", justify="right")
    for status in ("ok", "failed", "skipped"):
        table.add_row(status, str(counts.get(status, 0)))
    table.add_row("total", str(sum(counts.get(s, 0) for s in ("ok", "failed", "skipped"))), end_section=True)
    table.add_row("time", f"{seconds:.1f} s")
    table.add_row("frames", str(frames))
    table.add_row("frames/s", f"{fps:.2f}")
    return table


def render_text(renderable: RenderableType, width: int = 100) -> str:
    """A renderable as plain text (no colour, no control codes), lines right-stripped."""
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False, highlight=False).print(renderable)
    return "\n".join(line.rstrip() for line in buf.getvalue().rstrip("\n").splitlines())


def format_summary(counts: dict[str, int], seconds: float, frames: int) -> str:
    return render_text(summary_table(counts, seconds, frames))


class JobTracker:
    """Counts of one job as its videos settle; redraws the progress display on `stream`
    (in place on a terminal; elsewhere rich prints only the final display).
    force_terminal: draw as on a terminal whatever the stream is (None: ask the stream);
    width: columns to draw in (None: the terminal's, 80 for a file)."""

    def __init__(self, job_id: str, videos_total: int, stream: TextIO | None = None, clock=time.monotonic, redraw_s: float = 0.5,
                 force_terminal: bool | None = None, width: int | None = None):
        self.job_id = job_id
        self.videos_total = videos_total
        self.stream = stream
        # The job's own log routing owns stdout/stderr (pipeline/logs.py): Live must not redirect them.
        self._live = None if stream is None else Live(
            console=Console(file=stream, force_terminal=force_terminal, width=width, highlight=False),
            auto_refresh=False, redirect_stdout=False, redirect_stderr=False, transient=False)
        self.clock = clock
        self.redraw_s = redraw_s
        self.started = clock()
        self.metrics = None
        self._lock = threading.Lock()
        self._draw_lock = threading.Lock()
        self._settled: dict[int, object] = {}  # row index -> ReportRow
        self._counts = {"ok": 0, "failed": 0, "skipped": 0}
        self._frames = 0
        self._segments_back: dict[str, tuple[int, int]] = {}  # video_id -> (back, of)
        self._last_draw = float("-inf")
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()

    # ---------------------------------------------------------------- events

    def settle(self, index: int, row) -> None:
        """A report row is final. Each manifest row counts once, whichever dict holds it."""
        with self._lock:
            if index in self._settled:
                return
            self._settled[index] = row
            self._counts[row.status] = self._counts.get(row.status, 0) + 1
            self._segments_back.pop(row.video_id, None)
        if self.metrics is not None:
            self.metrics.video_finished(row.status, row.output_frames or 0, row.error_stage, row.error, getattr(row, "sync_conf", None))
        self._draw()

    def segment(self, row: dict) -> None:
        """A segment is back at the driver (composed, or failed on the way)."""
        with self._lock:
            if not row["error"]:
                self._frames += int(row["frame_end"]) - int(row["frame_start"])
            back, of = self._segments_back.get(row["video_id"], (0, int(row["n_segments"])))
            self._segments_back[row["video_id"]] = (back + 1, of)
        self._draw()

    def attach_metrics(self) -> None:
        """Once Ray is up: start the driver's metrics and count what settled before."""
        from pipeline.metrics import JobMetrics

        self.metrics = JobMetrics(self.job_id, self.videos_total)
        with self._lock:
            settled = list(self._settled.values())
        for row in settled:
            self.metrics.video_finished(row.status, row.output_frames or 0, row.error_stage, row.error, getattr(row, "sync_conf", None))
        self._ticker = threading.Thread(target=self._tick, name="imgtalk-progress", daemon=True)
        self._ticker.start()

    def close(self) -> None:
        """Stop the ticker and leave the final display in place. Safe to call twice."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=5)
        if self._live is not None:
            self._draw(force=True)
            with self._draw_lock:
                self._live.stop()
            self.stream.flush()

    # ---------------------------------------------------------------- state

    def snapshot(self) -> Snapshot:
        with self._lock:
            skipped = self._counts.get("skipped", 0)
            work = self.videos_total - skipped
            finished = self._counts.get("ok", 0) + self._counts.get("failed", 0)
            partial = sum(back / of for back, of in self._segments_back.values() if of)
            fraction = 1.0 if work <= 0 else min(1.0, (finished + partial) / work)
            return Snapshot(
                videos_total=self.videos_total,
                ok=self._counts.get("ok", 0),
                failed=self._counts.get("failed", 0),
                skipped=skipped,
                frames_done=self._frames,
                fraction=fraction,
                elapsed_s=self.clock() - self.started,
            )

    def _tick(self) -> None:
        # Redraws the line while nothing settles (the ETA and elapsed time move on) and
        # re-sets the metrics gauge, which Ray forgets unless it is set again.
        while not self._stop.wait(1.0):
            if self.metrics is not None:
                self.metrics.refresh()
            self._draw()

    def _draw(self, force: bool = False) -> None:
        if self._live is None or (self._stop.is_set() and not force):
            return  # the display has ended; rows settled after close() show in the summary
        with self._draw_lock:
            now = self.clock()
            if not force and now - self._last_draw < self.redraw_s:
                return
            self._last_draw = now
            if not self._live.is_started:
                self._live.start()
            self._live.update(progress_display(self.snapshot()), refresh=True)


class Report(dict):
    """Report rows by manifest row index. Setting a row settles that video in the tracker."""

    def __init__(self, tracker: JobTracker):
        super().__init__()
        self.tracker = tracker

    def __setitem__(self, index: int, row) -> None:
        super().__setitem__(index, row)
        self.tracker.settle(index, row)

    def update(self, other=(), **kwargs) -> None:
        for index, row in dict(other, **kwargs).items():
            self[index] = row
