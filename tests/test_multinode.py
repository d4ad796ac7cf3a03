"""The dub job on a real two-node Ray cluster (ray.cluster_utils.Cluster: two raylets, each
with its own resources and object store). Node-local cache, work or output paths are
refused before any work starts; with the work area on S3 (moto's server on loopback)
the job completes with segments made on one node and finalized on another."""
from __future__ import annotations

import os
from fractions import Fraction

import pytest

from pipeline.config import JobConfig, StorageConfig
from pipeline.dub.schemas import read_report, write_manifest
from pipeline.sample_catalogue import SampleVideo, speak, write_video
from pipeline.security import PolicyError
from pipeline.storage import Storage
from pipeline.weights import init_bundle
from stages.media import probe_video

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    os.environ.update(S3_ENV)  # the raylets' workers inherit the credentials
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"node_head": 1}, "object_store_memory": 300 << 20})
    cluster.add_node(num_cpus=2, resources={"node_worker": 1}, object_store_memory=300 << 20)
    cluster.wait_for_nodes()
    yield cluster
    if ray.is_initialized():
        ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory, s3_endpoint):
    import boto3

    root = tmp_path_factory.mktemp("multinode")
    bundle = str(root / "tiny")
    init_bundle(bundle, size="tiny")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    for bucket in ("media", "work", "out"):
        s3.create_bucket(Bucket=bucket)
    for name, seconds, line in (("v0", 1.2, "Hello there."), ("v1", 0.8, "Good day.")):
        video, audio = str(root / f"{name}.mp4"), str(root / f"{name}.wav")
        write_video(video, SampleVideo(name, Fraction(25), seconds, "", size=(320, 240)))
        speak(line, audio)
        s3.upload_file(video, "media", f"videos/{name}.mp4")
        s3.upload_file(audio, "media", f"audio/{name}.wav")
    return {"root": root, "bundle": bundle, "s3": s3, "endpoint": s3_endpoint}


def _config(catalogue, local_out: str, **over) -> JobConfig:
    """Security admits the local output folder too: what refuses it is the multi-node rule."""
    base = dict(segment_seconds=0.5, cache_uri="s3://work/cache", storage=StorageConfig(endpoint_url=catalogue["endpoint"]),
                security={"allowed_input_prefixes": ["s3://media/"], "allowed_output_prefixes": ["s3://out/", local_out]})
    base.update(over)
    return JobConfig(**base)


def _rows(out: str) -> list[dict]:
    return [{"video_uri": f"s3://media/videos/{n}.mp4", "audio_uri": f"s3://media/audio/{n}.wav",
             "output_uri": f"{out}/{n}.mp4"} for n in ("v0", "v1")]


def test_node_local_paths_are_refused_and_the_job_completes_with_the_work_area_on_s3(two_nodes, catalogue, tmp_path):
    import ray

    from pipeline.dub.job import run_dub

    storage = Storage(StorageConfig(endpoint_url=catalogue["endpoint"]).options())
    manifest = "s3://media/manifest.parquet"
    local_cache = tmp_path / "cache"

    # A node-local cache (the default `.imgtalk-cache`): refused before any work starts.
    write_manifest(_rows("s3://out/dubbed"), manifest, storage)
    with pytest.raises(PolicyError, match=r"2 nodes.*cache_uri .*cache.*work_uri"):
        run_dub(manifest, catalogue["bundle"], "s3://out/report.parquet", _config(catalogue, str(tmp_path / "out"), cache_uri=str(local_cache)),
                address=two_nodes.address)
    assert not local_cache.exists()
    # Node-local outputs, with the work area on S3: refused too, nothing written anywhere.
    write_manifest(_rows(str(tmp_path / "out")), manifest, storage)
    with pytest.raises(PolicyError, match=r"2 output URI\(s\) such as .*/out/v0.mp4"):
        run_dub(manifest, catalogue["bundle"], "s3://out/report.parquet", _config(catalogue, str(tmp_path / "out")), address=two_nodes.address)
    assert not (tmp_path / "out").exists()
    s3 = catalogue["s3"]
    assert "Contents" not in s3.list_objects_v2(Bucket="work") and "Contents" not in s3.list_objects_v2(Bucket="out")
    if ray.is_initialized():
        ray.shutdown()

    # Everything the nodes share on S3: the job completes.
    write_manifest(_rows("s3://out/dubbed"), manifest, storage)
    result = run_dub(manifest, catalogue["bundle"], "s3://out/report.parquet", _config(catalogue, str(tmp_path / "out")), address=two_nodes.address)
    assert [r.status for r in result.rows] == ["ok", "ok"], [r.error for r in result.rows]
    report = read_report("s3://out/report.parquet", storage)
    for r, name in zip(report, ("v0", "v1")):
        local = str(tmp_path / f"{name}.mp4")
        s3.download_file("out", f"dubbed/{name}.mp4", local)
        source = probe_video(str(catalogue["root"] / f"{name}.mp4"))
        assert probe_video(local).n_frames == source.n_frames == r.output_frames
        assert r.output_sha256 == Storage().sha256(local)
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="out", Prefix="dubbed/")["Contents"])
    assert keys == ["dubbed/v0.mp4", "dubbed/v1.mp4"]

