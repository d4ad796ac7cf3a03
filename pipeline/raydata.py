"""Ray Data helpers the jobs share: how their rows travel and how the driver reads them.

Both are about latency on a stream of few, slow rows (a segment takes seconds to minutes),
where Ray Data's defaults are tuned for many fast ones."""
from __future__ import annotations

from typing import Iterator


def one_row_per_block(ds):
    """`ds`, with every operator after it cutting its output into one-row blocks.

    A block is what Ray Data hands to an actor, so a video's segment rows, produced together
    by one flat_map, would otherwise travel and be computed together on one actor. A
    `repartition(target_num_rows_per_block=1)` after the flat_map does the same, but after an
    actor it runs as a task operator of its own: one more worker process, which on a small
    machine starts only when the first video's segments are ready (1-2 s on two cores) and
    stands between them and the segment actors. Setting the block-size target on this
    dataset's own context (not the process's) cuts the rows where they are made."""
    ds.context.target_max_block_size = 1  # bytes: any row fills a block
    return ds


def stream_rows(ds) -> Iterator[dict]:
    """The rows of `ds` as each block reaches the driver, as `Dataset.iter_rows` gives them.

    `iter_rows` prefetches one block, and Ray Data 2.60's prefetch window hands a block on
    only once the next one has arrived (or the stream ended): a video whose last segment is
    done waits for some other segment to finish before the driver sees it, which on two
    cores held the first finished video back by up to 9 s. Without prefetching each block is
    handed on as it arrives; the rows are small, so there is nothing to gain by fetching
    ahead. Closing this generator closes the stream, which shuts its executor down."""
    from ray.data.block import BlockAccessor

    blocks = iter(ds.iter_batches(batch_size=None, batch_format=None, prefetch_batches=0))
    try:
        for block in blocks:
            yield from BlockAccessor.for_block(block).iter_rows(public_row_format=True)
    finally:
        close = getattr(blocks, "close", None)
        if close is not None:
            close()
