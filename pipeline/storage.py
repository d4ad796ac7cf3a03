"""Every URI the job touches goes through fsspec: local paths and file:// by default,
s3:// through s3fs. Endpoint and credentials come from the environment (AWS_* variables,
instance roles) or the job config's `storage` block, never from the manifest.

Outputs are committed atomically, one way per storage kind, so a crash never leaves a
half-written object (or a leftover temporary one) at an output URI: an object store's PUT
is itself atomic (a multipart upload's object appears only when it is completed, and s3fs
aborts one that fails), local files are written beside the target and renamed over it.

Retries happen in one layer per kind of failure. Every S3 request is retried by botocore
itself, in its adaptive mode (exponential backoff, plus a client-side rate limit once the
bucket throttles), `retries` times after the first attempt; s3fs's own retry loop is set to one attempt
and `Storage.retry` does not try such a request again. `Storage.retry` retries what no
client retries: local and network file systems, and a response body cut off mid-read.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import random
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import fsspec
from fsspec.core import url_to_fs

T = TypeVar("T")
log = logging.getLogger("imgtalk.storage")

# What the object is, not how it was asked for: never worth a second try.
_FINAL = (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError)
# S3 error codes that mean "slow down" or "the server had trouble", whatever the status.
_RETRY_CODES = frozenset(
    {
        "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
        "RequestThrottled", "RequestTimeout", "RequestTimeoutException", "InternalError",
        "ServiceUnavailable", "BadGateway", "GatewayTimeout", "PriorRequestNotComplete",
    }
)
_RETRY_ERRNOS = frozenset(
    {
        errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED,
        errno.ECONNREFUSED, errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN,
        errno.EIO, getattr(errno, "EREMOTEIO", errno.EIO),
    }
)


def _network_error_types() -> tuple[type, ...]:
    """Connection-level failures of the S3 client stack (botocore over aiohttp), which do
    not derive from the builtin ConnectionError."""
    types: list[type] = []
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError, IncompleteReadError

        types += [BotoConnectionError, HTTPClientError, IncompleteReadError]
    except ImportError:
        pass
    try:
        from aiohttp import ClientConnectionError, ClientPayloadError

        types += [ClientConnectionError, ClientPayloadError]
    except ImportError:
        pass
    return tuple(types)


def _client_retried_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(errors botocore's retry handler has already seen, body-read errors among them it
    never retries): an API error answer, and a failure to send a request or get its answer;
    a response body that breaks off after the answer arrived is read outside the handler."""
    try:
        from botocore.exceptions import ClientError, HTTPClientError, ResponseStreamingError
        from botocore.exceptions import ConnectionError as BotoConnectionError
    except ImportError:
        return (), ()
    body: tuple[type, ...] = (ResponseStreamingError,)
    try:
        from aiobotocore.response import AioReadTimeoutError

        body += (AioReadTimeoutError,)
    except ImportError:
        pass
    return (ClientError, BotoConnectionError, HTTPClientError), body


def retried_by_client(exc: BaseException) -> bool:
    """True when botocore's own retry handler already had this request's failure (and
    retried it as far as its mode allows), so another try on top would only multiply them."""
    handled, body = _client_retried_types()
    return any(isinstance(e, handled) and not isinstance(e, body) for e in exception_chain(exc))


def exception_chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def is_transient(exc: BaseException) -> bool:
    """True for errors another attempt may not see: throttling, 5xx, resets, timeouts.

    s3fs turns botocore's ClientError into OSError subclasses (404 -> FileNotFoundError,
    403 -> PermissionError, anything else -> OSError(EIO) with the ClientError as its
    cause), so the whole cause chain is read, the server's own verdict first."""
    chain = exception_chain(exc)
    if any(isinstance(e, _FINAL) for e in chain):
        return False
    for e in chain:
        response = getattr(e, "response", None)
        if isinstance(response, dict) and ("Error" in response or "ResponseMetadata" in response):
            code = str((response.get("Error") or {}).get("Code", ""))
            status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
            if code in _RETRY_CODES:
                return True
            return status == 429 or (status >= 500 and status != 501)  # 501: not implemented, ever
    network = _network_error_types()
    for e in chain:
        if isinstance(e, (ConnectionError, TimeoutError) + network):
            return True
    return any(isinstance(e, OSError) and e.errno in _RETRY_ERRNOS for e in chain)


