"""Security: manifest URIs outside the allowed prefixes are refused in the report and never
read or written; credentials never ride in URIs and never reach logs or reports; weights
never unpickle code; Ray's token authentication stays on."""
import ast
import logging
import os
import pickle
import re
import shutil
import time
import urllib.request

import pytest
import yaml

from pipeline.config import ConfigError, JobConfig, StorageConfig, load_job_config
from pipeline.sample_catalogue import SampleVideo, speak, write_video
from pipeline.dub.schemas import read_report, write_manifest
from pipeline.security import PolicyError, URIPolicy, has_credentials, redact
from pipeline.storage import Storage, StorageOptions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV_SECRET = "envsecret-7f3a9c-NEVER-LOG"  # AWS_SECRET_ACCESS_KEY for the job's run
URI_SECRET = "urisecret/4b1d+e8-NEVER-LOG"  # what a malicious manifest smuggles in a URI


# --------------------------------------------------------------------------- the prefix policy

POLICY = URIPolicy(["s3://media/in", "S3://Media/dubs/"], ["s3://media/out/"])

ADMITTED = [
    ("s3://media/in/a.mp4", "video"),
    ("s3://media/in/deep/er/a.mp4", "audio"),
    ("S3://media/in/a.mp4", "video"),  # scheme case
    ("s3a://media/in/a.mp4", "video"),
    ("s3://media/dubs/a.wav", "audio"),  # a prefix written with odd case and a trailing slash
    ("s3://media/in/./a.mp4", "video"),  # "." segments change nothing on any reading
    ("s3://media/in/x/../a.mp4", "video"),  # ".." that stays inside on every reading
    ("s3://media/out/a.mp4", "output"),
]
REFUSED = [
    ("s3://media-evil/in/a.mp4", "video", "allowed_input_prefixes"),  # bucket boundary
    ("s3://media.evil/in/a.mp4", "video", "allowed_input_prefixes"),
    ("s3://media/input/a.mp4", "video", "allowed_input_prefixes"),  # segment boundary
    ("s3://media/in/../secret/a.mp4", "video", "allowed_input_prefixes"),  # S3 keeps the key, a normaliser would not
    ("s3://media/in/%2e%2e/secret/a.mp4", "video", "allowed_input_prefixes"),  # the same, percent-encoded
    ("s3://media/secret/../in/a.mp4", "video", "allowed_input_prefixes"),  # literal key outside
    ("s3://media//in/a.mp4", "video", "allowed_input_prefixes"),  # "/in/a.mp4" is another key
    ("s3://media/../media/in/a.mp4", "video", "climbs above the root"),
    ("s3://media/out/a.mp4", "video", "allowed_input_prefixes"),  # an output prefix does not admit inputs
    ("s3://media/in/a.mp4", "output", "allowed_output_prefixes"),
    ("s3://media/out/../in/a.mp4", "output", "allowed_output_prefixes"),
    ("/data/in/a.mp4", "video", "allowed_input_prefixes"),  # local paths on an s3 job
    ("file:///data/in/a.mp4", "video", "allowed_input_prefixes"),
    ("https://media/in/a.mp4", "video", "allowed_input_prefixes"),  # another scheme, same-looking host
]


@pytest.mark.parametrize("uri,kind", ADMITTED)
def test_policy_admits_uris_under_a_prefix(uri, kind):
    assert POLICY.check(uri, kind) is None


@pytest.mark.parametrize("uri,kind,rule", REFUSED)
def test_policy_refuses_uris_outside_naming_the_uri_and_the_rule(uri, kind, rule):
    reason = POLICY.check(uri, kind)
    assert reason is not None and uri in reason and rule in reason
    assert reason.startswith(f"{kind}_uri ")


def test_no_prefixes_admit_local_files_and_object_stores_but_not_credentials():
    open_policy = URIPolicy()
    for uri in ("/anywhere/a.mp4", "s3://any/thing", "relative/path.mp4", "file:///x", "gs://b/k", "az://c/k"):
        assert open_policy.check(uri, "video") is None and open_policy.canonical(uri) == uri
    assert "credentials" in open_policy.check("s3://KEY:SECRET@any/thing", "video")


def test_no_prefixes_refuse_http_and_other_schemes_unless_listed():
    open_policy = URIPolicy()
    for uri, kind in (("http://169.254.169.254/latest/meta-data/iam", "video"), ("https://host/a.wav", "audio"),
                      ("ftp://host/out.mp4", "output"), ("memory://x/y.mp4", "video")):
        reason = open_policy.check(uri, kind)
        assert reason is not None and reason.startswith(f"{kind}_uri {uri}") and "is not allowed" in reason
        assert "allowed_schemes" in reason
    assert URIPolicy(schemes=["file", "https"]).check("https://host/a.wav", "audio") is None


