"""The per-video stages' backpressure (pipeline/dub/gate.py) as a plain asyncio object; the
job runs it as a Ray actor (tests/test_resilience.py: a gated job in both layouts)."""
from __future__ import annotations

import asyncio

import pytest

from pipeline.dub.gate import VideoGate, gate_limit


async def _settle():  # let every task that can run, run
    for _ in range(20):
        await asyncio.sleep(0)


def test_the_gate_admits_up_to_its_limit_and_the_next_video_when_one_leaves():
    async def scenario():
        gate = VideoGate(2)
        assert await gate.enter(0) == 1 and await gate.enter(1) == 2
        third = asyncio.ensure_future(gate.enter(2))
        await _settle()
        assert not third.done()  # two in flight: the third waits
        assert await gate.enter(1) == 2  # a retried video is already in: it does not wait or count twice
        await gate.leave(7)  # never admitted: nothing changes
        await _settle()
        assert not third.done()
        await gate.leave(0)
        assert await third == 2 and gate.admitted == {1, 2}

    asyncio.run(scenario())


def test_the_limit_keeps_every_segment_actor_fed_unless_configured():
    assert gate_limit(None, 2) == 6 and gate_limit(None, 0) == 4 and gate_limit(3, 64) == 3
    with pytest.raises(ValueError, match="at least one"):
        VideoGate(0)
