"""`imgtalk prepare`: a corpus of talking-head videos -> training shards in object storage.

    corpus rows ─ plan ─ audio ─ flat_map(chunks) ─ chunk ─┐   (actors; the chunk stage writes its shard)
                                                          ▼
    driver: when every chunk of a video is back → its neutral frame (the best candidate of
    all its frames) → <out>/videos/<video_id>.json (the video is now prepared)
    at the end: speaker-disjoint splits → videos.parquet, card.json, report.parquet

Layout of <out>:
    chunks/<video_id>/<chunk>.parquet   per-frame crops, motion, audio rows, flags (see operators.py)
    videos/<video_id>.json              one per prepared video: counts, sums, neutral frame
    videos.parquet                      every prepared video with its split and neutral motion
    card.json                           the corpus card (stages/corpus/card.py)
    report.parquet                      one row per corpus row of this run

A rerun skips videos whose videos/<id>.json exists; a failed video's chunks are removed.
"""
from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.arrays import pack
from pipeline.raydata import one_row_per_block, stream_rows
from pipeline.prepare.config import CorpusRow, PrepareConfig, PrepareReportRow, read_corpus, write_prepare_report
from pipeline.security import job_policy, redact
from pipeline.storage import Storage, join_uri

log = logging.getLogger("imgtalk.prepare")


@dataclass
class PrepareResult:
    output_uri: str
    rows: list[PrepareReportRow]
    card: dict
    seconds: float
    frames: int = 0  # 25 fps frames prepared by this run
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def marker_uri(output_uri: str, video_id: str) -> str:
    return join_uri(output_uri, "videos", f"{video_id}.json")


def _merge(summaries: list[dict]) -> dict:
    """One video's counts, sums and best neutral candidate from its chunks' summaries."""
    counts: dict[str, int] = {}
    sums = {k: np.zeros((21, 3)) for k in ("exp", "exp2", "x_c", "x_c2")}
    n, neutral = 0, None
    for s in summaries:
        for k, v in s["counts"].items():
            counts[k] = counts.get(k, 0) + int(v)
        for k in sums:
            sums[k] += np.asarray(s["sums"][k], np.float64)
        n += int(s["sums"]["n"])
        cand = s.get("neutral")
        if cand and (neutral is None or cand["score"] < neutral["score"]):
            neutral = cand
    return {"counts": counts, "sums": {**{k: v.tolist() for k, v in sums.items()}, "n": n}, "neutral": neutral}


def _videos_table(markers: list[dict], splits: dict[str, str]) -> bytes:
    records = []
    for m in sorted(markers, key=lambda m: m["video_id"]):
        neutral = m["neutral"]
        records.append({
            "video_id": m["video_id"],
            "video_uri": m["video_uri"],
            "audio_uri": m.get("audio_uri") or "",  # "" = the video's own audio track
            "speaker_id": m["speaker_id"],
            "split": splits[m["speaker_id"]],
            "frames": int(m["counts"]["frames"]),
            "usable_frames": int(m["counts"]["usable"]),
            "neutral_frame": int(neutral["frame"]),
            "neutral_x_c": pack(np.asarray(neutral["x_c"], np.float32)),
            "neutral_exp": pack(np.asarray(neutral["exp"], np.float32)),
            "neutral_crop": bytes.fromhex(neutral["crop"]),
            "chunk_uris": m["chunk_uris"],
        })
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records), buf)
    return buf.getvalue()


def run_prepare(corpus_uri: str, weights_uri: str, output_uri: str, config: PrepareConfig | None = None,
                address: str | None = None) -> PrepareResult:
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from pipeline.dub.job import _init_ray
    from pipeline.prepare import operators as ops
    from pipeline.weights import localize_bundle, read_bundle_info
    from stages.corpus.card import assign_splits, corpus_card

    config = config or PrepareConfig()
    storage = Storage(config.storage.options())
    started = time.perf_counter()
    # A corpus is the researchers' own: no prefix lists are required on a cluster.
    policy = job_policy("prepare", config.security, {"corpus": corpus_uri, "weights": weights_uri, "output": output_uri},
                        cluster_needs_prefixes=False)
    read_bundle_info(localize_bundle(weights_uri, storage))
    corpus = read_corpus(corpus_uri, storage)

    report: dict[int, PrepareReportRow] = {}
    markers: dict[str, dict] = {}
    fixed_splits: dict[str, str] = {}
    todo: list[dict] = []
    rows_by_id: dict[str, tuple[int, CorpusRow]] = {}

    def settle(index: int, row: CorpusRow | None, status: str, **fields) -> None:
        report[index] = PrepareReportRow(
            row_index=index, video_id=row.video_id if row else "", video_uri=redact(row.video_uri) if row else "",
            speaker_id=row.speaker if row else "", status=status, **fields)

    for index, row, error in corpus:
        if row is None:
            report[index] = PrepareReportRow(row_index=index, video_id="", video_uri="", speaker_id="", status="failed",
                                             error=error, error_stage="manifest")
            continue
        refused = [r for r in (policy.check(row.video_uri, "video"), policy.check(row.audio_uri, "audio") if row.audio_uri else None) if r]
        if refused:
            settle(index, row, "failed", error="; ".join(refused), error_stage="security")
            continue
        if row.split:
            if fixed_splits.get(row.speaker, row.split) != row.split:
                settle(index, row, "failed", error=f"speaker {row.speaker!r} is given two splits ({fixed_splits[row.speaker]}, {row.split})",
                       error_stage="manifest")
                continue
            fixed_splits[row.speaker] = row.split
        rows_by_id[row.video_id] = (index, row)
        existing = marker_uri(output_uri, row.video_id)
        if storage.exists(existing):
            markers[row.video_id] = json.loads(storage.read_bytes(existing))
            settle(index, row, "skipped", frames=markers[row.video_id]["counts"]["frames"])
            continue
        todo.append(ops.normalise(dict(row_index=index, video_id=row.video_id, video_uri=policy.canonical(row.video_uri),
                                       audio_uri=policy.canonical(row.audio_uri) if row.audio_uri else "",
                                       speaker_id=row.speaker)))

    frames_done = 0
    if todo:
        started_ray = _init_ray(address)
        try:
            frames_done = _run_graph(ray, ActorPoolStrategy, DataContext, ops, config, weights_uri, output_uri, todo,
                                     storage, rows_by_id, markers, settle)
        finally:
            if started_ray:
                ray.shutdown()
    for row in todo:  # a row the stream never returned
        index = int(row["row_index"])
        if index not in report:
            settle(index, rows_by_id[row["video_id"]][1], "failed", error="never came back from the pipeline", error_stage="pipeline")

    speakers = sorted({m["speaker_id"] for m in markers.values()})
    splits = assign_splits(speakers, config.seed, tuple(config.split_fractions), {s: fixed_splits[s] for s in speakers if s in fixed_splits})
    for index, r in list(report.items()):
        if r.status != "failed" and r.speaker_id in splits:
            report[index] = r.model_copy(update={"split": splits[r.speaker_id]})
    card = corpus_card(list(markers.values()), splits, config.settings())
    if markers:
        storage.write_bytes_atomic(_videos_table(list(markers.values()), splits), join_uri(output_uri, "videos.parquet"))
        storage.write_bytes_atomic(json.dumps(card, indent=2, sort_keys=True).encode(), join_uri(output_uri, "card.json"))
    rows = [report[i] for i in sorted(report)]
    write_prepare_report(rows, join_uri(output_uri, "report.parquet"), storage)
    counts = {s: sum(r.status == s for r in rows) for s in ("ok", "failed", "skipped")}
    return PrepareResult(output_uri, rows, card, time.perf_counter() - started, frames_done, counts)


