"""What kind of failure an operator met, which decides what happens next (pipeline.steps):

- input: the row's own files are bad (unreadable media or audio, a missing file, no
  face). Another try sees the same bytes: the row fails at once.
- transient: storage throttling, a reset connection, a timeout. Another try may not see
  it: the stage body runs again, a bounded number of times, before the row fails.
- device: the GPU or its driver faulted (illegal memory access, launch failure, Xid).
  The process's CUDA context is now unusable, so every later segment sent to it would
  fail too: the process ends, and Ray replaces the actor and resubmits its segments.
- other: anything else (a bug, an unexpected value) fails the row, as an input error does.

CUDA out-of-memory is none of these at this level: the completion stage retries the batch
in halves (stages/completion/stage.py); one that still escapes fails the row.
"""
from __future__ import annotations

import logging
import os
import re
import sys
from typing import Literal

from pipeline.storage import exception_chain, is_transient

log = logging.getLogger("imgtalk.errors")

ErrorClass = Literal["input", "transient", "device", "other"]

# Messages of CUDA, cuBLAS/cuDNN, NCCL and driver faults that poison the process's CUDA
# context (torch raises them as RuntimeError or its AcceleratorError subclass). An
# out-of-memory error is not among them: the context survives it.
_DEVICE_FAULT_MARKS = (
    "cuda error: an illegal memory access",
    "cuda error: unspecified launch failure",
    "cuda error: an illegal instruction",
    "cuda error: misaligned address",
    "cuda error: uncorrectable ecc error",
    "cuda error: device-side assert",
    "cuda error: the launch timed out",
    "cuda error: unknown error",
    "cudaerrorillegaladdress",
    "cudaerrorlaunchfailure",
    "cudaerrorillegalinstruction",
    "cudaerrorecc",
    "cublas_status_execution_failed",
    "cublas_status_internal_error",
    "cudnn_status_execution_failed",
    "cudnn_status_internal_error",
    "nccl error",
)
# "Xid 79" and the like, as the driver logs them; a whole word, so "oxide" is no fault.
_XID = re.compile(r"\bxid\b")


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA out-of-memory, as torch raises it (OutOfMemoryError) or as older code paths
    word it (a RuntimeError saying "CUDA out of memory")."""
    from stages.completion.stage import is_cuda_out_of_memory

    return is_cuda_out_of_memory(exc)


def is_device_fault(exc: BaseException) -> bool:
    """True when the exception (or one it was raised from) reports a GPU or driver fault
    after which this process can no longer use the device."""
    for e in exception_chain(exc):
        if is_out_of_memory(e):
            return False
        if isinstance(e, RuntimeError):
            message = str(e).lower()
            if any(mark in message for mark in _DEVICE_FAULT_MARKS) or _XID.search(message):
                return True
    return False


def is_input_error(exc: BaseException) -> bool:
    """The row's own inputs are at fault: media or audio that cannot be read, a missing
    file, a video with no face."""
    from pipeline.steps import RowError
    from stages.audio import AudioError
    from stages.media import MediaError
    from stages.motion.selection import NoFaceError

    return isinstance(exc, (RowError, MediaError, AudioError, FileNotFoundError, NoFaceError))


def classify(exc: BaseException) -> ErrorClass:
    # Device faults first: a CUDA error says nothing about the row, whatever wraps it.
    if is_device_fault(exc):
        return "device"
    # Transient before input: a decoder that failed because the connection under it dropped
    # raises a MediaError from the network error, and another try reads the same file whole.
    # is_transient reads the whole cause chain, and a missing file in it is never transient.
    if is_transient(exc):
        return "transient"
    if is_input_error(exc):
        return "input"
    return "other"


def end_process(code: int = 1) -> None:
    """Leave at once, without unwinding (a faulted CUDA context can hang in teardown):
    Ray sees its actor die, starts a replacement and resubmits the actor's work."""
    logging.shutdown()  # flush what was logged about the fault first
    sys.stderr.flush()
    os._exit(code)