@dataclass(frozen=True)
class StorageOptions:
    """Plain values from the job config's `storage` block."""

    endpoint_url: str | None = None
    region: str | None = None
    retries: int = 4  # tries after the first: botocore's max_attempts on S3, Storage.retry's elsewhere
    backoff_s: float = 0.5  # Storage.retry's first pause (botocore has its own schedule)


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def strip_file_scheme(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


def _jitter() -> float:
    # Many workers hitting one throttled bucket spread out.
    return random.uniform(0.5, 1.0)


class Storage:
    """A thin, picklable handle over fsspec filesystems with retries and atomic commits.
    `sleep` and `jitter` (a factor in [0.5, 1)) are injectable so tests never wait on a clock."""

    def __init__(self, options: StorageOptions | None = None, sleep: Callable[[float], None] = time.sleep,
                 jitter: Callable[[], float] | None = None):
        self.options = options or StorageOptions()
        self.sleep = sleep
        self.jitter = jitter or _jitter

    # fsspec filesystems are cached per process by their arguments; building them lazily
    # keeps Storage cheap to pickle into Ray workers.
    def fs_for(self, uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
        kwargs = {}
        s3 = uri.startswith("s3://") or uri.startswith("s3a://")
        if s3:
            client_kwargs = {}
            endpoint = self.options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
                "AWS_ENDPOINT_URL"
            )
            if endpoint:
                client_kwargs["endpoint_url"] = endpoint
            if self.options.region:
                client_kwargs["region_name"] = self.options.region
            kwargs["client_kwargs"] = client_kwargs
            kwargs["config_kwargs"] = {"retries": self.s3_retry_config()}
        fs, path = url_to_fs(strip_file_scheme(uri), **kwargs)
        if s3:
            # s3fs retries a failed call up to 5 times around botocore's own attempts; one
            # attempt leaves botocore's adaptive mode as the only retry layer. (A class
            # attribute, not a constructor argument.)
            fs.retries = 1
        return fs, path

    def s3_retry_config(self) -> dict:
        """botocore's `retries` setting for every S3 client: adaptive mode, `retries` tries
        after the first (botocore's max_attempts counts retries; the client reads it back
        as total_max_attempts = retries + 1). Adaptive is standard mode (exponential backoff
        with jitter over throttles, 5xx, timeouts and dropped connections) plus a
        client-side rate limit that slows the process's requests once the bucket throttles."""
        return {"mode": "adaptive", "max_attempts": self.options.retries}

    def retry(self, fn: Callable[[], T], what: str) -> T:
        """fn(), again after exponential backoff while it fails transiently (is_transient);
        permanent errors are raised at once, unchanged. A transient S3 request failure
        that botocore has already retried (retried_by_client) is raised at once too, as an
        OSError naming `what`: one retry layer, not botocore's attempts times ours."""
        delay = self.options.backoff_s
        for attempt in range(self.options.retries + 1):
            try:
                return fn()
            except Exception as e:  # noqa: BLE001, PERF203 - classified below, re-raised if final
                if not is_transient(e):
                    raise
                if retried_by_client(e):
                    raise OSError(f"{what}: storage error after the S3 client's retries: {type(e).__name__}: {e}") from e
                if attempt == self.options.retries:
                    raise OSError(f"{what}: storage error after {attempt + 1} attempts: {type(e).__name__}: {e}") from e
                # Jitter so that many workers hitting one throttled bucket spread out.
                pause = delay * self.jitter()
                log.warning("%s: %s: %s (attempt %d, retrying in %.2f s)", what, type(e).__name__, e, attempt + 1, pause)
                self.sleep(pause)
                delay *= 2
        raise AssertionError("unreachable")

    def identity(self, uri: str) -> str:
        """A short string that changes whenever the object's content does: size + ETag on
        object stores, size + modification time (ns) on files."""
        if not is_remote(uri):
            st = os.stat(strip_file_scheme(uri))
            return f"{st.st_size}:{st.st_mtime_ns}"
        fs, path = self.fs_for(uri)
        info = self.retry(lambda: fs.info(path), f"stat {uri}")
        tag = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or ""
        return f"{info.get('size')}:{str(tag).strip(chr(34))}"

    def exists(self, uri: str) -> bool:
        fs, path = self.fs_for(uri)
        return self.retry(lambda: fs.exists(path), f"exists {uri}")

    def size(self, uri: str) -> int:
        fs, path = self.fs_for(uri)
        return int(self.retry(lambda: fs.size(path), f"size {uri}"))

    def open(self, uri: str, mode: str = "rb", **kwargs):
        fs, path = self.fs_for(uri)
        f = self.retry(lambda: fs.open(path, mode, **kwargs), f"open {uri}")
        fetch = getattr(getattr(f, "cache", None), "fetcher", None)
        if is_remote(uri) and "r" in mode and fetch is not None:
            # Every ranged read of the object passes through here: its request is retried
            # by botocore, and a body cut off mid-read, which nothing below retries once
            # s3fs tries once, by Storage.retry.
            f.cache.fetcher = lambda start, end: self.retry(lambda: fetch(start, end), f"read {uri}")
        return f

    def read_bytes(self, uri: str) -> bytes:
        fs, path = self.fs_for(uri)
        return self.retry(lambda: fs.cat_file(path), f"read {uri}")

    def makedirs(self, uri: str) -> None:
        fs, path = self.fs_for(uri)
        if not is_remote(uri):
            fs.makedirs(path, exist_ok=True)

    def listdir(self, uri: str) -> list[str]:
        fs, path = self.fs_for(uri)
        if not self.retry(lambda: fs.exists(path), f"list {uri}"):
            return []
        return sorted(self.retry(lambda: fs.ls(path, detail=False), f"list {uri}"))

    def rm(self, uri: str, recursive: bool = False) -> None:
        fs, path = self.fs_for(uri)
        if self.retry(lambda: fs.exists(path), f"exists {uri}"):
            self.retry(lambda: fs.rm(path, recursive=recursive), f"rm {uri}")

    def sha256(self, uri: str, chunk: int = 1 << 22) -> str:
        h = hashlib.sha256()
        with self.open(uri, "rb") as f:
            while True:
                block = f.read(chunk)
                if not block:
                    break
                h.update(block)
        return h.hexdigest()

    @contextlib.contextmanager
    def local_copy(self, uri: str, suffix: str = "") -> Iterator[str]:
        """A local path holding the object's bytes (the object itself when it is local)."""
        if not is_remote(uri):
            path = strip_file_scheme(uri)
            if not os.path.exists(path):
                raise FileNotFoundError(path)
            yield path
            return
        fs, path = self.fs_for(uri)
        with tempfile.TemporaryDirectory(prefix="imgtalk-") as tmp:
            local = os.path.join(tmp, "obj" + suffix)
            self.retry(lambda: fs.get(path, local), f"download {uri}")
            yield local

    def put_atomic(self, local_path: str, uri: str) -> None:
        """Copy a finished local file to `uri` so readers only ever see the whole object.

        On an object store this is one upload: a single PUT, or for a large file a multipart
        upload whose object appears only on completion (s3fs aborts it if a part fails).
        Either way a crash leaves the old object or none, never a part or a temporary key.
        A retry re-sends the whole file, which is harmless: the last completed upload wins."""
        fs, path = self.fs_for(uri)
        if is_remote(uri):
            self.retry(lambda: fs.put_file(local_path, path), f"upload {uri}")
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            shutil.copyfile(local_path, tmp)
            os.replace(tmp, path)  # atomic on POSIX within one filesystem
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def write_bytes_atomic(self, data: bytes, uri: str) -> None:
        if is_remote(uri):  # one PUT of the bytes in memory: atomic, no local file needed
            fs, path = self.fs_for(uri)
            self.retry(lambda: fs.pipe_file(path, data), f"upload {uri}")
            return
        with tempfile.NamedTemporaryFile(delete=False) as f:
            f.write(data)
            tmp = f.name
        try:
            self.put_atomic(tmp, uri)
        finally:
            os.remove(tmp)


def join_uri(base: str, *parts: str) -> str:
    base = base.rstrip("/")
    return "/".join([base, *[p.strip("/") for p in parts]])
