"""The backpressure gate (pipeline/dub/admission.py) on its own event loop, no Ray: which
admits wait, which pass, and what a release lets through."""
from __future__ import annotations

import asyncio

from pipeline.config import JobConfig
from pipeline.dub.admission import VideoGate, default_window, segments_of


def test_gate_admits_while_the_window_has_room_and_a_release_lets_the_next_in():
    async def scenario():
        gate = VideoGate(limit=4)
        await gate.admit("a", 3)  # nothing in flight: in at once
        waiting = asyncio.create_task(gate.admit("b", 2))  # 3 + 2 > 4: waits
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert not waiting.done()
        await gate.admit("a", 3)  # a retried analyse of an admitted video is not held back
        await gate.admit("c", 1)  # 3 + 1 fits
        assert await gate.segments_in_flight() == 4
        await gate.release("a")
        await asyncio.wait_for(waiting, 1)  # the release let "b" in
        assert gate.in_flight == {"c": 1, "b": 2}
        await gate.release("a")  # a second release of the same video changes nothing
        assert await gate.segments_in_flight() == 3

    asyncio.run(scenario())


def test_a_video_longer_than_the_window_goes_through_alone():
    async def scenario():
        gate = VideoGate(limit=2)
        await gate.admit("small", 1)
        long = asyncio.create_task(gate.admit("long", 900))
        await asyncio.sleep(0)
        assert not long.done()
        await gate.release("small")
        await asyncio.wait_for(long, 1)
        assert gate.in_flight == {"long": 900}

    asyncio.run(scenario())


def test_segment_weights_and_the_default_window():
    assert [segments_of(d, 4.0) for d in (0.5, 4.0, 4.01, 10.0)] == [1, 1, 2, 3]
    pools = JobConfig().pools
    assert default_window(pools) == 2 * sum(pools[n].size for n in ("face", "motion", "complete", "compose"))
