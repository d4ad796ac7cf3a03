"""The Grafana dashboard's PromQL against a real Prometheus (Debian's 2.42, installed by
scripts/install.sh) that scrapes a real local Ray through deploy/prometheus/prometheus.yml,
while a small job runs: every panel query must return data from that run.

The config Prometheus runs is the shipped file with only the scrape interval shortened and
the service-discovery path pointed at this Ray session's copy of the file (the one that
/tmp/ray/prom_metrics_service_discovery.json links to; other Rays on the same machine move
that link). Prometheus listens on loopback, keeps its TSDB in a temporary folder, and is
stopped at the end.

Lip-sync series: the job's bundle gets a randomly initialised SyncNet
(syncnet/syncnet_v2.model, the optional component), so finalize scores both ok videos and
the sync-confidence panel has this run's data like every other panel; its figures are
meaningless as quality, only their presence and count are checked.

GPU series: this runs where Ray sees no GPU, so Ray exports no ray_node_gpus_* /
ray_node_gram_* series and no process touches CUDA (no imgtalk_gpu_memory_*). A query
built only from those metrics must then still be valid PromQL that Prometheus evaluates
(status success) and returns nothing; its metric names are checked against Ray's source
(for Ray's) and pipeline.metrics (for ours) instead, so a typo cannot hide. Each GPU panel
also plots a CPU or host-memory series, and that one must have data. With a GPU, every
query must have data.
"""
import json
import math
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
import wave
from fractions import Fraction

import numpy as np
import pytest
import yaml

from pipeline import metrics
from pipeline.config import JobConfig
from pipeline.sample_catalogue import SampleVideo, write_video
from pipeline.dub.schemas import write_manifest
from pipeline.storage import Storage
from pipeline.weights import init_bundle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "imgtalk.json")
PROMETHEUS_YML = os.path.join(ROOT, "deploy", "prometheus", "prometheus.yml")
SCRAPE_S = 1
# Only a GPU (or CUDA in a job's process) produces these.
GPU_METRICS = {
    "ray_node_gpus_utilization",
    "ray_node_gram_used",
    "ray_node_gram_available",
    "ray_imgtalk_gpu_memory_allocated_bytes",
    "ray_imgtalk_gpu_memory_reserved_bytes",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read().decode())


