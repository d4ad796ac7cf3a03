"""Deployment files: the Ray cluster launcher config (validated against the schema inside the
ray package), the Dockerfile, the KubeRay manifests, the cluster job config, and the README's
submit command. Docker cannot build here (no engine), so the Dockerfile is checked as text:
base, pins, entry point and every path it copies."""
from __future__ import annotations

import copy
import fnmatch
import glob
import json
import math
import os
import re
import shlex
import tomllib

import jsonschema
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _path(*parts: str) -> str:
    return os.path.join(ROOT, *parts)


def _read(*parts: str) -> str:
    with open(_path(*parts)) as f:
        return f.read()


def _version() -> str:
    with open(_path("pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["version"]


IMAGE = f"ghcr.io/imgtalk-dub/imgtalk:{_version()}"


def _ray_pin() -> str:
    for line in _read("requirements-runtime.txt").splitlines():
        m = re.fullmatch(r"ray(\[[^\]]*\])?==(\S+)", line.strip())
        if m:
            return m.group(2)
    raise AssertionError("requirements-runtime.txt does not pin ray")


# --------------------------------------------------------------------------- ray_cluster.yaml


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(_read("ray_cluster.yaml"))


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    import ray.autoscaler

    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        return json.load(f)


def test_ray_cluster_validates_against_ray_schema(cluster, ray_schema):
    jsonschema.validate(cluster, ray_schema)
    # What `ray up` does before launching anything: merge the provider defaults, then check
    # the cross-field rules the schema cannot express (head type listed, min <= max workers).
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cluster)))


@pytest.mark.parametrize(
    "breakage",
    [
        lambda c: c["available_node_types"]["head"]["resources"].update(CPU=0.5),  # resources are integers
        lambda c: c.update(docker_image=c["docker"]["image"]),  # unknown top-level key
        lambda c: c["docker"].update(gpus="all"),  # unknown docker key
        lambda c: c.pop("provider"),  # required
    ],
)
def test_ray_schema_rejects_broken_variants(cluster, ray_schema, breakage):
    broken = copy.deepcopy(cluster)
    breakage(broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, ray_schema)


def _worker_types(cluster: dict) -> dict[str, dict]:
    return {k: v for k, v in cluster["available_node_types"].items() if k != cluster["head_node_type"]}


def test_ray_cluster_shape(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head must run no stage"
    workers = _worker_types(cluster)
    gpu = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) >= 1}
    cpu = {k: v for k, v in workers.items() if not v["resources"].get("GPU") and v["resources"].get("CPU", 0) >= 8}
    assert gpu and cpu, f"need a GPU and a CPU worker type, got {sorted(workers)}"
    for name, t in workers.items():
        assert t["min_workers"] == 0, f"{name} must scale from zero"
        assert t["max_workers"] >= 1, name
    assert cluster["max_workers"] == sum(t["max_workers"] for t in workers.values())
    for name, t in gpu.items():
        assert "--gpus all" in t["docker"]["worker_run_options"], name
    for name, t in cpu.items():
        assert not any("--gpus" in o for o in t.get("docker", {}).get("worker_run_options", [])), name

    docker = cluster["docker"]
    assert docker["image"] == IMAGE
    assert not any(k in docker for k in ("head_image", "worker_image")), "one image for every node"
    assert docker["disable_automatic_runtime_detection"] is True  # else --runtime=nvidia on CPU nodes
    assert all(len(cmd.strip()) > 0 for cmd in cluster["setup_commands"])
    assert any(f"ray.__version__ == '{_ray_pin()}'" in cmd for cmd in cluster["setup_commands"])
    assert cluster["idle_timeout_minutes"] > 0


