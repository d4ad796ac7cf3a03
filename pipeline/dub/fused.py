"""The fused stage layout (`stage_layout: fused`): several of the dub job's operators in
one actor, called one after the other on each row.

On a cluster every stage has its own actor pool, sized to its cost (pipeline/config.py
pools). On a laptop that costs more than it gives: each actor is a process that imports
torch and mediapipe and loads its models before its first row, and seven of them start
at once on two cores, so the first finished video waits for all of them. Fused, the
per-video stages (plan, analyse, audio) share one actor and the per-segment stages (face,
motion, complete, compose) another, copied once per CPU; each operator keeps its own
error handling, retries, timing and metrics (pipeline.steps), so a row fails, or is
skipped, exactly as it would across pools. The video actor also cuts each video into its
segment rows (a flat_map), which the pools layout does in a task of its own: on two cores
that task is one more worker process starting, and one more hand-over before a video's
first segment (the README's "What is missing" has the timeline)."""
from __future__ import annotations

import os
import tempfile
from typing import IO

from pipeline.config import PoolConfig

VIDEO_STAGES = ("plan", "analyse", "audio")
SEGMENT_STAGES = ("face", "motion", "complete", "compose")


def claim_lead(name: str) -> IO | None:
    """The lock `name` (a file `<temp folder>/<name>-<uid>.lock` on this node), held for as
    long as the returned file stays open: the kernel lets go when its process ends, so an
    actor that replaces a dead lead can take it, and no stale lock outlives a job. None when
    someone else holds it. The file itself stays, empty, for the next job to lock."""
    import fcntl

    try:
        handle = open(os.path.join(tempfile.gettempdir(), f"{name}-{os.getuid()}.lock"), "a")
    except OSError:  # no temp folder to write: nobody leads
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


def run_in_idle_class() -> bool:
    """This thread, and the threads it starts from now on, in Linux's idle scheduling class
    (SCHED_IDLE): they run on what CPU time other threads leave, down to a few percent of a
    core beside a busy one. There is no way back without privileges. False where the
    platform has no such class."""
    if not hasattr(os, "SCHED_IDLE"):
        return False
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    return True


class FusedOp:
    """`steps`: (operator class, its constructor arguments) in the order rows pass them.

    `lead`: the name of a node-wide lock (`claim_lead`) that the segment actors compete for
    (one name for every job: two jobs on one laptop share a lead). The actor that takes it
    runs as usual; the others run in the idle scheduling class from before their models
    load. On two cores, three actors importing torch, diffusers and mediapipe at once put the
    first video behind all of them; this way the video actor and one segment actor start
    first, and the first video's segments go to that one (Ray Data hands rows only to
    actors whose constructors have finished) while the others take the CPU time left over,
    which is all of a core nobody else wants, and never less than a few percent of one.
    `idle` says whether this actor went into that class.

    `gate`: for the first per-video stage, the job's VideoGate (pipeline/dub/gate.py), which
    each row waits on before its operators run."""

    def __init__(self, steps: list[tuple[type, tuple]], lead: str | None = None, gate=None):
        self.lead = claim_lead(lead) if lead else None
        self.idle = bool(lead) and self.lead is None and run_in_idle_class()
        self.gate = gate
        self.ops = [op(*args) for op, args in steps]

    def __call__(self, row: dict) -> dict:
        if self.gate is not None:
            import ray

            ray.get(self.gate.enter.remote(int(row["row_index"])))
        for op in self.ops:
            row = op(row)
        return row


class FusedVideoOp(FusedOp):
    """The per-video stages, then the video's segment rows (pipeline.dub.operators.split_segments)."""

    def __call__(self, row: dict) -> list[dict]:
        from pipeline.dub import operators

        return operators.split_segments(super().__call__(row))


def fused_pool(pools: dict[str, PoolConfig], stages: tuple[str, ...], size: int) -> PoolConfig:
    """One actor pool doing the work of `stages`: each actor reserves the largest CPU and
    GPU share among them (the stages run one at a time in it) and the sum of their memory
    (it holds all of their models)."""
    memory = [pools[s].memory_gb for s in stages if pools[s].memory_gb]
    return PoolConfig(
        size=size,
        num_cpus=max(pools[s].num_cpus for s in stages),
        num_gpus=max(pools[s].num_gpus for s in stages),
        memory_gb=sum(memory) if memory else None,
    )
