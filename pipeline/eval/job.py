"""`imgtalk eval`: the paper's five metrics over a test set, as a Ray Data job.

    inputs ─ (prepared test split: dub it with each bundle, `imgtalk dub`) ─ pairs ─ ScoreOp actors ─ driver
                                                 (or a dub report's ok rows)            (GPU if asked)    │
        eval.parquet (per video) · summary.json (means, FID, settings, skipped) · table.md  ◀───────────┘

Protocols:
- reconstruction: each test video dubbed with its own audio and compared with itself (the
  paper's Table-1 setting): SSIM, PSNR, FID, LMD, AVConf (LSE-C) and LSE-D;
- cross: another audio track (test video i with the audio of test video i+shift): no
  ground-truth frame, so only FID (against the source frames), AVConf and LSE-D.

Means are over videos (each video's mean over its frames), as Wav2Lip's LRS scorer
averages per-video LSE; FID pools every video's face crops (every `fid_stride`-th frame) of
one bundle into one set. A metric whose weights are missing is skipped, with the reason, in
the table and summary.json; it never gets a value.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.eval.config import INCEPTION_FILES, SYNCNET_FILE, EVAL_SCHEMA, EvalConfig, EvalRow
from pipeline.raydata import stream_rows
from pipeline.storage import Storage, join_uri

log = logging.getLogger("imgtalk")

MEAN_KEYS = ("ssim", "psnr", "lmd", "sync_conf", "sync_dist")
FID_FULL_RANK_FRAMES = 2048


class EvalError(ValueError):
    pass


@dataclass
class EvalResult:
    out_uri: str
    protocol: str
    rows: list[EvalRow]
    summary: dict
    table: str
    seconds: float
    dub_reports: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- inputs


def resolve_metric_weights(config: EvalConfig, storage: Storage, bundle_roots: list[str] = ()) -> tuple[dict, dict]:
    """({"inception_uri", "syncnet_uri"} of the files found, {metric: why skipped})."""
    weights, skipped = {}, {}
    root = config.metric_weights_uri
    for name in INCEPTION_FILES:
        if root and storage.exists(join_uri(root, name)):
            weights["inception_uri"] = join_uri(root, name)
            break
    else:
        skipped["fid"] = (f"no FID Inception weights ({' or '.join(INCEPTION_FILES)}) in "
                          f"{root or 'metric_weights_uri (not set)'}")
    candidates = ([join_uri(root, SYNCNET_FILE)] if root else []) + [os.path.join(b, "syncnet", SYNCNET_FILE) for b in bundle_roots]
    for uri in candidates:
        if storage.exists(uri):
            weights["syncnet_uri"] = uri
            break
    else:
        why = f"no SyncNet weights ({SYNCNET_FILE}) in {root or 'metric_weights_uri (not set)'} or the bundle's syncnet/"
        skipped["sync_conf"] = skipped["sync_dist"] = why
    return weights, skipped


def pairs_from_report(report_uri: str, storage: Storage, protocol: str, label: str) -> list[dict]:
    """A dub report's rows whose output exists (ok, or skipped because an earlier run made it)."""
    from pipeline.dub.schemas import read_report

    try:
        rows = read_report(report_uri, storage)
    except FileNotFoundError as e:
        raise EvalError(f"{report_uri}: dub report not found") from e
    pairs = []
    for r in rows:
        if r.status == "ok" or (r.status == "skipped" and storage.exists(r.output_uri)):
            pairs.append(dict(bundle=label, protocol=protocol, video_uri=r.video_uri,
                              audio_uri="" if r.audio_uri == r.video_uri else r.audio_uri, output_uri=r.output_uri))
    return pairs


