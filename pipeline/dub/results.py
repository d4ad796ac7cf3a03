"""Durable results: each video's report row is kept in the work area as soon as the video
settles, so a job stopped by its error budget, SIGINT or a dead driver leaves its
results behind, and a resumed job's report carries every earlier row.

    <work_dir>/results/<video_id>.json   {"state", "inputs", "row"}

`state` is "finalizing" while the video's output is being committed (the row then holds
every field known before finalize) and "settled" once its row is final. `inputs` is what
the output was made from (input_identity): the next run skips a video only when its
output exists and those inputs are unchanged, so a re-recorded dub track is redone.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable

from pipeline.config import JobConfig
from pipeline.dub.schemas import ReportRow
from pipeline.storage import Storage, join_uri
from pipeline.workarea import PIXEL_SETTINGS

# Settings that change a committed output's bytes besides the segments' pixels: the muxed
# audio. Together with PIXEL_SETTINGS they decide whether an existing output is current.
OUTPUT_SETTINGS = ("output.audio_codec", "output.audio_bitrate", "output.audio_sample_rate", "output.keep_source_streams")


def settings_identity(config: JobConfig) -> dict:
    """The job settings that decide an output's bytes, by dotted name."""
    dumped = config.model_dump(mode="json")
    settings = {}
    for name in PIXEL_SETTINGS + OUTPUT_SETTINGS:
        value = dumped
        for part in name.split("."):
            value = value[part]
        settings[name] = value
    return settings


def input_identity(storage: Storage, video_uri: str, audio_uri: str, bundle_id: str, settings: dict,
                   segment_seconds: float, crf: int, face: str = "largest") -> dict:
    """What an output is made from: both inputs' identities (size + ETag, or size + mtime),
    the weights bundle's identity and the settings that change its bytes."""
    return {
        "video": storage.identity(video_uri),
        "audio": storage.identity(audio_uri),
        "bundle": bundle_id,
        "settings": settings,
        "segment_seconds": float(segment_seconds),
        "crf": int(crf),
        # Only when chosen: outputs made before the option existed keep matching.
        **({} if face == "largest" else {"face": face}),
    }


class ResultStore:
    """The work area's durable report rows, one object per video (keyed by video_id, which
    is the output URI's hash)."""

    def __init__(self, storage: Storage, work_dir: str):
        self.storage = storage
        self.root = join_uri(work_dir, "results")

    def uri(self, video_id: str) -> str:
        return join_uri(self.root, f"{video_id}.json")

    def write(self, row: ReportRow, inputs: dict | None, state: str = "settled") -> None:
        record = {"state": state, "inputs": inputs, "row": row.model_dump(mode="json")}
        self.storage.write_bytes_atomic(json.dumps(record).encode(), self.uri(row.video_id))

    def read(self, video_id: str) -> dict | None:
        """The record, or None when there is none (or it cannot be read: no promise then)."""
        try:
            record = json.loads(self.storage.read_bytes(self.uri(video_id)))
            ReportRow.model_validate(record["row"])
            return record if record.get("state") in ("finalizing", "settled") else None
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            return None


@dataclass
class Decision:
    """What to do with one manifest row whose output may exist already."""

    redo: bool
    inputs: dict | None = None  # input_identity now; None when an input cannot be read (the job reports it)
    earlier: ReportRow | None = None  # the settled row of the run that made the output
    note: str | None = None  # why an existing output is kept without an earlier row


def decide(storage: Storage, store: ResultStore, video_id: str, output_uri: str, identity: Callable[[], dict],
           force: bool, describe: Callable[[str], dict]) -> Decision:
    """Redo the video, or keep its existing output (and report the earlier result).

    Kept: the output exists and the work area records it as made from the same inputs.
    Redone: no output, --force, or an input (video, audio, weights, settings) changed.
    An output with no record (made before results were recorded, or the work area was
    cleared) is kept as it is, with a note: its inputs cannot be checked. A record still
    "finalizing" (the driver died during the commit) is completed from the output itself."""
    try:
        inputs = identity()
    except OSError:
        inputs = None  # a missing input: the job's plan step names the file
    if force or inputs is None or not storage.exists(output_uri):
        return Decision(True, inputs)
    record = store.read(video_id)
    if record is None:
        return Decision(False, inputs, note=f"output {output_uri} exists and no earlier result is recorded in the work "
                                            "area, so its inputs cannot be checked: kept as it is (--force redoes it)")
    if record["inputs"] != inputs:
        return Decision(True, inputs)
    earlier = ReportRow.model_validate(record["row"])
    if record["state"] == "finalizing":
        earlier = earlier.model_copy(update=describe(output_uri))
        store.write(earlier, inputs)
    return Decision(False, inputs, earlier=earlier)


def decide_all(rows: Iterable[tuple], decide_one: Callable[..., Decision], threads: int = 32) -> list[Decision]:
    """decide_one(*row) for every row, `threads` at a time: on an object store each is a few
    HEAD requests, and 10,000 of them one after another would hold the job back minutes."""
    rows = list(rows)
    if not rows:
        return []
    with ThreadPoolExecutor(max_workers=min(threads, len(rows))) as pool:
        return list(pool.map(lambda r: decide_one(*r), rows))


def describe_output(storage: Storage, uri: str) -> dict:
    """The report's output fields read back from a committed output."""
    from stages.media import probe_video
    from pipeline.steps import open_source

    with open_source(storage, uri) as src:
        info = probe_video(src, threads=1)  # on the driver, beside many others
    return {"output_frames": info.n_frames, "output_bytes": storage.size(uri), "output_sha256": storage.sha256(uri)}
