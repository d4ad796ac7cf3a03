"""`imgtalk prepare`: configuration, manifest rows and report rows (pydantic at the edge)."""
from __future__ import annotations

import hashlib
import io
import os
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.config import AudioConfig, FaceConfig, PoolConfig, SecurityConfig, StorageConfig, load_yaml_config
from pipeline.storage import Storage, is_remote, strip_file_scheme

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _pools_default() -> dict[str, PoolConfig]:
    return {
        "plan": PoolConfig(size=1, num_cpus=0.25),
        "audio": PoolConfig(size=1, num_cpus=0.25),
        "chunk": PoolConfig(size=1, num_cpus=0.5),
    }


class PrepareConfig(_Strict):
    cache_uri: str = Field(".imgtalk-cache", description="HuBERT feature cache (shared with dub)")
    chunk_seconds: float = Field(6.0, gt=0.5, le=60, description="frames per shard row, at 25 fps")
    crop_format: Literal["jpeg", "png"] = "jpeg"
    jpeg_quality: int = Field(95, ge=95, le=100)
    min_face_px: float = Field(64.0, ge=0, description="faces narrower than this (source pixels) are not trained on")
    max_abs_yaw_deg: float = Field(45.0, gt=0)
    cut_threshold: float = Field(30.0, gt=0, description="scene-cut detector: mean grey change of 32² thumbnails")
    min_usable_seconds: float = Field(1.0, ge=0, description="a video with less usable footage is reported failed")
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int = Field(1, ge=1)
    motion_frames: int = Field(32, ge=1, description="frames per motion-extractor forward")
    audio: AudioConfig = AudioConfig()
    face: FaceConfig = FaceConfig()
    pools: dict[str, PoolConfig] = Field(default_factory=_pools_default)
    storage: StorageConfig = StorageConfig()
    security: SecurityConfig = SecurityConfig()

    def settings(self) -> dict:
        """What decides the shards' content, recorded in the card."""
        return self.model_dump(mode="json", include={"chunk_seconds", "crop_format", "jpeg_quality", "min_face_px",
                                                     "max_abs_yaw_deg", "cut_threshold", "min_usable_seconds",
                                                     "split_fractions", "seed"})


def load_prepare_config(path: str | None) -> PrepareConfig:
    return load_yaml_config(PrepareConfig, path, "prepare config")


class CorpusRow(_Strict):
    """One video of a training corpus. Without a speaker_id the video is its own speaker
    (safe for a speaker-disjoint split, pessimistic for its balance); without an audio_uri
    the video's own audio stream is used."""

    video_uri: str = Field(min_length=1)
    audio_uri: str | None = None
    speaker_id: str | None = None
    split: Literal["train", "val", "test"] | None = None

    @property
    def video_id(self) -> str:
        return hashlib.sha256(self.video_uri.encode()).hexdigest()[:16]

    @property
    def speaker(self) -> str:
        return self.speaker_id or os.path.splitext(os.path.basename(self.video_uri.rstrip("/")))[0]


def read_corpus(uri: str, storage: Storage) -> list[tuple[int, CorpusRow | None, str | None]]:
    """(row index, row or None, error) for a Parquet manifest, or for every video file under
    a folder or prefix (sorted, so the order is stable)."""
    from pipeline.dub.schemas import ManifestError

    if uri.endswith(".parquet"):
        try:
            table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
        except FileNotFoundError as e:
            raise ManifestError(f"{uri}: corpus manifest not found") from e
        except (pa.ArrowInvalid, OSError) as e:
            raise ManifestError(f"{uri}: not a readable Parquet file ({e})") from e
        if "video_uri" not in table.column_names:
            raise ManifestError(f"{uri}: corpus manifest lacks column video_uri; it has {table.column_names}")
        extra = sorted(set(table.column_names) - set(CorpusRow.model_fields))
        if extra:
            raise ManifestError(f"{uri}: unknown corpus manifest column(s) {extra}")
        records = table.to_pylist()
    else:
        fs, path = storage.fs_for(uri)
        if not storage.retry(lambda: fs.isdir(path), f"list {uri}"):
            raise ManifestError(f"{uri}: neither a .parquet manifest nor a folder of videos")
        found = sorted(p for p in storage.retry(lambda: fs.find(path), f"list {uri}") if p.lower().endswith(VIDEO_EXTENSIONS))
        scheme = uri.split("://", 1)[0] + "://" if is_remote(uri) else ""
        records = [{"video_uri": scheme + p if scheme else strip_file_scheme(p)} for p in found]
        if not records:
            raise ManifestError(f"{uri}: no video files ({', '.join(VIDEO_EXTENSIONS)}) found")
    rows = []
    seen: dict[str, int] = {}
    for i, rec in enumerate(records):
        try:
            row = CorpusRow.model_validate({k: v for k, v in rec.items() if v is not None})
        except ValidationError as e:
            msg = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
            rows.append((i, None, f"corpus row {i}: {msg}"))
            continue
        if row.video_uri in seen:
            rows.append((i, None, f"corpus row {i}: video_uri {row.video_uri} repeats row {seen[row.video_uri]}"))
            continue
        seen[row.video_uri] = i
        rows.append((i, row, None))
    return rows


class PrepareReportRow(_Strict):
    row_index: int
    video_id: str
    video_uri: str
    speaker_id: str
    split: str | None = None
    status: Literal["ok", "failed", "skipped"]
    error: str | None = None
    error_stage: str | None = None
    frames: int | None = None  # at 25 fps
    face_frames: int | None = None
    usable_frames: int | None = None
    chunks: int | None = None
    seconds: float | None = None


def write_prepare_report(rows: list[PrepareReportRow], uri: str, storage: Storage) -> None:
    from pipeline.dub.schemas import _arrow_type, write_rows

    schema = pa.schema([(name, _arrow_type(f.annotation)) for name, f in PrepareReportRow.model_fields.items()])
    write_rows(rows, schema, uri, storage)