def dub_manifest(prepared_uri: str, storage: Storage, protocol: str, out_folder: str, config: EvalConfig) -> list[dict]:
    """Manifest rows dubbing the prepared corpus' `config.split` videos (sorted by video id):
    with their own audio (reconstruction) or with test video i+shift's (cross)."""
    import io

    import pyarrow.parquet as pq

    uri = join_uri(prepared_uri, "videos.parquet")
    try:
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    except FileNotFoundError as e:
        raise EvalError(f"{uri}: not found; --prepared takes the output folder of imgtalk prepare") from e
    videos = sorted((r for r in table.to_pylist() if r["split"] == config.split), key=lambda r: r["video_id"])
    if not videos:
        raise EvalError(f"{uri}: no video in split {config.split!r} (splits: {sorted(set(table.column('split').to_pylist()))})")
    own = [v.get("audio_uri") or v["video_uri"] for v in videos]
    if protocol == "cross" and len(videos) < 2:
        raise EvalError(f"{uri}: cross-dubbing needs 2 or more {config.split} videos, found {len(videos)}")
    rows = []
    for i, v in enumerate(videos):
        audio = own[i] if protocol == "reconstruction" else own[(i + config.cross_shift) % len(videos)]
        if protocol == "cross" and audio == own[i]:
            audio = own[(i + 1) % len(videos)]
        rows.append(dict(video_uri=v["video_uri"], audio_uri=audio,
                         output_uri=join_uri(out_folder, "dubbed", f"{v['video_id']}.mp4")))
    return rows


# ----------------------------------------------------------------------------- aggregate


def summarise(rows: list[EvalRow], features: dict[str, dict[str, list[np.ndarray]]], skipped: dict) -> dict[str, dict]:
    """label -> {metric: mean over ok videos, fid, counts}."""
    from stages.eval.fid import fid_from_features

    out = {}
    for label in dict.fromkeys(r.bundle for r in rows):
        ok = [r for r in rows if r.bundle == label and r.status == "ok"]
        entry: dict = {"videos": len(ok), "failed": sum(r.bundle == label and r.status == "failed" for r in rows)}
        for key in MEAN_KEYS:
            values = [getattr(r, key) for r in ok if getattr(r, key) is not None]
            entry[key] = float(np.mean(values)) if values and key not in skipped else None
        gt = [r.gt_sync_conf for r in ok if r.gt_sync_conf is not None]
        entry["gt_sync_conf"] = float(np.mean(gt)) if gt else None
        gt_d = [r.gt_sync_dist for r in ok if r.gt_sync_dist is not None]
        entry["gt_sync_dist"] = float(np.mean(gt_d)) if gt_d else None
        entry["fid"] = None
        feats = features.get(label)
        if "fid" not in skipped and feats and feats["real"]:
            real, fake = np.concatenate(feats["real"]), np.concatenate(feats["fake"])
            entry["fid_frames"] = int(len(fake))
            if len(fake) >= 2:
                entry["fid"] = fid_from_features(real, fake)
            if len(fake) < FID_FULL_RANK_FRAMES:
                entry["fid_note"] = (f"{len(fake)} frames < {FID_FULL_RANK_FRAMES}: the covariance is rank-deficient "
                                     "and FID is biased high; compare only runs with equal frame counts")
        out[label] = entry
    return out


def _settings(weights: dict) -> dict:
    from stages.eval import image_metrics, lmd

    settings = {"ssim_psnr": image_metrics.SETTINGS, "lmd": lmd.SETTINGS, "weights": weights}
    if "inception_uri" in weights:
        from stages.eval.inception import FID_SETTINGS

        settings["fid"] = FID_SETTINGS
    settings["sync"] = {"implementation": "SyncNet v2 (syncnet_python), LSE-C = median - min of the mean distances "
                                          "over ±15 frame offsets, LSE-D = that min",
                        "faces": "mediapipe FaceMesh boxes, run_pipeline.py crop geometry, 25 fps"}
    return settings


# ----------------------------------------------------------------------------- the job


