"""Manifest and report rows (pydantic at the edge, Parquet on disk).

Manifest: one row per video to dub: video_uri, audio_uri, output_uri, optional options
(a JSON object string with per-row overrides). Report: one row per manifest row, whatever
happened to it.
"""
from __future__ import annotations

import hashlib
import io
import json
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.storage import Storage


class FaceBox(BaseModel):
    """Dub the face inside this box (source-frame pixels of the stored frames, x0 < x1,
    y0 < y1) at `t` seconds into the video."""

    model_config = ConfigDict(extra="forbid")
    box: tuple[float, float, float, float]
    t: float = Field(0.0, ge=0)

    @field_validator("box")
    @classmethod
    def _ordered(cls, v):
        if not (v[0] < v[2] and v[1] < v[3]):
            raise ValueError(f"box must be [x0, y0, x1, y1] with x0 < x1 and y0 < y1, got {list(v)}")
        return v


class RowOptions(BaseModel):
    """Per-row overrides a manifest may carry."""

    model_config = ConfigDict(extra="forbid")
    crf: int | None = Field(None, ge=0, le=51)
    segment_seconds: float | None = Field(None, gt=0.2, le=120)

    # Who is dubbed (stages/face/identity.py): the largest face over the video, the face
    # nearest the centre, or the face in a box at a time.
    face: Literal["largest", "center"] | FaceBox = "largest"

    def face_key(self) -> str:
        """The face option as the row carries it: "largest", "center" or the box's JSON."""
        return self.face if isinstance(self.face, str) else json.dumps(self.face.model_dump(), sort_keys=True)
    # The source's audio tracks: "replace" drops them (the dub is the only audio), "add"
    # keeps them after the dub (README "Deliverable audio").
    audio_mode: Literal["replace", "add"] = "replace"
    audio_language: str | None = Field(None, pattern=r"^[a-z]{3}$", description="ISO 639-2 tag of the dub track")

    def output_settings(self, settings: dict) -> dict:
        """settings (results.settings_identity) with this row's audio options, when chosen:
        outputs made before the options existed keep matching."""
        chosen = {k: v for k, v in (("audio_mode", self.audio_mode), ("audio_language", self.audio_language))
                  if v != RowOptions.model_fields[k].default}
        return {**settings, "row_audio": chosen} if chosen else settings


class ManifestRow(BaseModel):
    model_config = ConfigDict(extra="forbid")
    video_uri: str = Field(min_length=1)
    audio_uri: str = Field(min_length=1)
    output_uri: str = Field(min_length=1)
    options: RowOptions = RowOptions()

    @field_validator("options", mode="before")
    @classmethod
    def _parse_options(cls, v):
        if v is None or v == "":
            return RowOptions()
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except json.JSONDecodeError as e:
                raise ValueError(f"options is not a JSON object: {e}") from e
        return v

    @property
    def video_id(self) -> str:
        # Stable across re-runs and unique per output: the output URI names the work.
        return hashlib.sha256(self.output_uri.encode()).hexdigest()[:16]


MANIFEST_SCHEMA = pa.schema(
    [
        ("video_uri", pa.string()),
        ("audio_uri", pa.string()),
        ("output_uri", pa.string()),
        ("options", pa.string()),
    ]
)

Status = Literal["ok", "failed", "skipped"]


