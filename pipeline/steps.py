"""What every job's operators do around their stage, written once: open a URI for PyAV,
and turn a row-level body into an operator that passes failed rows through, times the
call, tries again after a transient error, ends the process after a GPU fault, and turns
any other exception into a failed row whose message names the file."""
from __future__ import annotations

import contextlib
import functools
import logging
import time
from typing import Callable, Protocol

from pipeline.errors import classify, end_process
from pipeline.storage import Storage, is_remote

log = logging.getLogger("imgtalk.steps")


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


class RetryPolicy(Protocol):
    """What make_row_step reads from an operator's retry settings (config.RetryConfig)."""

    segment_attempts: int
    backoff_s: float


def failure_message(row: dict, subject: Callable[[dict], str], error: BaseException) -> str:
    """A failed row's message, naming the file: a RowError or MediaError as written (they
    name it), an AudioError prefixed with the subject unless it names the audio URI
    already, a missing file as "<subject>: no such file", anything else as
    "<subject>: Type: message"."""
    from stages.audio import AudioError
    from stages.media import MediaError

    if isinstance(error, (RowError, MediaError)):
        return str(error)
    if isinstance(error, AudioError):
        message, audio = str(error), row.get("audio_uri") or ""
        return message if audio and audio in message else f"{subject(row)}: {message}"
    if isinstance(error, FileNotFoundError):
        return f"{subject(row)}: no such file"
    return f"{subject(row)}: {type(error).__name__}: {error}"


def make_row_step(normalise: Callable[[dict], dict], skip: Callable[[dict], bool],
                  fail: Callable[[dict, str, str], dict], instrumented=None, *,
                  retries: Callable[[object], RetryPolicy] | None = None,
                  abandoned: Callable[[object, dict, str], str | None] | None = None,
                  on_failed: Callable[[object, dict], None] | None = None,
                  on_device_fault: Callable[[object, dict, str], None] | None = None,
                  sleep: Callable[[float], None] = time.sleep,
                  exit_process: Callable[[int], None] = end_process):
    """A decorator factory `row_step(stage, subject)` for one job's row format.

    The decorated `body(self, row) -> dict of updates` becomes `__call__(self, row) -> row`.
    Rows for which `skip` is true pass through; rows for which `abandoned(op, row, stage)`
    gives a reason fail with it, unworked. What an exception does depends on its class
    (pipeline.errors.classify):
    - a transient error runs the body again, up to `retries(op).segment_attempts` tries
      in all (one without `retries`), after `sleep(backoff_s * 2**k)`; the last one
      fails the row, saying how many tries it had;
    - a device fault logs, runs `on_device_fault(op, row, stage)` (a job may count them,
      to give up on a segment through `abandoned`) and calls `exit_process(1)`
      (pipeline.errors.end_process by default): the row is not failed, Ray replaces the
      actor and resubmits it. Should the exit function return (a test's), the exception
      is raised again;
    - anything else fails the row at `stage` with failure_message(), and then
      `on_failed(op, failed_row)` runs.
    The call's seconds add to the row's `time_<stage>_s` when the row has that key; a
    body that returns `segment_reused=True` found its work done and is not timed."""

    def row_step(stage: str, subject: Callable[[dict], str]):
        def wrap(body):
            @functools.wraps(body)
            def call(self, row: dict) -> dict:
                row = normalise(row)
                if skip(row):
                    return row
                if abandoned is not None:
                    reason = abandoned(self, row, stage)
                    if reason:
                        return fail(row, stage, f"{subject(row)}: {reason}")
                policy = retries(self) if retries is not None else None
                attempts = policy.segment_attempts if policy is not None else 1
                start = time.perf_counter()
                for attempt in range(1, attempts + 1):
                    try:
                        updates = body(self, row)
                        break
                    except Exception as e:  # noqa: BLE001, PERF203 - classified: retried, the process ended, or this row's
                        kind = classify(e)
                        if kind == "device":
                            log.critical("%s: GPU fault at %s: %s: %s; ending this process so that Ray replaces it "
                                         "and retries the segment", subject(row), stage, type(e).__name__, e)
                            if on_device_fault is not None:
                                try:
                                    on_device_fault(self, row, stage)
                                except Exception as hook_error:  # noqa: BLE001 - nothing may keep the process alive
                                    log.error("%s: could not record the GPU fault: %s", subject(row), hook_error)
                            exit_process(1)
                            raise
                        if kind == "transient" and attempt < attempts:
                            pause = policy.backoff_s * 2 ** (attempt - 1)
                            log.warning("%s: %s at %s: %s (try %d of %d, again in %.2f s)",
                                        subject(row), type(e).__name__, stage, e, attempt, attempts, pause)
                            sleep(pause)
                            continue
                        message = failure_message(row, subject, e)
                        if kind == "transient" and attempts > 1:
                            message += f" (after {attempts} tries)"
                        failed = fail(row, stage, message)
                        if on_failed is not None:
                            on_failed(self, failed)
                        return failed
                row.update(updates)
                key = f"time_{stage}_s"
                if key in row and not updates.get("segment_reused"):
                    row[key] = float(row.get(key, 0.0)) + (time.perf_counter() - start)
                return row

            return instrumented(stage)(call) if instrumented else call

        return wrap

    return row_step