def _wait(what: str, check, timeout_s: float = 60.0, every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = check()
        except OSError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(every_s)


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray started the way `imgtalk dub --metrics-port` starts one."""
    import ray

    from pipeline.dub.job import _init_ray

    saved = {k: os.environ.get(k) for k in ("RAY_metrics_report_interval_ms", "RAY_USAGE_STATS_ENABLED")}
    os.environ.update(RAY_metrics_report_interval_ms="500", RAY_USAGE_STATS_ENABLED="0")
    port = _free_port()
    assert _init_ray(None, num_cpus=2, metrics_export_port=port)
    session_dir = ray._private.worker._global_node.get_session_dir_path()
    sd_file = os.path.join(session_dir, "prom_metrics_service_discovery.json")
    _wait("Ray's service-discovery file", lambda: os.path.exists(sd_file) and json.load(open(sd_file)))
    yield {"metrics_port": port, "sd_file": sd_file, "gpus": ray.cluster_resources().get("GPU", 0)}
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def prometheus(ray_session, tmp_path_factory):
    exe = shutil.which("prometheus")
    assert exe, "prometheus is not installed: run scripts/install.sh (Debian package prometheus)"
    with open(PROMETHEUS_YML) as f:
        config = yaml.safe_load(f)
    # What ships: one job that reads Ray's file_sd file and keeps the job's own `job` label.
    (scrape,) = config["scrape_configs"]
    assert scrape["honor_labels"] is True
    assert [c["files"] for c in scrape["file_sd_configs"]] == [["/tmp/ray/prom_metrics_service_discovery.json"]]
    # Only the interval and the file's path change for the test.
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = f"{SCRAPE_S}s"
    scrape["file_sd_configs"][0]["files"] = [ray_session["sd_file"]]
    scrape["file_sd_configs"][0]["refresh_interval"] = "1s"
    root = tmp_path_factory.mktemp("prometheus")
    config_path = root / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = _free_port()
    log = open(root / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [exe, f"--config.file={config_path}", f"--storage.tsdb.path={root / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait("Prometheus to be ready", lambda: proc.poll() is None and urllib.request.urlopen(url + "/-/ready", timeout=5).status == 200)
        export = f":{ray_session['metrics_port']}"

        def node_target_up():
            targets = _get_json(url + "/api/v1/targets")["data"]["activeTargets"]
            return any(t["scrapeUrl"].split("/metrics")[0].endswith(export) and t["health"] == "up" for t in targets)

        _wait("the Ray node's export port to be scraped", node_target_up)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        log.close()


def _tone(path: str, seconds: float) -> None:
    t = np.arange(int(16000 * seconds)) / 16000
    pcm = (0.3 * np.sin(2 * math.pi * 220.0 * t) * 32767).astype(np.int16)
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())


def _query_range(url: str, expr: str, start: float, end: float) -> dict:
    q = urllib.parse.urlencode({"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": "1s"})
    return _get_json(f"{url}/api/v1/query_range?{q}")


def _finite(result: list) -> list[tuple[dict, float]]:
    return [(s["metric"], float(v)) for s in result for _, v in s["values"] if math.isfinite(float(v))]


def _expand(expr: str, dashboard: dict, job: str) -> str:
    """Grafana's substitution with concrete values: $job is this run's job id,
    $__rate_interval is Grafana's floor of 4 scrape intervals, other variables take the
    dashboard's current value."""
    values = {"job": job, "__rate_interval": f"{4 * SCRAPE_S}s"}
    for var in dashboard["templating"]["list"]:
        if var["name"] not in values and var["type"] in ("interval", "custom", "constant"):
            values[var["name"]] = var["current"]["value"]
    out = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], expr)
    assert "$" not in out, out
    return out


