"""The validation report: one row per manifest row (pydantic at the edge, Parquet on disk)."""
from __future__ import annotations

from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from pipeline.dub.schemas import read_rows, write_rows
from pipeline.storage import Storage

# What a problem is about, first word of each `problems` entry ("<kind>: <detail>"), so a
# report can be filtered by kind without parsing prose.
ProblemKind = Literal[
    "invalid_row",  # the manifest row itself does not validate
    "outside_allowed_prefixes",  # security policy: the row would be refused, so it was not opened
    "missing_video",
    "unreadable_video",
    "unsupported_format",  # interlaced, or a pixel format whose depth/alpha the output cannot keep
    "no_face",  # none of the sampled frames shows a face
    "missing_audio",
    "unreadable_audio",
    "length_mismatch",  # dubbed audio and video lengths differ by more than qc.max_audio_fit_s
]
PROBLEM_KINDS: tuple[str, ...] = ProblemKind.__args__


def problem(kind: str, detail: str) -> str:
    if kind not in PROBLEM_KINDS:
        raise ValueError(f"unknown problem kind {kind!r}")
    return f"{kind}: {detail}"


def kind_of(entry: str) -> str:
    return entry.split(":", 1)[0]


class ValidationRow(BaseModel):
    model_config = ConfigDict(extra="forbid")
    row_index: int
    video_uri: str
    audio_uri: str
    output_uri: str
    status: Literal["ok", "problem"]
    problems: list[str] = Field(default_factory=list)  # "<kind>: <detail>", kinds in PROBLEM_KINDS
    frames: int | None = None
    fps: float | None = None
    width: int | None = None
    height: int | None = None
    pix_fmt: str | None = None
    duration_s: float | None = None
    audio_duration_s: float | None = None
    sampled_frames: int | None = None  # frames put through the face tracker
    sampled_face_frames: int | None = None  # of those, frames with a face

    @property
    def problem_kinds(self) -> list[str]:
        return [kind_of(p) for p in self.problems]


VALIDATION_SCHEMA = pa.schema([
    ("row_index", pa.int64()),
    ("video_uri", pa.string()),
    ("audio_uri", pa.string()),
    ("output_uri", pa.string()),
    ("status", pa.string()),
    ("problems", pa.list_(pa.string())),
    ("frames", pa.int64()),
    ("fps", pa.float64()),
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("pix_fmt", pa.string()),
    ("duration_s", pa.float64()),
    ("audio_duration_s", pa.float64()),
    ("sampled_frames", pa.int64()),
    ("sampled_face_frames", pa.int64()),
])
assert VALIDATION_SCHEMA.names == list(ValidationRow.model_fields), "schema and model must list the same columns"


def write_validation_report(rows: list[ValidationRow], uri: str, storage: Storage) -> None:
    write_rows(rows, VALIDATION_SCHEMA, uri, storage)


def read_validation_report(uri: str, storage: Storage) -> list[ValidationRow]:
    return read_rows(ValidationRow, uri, storage)
