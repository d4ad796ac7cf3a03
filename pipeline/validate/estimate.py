"""What a manifest would cost on the configured pools: frames, GPU-hours and wall time,
from the per-stage cost table in the job config (config.CostConfig).

Each stage's busy seconds are its work (videos, seconds of dubbed audio or frames) times
its cost. The job is one streaming graph, so once it is full every stage works at once and
the wall time is set by the slowest pool: max over stages of busy seconds / pool size
(this ignores start-up and the first video's latency, so short jobs take longer).
GPU-hours are busy hours times the GPUs each actor of that pool reserves."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import JobConfig
from pipeline.progress import format_duration

# (pool, cost field, unit of work)
_STAGES = (
    ("plan", "plan_s_per_video", "videos"),
    ("analyse", "analyse_s_per_video", "videos"),
    ("audio", "audio_s_per_audio_s", "audio_s"),
    ("face", "face_s_per_frame", "frames"),
    ("motion", "motion_s_per_frame", "frames"),
    ("complete", "complete_s_per_frame", "frames"),
    ("compose", "compose_s_per_frame", "frames"),
    ("finalize", "finalize_s_per_frame", "frames"),
)


@dataclass(frozen=True)
class StageEstimate:
    stage: str
    work: float
    unit: str
    busy_s: float  # one actor's seconds for all of it
    wall_s: float  # busy_s spread over the pool
    gpu_hours: float


@dataclass(frozen=True)
class Estimate:
    videos: int
    frames: int
    video_s: float
    audio_s: float
    stages: tuple[StageEstimate, ...]

    @property
    def gpu_hours(self) -> float:
        return sum(s.gpu_hours for s in self.stages)

    @property
    def bottleneck(self) -> StageEstimate:
        return max(self.stages, key=lambda s: s.wall_s)

    @property
    def wall_s(self) -> float:
        return self.bottleneck.wall_s


def estimate(config: JobConfig, videos: int, frames: int, video_s: float, audio_s: float) -> Estimate:
    work = {"videos": float(videos), "frames": float(frames), "audio_s": audio_s}
    stages = []
    for pool_name, field, unit in _STAGES:
        pool = config.pools[pool_name]
        busy = work[unit] * getattr(config.cost, field)
        stages.append(StageEstimate(pool_name, work[unit], unit, busy, busy / pool.size, busy * pool.num_gpus / 3600))
    return Estimate(videos, frames, video_s, audio_s, tuple(stages))


def format_estimate(est: Estimate, config: JobConfig) -> str:
    lines = [
        f"estimate for {est.videos} readable videos ({est.video_s:.1f} s of video, {est.audio_s:.1f} s of dubbed audio):",
        f"  frames:    {est.frames}",
        f"  GPU-hours: {est.gpu_hours:.4f}" + ("" if est.gpu_hours else " (no pool reserves a GPU in this config)"),
        f"  wall time: {format_duration(est.wall_s)} (bottleneck: {est.bottleneck.stage}, "
        f"{config.pools[est.bottleneck.stage].size} actors)",
        f"  {'stage':<9} {'work':>14} {'pool':>20} {'busy s':>10} {'wall s':>9}",
    ]
    for s in est.stages:
        pool = config.pools[s.stage]
        reserve = f"{pool.size} x {pool.num_cpus:g} CPU" + (f" {pool.num_gpus:g} GPU" if pool.num_gpus else "")
        work = f"{s.work:.1f} s audio" if s.unit == "audio_s" else f"{int(s.work)} {s.unit}"
        lines.append(f"  {s.stage:<9} {work:>14} {reserve:>20} {s.busy_s:>10.1f} {s.wall_s:>9.1f}")
    lines.append("  (cost per stage from the config's `cost` block; defaults are CPU/planning figures, see pipeline/config.py CostConfig)")
    return "\n".join(lines)
