"""The validate job: every admitted manifest row probed on Ray (one ProbeOp actor pool),
the rest reported by the driver; then the estimate and the Parquet report.

    manifest rows ─ security policy (driver) ─ ProbeOp (actors: probe, audio, sampled faces) ─ driver: rows + estimate
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from pipeline.config import JobConfig
from pipeline.dub.schemas import read_manifest
from pipeline.raydata import stream_rows
from pipeline.security import job_policy, redact
from pipeline.storage import Storage
from pipeline.validate.estimate import Estimate, estimate
from pipeline.validate.schemas import ValidationRow, problem, write_validation_report

log = logging.getLogger("imgtalk")

# Frames per video put through the face tracker: enough to catch a video with no face
# anywhere (analyse samples 24 and fails when it finds none) at a few frames' cost.
DEFAULT_FACE_FRAMES = 3


@dataclass
class ValidateResult:
    rows: list[ValidationRow]
    estimate: Estimate
    report_uri: str | None

    @property
    def problems(self) -> list[ValidationRow]:
        return [r for r in self.rows if r.status == "problem"]


def _row(index: int, uris: dict, problems: list[str], **found) -> ValidationRow:
    shown = {k: redact(str(uris.get(k, ""))) for k in ("video_uri", "audio_uri", "output_uri")}
    return ValidationRow(row_index=index, status="problem" if problems else "ok", problems=problems, **shown, **found)


def run_validate(manifest_uri: str, config: JobConfig | None = None, report_uri: str | None = None,
                 address: str | None = None, face_frames: int = DEFAULT_FACE_FRAMES) -> ValidateResult:
    """Probe every row of the manifest; write the report to `report_uri` when given."""
    import ray

    from pipeline.dub.job import _init_ray
    from pipeline.validate.probe import ProbeOp

    config = config or JobConfig()
    storage = Storage(config.storage.options())
    policy = job_policy("validate", config.security, {"manifest": manifest_uri, "report": report_uri}, address)
    rows: dict[int, ValidationRow] = {}
    todo: list[dict] = []
    for index, m, error in read_manifest(manifest_uri, storage):
        if m is None:
            rows[index] = _row(index, {}, [problem("invalid_row", error)])
            continue
        uris = m.model_dump()
        # Checked before anything opens them, as the dub job does: a refused URI is never read.
        refused = [policy.check(u, kind) for u, kind in ((m.video_uri, "video"), (m.audio_uri, "audio"), (m.output_uri, "output"))]
        refused = [problem("outside_allowed_prefixes", r) for r in refused if r]
        if refused:
            rows[index] = _row(index, uris, refused)
            continue
        todo.append({"row_index": index, "video_uri": policy.canonical(m.video_uri), "audio_uri": policy.canonical(m.audio_uri),
                     "manifest": json.dumps(uris)})

    if todo:
        started_ray = _init_ray(address)
        try:
            from ray.data import DataContext

            ctx = DataContext.get_current()
            ctx.enable_progress_bars = False
            ctx.print_on_execution_start = False
            # Probing is the analyse stage's kind of work (decode sampled frames, track
            # faces), so it runs in a pool of that shape.
            ds = ray.data.from_items(todo, override_num_blocks=len(todo))
            ds = ds.map(ProbeOp, fn_constructor_args=(config.model_dump(), face_frames), **config.pools["analyse"].actor_args())
            by_index = {r["row_index"]: r for r in todo}
            for out in stream_rows(ds):
                index = int(out["row_index"])
                found = json.loads(out["found"])
                rows[index] = _row(index, json.loads(by_index[index]["manifest"]), [redact(p) for p in found.pop("problems")], **found)
        finally:
            if started_ray:
                ray.shutdown()

    ordered = [rows[i] for i in sorted(rows)]
    readable = [r for r in ordered if r.frames is not None]
    # Every readable video counts, problem rows included: fixing a row does not change its frames.
    est = estimate(config, len(readable), sum(r.frames for r in readable), sum(r.duration_s or 0.0 for r in readable),
                   sum(r.audio_duration_s or 0.0 for r in readable))
    if report_uri:
        write_validation_report(ordered, report_uri, storage)
    return ValidateResult(ordered, est, report_uri)