class ReportRow(BaseModel):
    model_config = ConfigDict(extra="forbid")
    job_id: str
    row_index: int
    video_id: str
    video_uri: str
    audio_uri: str
    output_uri: str
    status: Status
    error: str | None = None
    error_stage: str | None = None
    source_frames: int | None = None
    output_frames: int | None = None
    fps: float | None = None
    width: int | None = None
    height: int | None = None
    duration_s: float | None = None
    audio_duration_s: float | None = None
    audio_padded_s: float | None = None
    audio_trimmed_s: float | None = None
    face_fraction: float | None = None
    segments: int | None = None
    feature_cache_hit: bool | None = None
    time_plan_s: float | None = None
    time_analyse_s: float | None = None
    time_audio_s: float | None = None
    time_face_s: float | None = None
    time_motion_s: float | None = None
    time_complete_s: float | None = None
    time_compose_s: float | None = None
    time_finalize_s: float | None = None
    output_bytes: int | None = None
    output_sha256: str | None = None
    # SyncNet's lip-sync figures of the output (pipeline/dub/qc.py), when the weights bundle
    # holds syncnet/syncnet_v2.model; else None.
    sync_conf: float | None = None  # LSE-C / AVConf: median minus minimum of the mean distances over offsets
    sync_dist: float | None = None  # LSE-D: the minimum mean distance
    sync_offset: int | None = None  # the audio-video offset (25 fps frames) with the minimum distance
    warnings: str | None = None  # what an operator should look at ("; "-separated): qc.qc_warnings
    result_job_id: str | None = None  # the job that made the output: this one, or for a skipped row an earlier one


def _arrow_type(annotation) -> pa.DataType:
    text = str(annotation)
    if "int" in text and "Literal" not in text:
        return pa.int64()
    if "float" in text:
        return pa.float64()
    if "bool" in text:
        return pa.bool_()
    return pa.string()


REPORT_SCHEMA = pa.schema(
    [(name, _arrow_type(field.annotation)) for name, field in ReportRow.model_fields.items()]
)


class ManifestError(ValueError):
    pass


def read_manifest(uri: str, storage: Storage) -> list[tuple[int, ManifestRow | None, str | None]]:
    """(row_index, row or None, error or None) for every row of the manifest Parquet file.

    A whole-file problem (missing, not Parquet, missing columns) raises ManifestError; a
    bad row only marks that row, so the rest of the job goes on."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as e:
        raise ManifestError(f"{uri}: manifest not found") from e
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as e:
        raise ManifestError(f"{uri}: not a readable Parquet file ({e})") from e
    required = {"video_uri", "audio_uri", "output_uri"}
    missing = sorted(required - set(table.column_names))
    if missing:
        raise ManifestError(f"{uri}: manifest lacks column(s) {missing}; it has {table.column_names}")
    extra = sorted(set(table.column_names) - required - {"options"})
    if extra:
        raise ManifestError(f"{uri}: unknown manifest column(s) {extra}")
    rows = []
    seen_outputs: dict[str, int] = {}
    for i, rec in enumerate(table.to_pylist()):
        try:
            row = ManifestRow.model_validate(rec)
        except ValidationError as e:
            msg = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
            rows.append((i, None, f"manifest row {i}: {msg}"))
            continue
        if row.output_uri in seen_outputs:
            rows.append((i, None, f"manifest row {i}: output_uri {row.output_uri} repeats row {seen_outputs[row.output_uri]}"))
            continue
        seen_outputs[row.output_uri] = i
        rows.append((i, row, None))
    return rows


def write_manifest(rows: list[dict], uri: str, storage: Storage) -> None:
    records = [
        {
            "video_uri": r["video_uri"],
            "audio_uri": r["audio_uri"],
            "output_uri": r["output_uri"],
            "options": json.dumps(r["options"]) if isinstance(r.get("options"), dict) else r.get("options"),
        }
        for r in rows
    ]
    table = pa.Table.from_pylist(records, schema=MANIFEST_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes_atomic(buf.getvalue(), uri)


def write_rows(rows: list[BaseModel], schema: pa.Schema, uri: str, storage: Storage) -> None:
    """A report of pydantic rows as one Parquet file, in row_index order, committed atomically."""
    rows = sorted(rows, key=lambda r: r.row_index)
    table = pa.Table.from_pylist([r.model_dump() for r in rows], schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes_atomic(buf.getvalue(), uri)


def read_rows(model: type[BaseModel], uri: str, storage: Storage) -> list:
    """The rows write_rows wrote, as `model`s."""
    table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    return [model.model_validate(r) for r in table.to_pylist()]


def write_report(rows: list[ReportRow], uri: str, storage: Storage) -> None:
    write_rows(rows, REPORT_SCHEMA, uri, storage)


def read_report(uri: str, storage: Storage) -> list[ReportRow]:
    return read_rows(ReportRow, uri, storage)