def _run_graph(ray, ActorPoolStrategy, DataContext, ops, config: PrepareConfig, weights_uri: str, output_uri: str,
               todo: list[dict], storage: Storage, rows_by_id, markers: dict, settle) -> int:
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    cfg = config.model_dump()
    pools = config.pools

    def actors(name: str):
        return pools[name].actor_args()

    ds = one_row_per_block(ray.data.from_items(todo, override_num_blocks=len(todo)))  # a video's chunks spread
    ds = ds.map(ops.PrepPlanOp, fn_constructor_args=(cfg,), **actors("plan"))
    ds = ds.map(ops.PrepAudioOp, fn_constructor_args=(cfg, weights_uri), **actors("audio"))
    ds = ds.flat_map(ops.chunk_splitter(config.chunk_seconds), num_cpus=0.25)
    ds = ds.map(ops.ChunkOp, fn_constructor_args=(cfg, weights_uri, output_uri), **actors("chunk"))

    pending: dict[str, list[dict]] = {}
    failed: dict[str, dict] = {}
    frames_done = 0

    def fail_video(row: dict) -> None:
        vid = row["video_id"]
        index, corpus_row = rows_by_id[vid]
        failed[vid] = row
        settle(index, corpus_row, "failed", error=redact(row["error"]), error_stage=row["error_stage"],
               frames=int(row["frames"]) or None)
        storage.rm(join_uri(output_uri, "chunks", vid), recursive=True)

    for raw in stream_rows(ds):
        row = ops.normalise(raw)
        vid = row["video_id"]
        if vid in failed:
            continue
        if row["error"]:
            fail_video(row)
            continue
        chunks = pending.setdefault(vid, [])
        if any(c["chunk_idx"] == row["chunk_idx"] for c in chunks):
            continue  # a retried chunk came back twice
        chunks.append(row)
        if len(chunks) < int(row["n_chunks"]):
            continue
        chunks = sorted(pending.pop(vid), key=lambda c: int(c["chunk_idx"]))
        merged = _merge([json.loads(c["summary"]) for c in chunks])
        usable_s = merged["counts"].get("usable", 0) / 25.0
        index, corpus_row = rows_by_id[vid]
        if merged["neutral"] is None or usable_s < config.min_usable_seconds:
            fail_video(dict(row, error=f"video {row['video_uri']}: {usable_s:.2f} s of usable footage (a face of at least "
                                        f"{config.min_face_px:g} px, yaw within {config.max_abs_yaw_deg:g} deg, with speech); "
                                        f"at least {config.min_usable_seconds:g} s needed", error_stage="filter"))
            continue
        marker = {"video_id": vid, "video_uri": corpus_row.video_uri, "audio_uri": corpus_row.audio_uri,
                  "speaker_id": row["speaker_id"], "chunk_uris": [c["chunk_uri"] for c in chunks], **merged,
                  # plan and audio ran once per video (every chunk row carries their time)
                  "seconds": {"plan": float(chunks[0]["time_plan_s"]), "audio": float(chunks[0]["time_audio_s"]),
                              "chunk": sum(float(c["time_chunk_s"]) for c in chunks)}}
        storage.write_bytes_atomic(json.dumps(marker).encode(), marker_uri(output_uri, vid))
        markers[vid] = marker
        frames_done += int(merged["counts"]["frames"])
        settle(index, corpus_row, "ok", frames=merged["counts"]["frames"], face_frames=merged["counts"]["face"],
               usable_frames=merged["counts"]["usable"], chunks=len(chunks), seconds=sum(marker["seconds"].values()))
    return frames_done
