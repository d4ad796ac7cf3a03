"""Job configuration (pydantic, YAML). Configuration enters here, at the edge; the rest of
the code receives plain typed values. Every default works on a laptop (local Ray on the
CPU, local folders)."""
from __future__ import annotations

import os
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.security import DEFAULT_SCHEMES
from pipeline.storage import StorageOptions


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PoolConfig(_Strict):
    """How many copies of a stage run and what each one reserves on the cluster."""

    size: int = Field(1, ge=1, description="actor pool size (or max concurrent tasks)")
    num_cpus: float = Field(0.25, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    memory_gb: float | None = Field(
        None, gt=0, description="heap memory each actor/task reserves (Ray schedules by it); ~1.5 for CPU stages, more for complete"
    )

    def resources(self) -> dict:
        """What one actor or task of this pool reserves: Ray's num_cpus, num_gpus, memory."""
        extra = {"memory": int(self.memory_gb * 2**30)} if self.memory_gb else {}
        return dict(num_cpus=self.num_cpus, num_gpus=self.num_gpus or None, **extra)

    def actor_args(self) -> dict:
        """map() arguments that run a stage as this fixed-size actor pool."""
        from ray.data import ActorPoolStrategy

        return dict(compute=ActorPoolStrategy(size=self.size), **self.resources())

    def task_args(self) -> dict:
        """ray.remote() options of a task run for this pool (finalize): the same
        reservation as an actor of it, so Ray schedules it by its memory and GPUs too."""
        return {k: v for k, v in self.resources().items() if v is not None}


def _pools_default() -> dict[str, PoolConfig]:
    # Fractional CPUs so that every pool fits on a 2-core laptop at once; on a cluster
    # raise sizes and set num_gpus for `complete` (one actor per GPU).
    return {
        "plan": PoolConfig(size=2, num_cpus=0.25),
        "analyse": PoolConfig(size=1, num_cpus=0.25),
        "audio": PoolConfig(size=1, num_cpus=0.25),
        "face": PoolConfig(size=1, num_cpus=0.25),
        "motion": PoolConfig(size=1, num_cpus=0.25),
        "complete": PoolConfig(size=1, num_cpus=0.25),
        "compose": PoolConfig(size=1, num_cpus=0.25),
        "finalize": PoolConfig(size=2, num_cpus=0.25),
    }


class BatchConfig(_Strict):
    complete_frames: int = Field(16, ge=1, description="frames per IMC-UNet/VAE forward")
    motion_frames: int = Field(64, ge=1, description="frames per motion-extractor forward")


class OutputConfig(_Strict):
    """The output video's encoding. The pixel format, bit depth and colour tags are always
    the source's (stages/media/colour.py); these choose the encoder and its quality. The
    container is the output_uri's extension: .mov, .mkv, else mp4."""

    codec: str = Field("libx264", description="libx264, libx265, libsvtav1, libvpx-vp9, prores_ks, mpeg4, or "
                       "match-source: the encoder of the source's codec family at its bitrate and GOP")
    crf: int = Field(18, ge=0, le=51, description="constant quality for libx264/libx265/libsvtav1/libvpx-vp9")
    preset: str = Field("medium", description="x264/x265 preset name; mapped to SVT-AV1 and libvpx speeds")
    bitrate: int | None = Field(None, gt=0, description="video bits/s instead of crf/qscale (None: constant quality)")
    gop: int | None = Field(None, ge=1, description="keyframe interval in frames (None: encoder default; match-source: the source's)")
    qscale: int = Field(4, ge=1, le=31, description="quantiser for prores_ks and mpeg4 (lower is better)")
    prores_profile: Literal["auto", "proxy", "lt", "standard", "hq", "4444", "4444xq"] = Field(
        "auto", description="auto: hq for 4:2:2 sources, 4444 for 4:4:4")
    # The dub track (stages/media/mux.py AudioOutput; README "Deliverable audio"). None takes
    # it from the dub file: its sample rate (or the nearest the codec has), its bit rate when
    # lossy-coded, else 64 kb/s per channel. Its channel layout is always the dub's.
    audio_codec: Literal["aac", "ac3", "eac3", "libopus"] = "aac"
    audio_bitrate: int | None = Field(None, ge=16_000)
    audio_sample_rate: int | None = Field(None, ge=8_000)
    keep_source_streams: bool = Field(
        False, description="carry the source video's subtitle and data streams, chapters, metadata, timecode and "
        "language tags into the output (packet copy); its audio tracks: the manifest's audio_mode")


class FaceConfig(_Strict):
    min_detection_confidence: float = Field(0.5, ge=0, le=1)
    smoothing_sigma_frames: float = Field(1.5, ge=0)
    max_gap_frames: int = Field(2, ge=0)
    feather_px: float = Field(6.0, ge=0)
    identity_max_distance: float = Field(
        1.0, gt=0, description="a face is the dubbed person when its signature is this close to theirs "
        "(stages/face/identity.py; 1.0 is the boundary its scales were set to)")


class AnalyseConfig(_Strict):
    sample_frames: int = Field(24, ge=1, description="frames sampled across a video to pick neutral/reference")
    reference_bank: int = Field(6, ge=1)
    still_window_seconds: float = Field(
        0.08, ge=0, description="the neutral frame is one whose mouth is at rest (its opening steady) over this long "
        "either side of it, where a sampled frame has one (stages/motion/selection.py); 0: any closed mouth")
    min_reference_gap_frames: int = Field(
        12, ge=1, description="a reference is never within this many frames of its target (no mouth leak)"
    )


class AudioConfig(_Strict):
    chunk_seconds: float = Field(20.0, gt=0)
    context_seconds: float = Field(2.0, ge=0)


class MotionConfig(_Strict):
    warmup_seconds: float = Field(
        1.0, ge=0, description="audio before a segment fed to Stage 1 so motion is continuous across segments"
    )
    silence_gate_db: float | None = Field(
        -35.0, le=0, description="the silence gate: frames of the dubbed track whose speech-band level is this many dB "
        "below its loudest frame, in runs of at least silence_gate_frames, show a closed mouth (silence_gate_mode); "
        "null turns the gate off (README, Operator guide)")
    silence_gate_mode: Literal["neutral-pixels", "neutral", "stage1"] = Field(
        "neutral-pixels", description="what a gated run shows: neutral-pixels, the neutral frame's own crop, colour-matched "
        "to each frame's and pasted back, there and past the dubbed track's end (Stage 2 does not run on those frames); neutral, the neutral frame's own mouth (Δδ = 0) drawn by Stage 2 "
        "with the neutral frame as its RSCA reference; stage1, Stage 1 decoded afresh over the run's audio alone (no motion "
        "fed back from the speech before it)")
    silence_gate_frames: int = Field(3, ge=1, description="25 Hz frames a quiet run needs to count as silence: a "
                                     "shorter one (a stop consonant, a breath between words) is left to Stage 1")


class CompleteConfig(_Strict):
    decode: Literal["full", "mouth"] = Field(
        "full", description="full: VAE-decode the whole crop; mouth: only the latent window over the pasted mouth "
        "(plus decode_margin_latents), the rest of the crop is never pasted (README, Performance)")
    decode_margin_latents: int = Field(4, ge=0, description="latents of decoder context around the pasted region")


class QCConfig(_Strict):
    """Quality checks on every finished video (pipeline/dub/qc.py): what puts a warning in
    the report's `warnings` column, and what fails a video outright."""

    low_sync_conf: float = Field(
        3.0, description="warn when SyncNet's confidence (LSE-C) of an output is below this (needs syncnet/ in the bundle)"
    )
    min_sync_conf: float | None = Field(
        None, description="fail the video, committing no output, when its SyncNet confidence is below this (None: never)"
    )
    max_audio_fit_s: float = Field(0.5, ge=0, description="warn when the dubbed track was padded or trimmed by more than this")
    min_face_fraction: float = Field(0.5, ge=0, le=1, description="warn when a face was found on fewer than this fraction of frames")


class CostConfig(_Strict):
    """Seconds each stage spends per unit of work: what `imgtalk validate` multiplies by a
    manifest's frames and seconds to estimate a job before it runs (pipeline/validate/estimate.py).

    The defaults are CPU figures from this project's 2-core machine, except `complete`:
    face and compose are `benchmarks/pipeline_bench.py --part stages` at 1080p (README,
    "Sizing actor pools to GPUs": decode + tracking 25 ms, decode + paste + x264 medium
    128 ms per frame); complete is the README's planning figure of 100 frames/s per GPU at
    paper size (the FLOP bound on an H100 is about 750); the per-video and audio figures
    are rough CPU figures of the same machine. Re-measure on your own cluster: dub a sample
    of the catalogue and divide each report column time_<stage>_s by source_frames (or, for
    plan/analyse/audio, take it per video and per second of dubbed audio)."""

    plan_s_per_video: float = Field(0.5, ge=0, description="probe a video and check its audio")
    analyse_s_per_video: float = Field(3.0, ge=0, description="sample frames, neutral frame and reference bank")
    audio_s_per_audio_s: float = Field(0.5, ge=0, description="HuBERT features per second of dubbed audio")
    face_s_per_frame: float = Field(0.025, ge=0, description="decode + face tracking + aligned crops")
    motion_s_per_frame: float = Field(0.005, ge=0, description="motion extractor + Stage 1")
    complete_s_per_frame: float = Field(0.01, ge=0, description="VAE encode + IMC-UNet + VAE decode, on one GPU")
    compose_s_per_frame: float = Field(0.128, ge=0, description="decode + paste-back + encode")
    finalize_s_per_frame: float = Field(0.002, ge=0, description="stream-copy concat + audio mux + commit")


class StorageConfig(_Strict):
    endpoint_url: str | None = None
    region: str | None = None
    retries: int = Field(4, ge=0)
    backoff_s: float = Field(0.5, ge=0)

    def options(self) -> StorageOptions:
        return StorageOptions(
            endpoint_url=self.endpoint_url, region=self.region, retries=self.retries, backoff_s=self.backoff_s
        )


class RetryConfig(_Strict):
    """How often a stage tries a segment again after a transient error (storage
    throttling, a reset connection, a timeout) before the row fails. Input errors fail
    the row at once; GPU faults end the actor, which Ray replaces (pipeline/errors.py)."""

    segment_attempts: int = Field(3, ge=1, description="tries of a stage's work on one row, the first included")
    backoff_s: float = Field(1.0, ge=0, description="pause before the second try; it doubles for each try after")
    device_faults: int = Field(
        3, ge=1, description="GPU faults one segment (one video, in the per-video stages) may cause in a stage that "
        "runs a network (each ends an actor, which Ray replaces) before it is failed instead of tried again: a row "
        "that faults every GPU must not loop forever")


class SecurityConfig(_Strict):
    """Where manifest URIs may point (pipeline/security.py has the matching rules).
    None (the default) admits every URI whose scheme is in `allowed_schemes`: right for a
    laptop, not for manifests from other teams, so a dub job against a cluster refuses to
    start without both prefix lists. A list admits only URIs under one of its prefixes;
    local paths only through a local prefix."""

    allowed_input_prefixes: list[str] | None = Field(None, description="video_uri and audio_uri must be under one of these")
    allowed_output_prefixes: list[str] | None = Field(None, description="output_uri must be under one of these")
    allowed_schemes: list[str] = Field(
        default_factory=lambda: list(DEFAULT_SCHEMES),
        description="schemes admitted where no prefixes are set (never http(s) unless listed here)")

    @field_validator("allowed_input_prefixes", "allowed_output_prefixes")
    @classmethod
    def _no_credentials(cls, v: list[str] | None) -> list[str] | None:
        from pipeline.security import PolicyError, locate

        for prefix in v or []:
            try:
                locate(prefix)
            except PolicyError as e:
                raise ValueError(str(e)) from None
        return v


class JobConfig(_Strict):
    segment_seconds: float = Field(4.0, gt=0.2, le=120)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    cache_uri: str = Field(".imgtalk-cache", description="feature cache and work area (local path or s3://)")
    work_uri: str | None = Field(None, description="encoded segments before finalize; default <cache_uri>/work")
    torch_threads: int = Field(1, ge=1, description="intra-op threads per worker (avoid oversubscription)")
    batch: BatchConfig = BatchConfig()
    pools: dict[str, PoolConfig] = Field(default_factory=_pools_default)
    stage_layout: Literal["auto", "pools", "fused"] = Field(
        "auto",
        description="pools: one actor pool per stage (a cluster); fused: the per-video stages in one actor and the "
        "per-segment stages in another, copied per CPU (a laptop, where every actor's start-up costs seconds of the "
        "only cores there are); auto: fused on a single node with at most 4 CPUs and no GPU, else pools",
    )
    max_videos_in_flight: int | None = Field(
        None, ge=1,
        description="backpressure: at most this many videos between the start of their plan stage and the return of "
        "their last segment (pipeline/dub/gate.py); default twice the segment actors plus two",
    )
    fused_lead: bool = Field(
        True,
        description="fused layout: one segment actor runs as usual and the others in the idle scheduling class, so the "
        "first video is not held back by every actor starting at once (pipeline/dub/fused.py); false: all alike",
    )
    output: OutputConfig = OutputConfig()
    face: FaceConfig = FaceConfig()
    analyse: AnalyseConfig = AnalyseConfig()
    audio: AudioConfig = AudioConfig()
    motion: MotionConfig = MotionConfig()
    complete: CompleteConfig = CompleteConfig()
    storage: StorageConfig = StorageConfig()
    retries: RetryConfig = RetryConfig()
    security: SecurityConfig = SecurityConfig()
    qc: QCConfig = QCConfig()
    cost: CostConfig = CostConfig()  # imgtalk validate's estimate: seconds per frame / video per stage
    max_failed_videos: int | None = Field(
        None, ge=0, description="stop the job cleanly once more videos than this have failed (None: never)"
    )
    report_interval_s: float = Field(
        30.0, ge=0, description="rewrite the partial report at most this often while the job runs (0: after every video)"
    )

    @field_validator("cache_uri", "work_uri")
    @classmethod
    def _uri_without_credentials(cls, v: str | None) -> str | None:
        from pipeline.security import has_credentials, redact

        if v is not None and has_credentials(v):
            raise ValueError(f"{redact(v)}: URIs must not carry credentials; they come from the environment or instance roles")
        return v

    @field_validator("pools")
    @classmethod
    def _known_pools(cls, v: dict[str, PoolConfig]) -> dict[str, PoolConfig]:
        known = set(_pools_default())
        unknown = sorted(set(v) - known)
        if unknown:
            raise ValueError(f"unknown pools {unknown}; known: {sorted(known)}")
        merged = _pools_default()
        merged.update(v)
        return merged

    def work_dir(self) -> str:
        return self.work_uri or self.cache_uri.rstrip("/") + "/work"


class ConfigError(ValueError):
    pass


def load_yaml_config(model: type[BaseModel], path: str | None, what: str):
    """A pydantic config from a YAML file (every key optional), errors naming file and key."""
    if path is None:
        return model()
    if not os.path.exists(path):
        raise ConfigError(f"{path}: {what} not found")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a {what} is a YAML mapping, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"{path}: invalid {what}:\n  " + "\n  ".join(lines)) from e


def load_job_config(path: str | None) -> JobConfig:
    return load_yaml_config(JobConfig, path, "job config")
