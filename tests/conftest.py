import os
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    import numpy as np
    import torch

    torch.manual_seed(0)
    np.random.seed(0)
    yield


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """A real S3 endpoint on loopback (moto's server), as s3fs's and Ray's own tests use."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """A tiny randomly initialised weights bundle, written once per test session."""
    from pipeline.weights import init_bundle

    path = str(tmp_path_factory.mktemp("weights") / "tiny")
    init_bundle(path, size="tiny")
    return path


def _ordinary_scheduling() -> int:
    """The calling thread back in Linux's ordinary scheduling class; returns the class it was
    in. A Ray started from a SCHED_FIFO thread runs its raylet, GCS and every worker and task
    real-time (checked: a task reports policy 1), and on two cores Ray Data's busy scheduling
    loops then starve the tasks they wait for: a training test stalled for 19 minutes that
    way in a fresh-clone run. What left pytest's thread real-time was SVT-AV1 opening as
    root, which SegmentWriter now undoes (stages/media/encode.py: real_time_undone)."""
    if not hasattr(os, "sched_getscheduler"):
        return 0
    policy = os.sched_getscheduler(0)
    if policy != os.SCHED_OTHER:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    return policy


@pytest.fixture(autouse=True)
def _ordinary_scheduling_per_test(request):  # for a Ray a test starts itself
    _ordinary_scheduling()
    yield
    left = _ordinary_scheduling()
    if left != getattr(os, "SCHED_OTHER", 0):  # named in the run's warnings summary, so a new culprit is found
        warnings.warn(f"{request.node.nodeid} left the test thread in scheduling class {left}; put back", stacklevel=1)


@pytest.fixture(scope="module", autouse=True)
def _ordinary_scheduling_per_module():  # autouse goes first in its scope: before a module's Ray
    _ordinary_scheduling()
    yield


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray for one test module (3 logical CPUs: two training ranks plus data),
    with fake AWS credentials for the loopback S3 endpoint."""
    import ray

    os.environ.update({"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret",
                       "AWS_DEFAULT_REGION": "us-east-1", "RAY_USAGE_STATS_ENABLED": "0"})
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# The suite's result is settled once pytest has reported it. Tearing the interpreter down
# afterwards runs the destructors of native threads that libraries under test leave behind
# (Ray's gRPC, mediapipe's TFLite, moto's server), and a fresh-clone run (2026-12-03) ended
# with SIGSEGV there, after "582 passed" was printed (rc 139, no Python frame in the crash).
# So the session leaves without that teardown, with pytest's own exit status.
# os._exit also skips pytest's clean-up at exit of older sessions' temporary folders, so a
# green session removes its own (pyproject.toml: tmp_path_retention_policy).
def pytest_sessionfinish(session, exitstatus):
    session.config.stash[_SESSION] = session


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    session = config.stash.get(_SESSION, None)
    if session is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(session.exitstatus))  # as the other sessionfinish hooks left it


_SESSION = pytest.StashKey[pytest.Session]()
