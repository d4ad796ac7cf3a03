"""What every job's operators do around their stage, written once: open a URI for PyAV,
and turn a row-level body into an operator that passes failed rows through, times the
call, and turns an exception into a failed row whose message names the file."""
from __future__ import annotations

import contextlib
import functools
import time
from typing import Callable

from pipeline.storage import Storage, is_remote


class ConfiguredOp:
    """What every operator sets up: its job's config (`config_model`, validated from the
    plain dict Ray hands over), storage, and for operators that run models torch's thread
    count and the weights bundle."""

    config_model: type  # the job's pydantic config

    def __init__(self, config: dict, weights_uri: str | None = None):
        from pipeline.weights import localize_bundle, read_bundle_info

        self.config = self.config_model.model_validate(config)
        self.storage = Storage(self.config.storage.options())
        self.bundle = None
        if weights_uri is not None:
            import torch

            torch.set_num_threads(self.config.torch_threads)
            self.bundle = read_bundle_info(localize_bundle(weights_uri, self.storage))


def video_subject(row: dict) -> str:
    """How an error names a row's video."""
    return f"video {row['video_uri']}"


class RowError(Exception):
    """A row's failure whose message already names the file and the problem."""


@contextlib.contextmanager
def open_source(storage: Storage, uri: str):
    """A path or seekable file object PyAV can read: local paths as they are, remote
    objects as fsspec files (ranged reads, no full download)."""
    if not is_remote(uri):
        yield uri[len("file://") :] if uri.startswith("file://") else uri
        return
    with storage.open(uri, "rb", block_size=4 << 20) as f:
        yield f


def make_row_step(normalise: Callable[[dict], dict], skip: Callable[[dict], bool],
                  fail: Callable[[dict, str, str], dict], instrumented=None):
    """A decorator factory `row_step(stage, subject)` for one job's row format.

    The decorated `body(self, row) -> dict of updates` becomes `__call__(self, row) -> row`.
    Rows for which `skip` is true pass through. An exception fails the row at `stage`: a
    RowError or MediaError as written (they name the file), an AudioError prefixed with
    the subject unless it names the audio URI already, a missing file as "<subject>: no
    such file", anything else as "<subject>: Type: message". The call's seconds add to the
    row's `time_<stage>_s` when the row has that key; a body that returns
    `segment_reused=True` found its work done and is not timed."""

    def row_step(stage: str, subject: Callable[[dict], str]):
        from stages.audio import AudioError
        from stages.media import MediaError

        def wrap(body):
            @functools.wraps(body)
            def call(self, row: dict) -> dict:
                row = normalise(row)
                if skip(row):
                    return row
                start = time.perf_counter()
                try:
                    updates = body(self, row)
                except (RowError, MediaError) as e:
                    return fail(row, stage, str(e))
                except AudioError as e:
                    message = str(e)
                    audio = row.get("audio_uri") or ""
                    return fail(row, stage, message if audio and audio in message else f"{subject(row)}: {message}")
                except FileNotFoundError:
                    return fail(row, stage, f"{subject(row)}: no such file")
                except Exception as e:  # noqa: BLE001 - any failure is this row's, not the job's
                    return fail(row, stage, f"{subject(row)}: {type(e).__name__}: {e}")
                row.update(updates)
                key = f"time_{stage}_s"
                if key in row and not updates.get("segment_reused"):
                    row[key] = float(row.get(key, 0.0)) + (time.perf_counter() - start)
                return row

            return instrumented(stage)(call) if instrumented else call

        return wrap

    return row_step