def test_ray_cluster_keeps_token_auth_on_and_dashboard_on_loopback(cluster):
    head_start = " ".join(cluster["head_start_ray_commands"])
    worker_start = " ".join(cluster["worker_start_ray_commands"])
    for cmds in (head_start, worker_start):
        assert "RAY_AUTH_MODE=token" in cmds
    assert "--head" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start
    assert "--metrics-export-port=8080" in head_start and "--metrics-export-port=8080" in worker_start
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_file_mounts_and_copies_exist_in_the_repo(cluster):
    for remote, local in cluster["file_mounts"].items():
        if local.startswith(("~", "/")):
            continue  # the operator's own files (the auth token)
        assert os.path.exists(_path(local)), f"ray_cluster.yaml file_mounts[{remote!r}]: {local} not in the repo"
    copies = _dockerfile_copies()
    assert copies
    ignore = [p for p in (ln.strip() for ln in _read(".dockerignore").splitlines()) if p and not p.startswith("#")]
    for src, _ in copies:
        assert os.path.exists(_path(src)), f"deploy/Dockerfile COPY {src}: not in the repo (context = repo root)"
        hit = [p for p in ignore if fnmatch.fnmatch(src, p.replace("**/", "")) or fnmatch.fnmatch(src, p)]
        assert not hit, f".dockerignore {hit} drops {src}, which deploy/Dockerfile copies"


# --------------------------------------------------------------------------- Dockerfile


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for raw in _read("deploy", "Dockerfile").splitlines():
        s = raw.strip()
        if s.startswith("#") or (not s and not buf):
            continue
        if s.endswith("\\"):
            buf += s[:-1].strip() + " "
            continue
        line = (buf + s).strip()
        buf = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not buf, "deploy/Dockerfile ends inside a continuation line"
    return out


def _dockerfile_copies() -> list[tuple[str, str]]:
    """(source in the build context, absolute destination in the image) for every COPY."""
    workdir, copies = "/", []
    for word, args in _dockerfile():
        if word == "WORKDIR":
            workdir = os.path.join(workdir, args)
        elif word == "COPY":
            *srcs, dest = [a for a in shlex.split(args) if not a.startswith("--")]
            dest_abs = os.path.normpath(os.path.join(workdir, dest))
            for src in srcs:
                if len(srcs) == 1 and not dest.endswith("/"):
                    copies.append((os.path.normpath(src), dest_abs))
                else:
                    copies.append((os.path.normpath(src), os.path.join(dest_abs, os.path.basename(src))))
    return copies


# Requirements files of exact pins only (test_requirements_files_pin_exactly checks them).
_PINNED_FILES = ("requirements.txt", "requirements-runtime.txt")
_PINNED = re.compile(r"[A-Za-z0-9_.\-]+(\[[A-Za-z0-9_,.\-]+\])?==[A-Za-z0-9_.+!\-]+")
_OPTIONS_WITH_VALUE = {"-c", "--constraint", "-i", "--index-url", "--extra-index-url", "-f", "--find-links", "--target", "--prefix"}


def unpinned_pip_args(command: str) -> list[str]:
    """What a `pip install` command would resolve without an exact pin: package arguments that
    are not `name==version`, a pin read from a pinned requirements file, such a file itself, or
    the local project installed with --no-deps."""
    tokens = shlex.split(command)
    i = tokens.index("install") + 1
    no_deps = "--no-deps" in tokens
    bad = []
    while i < len(tokens):
        t = tokens[i]
        if t in ("-r", "--requirement"):
            if tokens[i + 1] not in _PINNED_FILES:
                bad.append(f"-r {tokens[i + 1]}")
            i += 2
            continue
        if t in _OPTIONS_WITH_VALUE:
            i += 2
            continue
        if not t.startswith("-"):
            from_requirements = t.startswith("$(") and any(f in t for f in _PINNED_FILES)
            local_project = t == "." and no_deps
            if not (_PINNED.fullmatch(t) or from_requirements or local_project):
                bad.append(t)
        i += 1
    return bad