def run_eval(out_uri: str, protocol: str, *, report_uri: str | None = None, prepared_uri: str | None = None,
             bundles: dict[str, str] | None = None, config: EvalConfig | None = None,
             address: str | None = None) -> EvalResult:
    """Evaluate a dub report's outputs (report_uri), or dub a prepared corpus' test split with
    each bundle (label -> weights URI) and evaluate those."""
    import ray

    from pipeline.dub.job import _init_ray, run_dub
    from pipeline.dub.schemas import write_manifest
    from pipeline.weights import localize_bundle

    config = config or EvalConfig()
    if protocol not in ("reconstruction", "cross"):
        raise EvalError(f"unknown protocol {protocol!r}: reconstruction or cross")
    if (report_uri is None) == (prepared_uri is None):
        raise EvalError("give either a dub report or a prepared corpus")
    if prepared_uri is not None and not bundles:
        raise EvalError("dubbing a prepared corpus needs at least one weights bundle")
    storage = Storage(config.storage.options())
    started = time.perf_counter()
    roots = [localize_bundle(uri, storage) for uri in (bundles or {}).values()]
    weights, skipped = resolve_metric_weights(config, storage, roots)
    for metric, why in skipped.items():
        log.warning("%s skipped: %s", metric, why)

    started_ray = _init_ray(address)
    try:
        pairs, dub_reports = [], {}
        if report_uri is not None:
            label = next(iter(bundles)) if bundles else os.path.splitext(os.path.basename(report_uri.rstrip("/")))[0]
            pairs = pairs_from_report(report_uri, storage, protocol, label)
        else:
            for label, uri in bundles.items():
                folder = join_uri(out_uri, _slug(label))
                manifest = join_uri(folder, "manifest.parquet")
                write_manifest(dub_manifest(prepared_uri, storage, protocol, folder, config), manifest, storage)
                report = join_uri(folder, "dub_report.parquet")
                run_dub(manifest, uri, report, config.dub, address=address, progress=False)
                dub_reports[label] = report
                pairs += pairs_from_report(report, storage, protocol, label)
        if not pairs:
            raise EvalError("no dubbed video to evaluate (no ok row in the dub report)")
        rows, features = _score(ray, config, weights, pairs)
    finally:
        if started_ray:
            ray.shutdown()

    summary = summarise(rows, features, skipped)
    table = _table(summary, protocol, skipped, ablation=len(summary) > 1)
    _write(out_uri, storage, rows, {"protocol": protocol, "bundles": summary, "skipped": skipped,
                                    "settings": _settings(weights), "dub_reports": dub_reports}, table)
    return EvalResult(out_uri, protocol, rows, summary, table, time.perf_counter() - started, dub_reports)


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label).strip("_") or "bundle"


def _score(ray, config: EvalConfig, weights: dict, pairs: list[dict]) -> tuple[list[EvalRow], dict]:
    from ray.data import DataContext

    from pipeline.arrays import unpack
    from pipeline.eval.operators import ScoreOp

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ds = ray.data.from_items(pairs, override_num_blocks=len(pairs))
    ds = ds.map(ScoreOp, fn_constructor_args=(config.model_dump(), weights), **config.pool.actor_args())
    rows, features = [], {}
    for raw in stream_rows(ds):
        figures = json.loads(raw["figures"] or "{}")
        row = EvalRow(bundle=raw["bundle"], protocol=raw["protocol"], video_uri=raw["video_uri"],
                      audio_uri=raw["audio_uri"], output_uri=raw["output_uri"], status=raw["status"],
                      error=raw["error"] or None,
                      **{k: v for k, v in figures.items() if k in EvalRow.model_fields})
        if raw["fid_fake"]:
            fake, real = unpack(raw["fid_fake"]), unpack(raw["fid_real"])
            row = row.model_copy(update={"fid_frames": int(len(fake))})
            bucket = features.setdefault(row.bundle, {"real": [], "fake": []})
            bucket["real"].append(real)
            bucket["fake"].append(fake)
        if row.status == "failed":
            log.error("eval of %s failed: %s", row.output_uri, row.error)
        rows.append(row)
    order = {(p["bundle"], p["output_uri"]): i for i, p in enumerate(pairs)}
    rows.sort(key=lambda r: order[(r.bundle, r.output_uri)])
    return rows, features


def _table(summary: dict, protocol: str, skipped: dict, ablation: bool) -> str:
    from pipeline.eval.tables import table1, table2

    ours = {}
    first = next(iter(summary.values()))
    if protocol == "reconstruction" and first.get("gt_sync_conf") is not None:
        ours["Ground truth (source video, own audio)"] = {
            "ssim": 1.0, "lmd": 0.0, "sync_conf": first["gt_sync_conf"], "sync_dist": first["gt_sync_dist"]}
    for label, entry in summary.items():
        ours[f"{label} (ours, measured: {entry['videos']} videos)"] = entry
    return (table2 if ablation else table1)(ours, protocol, skipped)


def _write(out_uri: str, storage: Storage, rows: list[EvalRow], summary: dict, table: str) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([r.model_dump() for r in rows], schema=EVAL_SCHEMA), buf)
    storage.write_bytes_atomic(buf.getvalue(), join_uri(out_uri, "eval.parquet"))
    storage.write_bytes_atomic(json.dumps(summary, indent=2, default=str).encode(), join_uri(out_uri, "summary.json"))
    storage.write_bytes_atomic(table.encode(), join_uri(out_uri, "table.md"))
