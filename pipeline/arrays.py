"""Arrays between Ray Data operators and in Parquet shards travel as `.npy` bytes: they
keep dtype and shape exactly, and variable-length frame arrays need no ragged-tensor
column types."""
from __future__ import annotations

import io

import numpy as np


def pack(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def unpack(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)