def test_a_dub_against_a_cluster_needs_both_prefix_lists(tmp_path, monkeypatch):
    from pipeline.config import JobConfig
    from pipeline.dub.job import run_dub

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for security in ({}, {"allowed_input_prefixes": [str(tmp_path)]}):
        with pytest.raises(PolicyError, match="allowed_input_prefixes and security.allowed_output_prefixes"):
            run_dub(str(tmp_path / "m.parquet"), str(tmp_path / "w"), str(tmp_path / "r.parquet"),
                    JobConfig(security=security), address="ray://head:10001")
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # inside `ray job submit`
    with pytest.raises(PolicyError, match="against a cluster"):
        run_dub(str(tmp_path / "m.parquet"), str(tmp_path / "w"), str(tmp_path / "r.parquet"), JobConfig())
    assert not (tmp_path / "r.parquet").exists()


def test_a_dry_run_against_a_cluster_is_held_to_the_dub_jobs_rules(tmp_path, monkeypatch):
    """`imgtalk validate` probes what `imgtalk dub` would open, so against a cluster it needs the
    same prefix lists, and its own URIs carry no credentials; it refuses before reading anything."""
    from pipeline.dub.schemas import ManifestError
    from pipeline.validate.job import run_validate

    manifest, report = str(tmp_path / "m.parquet"), str(tmp_path / "r.parquet")
    both = {"allowed_input_prefixes": [str(tmp_path)], "allowed_output_prefixes": [str(tmp_path)]}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for security in ({}, {"allowed_output_prefixes": [str(tmp_path)]}):
        with pytest.raises(PolicyError, match="a validate job run against a cluster .* needs security.allowed_input_prefixes"):
            run_validate(manifest, JobConfig(security=security), report_uri=report, address="ray://head:10001")
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # inside `ray job submit`
    with pytest.raises(PolicyError, match="against a cluster"):
        run_validate(manifest, JobConfig(), report_uri=report)
    with pytest.raises(PolicyError, match="must not carry credentials") as refused:
        run_validate(f"s3://AKIAFAKE:{URI_SECRET}@media/m.parquet", JobConfig(security=both), report_uri=report)
    assert URI_SECRET not in str(refused.value)
    # with both lists it gets past the policy to the manifest itself (which is not there)
    with pytest.raises(ManifestError, match="manifest not found"):
        run_validate(manifest, JobConfig(security=both), report_uri=report)
    assert not os.path.exists(report)


def test_local_prefixes_resolve_paths_as_the_os_does(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (outside / "secret.mp4").write_bytes(b"x")
    (allowed / "escape").symlink_to(outside)  # a link inside the prefix pointing out of it
    policy = URIPolicy([str(allowed)], [f"file://{allowed}/"])
    assert policy.check(f"{allowed}/a.mp4", "video") is None
    assert policy.check(f"{allowed}//sub/./a.mp4", "video") is None
    assert policy.check(f"file://{allowed}/a.mp4", "video") is None
    assert policy.check(f"{allowed}/a.mp4", "output") is None
    assert policy.canonical(f"{allowed}//sub/./a.mp4") == f"{allowed}/sub/a.mp4"  # what was checked is what is opened
    for uri in (f"{allowed}/../outside/secret.mp4", f"{allowed}/escape/secret.mp4", f"{allowed}-evil/a.mp4", str(outside / "secret.mp4")):
        reason = policy.check(uri, "video")
        assert reason is not None and "allowed_input_prefixes" in reason, uri
    assert f"resolves to {outside}/secret.mp4" in policy.check(f"{allowed}/escape/secret.mp4", "video")


def test_credentials_in_uris_are_refused_and_redacted():
    for uri in (f"s3://AKIAFAKE:{URI_SECRET}@media/in/a.mp4", f"https://user:{URI_SECRET}@host/a.mp4", f"s3://{URI_SECRET.split('/')[0]}@media/in/a.mp4"):
        assert has_credentials(uri)
        reason = POLICY.check(uri, "video")
        assert "must not carry credentials" in reason and URI_SECRET not in reason and URI_SECRET.split("/")[0] not in reason
        assert "***@" in reason
    assert not has_credentials("s3://media/in/speaker@example.com/a.mp4")  # an "@" in a key is no credential
    assert redact(f"failed to open s3://K:{URI_SECRET}@b/k, then https://u:p@h/x") == "failed to open s3://***@b/k, then https://***@h/x"


def test_job_config_carries_the_policy_and_refuses_credentials(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"security": {"allowed_input_prefixes": ["s3://media/in"], "allowed_output_prefixes": ["s3://media/out"]}, "max_failed_videos": 3}))
    config = load_job_config(str(path))
    assert config.security.allowed_input_prefixes == ["s3://media/in"] and config.max_failed_videos == 3
    assert JobConfig().security.allowed_input_prefixes is None  # the laptop default: everything
    for bad in ({"security": {"allowed_input_prefixes": [f"s3://K:{URI_SECRET}@media/in"]}}, {"cache_uri": f"s3://K:{URI_SECRET}@media/cache"}):
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(ConfigError) as e:
            load_job_config(str(path))
        assert "credentials" in str(e.value) and URI_SECRET not in str(e.value)