@pytest.mark.parametrize(
    "command, bad",
    [
        ("pip install torch", ["torch"]),
        ("pip install 'numpy>=2' pyyaml==6.0.4", ["numpy>=2"]),
        ("pip install -r requirements-dev.txt", ["-r requirements-dev.txt"]),
        ("pip install .", ["."]),
        ("pip install --no-deps .", []),
        ("pip install --index-url https://x/simple \"$(grep '^torch==' requirements.txt)\"", []),
        ("python -m pip install -q ray[default,data]==2.60.0 -r requirements.txt", []),
    ],
)
def test_pin_checker(command, bad):
    assert unpinned_pip_args(command) == bad


def _pip_installs() -> list[str]:
    found = []
    for word, args in _dockerfile():
        if word != "RUN":
            continue
        for part in re.split(r"&&|\|\||;", args):
            m = re.search(r"\b(?:python[\d.]*\s+-m\s+)?pip3?\s+install\b.*", part)
            if m:
                found.append(m.group(0).strip())
    return found


def test_dockerfile():
    instructions = _dockerfile()
    froms = [a for w, a in instructions if w == "FROM"]
    assert len(froms) == 1
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)(?:\.\d+)?-[a-z-]*ubuntu\d\d\.\d\d", froms[0])
    assert m and int(m.group(1)) >= 12, f"not a CUDA 12+ base: {froms[0]}"

    runs = [a for w, a in instructions if w == "RUN"]
    apt = [r for r in runs if "apt-get install" in r]
    assert apt and "python3.11" in apt[0].split()

    pips = _pip_installs()
    assert any("-r requirements-runtime.txt" in p for p in pips), "requirements-runtime.txt is not installed"
    for p in pips:
        assert unpinned_pip_args(p) == [], f"deploy/Dockerfile: unpinned `{p}`"
    # The CUDA build of torch, or no image.
    assert any("torch.version.cuda" in r for r in runs)

    cmd = [a for w, a in instructions if w == "CMD"]
    assert len(cmd) == 1 and json.loads(cmd[0])[0] == "imgtalk"
    # The launcher runs `docker run IMAGE bash`, KubeRay overrides the command: no ENTRYPOINT.
    assert not [a for w, a in instructions if w == "ENTRYPOINT"]
    users = [a for w, a in instructions if w == "USER"]
    assert users and users[-1] not in ("root", "0")
    env = " ".join(a for w, a in instructions if w == "ENV")
    assert "HOME=/home/" + users[-1] in env  # the launcher mounts files under the image's $HOME

    text = _read("deploy", "Dockerfile")
    assert f"docker build -f deploy/Dockerfile -t {IMAGE} ." in text
    assert f'org.opencontainers.image.version="{_version()}"' in text


def _requirement_lines(name: str, seen: tuple = ()) -> list[str]:
    """The requirement lines of a requirements file, `-r` includes expanded."""
    assert name not in seen, f"{name} includes itself"
    out = []
    for line in _read(name).splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith(("-r ", "--requirement ")):
            out += _requirement_lines(line.split(None, 1)[1], (*seen, name))
        elif line:
            out.append(line)
    return out


