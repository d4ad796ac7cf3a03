"""How rows travel through the jobs' Ray Data graphs (pipeline/raydata.py), on a real local Ray."""
from __future__ import annotations

import os
import time

import pytest

from pipeline.raydata import one_row_per_block, stream_rows


# The stand-ins are defined inside the tests: Ray's workers cannot import this module, and
# cloudpickle sends what is defined in a function by value.


def test_an_actors_rows_leave_it_one_per_block_only_on_that_dataset(local_ray):
    from ray.data import ActorPoolStrategy, DataContext

    class SegmentRows:  # a video actor stand-in: one input row becomes three segment rows
        def __call__(self, row: dict) -> list[dict]:
            return [{"video": row["video"], "segment": i, "payload": b"x" * 64} for i in range(3)]

    def blocks(cut: bool):
        ds = local_ray.data.from_items([{"video": "a"}, {"video": "b"}], override_num_blocks=2)
        if cut:
            ds = one_row_per_block(ds)
        done = ds.flat_map(SegmentRows, compute=ActorPoolStrategy(size=1), num_cpus=0.25).materialize()
        return done.num_blocks(), done.count()

    assert blocks(cut=False) == (2, 6)  # a video's segments travel together
    assert blocks(cut=True) == (6, 6)  # each segment can go to its own actor
    assert DataContext.get_current().target_max_block_size > 1  # the process's default is untouched
    assert blocks(cut=False) == (2, 6)


def test_the_driver_gets_each_row_without_waiting_for_the_next(local_ray, tmp_path):
    """Dataset.iter_rows would hold row 0 back until row 1 exists, and row 1 waits for the
    driver to have row 0: with it, row 1 gives up waiting; with stream_rows it does not.
    (The patience only bounds how long a failing run takes; nothing is timed.)"""

    def wait_for_driver(row: dict) -> dict:  # row 0 passes at once; row 1 waits for the driver to have it
        if row["i"] == 0:
            return dict(row, gave_up=False)
        deadline = time.monotonic() + row["patience"]
        while not os.path.exists(row["signal"]):
            if time.monotonic() > deadline:
                return dict(row, gave_up=True)
            time.sleep(0.05)
        return dict(row, gave_up=False)

    signal = str(tmp_path / "driver-has-row-0")
    items = [{"i": i, "signal": signal, "patience": 120.0} for i in range(2)]
    ds = local_ray.data.from_items(items, override_num_blocks=2).map(wait_for_driver, num_cpus=0.25)
    got = []
    for row in stream_rows(ds):
        got.append((row["i"], row["gave_up"]))
        if row["i"] == 0:
            open(signal, "w").close()
    assert got == [(0, False), (1, False)]


def test_closing_the_stream_part_way_stops_it(local_ray):
    ds = local_ray.data.from_items([{"i": i} for i in range(6)], override_num_blocks=6)
    rows = stream_rows(ds)
    first = next(rows)
    rows.close()
    assert first["i"] in range(6)
    with pytest.raises(StopIteration):
        next(rows)