def test_job_level_uris_with_credentials_stop_the_job_before_any_io(tmp_path, capsys, monkeypatch):
    from pipeline.cli import main
    from pipeline.dub.job import run_dub

    monkeypatch.chdir(tmp_path)  # the CLI keeps the log of a job whose report is remote in the current folder

    with pytest.raises(PolicyError) as e:
        run_dub(f"s3://K:{URI_SECRET}@media/manifest.parquet", str(tmp_path / "no-weights"), str(tmp_path / "r.parquet"))
    assert URI_SECRET not in str(e.value) and "manifest s3://***@media" in str(e.value)
    code = main(["dub", "--manifest", str(tmp_path / "m.parquet"), "--weights", str(tmp_path / "w"),
                 "--output-report", f"https://u:{URI_SECRET}@host/report.parquet"])
    err = capsys.readouterr().err
    assert code == 2 and "report https://***@host" in err and URI_SECRET not in err


# --------------------------------------------------------------------------- weights and Ray auth


def _repo_files(suffixes: tuple[str, ...] | None = None):
    skip = {".venv", ".git", "__pycache__", "node_modules", ".pytest_cache", "demo_out"}
    for d, dirs, files in os.walk(ROOT):
        dirs[:] = [x for x in dirs if x not in skip and not x.endswith(".egg-info")]
        for f in files:
            if suffixes is None or f.endswith(suffixes):
                yield os.path.join(d, f)


def test_every_torch_load_in_the_source_tree_is_weights_only():
    calls = 0
    for path in _repo_files((".py",)):
        tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
                owner = node.func.value
                if isinstance(owner, ast.Name) and owner.id == "torch":
                    calls += 1
                    flags = {k.arg: k.value for k in node.keywords}
                    ok = isinstance(flags.get("weights_only"), ast.Constant) and flags["weights_only"].value is True
                    assert ok, f"{os.path.relpath(path, ROOT)}:{node.lineno}: torch.load without weights_only=True"
                if isinstance(owner, ast.Name) and owner.id in ("pickle", "cPickle", "dill", "joblib"):
                    raise AssertionError(f"{os.path.relpath(path, ROOT)}:{node.lineno}: {owner.id}.load of untrusted files")
            if isinstance(node, ast.keyword) and node.arg == "allow_pickle" and getattr(node.value, "value", False) is True:
                raise AssertionError(f"{os.path.relpath(path, ROOT)}:{node.lineno}: numpy allow_pickle=True")
    assert calls >= 2  # the scan sees the loaders it is about (motion extractor, VGG)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_weights_file_carrying_code_is_refused_not_run(tmp_path):
    import torch

    from pipeline.weights import BundleError, load_hubert, load_motion_extractor, load_vae, read_bundle_info
    from pipeline.weights import init_bundle

    bundle = str(tmp_path / "w")
    init_bundle(bundle, size="tiny")
    marker = tmp_path / "payload-ran"
    torch.save({"weight": _Payload(marker)}, os.path.join(bundle, "liveportrait", "motion_extractor.pth"))
    for folder, name in (("hubert", "pytorch_model.bin"), ("vae", "diffusion_pytorch_model.bin")):
        for f in os.listdir(os.path.join(bundle, folder)):
            if f.endswith(".safetensors"):
                os.remove(os.path.join(bundle, folder, f))
        torch.save({"weight": _Payload(marker)}, os.path.join(bundle, folder, name))
    info = read_bundle_info(bundle)
    for load in (load_motion_extractor, load_hubert, load_vae):
        with pytest.raises((BundleError, pickle.UnpicklingError)) as e:
            load(info)
        chain, err = [], e.value
        while err is not None and len(chain) < 10:
            chain.append(str(err))
            err = err.__cause__ or err.__context__
        assert any("posix.system" in text for text in chain), chain  # refused by the weights-only unpickler
    assert not marker.exists()


