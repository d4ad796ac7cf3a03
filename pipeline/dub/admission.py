"""Backpressure on the per-video stages: a video enters analyse (and so audio and the
segment stages) only while few enough segments are in flight.

Without it the cheap-to-queue per-video stages run through the whole catalogue before
the segment stages have finished one video: on a laptop they take the CPU the first
video needs (first output after minutes, not seconds), and on a cluster the driver ends
up owning a block per segment of every video at once. With it one video flows through
while the next ones are planned.

    driver ── release(video_id) when a video's segments are all back ──┐
                                                                       ▼
    AnalyseOp ── Admission(video_id, segments) ── blocks until ── VideoGate (a Ray actor)

The gate always admits a video when nothing is in flight, so a video longer than the
whole window still goes through (alone).
"""
from __future__ import annotations

import asyncio
import math


class VideoGate:
    """Segments in flight, by video; `admit` waits until a video fits in `limit`. Run as an
    async Ray actor (pipeline.dub.job), so many waiting admits cost no thread each."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight: dict[str, int] = {}
        self._changed: asyncio.Condition | None = None  # made on the actor's own event loop

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    def fits(self, video_id: str, segments: int) -> bool:
        others = sum(n for v, n in self.in_flight.items() if v != video_id)
        return video_id in self.in_flight or not self.in_flight or others + segments <= self.limit

    async def admit(self, video_id: str, segments: int) -> None:
        changed = self._condition()
        async with changed:
            await changed.wait_for(lambda: self.fits(video_id, segments))
            self.in_flight[video_id] = segments  # again after a retried analyse: the same entry

    async def release(self, video_id: str) -> None:
        changed = self._condition()
        async with changed:
            if self.in_flight.pop(video_id, None) is not None:
                changed.notify_all()

    async def segments_in_flight(self) -> int:
        return sum(self.in_flight.values())


class Admission:
    """What AnalyseOp calls before a video's work: blocks until the gate admits it. A
    picklable handle (the gate actor's), so it travels in the operator's constructor."""

    def __init__(self, gate):
        self.gate = gate

    def __call__(self, video_id: str, segments: int) -> None:
        import ray

        ray.get(self.gate.admit.remote(video_id, segments))


def segments_of(duration_s: float, segment_seconds: float) -> int:
    """About how many segments a video becomes (segment_plan merges a short tail), as the
    gate's weight: exact enough to pace the stages, and known before the split."""
    return max(1, math.ceil(duration_s / segment_seconds - 1e-9))


def default_window(pools: dict) -> int:
    """Segments in flight when the config sets none: two for every actor of the segment
    stages, enough to keep each busy while the next video's per-video work runs."""
    return 2 * sum(pools[name].size for name in ("face", "motion", "complete", "compose"))
