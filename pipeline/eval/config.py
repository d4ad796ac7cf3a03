"""`imgtalk eval`: configuration and the per-video result row (pydantic at the edge)."""
from __future__ import annotations

from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from pipeline.config import JobConfig, PoolConfig, StorageConfig, load_yaml_config
from pipeline.dub.schemas import _arrow_type  # one rule for our Parquet rows' column types

Protocol = Literal["reconstruction", "cross"]

# The released files users download (the project ships no metric weights): pytorch-fid's
# FID Inception, torch-fidelity's copy of the same network, syncnet_python's SyncNet v2.
INCEPTION_FILES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
SYNCNET_FILE = "syncnet_v2.model"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EvalConfig(_Strict):
    metric_weights_uri: str | None = Field(
        None, description=f"folder holding {INCEPTION_FILES[0]} (or {INCEPTION_FILES[1]}) and {SYNCNET_FILE}; "
                          "a bundle's syncnet/ is used when this has none")
    fid_stride: int = Field(1, ge=1, description="every n-th face frame of each video enters FID")
    cross_shift: int = Field(1, ge=1, description="cross-dub: test video i is dubbed with the audio of test video i+shift")
    split: str = Field("test", description="the prepared corpus' split to evaluate")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int = Field(1, ge=1)
    pool: PoolConfig = PoolConfig(size=1, num_cpus=1.0)
    dub: JobConfig = JobConfig()
    storage: StorageConfig = StorageConfig()


def load_eval_config(path: str | None) -> EvalConfig:
    return load_yaml_config(EvalConfig, path, "eval config")


class EvalRow(_Strict):
    """One evaluated video: what `eval.parquet` holds."""

    bundle: str
    protocol: Protocol
    video_uri: str  # the source (ground truth in reconstruction)
    audio_uri: str  # what the generated video was dubbed with ("" = the source's own track)
    output_uri: str  # the generated video
    status: Literal["ok", "failed"]
    error: str | None = None
    frames: int | None = None
    face_frames: int | None = None
    fid_frames: int | None = None
    ssim: float | None = None
    psnr: float | None = None
    lmd: float | None = None
    lmd_frames: int | None = None
    sync_conf: float | None = None
    sync_dist: float | None = None
    sync_offset: int | None = None
    gt_sync_conf: float | None = None
    gt_sync_dist: float | None = None
    gt_sync_offset: int | None = None
    sync_error: str | None = None


EVAL_SCHEMA = pa.schema([(name, _arrow_type(f.annotation)) for name, f in EvalRow.model_fields.items()])
