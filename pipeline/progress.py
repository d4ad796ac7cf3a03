"""What the person at the terminal sees: a live progress line on stderr while `imgtalk dub`
runs (videos and frames done, frames/s, ETA) and a summary table at the end.

The driver tells a JobTracker what settles (a video's report row) and what comes back
(a composed segment); the tracker keeps the counts, feeds the driver's metrics
(pipeline.metrics.JobMetrics) and, when given a stream, redraws one line on it.
Formatting is pure (Snapshot in, text out) so it is tested with known numbers.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TextIO


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


def format_progress(snap: Snapshot, width: int = 20) -> str:
    """One line, e.g. `[#####---------------] 1/4 videos (1 failed)  52 frames  4.3 frames/s  0:12 elapsed  ETA 0:36`."""
    filled = min(width, int(snap.fraction * width))
    bar = "[" + "#" * filled + "-" * (width - filled) + "]"
    failed = f" ({snap.failed} failed)" if snap.failed else ""
    return (
        f"{bar} {snap.videos_done}/{snap.videos_total} videos{failed}  {snap.frames_done} frames  "
        f"{snap.frames_per_second:.1f} frames/s  {format_duration(snap.elapsed_s)} elapsed  ETA {format_duration(snap.eta_s)}"
    )


def format_summary(counts: dict[str, int], seconds: float, frames: int) -> str:
    """The table `imgtalk dub` ends with: videos by status, total time, frames/s."""
    fps = frames / seconds if seconds > 0 else 0.0
    statuses = [(s, str(counts.get(s, 0))) for s in ("ok", "failed", "skipped")]
    statuses.append(("total", str(sum(counts.get(s, 0) for s in ("ok", "failed", "skipped")))))
    figures = [("time", f"{seconds:.1f} s"), ("frames", str(frames)), ("frames/s", f"{fps:.2f}")]
    header = ("status", "videos")
    key_w = max(len(k) for k, _ in [header, *statuses, *figures])
    val_w = max(len(v) for _, v in [header, *statuses, *figures])
    rule = "-" * key_w + "  " + "-" * val_w
    line = lambda k, v: f"{k:<{key_w}}  {v:>{val_w}}"  # noqa: E731
    return "\n".join([line(*header), rule, *(line(*r) for r in statuses), rule, *(line(*r) for r in figures)])


class JobTracker:
    """Counts of one job as its videos settle; redraws a progress line on `stream`."""

    def __init__(self, job_id: str, videos_total: int, stream: TextIO | None = None, clock=time.monotonic, redraw_s: float = 0.5):
        self.job_id = job_id
        self.videos_total = videos_total
        self.stream = stream
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
        """Stop the ticker and end the line. Safe to call twice."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=5)
        if self.stream is not None:
            self._draw(force=True)
            self.stream.write("\n")
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
        if self.stream is None or (self._stop.is_set() and not force):
            return  # the line has ended; rows settled after close() show in the summary
        with self._draw_lock:
            now = self.clock()
            if not force and now - self._last_draw < self.redraw_s:
                return
            self._last_draw = now
            line = format_progress(self.snapshot())
            # \r and clear-to-end-of-line: one line, redrawn in place.
            self.stream.write("\r" + line + "\x1b[K")
            self.stream.flush()


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