def test_every_panel_query_returns_data_from_a_run(ray_session, prometheus, tmp_path):
    from pipeline.dub.job import run_dub

    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    titles = [p["title"] for p in dashboard["panels"]]
    # what the issue asks the dashboard to show
    for needle in ("End-to-end frames/s", "per stage", "p50 / p95", "GPU utilisation", "GPU memory", "Failures", "Videos", "ETA",
                   "Lip-sync confidence"):
        assert any(needle in t for t in titles), (needle, titles)
    targets = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]

    # Every metric a query names exists: ours in pipeline.metrics, Ray's in its node reporter.
    import ray.dashboard.modules.reporter.reporter_agent as reporter

    with open(reporter.__file__) as f:
        reporter_source = f.read()
    ours = {"ray_" + n for n in metrics.SPECS} | {f"ray_{n}_{s}" for n, spec in metrics.SPECS.items() if spec[0] == "histogram" for s in ("bucket", "sum", "count")}
    for title, expr in targets:
        for name in re.findall(r"\bray_\w+", expr):
            assert name in ours or f'"{name[len("ray_"):]}"' in reporter_source, (title, name)

    # A small job: two short videos, one corrupt file (fails at plan).
    root = tmp_path / "media"
    root.mkdir()
    rows = []
    for name, fps in (("a", Fraction(25)), ("b", Fraction(30000, 1001))):
        write_video(str(root / f"{name}.mp4"), SampleVideo(name, fps, 1.2, "", size=(320, 240)))
        _tone(str(root / f"{name}.wav"), 1.2)
        rows.append({"video_uri": str(root / f"{name}.mp4"), "audio_uri": str(root / f"{name}.wav"), "output_uri": str(tmp_path / "out" / f"{name}.mp4")})
    (root / "bad.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    rows.append({"video_uri": str(root / "bad.mp4"), "audio_uri": str(root / "a.wav"), "output_uri": str(tmp_path / "out" / "bad.mp4")})
    write_manifest(rows, str(tmp_path / "manifest.parquet"), Storage())
    bundle = str(tmp_path / "weights")
    init_bundle(bundle, size="tiny")
    # The optional SyncNet component, random weights: every ok video is scored and recorded.
    import torch

    from stages.eval.syncnet import SyncNet

    torch.manual_seed(0)
    os.makedirs(os.path.join(bundle, "syncnet"))
    SyncNet().save_file(os.path.join(bundle, "syncnet", "syncnet_v2.model"))

    start = time.time()
    result = run_dub(str(tmp_path / "manifest.parquet"), bundle, str(tmp_path / "report.parquet"),
                     JobConfig(segment_seconds=0.5, cache_uri=str(tmp_path / "cache")), progress=False)
    assert result.counts == {"ok": 2, "failed": 1, "skipped": 0}, [r.error for r in result.rows]
    scored = [r.sync_conf for r in result.rows if r.status == "ok"]
    assert len(scored) == 2 and all(c is not None and c >= 0 for c in scored), scored
    job = result.job_id
    url = prometheus

    def scraped_final_state():
        r = _get_json(url + "/api/v1/query?" + urllib.parse.urlencode({"query": f'sum(ray_imgtalk_videos_finished_total{{job="{job}"}})'}))
        return r["data"]["result"] and float(r["data"]["result"][0]["value"][1]) == 3

    _wait("Prometheus to scrape the finished job", scraped_final_state)
    time.sleep(2 * SCRAPE_S)  # a last scrape or two past the end, for the rate windows
    end = time.time()

    for title, expr in targets:
        concrete = _expand(expr, dashboard, job)
        answer = _query_range(url, concrete, start, end)
        assert answer["status"] == "success", (title, concrete, answer)
        points = _finite(answer["data"]["result"])
        gpu_only = set(re.findall(r"\bray_\w+", expr)) <= GPU_METRICS
        if gpu_only and not ray_session["gpus"]:
            assert answer["data"]["result"] == [], (title, concrete)
        else:
            assert points, f"panel {title!r}: no data for {concrete}"

    def series(expr):
        return _finite(_query_range(url, _expand(expr, dashboard, job), start, end)["data"]["result"])

    by_title = {p["title"]: [t["expr"] for t in p["targets"]] for p in dashboard["panels"]}
    # The values are this run's: the stages that ran, the failure it had, its video counts.
    stages = {m["stage"] for m, _ in series(by_title["Frames/s per stage"][0])}
    assert stages == {"face", "motion", "complete", "compose"}
    assert all(v >= 0 for _, v in series(by_title["Frames/s per stage"][0]))
    failures = {(m["stage"], m["kind"]): v for m, v in series(by_title["Failures by stage and kind"][0])}
    assert failures == {("plan", "MediaError"): 1.0}
    finished = {}
    for m, v in series(by_title["Videos: finished vs total"][1]):
        finished[m["status"]] = max(v, finished.get(m["status"], 0))
    assert finished == {"ok": 2.0, "failed": 1.0, "skipped": 0.0}
    assert max(v for _, v in series(by_title["Videos: finished vs total"][0])) == 3
    latencies = series(by_title["Batch latency p50 / p95 per stage"][1])
    assert all(0 < v <= 300 for _, v in latencies)
    assert all(v >= 0 for _, v in series(by_title["ETA"][0]))
    # One observation per scored (ok) video, each within the histogram's range.
    (sync_panel,) = [t for t in by_title if t.startswith("Lip-sync confidence")]
    assert {m["job"] for m, _ in series(by_title[sync_panel][0])} == {job}
    assert all(0 <= v <= metrics.SYNC_CONF_BUCKETS[-1] for e in by_title[sync_panel] for _, v in series(e))
    assert max(v for _, v in series(f'sum(ray_imgtalk_sync_confidence_count{{job="{job}"}})')) == 2
