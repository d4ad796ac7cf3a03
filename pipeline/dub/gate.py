"""Backpressure on the per-video stages: at most `limit` videos between the start of their
per-video work (plan, analyse, audio) and the return of their last segment to the driver.

Without it plan, analyse and audio run as far ahead of the segment stages as they can
(they are cheap beside them), and the driver comes to own a block for every segment
planned: millions on a catalogue of thousands of hours. Ray Data's own backpressure counts
object-store bytes, and a segment row is a few hundred of them, so it never binds here.

The gate runs as an async Ray actor (pipeline/dub/job.py makes it): the first per-video
operator waits in `enter` before each video, and the driver calls `leave` once the
video's segments are all back (or it failed before it had any). Videos are named by their
manifest row, so a video whose actor died and whose work Ray retries enters once."""
from __future__ import annotations

import asyncio


class VideoGate:
    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"a video gate must admit at least one video, not {limit}")
        self.limit = limit
        self.admitted: set[int] = set()
        self._changed = asyncio.Condition()

    async def enter(self, video: int) -> int:
        """Wait until `video` may start; how many videos are in flight with it."""
        async with self._changed:
            await self._changed.wait_for(lambda: video in self.admitted or len(self.admitted) < self.limit)
            self.admitted.add(video)
            return len(self.admitted)

    async def leave(self, video: int) -> None:
        async with self._changed:
            self.admitted.discard(video)
            self._changed.notify_all()


def gate_limit(configured: int | None, segment_actors: int) -> int:
    """The configured limit, or enough videos to keep every segment actor's queue full
    (Ray Data sends an actor two rows at a time) with one video's worth to spare at each end."""
    return configured if configured is not None else 2 * max(1, segment_actors) + 2
