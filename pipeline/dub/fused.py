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

from pipeline.config import PoolConfig

VIDEO_STAGES = ("plan", "analyse", "audio")
SEGMENT_STAGES = ("face", "motion", "complete", "compose")


class FusedOp:
    """`steps`: (operator class, its constructor arguments) in the order rows pass them."""

    def __init__(self, steps: list[tuple[type, tuple]]):
        self.ops = [op(*args) for op, args in steps]

    def __call__(self, row: dict) -> dict:
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