AUTH_OFF = re.compile(
    r"""RAY_AUTH_MODE["'\]]*\s*[:=,]\s*["']?disabled"""  # shell, Python, YAML/JSON mappings
    r"""|name:\s*["']?RAY_AUTH_MODE["']?\s*\n\s*value:\s*["']?disabled"""  # Kubernetes env lists
    r"""|auth[_-]?mode["'\]]*\s*[:=,]\s*["']?(disabled|none)\b""",
    re.I,
)
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def test_nothing_in_the_repository_turns_ray_token_auth_off():
    """Code, scripts and deployment files never opt out; the docs' copyable blocks neither
    (prose may warn against it). Tests are data here: they search for the opt-out."""
    texts = (".py", ".sh", ".yaml", ".yml", ".json", ".toml", ".cfg", ".ini", ".env", "Dockerfile", ".md")
    offenders, scanned = [], 0
    for path in _repo_files(texts):
        rel = os.path.relpath(path, ROOT)
        if rel.startswith("tests" + os.sep):
            continue
        try:
            text = open(path, encoding="utf-8").read()
        except (UnicodeDecodeError, OSError):
            continue
        if path.endswith(".md"):
            text = "\n".join(FENCE.findall(text))
        scanned += 1
        offenders += [f"{rel}: {m.group(0)}" for m in AUTH_OFF.finditer(text)]
    assert not offenders
    assert scanned > 20
    for opt_out in ("export RAY_AUTH_MODE=disabled", "env: {RAY_AUTH_MODE: disabled}", 'os.environ["RAY_AUTH_MODE"] = "disabled"',
                    'env.setdefault("RAY_AUTH_MODE", "disabled")', "RAY_AUTH_MODE: 'disabled'", "- name: RAY_AUTH_MODE\n  value: disabled"):
        assert AUTH_OFF.search(opt_out), opt_out
    assert not AUTH_OFF.search("RAY_AUTH_MODE=token")


# --------------------------------------------------------------------------- a job against S3


@pytest.fixture(scope="module")
def ray_via_job():
    """Ray started the way `imgtalk dub --metrics-port` starts it, with the fake secret in
    its environment; yields the metrics port."""
    import socket

    import ray
    from ray._raylet import AuthenticationMode, get_authentication_mode

    from pipeline.dub.job import _init_ray

    os.environ.update(AWS_ACCESS_KEY_ID="testing-key-id", AWS_SECRET_ACCESS_KEY=ENV_SECRET, AWS_DEFAULT_REGION="us-east-1")
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_metrics_report_interval_ms="500")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert _init_ray(None, num_cpus=2, metrics_export_port=port)
    assert get_authentication_mode() == AuthenticationMode.TOKEN  # token auth is on for the job's Ray
    yield port
    ray.shutdown()