def _dist_name(requirement: str) -> str:
    return re.split(r"[\[=<>!~ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_requirements_files_pin_exactly():
    for name in _PINNED_FILES:
        for line in _requirement_lines(name):
            assert _PINNED.fullmatch(line), f"{name}: {line!r} is not an exact pin"
    # CI installs the image's set and the test pins on top, never another version of one.
    runtime = {_dist_name(r): r for r in _requirement_lines("requirements-runtime.txt")}
    everything = {_dist_name(r): r for r in _requirement_lines("requirements.txt")}
    assert runtime.items() <= everything.items()


def test_image_installs_no_test_packages():
    """The production image ships the runtime set only: none of pyproject's `test` extra
    (pytest, moto, prometheus-client), and no espeak-ng (only the demo speaks)."""
    with open(_path("pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    test_only = {_dist_name(r) for r in project["optional-dependencies"]["test"]}
    assert {"pytest", "moto"} <= test_only
    runtime = {_dist_name(r) for r in project["dependencies"]}
    assert not test_only & runtime, "a test package is also a runtime dependency in pyproject.toml"

    installed = set()
    for command in _pip_installs():
        tokens = shlex.split(command)
        for i, t in enumerate(tokens):
            if t in ("-r", "--requirement"):
                installed |= {_dist_name(r) for r in _requirement_lines(tokens[i + 1])}
            elif _PINNED.fullmatch(t):
                installed.add(_dist_name(t))
    assert "torch" in installed and "ray" in installed  # the parse found the real installs
    assert not installed & test_only, f"deploy/Dockerfile installs test packages {sorted(installed & test_only)}"
    apt = " ".join(a for w, a in _dockerfile() if w == "RUN" and "apt-get install" in a).split()
    assert "espeak-ng" not in apt
    # nothing that is not the project's code either: no tests folder copied in
    assert not [src for src, _ in _dockerfile_copies() if src.startswith("tests") or src == "requirements.txt"]


def test_no_credentials_in_deployment_files():
    pattern = re.compile(r"AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|AWS_SESSION_TOKEN|AKIA[0-9A-Z]{16}|RAY_AUTH_MODE=disabled")
    for parts in [("ray_cluster.yaml",), ("deploy", "Dockerfile"), ("deploy", "job.cluster.yaml"),
                  ("deploy", "kuberay", "raycluster.yaml"), ("deploy", "kuberay", "rayjob.yaml")]:
        text = _read(*parts)
        assert not pattern.search(text), f"{os.path.join(*parts)}: {pattern.search(text).group(0)}"


# --------------------------------------------------------------------------- KubeRay


@pytest.fixture(scope="module")
def kuberay() -> dict[str, dict]:
    docs = []
    for name in ("raycluster.yaml", "rayjob.yaml"):
        docs += [d for d in yaml.safe_load_all(_read("deploy", "kuberay", name)) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert set(by_kind) >= {"RayCluster", "RayJob"}
    for d in docs:
        if d["kind"] in ("RayCluster", "RayJob"):
            assert d["apiVersion"] == "ray.io/v1"
    return by_kind


def _containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _cpu(q: str) -> float:
    return float(q[:-1]) / 1000 if str(q).endswith("m") else float(q)


def test_raycluster_fields(kuberay):
    spec = kuberay["RayCluster"]["spec"]
    assert spec["rayVersion"] == _ray_pin()
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "dashboard-host" in head["rayStartParams"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "the dashboard must not be exposed outside the cluster"
    for group in [head, *spec["workerGroupSpecs"]]:
        # KubeRay passes these to `ray start` as strings; a YAML number is rejected.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
    for c in _containers(spec):
        assert c["image"] == IMAGE
        assert not [e for e in c.get("env", []) if "SECRET" in e["name"] or "ACCESS_KEY" in e["name"]]

    gpu = [g for g in spec["workerGroupSpecs"] if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    cpu = [g for g in spec["workerGroupSpecs"] if g not in gpu]
    assert gpu and cpu
    for g in gpu:
        assert g["minReplicas"] == 0 and g["maxReplicas"] >= 1
        assert int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        tolerations = g["template"]["spec"]["tolerations"]
        assert any(t["key"] == "nvidia.com/gpu" and t.get("effect") == "NoSchedule" for t in tolerations)
    for g in cpu:
        assert g["minReplicas"] == 0 and g["maxReplicas"] >= 1


def test_rayjob_fields(kuberay):
    from pipeline.cli import build_parser

    job = kuberay["RayJob"]["spec"]
    assert job["rayClusterSpec"] == kuberay["RayCluster"]["spec"], "rayjob.yaml's rayClusterSpec drifted from raycluster.yaml"
    assert job["shutdownAfterJobFinishes"] is True
    assert job["submissionMode"] in ("K8sJobMode", "HTTPMode")
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["imgtalk", "dub"]
    args = build_parser().parse_args(argv[1:])
    assert args.address == "auto"
    assert all(u.startswith("s3://") for u in (args.manifest, args.weights, args.output_report))
    # The config it names is inside the image, copied from a repo file that loads.
    copied = {dest: src for src, dest in _dockerfile_copies()}
    assert args.config in copied, f"{args.config} is not copied into the image"
    from pipeline.config import load_job_config

    load_job_config(_path(copied[args.config]))
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    assert set(runtime_env) == {"env_vars"}
    assert runtime_env["env_vars"]["AWS_ENDPOINT_URL_S3"].startswith("https://")


def test_metrics_port_and_podmonitor_match_the_manifests(kuberay):
    spec = kuberay["RayCluster"]["spec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        port = int(group["rayStartParams"]["metrics-export-port"])
        for c in group["template"]["spec"]["containers"]:
            assert {"containerPort": port, "name": "metrics"} in c["ports"]
    guide = _read("deploy", "MONITORING.md")
    snippets = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", guide, re.S)]
    monitors = [d for d in snippets if d.get("kind") == "PodMonitor"]
    assert len(monitors) == 1
    monitor = monitors[0]["spec"]
    assert monitor["selector"]["matchLabels"] == {"ray.io/cluster": kuberay["RayCluster"]["metadata"]["name"]}
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    # The job's own `job` label (the job id) is what the dashboard selects on.
    assert endpoint["honorLabels"] is True
    for path in sorted(set(re.findall(r"`((?:deploy|pipeline|tests|benchmarks)/[\w./-]+|ray_cluster\.yaml)`", guide))):
        assert os.path.exists(_path(path)), f"deploy/MONITORING.md names {path}, which is not in the repo"


# --------------------------------------------------------------------------- job config


@pytest.fixture(scope="module")
def job_config():
    from pipeline.config import load_job_config

    return load_job_config(_path("deploy", "job.cluster.yaml"))


def test_cluster_job_config(job_config):
    pools = job_config.pools
    assert pools["complete"].num_gpus == 1, "one completion actor per GPU"
    for name in ("audio", "motion"):
        assert 0 < pools[name].num_gpus < 1, f"{name} shares a GPU"
    for name, p in pools.items():
        assert p.memory_gb, f"pools.{name}.memory_gb: a cluster job reserves memory"
        if name not in ("audio", "motion", "complete"):
            assert p.num_gpus == 0, name
    assert job_config.cache_uri.startswith("s3://") and (job_config.work_uri or "").startswith("s3://")
    # Manifests come from other teams: a cluster job names where rows may point.
    sec = job_config.security
    assert sec.allowed_input_prefixes and sec.allowed_output_prefixes
    assert all(p.startswith("s3://") for p in sec.allowed_input_prefixes + sec.allowed_output_prefixes)
    assert job_config.max_failed_videos is not None


def _demand(job_config) -> tuple[float, float]:
    pools = job_config.pools.values()
    return sum(p.size * p.num_cpus for p in pools), sum(p.size * p.num_gpus for p in pools)


def test_job_config_fits_the_launcher_cluster(job_config, cluster):
    workers = _worker_types(cluster).values()
    cpus = sum(t["max_workers"] * t["resources"].get("CPU", 0) for t in workers)
    gpus = sum(t["max_workers"] * t["resources"].get("GPU", 0) for t in workers)
    need_cpu, need_gpu = _demand(job_config)
    assert need_cpu <= cpus and need_gpu <= gpus, (need_cpu, cpus, need_gpu, gpus)
    assert gpus - need_gpu < 1, f"{gpus - need_gpu:g} GPUs left idle at full size"
    for name, p in job_config.pools.items():
        assert any(t["resources"].get("CPU", 0) >= p.num_cpus and t["resources"].get("GPU", 0) >= p.num_gpus for t in workers), name


def test_job_config_fits_the_kuberay_cluster(job_config, kuberay):
    groups = kuberay["RayCluster"]["spec"]["workerGroupSpecs"]
    limits = [(g["maxReplicas"], g["template"]["spec"]["containers"][0]["resources"]["limits"]) for g in groups]
    cpus = sum(n * _cpu(lim["cpu"]) for n, lim in limits)
    gpus = sum(n * int(lim.get("nvidia.com/gpu", 0)) for n, lim in limits)
    need_cpu, need_gpu = _demand(job_config)
    assert need_cpu <= cpus and need_gpu <= gpus, (need_cpu, cpus, need_gpu, gpus)
    assert gpus - need_gpu < 1
    for name, p in job_config.pools.items():
        assert any(_cpu(lim["cpu"]) >= p.num_cpus and int(lim.get("nvidia.com/gpu", 0)) >= math.ceil(p.num_gpus) for _, lim in limits), name


# --------------------------------------------------------------------------- README


def test_readme_operator_guide_submit_command_parses():
    from pipeline.cli import build_parser

    readme = _read("README.md")
    guide_at, layout_at = readme.find("## Operator guide"), readme.find("## Layout")
    assert 0 <= guide_at < layout_at, "README: the Operator guide comes just before Layout"
    guide = readme[guide_at:layout_at]
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", guide, re.S)
    submits = [b for b in blocks if "ray job submit" in b]
    assert submits
    command = re.sub(r"\\\n\s*", " ", submits[0])
    command = command[command.index("ray job submit"):].splitlines()[0]
    ray_part, _, entry = command.partition(" -- ")
    assert "--working-dir ." in ray_part and "--address" in ray_part
    argv = shlex.split(entry)
    assert argv[:2] == ["imgtalk", "dub"]
    args = build_parser().parse_args(argv[1:])
    assert args.address == "auto" and args.config == "deploy/job.cluster.yaml"
    for words in ("ray job logs", "ray job status", "ray job stop", "RAY_AUTH_TOKEN", "num_gpus"):
        assert words in guide, f"README Operator guide: nothing about {words!r}"


def test_prepare_and_train_configs_fit_the_launcher_cluster(cluster):
    from pipeline.prepare.config import load_prepare_config
    from pipeline.train.config import load_train_config

    workers = _worker_types(cluster).values()
    cpus = sum(t["max_workers"] * t["resources"].get("CPU", 0) for t in workers)
    gpus = sum(t["max_workers"] * t["resources"].get("GPU", 0) for t in workers)
    prepare = load_prepare_config(_path("deploy", "prepare.cluster.yaml"))
    need_cpu = sum(p.size * p.num_cpus for p in prepare.pools.values())
    need_gpu = sum(p.size * p.num_gpus for p in prepare.pools.values())
    assert need_cpu <= cpus and need_gpu <= gpus, (need_cpu, cpus, need_gpu, gpus)
    assert prepare.cache_uri.startswith("s3://") and prepare.security.allowed_input_prefixes
    for name in ("train.cluster.yaml", "train.stage2.cluster.yaml"):
        train = load_train_config(_path("deploy", name))
        assert train.use_gpu and train.num_workers == gpus, f"{name}: one DDP rank per GPU"
        assert train.num_workers * train.cpus_per_worker <= cpus, name
        # Multi-node training needs storage every node reaches: never a node-local path.
        assert train.storage_path.startswith("s3://"), name
    assert load_train_config(_path("deploy", "train.stage2.cluster.yaml")).stage2.gradient_checkpointing


# --------------------------------------------------------------------------- the demo bundle's recipe


def test_every_config_the_demo_bundle_script_names_exists_and_loads():
    """scripts/train_demo_bundle.sh reproduces the committed bundle: each config it passes
    must exist and pass its job's schema (a misspelt option would stop the script half-way)."""
    from pipeline.prepare.config import load_prepare_config
    from pipeline.train.config import load_train_config

    script = _read("scripts", "train_demo_bundle.sh")
    named = re.findall(r"--config (deploy/demo/\S+\.yaml)", script)
    assert len(named) >= 8
    assert set(named) == {os.path.relpath(p, ROOT) for p in glob.glob(_path("deploy", "demo", "*.yaml"))}
    for path in set(named):
        if os.path.basename(path) == "prepare.yaml":
            load_prepare_config(_path(path))
        else:
            cfg = load_train_config(_path(path))
            assert cfg.storage_path == "demo_train/runs", path  # the script clears it before training
