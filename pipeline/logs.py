"""Where a job's logs go: the terminal shows what the person running it needs (our own
warnings, the progress line, the summary), the job's log file keeps everything.

Without --verbose, everything else goes to the log file only:
- C and C++ output of the driver process (Ray's core worker, mediapipe's glog/absl
  `W0000`/`I0000` lines when the demo tracks faces in the driver): file descriptor 2 is
  pointed at the log file for the job's duration, and Python's sys.stderr at a copy of the
  terminal's descriptor, so Python output still reaches the terminal;
- Ray's Python loggers (`ray`, `ray.data`: token-auth notice, "progress bars disabled",
  execution summaries) and Python warnings raised in the driver;
- worker processes' output (mediapipe in every actor): Ray does not forward it to the
  driver (`log_to_driver=False`), so it stays in the Ray session's logs folder; when the job
  started that Ray itself, the workers' files are appended to the job log at the end (on a
  cluster they stay on each node: `ray logs`, the dashboard). Workers of a local Ray also
  start with GLOG_minloglevel / TF_CPP_MIN_LOG_LEVEL at 2 (errors only) unless set.
With --verbose nothing is redirected and Ray forwards worker output to the terminal.

The `imgtalk` logger writes INFO to the log file (one line per settled video with its
stage timings: pipeline/dub/job.py) and WARNING (INFO with --verbose) to the terminal.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import sys
from dataclasses import dataclass, field

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The process's standard error: C libraries write here, whatever sys.stderr is.
_STDERR_FD = 2


@dataclass
class JobLog:
    path: str
    verbose: bool
    stream: object  # the open log file (text)
    ray_logs_dirs: list[str] = field(default_factory=list)  # session logs of Rays this job started
    _rerouted: list = field(default_factory=list)  # (logger, handlers, propagate) to restore
    _handler: logging.Handler | None = None  # Ray's loggers -> the log file

    def route_ray_loggers(self) -> None:
        """Ray's Python loggers write to the log file instead of the terminal. Ray (and Ray
        Data, at import) install their own stderr handlers, and ray.init may install them
        again, so they are swapped before and after ray.init and put back when the job ends."""
        if self.verbose:
            return
        import ray.data  # noqa: F401 - installs ray.data's handlers, which are swapped below

        if self._handler is None:
            self._handler = logging.StreamHandler(self.stream)
            self._handler.setFormatter(logging.Formatter(FORMAT))
            self._handler.setLevel(logging.INFO)  # ray.data logs its whole DataContext at DEBUG
        for name in ("ray", "ray.data", "ray.train", "ray.tune", "py.warnings"):
            logger = logging.getLogger(name)
            if not any(entry[0] is logger for entry in self._rerouted):
                self._rerouted.append((logger, list(logger.handlers), logger.propagate))
            keep = [h for h in logger.handlers if isinstance(h, logging.FileHandler)]  # Ray's own session files
            logger.handlers = [*keep, self._handler]
            logger.propagate = False

    def ray_started(self, logs_dir: str | None) -> None:
        if logs_dir:
            self.ray_logs_dirs.append(logs_dir)

    def append_worker_logs(self) -> None:
        """Copy the workers' stdout/stderr files of the Rays this job started into the log."""
        for logs_dir in self.ray_logs_dirs:
            files = sorted(glob.glob(os.path.join(logs_dir, "worker-*.out")) + glob.glob(os.path.join(logs_dir, "worker-*.err")))
            for path in files:
                try:
                    with open(path, errors="replace") as f:
                        text = f.read()
                except OSError:
                    continue
                if text.strip():
                    self.stream.write(f"\n===== Ray worker output: {path}\n{text}")
        self.stream.flush()

    def restore(self) -> None:
        for logger, handlers, propagate in reversed(self._rerouted):
            logger.handlers, logger.propagate = handlers, propagate
        self._rerouted.clear()


_active: JobLog | None = None


def active() -> JobLog | None:
    return _active


def log_to_driver() -> bool:
    """Whether Ray should forward worker output to the driver's terminal: only with --verbose."""
    return _active is not None and _active.verbose


def before_ray_init() -> None:
    """Quiet mediapipe's and TensorFlow's C++ logging in the workers of a local Ray (they
    inherit the driver's environment) unless --verbose; a value already set wins."""
    if _active is not None and not _active.verbose:
        os.environ.setdefault("GLOG_minloglevel", "2")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        _active.route_ray_loggers()  # ray.init itself logs (the token-auth notice)


def after_ray_init(started: bool) -> None:
    """Called once Ray is up: route its loggers; remember a local session's logs folder."""
    if _active is None:
        return
    _active.route_ray_loggers()
    if started:
        try:
            import ray

            _active.ray_started(ray._private.worker._global_node.get_logs_dir_path())
        except Exception:  # noqa: BLE001 - without it the workers' output stays in Ray's folder only
            pass


def log_path_for(report_uri: str) -> str:
    """The job log beside a local report (`report.parquet` -> `report.log`); for a report in
    object storage, in the current folder, named after it."""
    from pipeline.storage import is_remote

    stem = report_uri[len("file://"):] if report_uri.startswith("file://") else report_uri
    stem = os.path.splitext(stem)[0]
    if is_remote(report_uri):
        return os.path.abspath(os.path.basename(stem) + ".log")
    return os.path.abspath(stem + ".log")


@contextlib.contextmanager
def job_log(path: str, verbose: bool = False, until_exit: bool = False):
    """Route logs for one CLI command (see the module docstring); yields the JobLog.

    until_exit: leave file descriptor 2 on the log file after the job, for the rest of the
    process (the CLI): libraries also write at interpreter exit (gRPC's shutdown notices
    from Ray's core worker), after the job. Only when sys.stderr was the process's own
    stderr, which stays on the terminal; a captured sys.stderr (pytest) is always restored."""
    global _active
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    stream = open(path, "a", buffering=1, errors="replace")
    job = JobLog(path, verbose, stream)
    ours = logging.getLogger("imgtalk")
    file_handler = logging.StreamHandler(stream)
    file_handler.setFormatter(logging.Formatter(FORMAT))
    saved = (ours.handlers, ours.level, ours.propagate)
    logging.captureWarnings(True)

    saved_fd = saved_stderr = None
    if not verbose:
        sys.stderr.flush()
        saved_fd = os.dup(_STDERR_FD)
        try:
            real = sys.stderr.fileno() == _STDERR_FD
        except (AttributeError, OSError, ValueError):
            real = False  # a captured stream (pytest): Python output does not go through fd 2 anyway
        if real:
            saved_stderr = sys.stderr
            sys.stderr = open(os.dup(saved_fd), "w", buffering=1, errors="replace")
        os.dup2(stream.fileno(), _STDERR_FD)
    terminal = logging.StreamHandler(sys.stderr)  # made after the swap: the terminal
    terminal.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    terminal.setLevel(logging.INFO if verbose else logging.WARNING)
    ours.handlers, ours.propagate = [file_handler, terminal], False
    ours.setLevel(logging.INFO)
    _active = job
    try:
        yield job
    finally:
        _active = None
        job.restore()
        logging.captureWarnings(False)
        ours.handlers, ours.level, ours.propagate = saved
        try:
            job.append_worker_logs()
        finally:
            keep = until_exit and saved_stderr is not None
            if saved_fd is not None and not keep:
                os.dup2(saved_fd, _STDERR_FD)
                os.close(saved_fd)
            if saved_stderr is not None and not keep:
                sys.stderr.close()
                sys.stderr = saved_stderr
            stream.close()  # fd 2, if kept, is a descriptor of its own on the same file