def test_rows_outside_the_prefixes_are_refused_untouched_and_no_secret_leaks(ray_via_job, s3_endpoint, tmp_path, caplog, capsys):
    import boto3

    from pipeline.dub.job import run_dub
    from pipeline.weights import init_bundle
    from test_resilience import FlakyS3Proxy

    caplog.set_level(logging.DEBUG)
    bundle = str(tmp_path / "w")
    init_bundle(bundle, size="tiny")
    video, audio = str(tmp_path / "v.mp4"), str(tmp_path / "a.wav")
    write_video(video, SampleVideo("v", __import__("fractions").Fraction(25), 0.8, "", size=(320, 240)))
    speak("Hi.", audio)
    # A readable local file outside every prefix; reading it would move its atime past its mtime.
    local = tmp_path / "local-secret.mp4"
    shutil.copy(video, local)
    st = os.stat(local)
    os.utime(local, ns=(st.st_mtime_ns - 10**12, st.st_mtime_ns))

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing-key-id", aws_secret_access_key=ENV_SECRET, region_name="us-east-1")
    for bucket in ("media", "media-evil"):
        s3.create_bucket(Bucket=bucket)
    s3.upload_file(video, "media", "in/v.mp4")
    s3.upload_file(audio, "media", "in/a.wav")
    s3.upload_file(video, "media", "private/v.mp4")
    s3.upload_file(video, "media-evil", "in/v.mp4")
    ok = {"video_uri": "s3://media/in/v.mp4", "audio_uri": "s3://media/in/a.wav"}
    rows = [
        dict(ok, output_uri="s3://media/out/ok.mp4"),
        dict(ok, video_uri="s3://media-evil/in/v.mp4", output_uri="s3://media/out/other-bucket.mp4"),
        dict(ok, video_uri="s3://media/in/../private/v.mp4", output_uri="s3://media/out/dotdot.mp4"),
        dict(ok, video_uri=str(local), output_uri="s3://media/out/local.mp4"),
        dict(ok, output_uri="s3://media/elsewhere/out.mp4"),
        dict(ok, output_uri="s3://media/out/../in/overwrite.mp4"),
        dict(ok, audio_uri=f"s3://AKIAFAKE:{URI_SECRET}@media/in/a.wav", output_uri="s3://media/out/creds.mp4"),
        dict(ok, output_uri=str(tmp_path / "local-out.mp4")),
    ]
    direct = Storage(StorageOptions(endpoint_url=s3_endpoint))
    write_manifest(rows, "s3://media/manifest.parquet", direct)

    proxy = FlakyS3Proxy(s3_endpoint)  # no failures: it only records what the job asks for
    try:
        config = JobConfig(
            segment_seconds=0.5, cache_uri="s3://media/cache", storage=StorageConfig(endpoint_url=proxy.url),
            security={"allowed_input_prefixes": ["s3://media/in/"], "allowed_output_prefixes": ["s3://media/out/"]},
        )
        result = run_dub("s3://media/manifest.parquet", bundle, "s3://media/report.parquet", config)
    finally:
        proxy.stop()

    report = read_report("s3://media/report.parquet", direct)
    assert [r.status for r in report] == ["ok"] + ["failed"] * 7, [r.error for r in report]
    expected = ["s3://media-evil/in/v.mp4", "s3://media/in/../private/v.mp4", str(local), "s3://media/elsewhere/out.mp4",
                "s3://media/out/../in/overwrite.mp4", "s3://***@media/in/a.wav", str(tmp_path / "local-out.mp4")]
    for r, uri in zip(report[1:], expected):
        assert r.error_stage == "security" and uri in r.error, r.error
    assert "must not carry credentials" in report[6].error and report[6].audio_uri == "s3://***@media/in/a.wav"

    # never read or written: no request for them, nothing at their outputs, nothing cached for them
    asked = [p for _, p in proxy.requests]
    assert not [p for p in asked if p.startswith(("/media-evil", "/media/private", "/media/elsewhere", "/media/in/overwrite", "/media/in/..", "/media/in/%2e"))]
    assert os.stat(local).st_atime_ns < os.stat(local).st_mtime_ns
    assert not os.path.exists(tmp_path / "local-out.mp4")
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="media").get("Contents", []))
    assert [k for k in keys if k.startswith(("out/", "elsewhere/"))] == ["out/ok.mp4"]
    # the work area keeps only the durable result of the row that ran
    assert len([k for k in keys if k.startswith("cache/hubert/")]) == 2  # the one track's features and speech level
    assert len([k for k in keys if k.startswith("cache/work/")]) == 1 and all(k.startswith("cache/work/results/") for k in keys if k.startswith("cache/work/"))
    assert "in/overwrite.mp4" not in keys

    # the secrets appear nowhere: report, driver logs and output, metrics, Ray's logs of this session
    report_bytes = s3.get_object(Bucket="media", Key="report.parquet")["Body"].read()
    out = capsys.readouterr()
    metrics, deadline = "", time.monotonic() + 60
    while f'job="{result.job_id}"' not in metrics or 'status="ok"' not in metrics:
        assert time.monotonic() < deadline, "the job's metrics never reached the exporter"
        time.sleep(1.0)
        with urllib.request.urlopen(f"http://127.0.0.1:{ray_via_job}/metrics", timeout=10) as r:
            metrics = r.read().decode()
    ours = [line for line in metrics.splitlines() if line.startswith("ray_imgtalk_")]
    assert ours and not [line for line in ours if "://" in line or "@" in line]  # no URI in any label
    places = {"report": report_bytes.decode("latin-1"), "driver log": caplog.text, "stdout": out.out, "stderr": out.err,
              "result": repr(result), "metrics": metrics}
    from ray._private.worker import global_worker

    logs = global_worker.node.get_logs_dir_path()
    for d, _, files in os.walk(logs):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                places[os.path.join(d, f)] = fh.read().decode("latin-1")
    assert len(places) > 10  # Ray's logs really were read
    for secret in (ENV_SECRET, URI_SECRET, URI_SECRET.split("/")[0]):
        leaks = [where for where, text in places.items() if secret in text]
        assert not leaks, (secret, leaks)
