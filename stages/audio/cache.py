"""Content-addressed cache of HuBERT features at 50 Hz, as Parquet under a cache root.

    <root>/hubert/<model_id>/<audio_sha256>.parquet
      columns: row (int32, the 50 Hz row index), feature (fixed-size list<float32>[D]);
      metadata: model_id, audio_sha256, n_frames (25 Hz frames), n_rows (= 2 n_frames),
      dim, duration_s, feature_rate (50); row groups of 500 rows (10 s)

A file holds HuBERT's native 50 Hz rows, two per 25 fps video frame: 25 Hz frame j owns
rows 2j and 2j+1. Everything outside this module counts in 25 Hz frames
(`CachedFeatures.n_frames`, `read_window`'s start/stop); `stages.audio.steps_per_frame`
turns a window's rows into a Stage 1 config's k audio steps per frame.

The key is the dubbed track's content hash and the model id, not its URI, so a re-run or
a second dub of the same audio (same bytes, any name) computes nothing twice. Model ids
of the 50 Hz stage end in "-50hz", so files of the former 25 Hz cache are never found;
a file whose metadata says another feature rate is treated as a miss. Segments read only
the row groups covering their window. A file is committed in one atomic step, so a reader
never sees a partial one: one PUT on an object store, a temporary name renamed over the
final one on a local file system. Every storage write goes through the cache's `retry`
(pipeline.storage.Storage.retry in the jobs), so a transient error is tried again.
"""
from __future__ import annotations

import hashlib
import io
import json
import uuid
from dataclasses import dataclass
from typing import Callable, TypeVar

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
import pyarrow as pa
import pyarrow.parquet as pq

FEATURE_RATE = 50  # rows per second in a cache file
ROWS_PER_FRAME = 2  # 50 Hz rows per 25 Hz frame
ROWS_PER_GROUP = 500  # 10 s; even, so a row group never splits a frame's pair

T = TypeVar("T")


def _once(fn: Callable[[], T], what: str) -> T:
    return fn()


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class CachedFeatures:
    path: str
    n_frames: int  # 25 Hz frames; the file holds 2 * n_frames rows at 50 Hz
    duration_s: float
    dim: int

    @property
    def n_rows(self) -> int:
        return ROWS_PER_FRAME * self.n_frames


class FeatureCache:
    """`retry(fn, what)` runs each storage write (fn) and decides whether to try it again;
    the default tries once."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str,
                 retry: Callable[[Callable[[], T], str], T] = _once):
        self.fs = fs
        self.root = root.rstrip("/")
        self.retry = retry

    def path(self, model_id: str, audio_sha256: str) -> str:
        return f"{self.root}/hubert/{model_id}/{audio_sha256}.parquet"

    def lookup(self, model_id: str, audio_sha256: str) -> CachedFeatures | None:
        path = self.path(model_id, audio_sha256)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).schema_arrow.metadata or {}
            info = json.loads(meta.get(b"imgtalk", b"{}"))
        if info.get("feature_rate") != FEATURE_RATE:
            return None  # written by the 25 Hz cache: a miss, recomputed and overwritten
        return CachedFeatures(path, int(info["n_frames"]), float(info["duration_s"]), int(info["dim"]))

    def store(self, model_id: str, audio_sha256: str, features_50hz: np.ndarray, duration_s: float) -> CachedFeatures:
        """Store (2 F, D) rows at 50 Hz (what HubertFeatures returns); F = n_frames."""
        features = np.ascontiguousarray(features_50hz, dtype=np.float32)
        if features.ndim != 2:
            raise ValueError(f"feature cache: expected (2 F, D) rows at 50 Hz, got shape {features.shape}")
        n_rows, dim = features.shape
        if n_rows % ROWS_PER_FRAME:
            raise ValueError(
                f"feature cache: {n_rows} rows is odd; 50 Hz HuBERT rows come in pairs, two per 25 Hz frame"
            )
        n_frames = n_rows // ROWS_PER_FRAME
        info = {"model_id": model_id, "audio_sha256": audio_sha256, "n_frames": n_frames, "n_rows": n_rows,
                "dim": dim, "duration_s": duration_s, "feature_rate": FEATURE_RATE}
        schema = pa.schema([("row", pa.int32()), ("feature", pa.list_(pa.float32(), dim))],
                           metadata={b"imgtalk": json.dumps(info).encode()})
        flat = pa.array(features.reshape(-1), type=pa.float32())
        table = pa.Table.from_arrays(
            [pa.array(np.arange(n_rows, dtype=np.int32)), pa.FixedSizeListArray.from_arrays(flat, dim)], schema=schema
        )
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=ROWS_PER_GROUP)
        path = self.path(model_id, audio_sha256)
        data = buf.getvalue()
        self.retry(lambda: self._commit(path, data), f"store features {path}")
        return CachedFeatures(path, n_frames, duration_s, dim)

    def _commit(self, path: str, data: bytes) -> None:
        """Write `data` at `path` whole or not at all; safe to run again after a failure."""
        if not isinstance(self.fs, LocalFileSystem):
            self.fs.pipe_file(path, data)  # an object store's PUT is atomic
            return
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        try:
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            self.fs.mv(tmp, path)  # a rename within one file system
        finally:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)

    def read_window(self, cached: CachedFeatures, start: int, stop: int) -> np.ndarray:
        """25 Hz frames [start, stop) clamped to [0, n_frames): their 50 Hz rows
        [2 start', 2 stop'), shape (2 (stop' - start'), D). Reads only the row groups needed."""
        start, stop = max(0, start), min(cached.n_frames, stop)
        if stop <= start:
            return np.zeros((0, cached.dim), np.float32)
        first, last = ROWS_PER_FRAME * start, ROWS_PER_FRAME * stop
        groups = list(range(first // ROWS_PER_GROUP, (last - 1) // ROWS_PER_GROUP + 1))
        with self.fs.open(cached.path, "rb") as f:
            table = pq.ParquetFile(f).read_row_groups(groups, columns=["feature"])
        col = table.column("feature").combine_chunks()
        values = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, cached.dim)
        offset = groups[0] * ROWS_PER_GROUP
        return values[first - offset : last - offset].astype(np.float32, copy=True)
