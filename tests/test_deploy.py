"""Tests for deploy/: launcher config, KubeRay manifests, images, job submission.

(a) deploy/cluster.yaml validates against the JSON schema shipped inside the
    installed ray package (the one `ray up` uses).
(b) The KubeRay manifests parse and use the ray.io/v1 RayCluster / RayJob
    fields, with token auth on and nothing exposed outside the cluster.
(c) deploy/submit_job.py submits jobs to a real Ray head that this module
    starts with `ray start --head --block` (token auth on, loopback dashboard,
    its own temp dir and ports) and stops again by signalling that one process:
    never `ray stop`, which would stop every Ray instance on the machine.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
CLUSTER_YAML = DEPLOY / "cluster.yaml"
RAYCLUSTER_YAML = DEPLOY / "kuberay" / "raycluster.yaml"
RAYJOB_YAML = DEPLOY / "kuberay" / "rayjob.yaml"
SUBMIT = DEPLOY / "submit_job.py"
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cuda"]
PUBLIC_HOSTS = {"0.0.0.0", "::", "[::]"}


def _yaml():
    return pytest.importorskip("yaml")


def _load(path: Path):
    return _yaml().safe_load(path.read_text())


def _load_all(path: Path) -> list:
    return [d for d in _yaml().safe_load_all(path.read_text()) if d is not None]


def _walk(obj, path=()):
    """Yield (path, key, value) for every mapping entry in a nested structure."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield path, k, v
            yield from _walk(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk(v, path + (i,))


def _submit_module():
    spec = importlib.util.spec_from_file_location("distgrad_deploy_submit_job", SUBMIT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------
# Every file: no credential in the repository, pinned versions agree.
# ---------------------------------------------------------------------------

def _deploy_text_files():
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def test_deploy_files_exist():
    for p in [CLUSTER_YAML, RAYCLUSTER_YAML, RAYJOB_YAML, SUBMIT, DEPLOY / "README.md", *DOCKERFILES]:
        assert p.is_file(), f"missing {p.relative_to(REPO)}"


def test_no_token_is_hard_coded():
    # A Ray token is 64 hex chars (`ray get-auth-token --generate`); catch that,
    # and any literal value given to RAY_AUTH_TOKEN (a $VAR or $(cmd) is fine).
    literal = re.compile(r"RAY_AUTH_TOKEN\s*[=:]\s*['\"]?(?![$'\"<{])[A-Za-z0-9+/_.=-]{8,}")
    for p in _deploy_text_files():
        text = p.read_text()
        assert not re.search(r"\b[0-9a-f]{64}\b", text), f"{p.name}: looks like a hard-coded token"
        assert not literal.search(text), f"{p.name}: RAY_AUTH_TOKEN set to a literal: {literal.search(text).group(0)}"


def _ray_versions_pinned():
    found = {}
    for p in [CLUSTER_YAML, RAYCLUSTER_YAML, RAYJOB_YAML, *DOCKERFILES]:
        for m in re.finditer(r"rayproject/ray:(\d+\.\d+\.\d+)", p.read_text()):
            found.setdefault(m.group(1), set()).add(p.name)
    for p in [RAYCLUSTER_YAML, RAYJOB_YAML]:
        for _, k, v in _walk(_load_all(p)):
            if k == "rayVersion":
                found.setdefault(str(v), set()).add(p.name)
    return found


def test_ray_version_is_the_same_everywhere():
    # Head, workers, submitter and client must run one Ray version.
    found = _ray_versions_pinned()
    assert len(found) == 1, f"different Ray versions pinned in deploy/: {found}"
    (version,) = found
    major, minor = (int(x) for x in version.split(".")[:2])
    assert (major, minor) >= (2, 52), "Ray token authentication needs Ray >= 2.52"


def test_readme_documents_every_file():
    readme = (DEPLOY / "README.md").read_text()
    for name in ["cluster.yaml", "raycluster.yaml", "rayjob.yaml", "Dockerfile", "Dockerfile.cuda",
                 "submit_job.py", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "ray get-auth-token",
                 "kubectl create secret", "port-forward"]:
        assert name in readme, f"deploy/README.md does not mention {name}"


# ---------------------------------------------------------------------------
# (a) Ray cluster launcher config
# ---------------------------------------------------------------------------

def test_cluster_yaml_validates_against_ray_schema():
    jsonschema = pytest.importorskip("jsonschema")
    autoscaler = pytest.importorskip("ray.autoscaler")
    schema_path = Path(autoscaler.__file__).parent / "ray-schema.json"
    assert schema_path.is_file(), f"ray ships no launcher schema at {schema_path}"
    schema = json.loads(schema_path.read_text())
    config = _load(CLUSTER_YAML)
    jsonschema.validate(config, schema)
    # The same file after `ray up`'s own preprocessing (defaults merged in).
    from ray.autoscaler._private.util import prepare_config, validate_config
    validate_config(prepare_config(config))


def _start_commands(config, which):
    cmds = config[which]
    assert any("ray start" in c for c in cmds), f"{which} never runs `ray start`"
    return [c for c in cmds if "ray start" in c]


def test_cluster_yaml_token_auth_on_every_node():
    config = _load(CLUSTER_YAML)
    run_options = " ".join(config["docker"]["run_options"])
    assert re.search(r"RAY_AUTH_MODE=token\b", run_options), "containers must run with RAY_AUTH_MODE=token"
    for which in ("head_start_ray_commands", "worker_start_ray_commands"):
        for cmd in _start_commands(config, which):
            assert re.search(r"RAY_AUTH_MODE=token\b", cmd), f"{which}: `ray start` without RAY_AUTH_MODE=token"
    # The token travels from the laptop's token file, never inline.
    assert "~/.ray/auth_token" in config["file_mounts"].values()
    assert not any("RAY_AUTH_MODE=disabled" in c for c in config.get("setup_commands", []))


def test_cluster_yaml_dashboard_not_public():
    config = _load(CLUSTER_YAML)
    (head_start,) = _start_commands(config, "head_start_ray_commands")
    m = re.search(r"--dashboard-host[= ](\S+)", head_start)
    # Ray's own default would be localhost too, but say it explicitly.
    assert m, "head `ray start` must set --dashboard-host"
    assert m.group(1).strip("'\"") not in PUBLIC_HOSTS
    # No inbound rule opening Ray's ports to the world.
    for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
        ranges = [r.get("CidrIp") for r in rule.get("IpRanges", [])]
        assert "0.0.0.0/0" not in ranges or rule.get("FromPort") == rule.get("ToPort") == 22, rule


def test_cluster_yaml_installs_distgrad():
    config = _load(CLUSTER_YAML)
    setup = config["setup_commands"]
    assert any(re.search(r"pip install .*distgrad", c) for c in setup), setup
    excluded = set(config.get("rsync_exclude", []))
    assert {".git", ".ci-venv"} <= excluded


# ---------------------------------------------------------------------------
# (b) KubeRay manifests
# ---------------------------------------------------------------------------

def _one(path, kind):
    docs = _load_all(path)
    objs = [d for d in docs if d.get("kind") == kind]
    assert len(objs) == 1, f"{path.name}: expected one {kind}, found {[d.get('kind') for d in docs]}"
    # A Secret with the token in it must not be committed.
    for d in docs:
        assert not (d.get("kind") == "Secret" and (d.get("data") or d.get("stringData"))), \
            f"{path.name} commits a Secret with data"
    obj = objs[0]
    assert obj["apiVersion"] == "ray.io/v1"
    assert obj["metadata"]["name"]
    return obj


def _groups(cluster_spec):
    head = cluster_spec["headGroupSpec"]
    workers = cluster_spec["workerGroupSpecs"]
    assert isinstance(workers, list) and workers
    return head, workers


def _containers(group):
    containers = group["template"]["spec"]["containers"]
    assert containers and all(c.get("image") for c in containers)
    return containers


def _check_cluster_spec(cluster_spec, where):
    head, workers = _groups(cluster_spec)
    assert str(cluster_spec.get("rayVersion", "")), f"{where}: set rayVersion"
    for group in [head, *workers]:
        params = group["rayStartParams"]
        assert isinstance(params, dict)
        # The CRD types rayStartParams as map[string]string.
        assert all(isinstance(v, str) for v in params.values()), f"{where}: rayStartParams values must be strings"
        _containers(group)
        spec = group["template"]["spec"]
        assert not spec.get("hostNetwork"), f"{where}: hostNetwork exposes Ray on the node"
    for w in workers:
        assert w["groupName"]
        assert 0 <= w["minReplicas"] <= w["replicas"] <= w["maxReplicas"]
    _check_token_auth(cluster_spec, where)
    _check_not_exposed(cluster_spec, where)


def _env(container):
    return {e["name"]: e for e in container.get("env", [])}


def _check_token_auth(cluster_spec, where):
    head, workers = _groups(cluster_spec)
    ray_containers = [_containers(g)[0] for g in [head, *workers]]  # the Ray container comes first
    operator_managed = (cluster_spec.get("authOptions") or {}).get("mode") == "token"
    for c in ray_containers:
        env = _env(c)
        mode = env.get("RAY_AUTH_MODE", {}).get("value")
        token = env.get("RAY_AUTH_TOKEN")
        if operator_managed:
            # KubeRay injects both variables from the Secret it generates;
            # setting them too would shadow or duplicate its values.
            assert mode is None and token is None, f"{where}/{c['name']}: authOptions already sets the token"
        else:
            assert mode == "token", f"{where}/{c['name']}: RAY_AUTH_MODE must be token"
            assert token is not None, f"{where}/{c['name']}: RAY_AUTH_TOKEN missing"
            assert "value" not in token, f"{where}/{c['name']}: token must come from a Secret"
            ref = token["valueFrom"]["secretKeyRef"]
            assert ref["name"] and ref["key"]
    if operator_managed:
        major, minor = (int(x) for x in cluster_spec["rayVersion"].split(".")[:2])
        assert (major, minor) >= (2, 52), "authOptions needs rayVersion >= 2.52.0"


def _check_not_exposed(cluster_spec, where):
    head, _ = _groups(cluster_spec)
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: head service must be ClusterIP"
    assert not head.get("enableIngress", False), f"{where}: no Ingress for the dashboard"
    svc_type = (head.get("headService") or {}).get("spec", {}).get("type", "ClusterIP")
    assert svc_type == "ClusterIP", f"{where}: headService must be ClusterIP"
    for path, k, v in _walk(cluster_spec):
        assert k != "hostPort", f"{where}: hostPort at {path} exposes a port on the node"
        assert v not in ("NodePort", "LoadBalancer"), f"{where}: {k}={v} at {path}"


def test_raycluster_manifest():
    rc = _one(RAYCLUSTER_YAML, "RayCluster")
    _check_cluster_spec(rc["spec"], "RayCluster")
    ports = {p["name"]: p["containerPort"] for p in _containers(rc["spec"]["headGroupSpec"])[0]["ports"]}
    assert ports.get("dashboard") == 8265 and ports.get("client") == 10001


def test_rayjob_manifest_runs_the_demo():
    rj = _one(RAYJOB_YAML, "RayJob")
    spec = rj["spec"]
    entry = shlex.split(spec["entrypoint"])
    assert entry[:2] == ["distgrad", "demo"], spec["entrypoint"]
    assert "--address" in entry and entry[entry.index("--address") + 1] == "auto"
    assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode")
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["activeDeadlineSeconds"] > 0
    assert "clusterSelector" not in spec, "the RayJob brings its own rayClusterSpec"
    _check_cluster_spec(spec["rayClusterSpec"], "RayJob")
    # With operator-managed auth KubeRay gives the submitter the token; with a
    # user Secret the submitter needs it explicitly.
    if (spec["rayClusterSpec"].get("authOptions") or {}).get("mode") != "token":
        sub = spec["submitterPodTemplate"]["spec"]["containers"][0]
        assert _env(sub)["RAY_AUTH_MODE"]["value"] == "token"
        assert "secretKeyRef" in _env(sub)["RAY_AUTH_TOKEN"]["valueFrom"]


# ---------------------------------------------------------------------------
# Container images
# ---------------------------------------------------------------------------

def _dockerfile_instructions(path):
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _package_dirs():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    dirs = set(meta["tool"]["setuptools"].get("package-dir", {}).values())
    top = {d.split("/")[0] for d in dirs}
    return top, meta["project"].get("readme")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile(dockerfile):
    ins = _dockerfile_instructions(dockerfile)
    args = {rest.split("=")[0]: rest.split("=", 1)[1] for w, rest in ins if w == "ARG" and "=" in rest}
    froms = [rest for w, rest in ins if w == "FROM"]
    assert len(froms) == 1
    base = froms[0].split()[0]
    base = args.get(base.strip("${}"), base)
    assert base.startswith(("rayproject/ray:", "python:")), base
    if dockerfile.name.endswith(".cuda"):
        assert re.search(r"-(gpu|cu\d+)$", base), f"CUDA image should start from a CUDA base, got {base}"
    # Every COPY source exists; together they cover what the build needs.
    copied = set()
    for w, rest in ins:
        if w == "COPY":
            parts = [p for p in rest.split() if not p.startswith("--")]
            for src in parts[:-1]:
                assert (REPO / src).exists(), f"{dockerfile.name}: COPY source {src} not in the repo"
                copied.add(src.rstrip("/"))
    top, readme = _package_dirs()
    missing = (top | {"pyproject.toml", readme}) - copied
    assert not missing, f"{dockerfile.name} does not COPY {sorted(missing)}"
    runs = " ".join(rest for w, rest in ins if w == "RUN")
    want = r"pip install \"?\.\[gpu\]" if dockerfile.name.endswith(".cuda") else r"pip install \.(\s|$)"
    assert re.search(want, runs), runs
    envs = " ".join(rest for w, rest in ins if w in ("ENV", "ARG"))
    assert "RAY_AUTH_MODE=token" in envs
    assert "RAY_AUTH_TOKEN" not in envs.replace("RAY_AUTH_TOKEN_PATH", ""), "never bake a token into an image"
    users = [rest for w, rest in ins if w == "USER"]
    assert not users or users[-1] not in ("root", "0"), "the image must not run as root"


@pytest.mark.slow
def test_dockerfile_copy_set_builds_a_wheel(tmp_path):
    """Build a wheel from exactly what deploy/Dockerfile copies, as `pip install .` in it does."""
    ins = _dockerfile_instructions(DOCKERFILES[0])
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    for w, rest in ins:
        if w == "COPY":
            parts = [p for p in rest.split() if not p.startswith("--")]
            for src in parts[:-1]:
                s = REPO / src
                if s.is_dir():
                    shutil.copytree(s, ctx / src.rstrip("/"), ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                else:
                    shutil.copy2(s, ctx / src)

    def build(src, out):
        return subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
            capture_output=True, text=True, timeout=300)

    r = build(ctx, tmp_path / "whl")
    if r.returncode != 0:
        # No skip here: a skip would hide a real failure (an old setuptools in the test venv
        # is one: `pip install ".[test]"` brings a current one).
        full = build(REPO, tmp_path / "whl-full")
        if full.returncode != 0:
            pytest.fail("the project does not build a wheel (is setuptools >= 70.1 installed?):\n"
                        + full.stderr[-2000:])
        pytest.fail("the repo builds but the Dockerfile's COPY set does not:\n" + r.stderr[-2000:])
    import zipfile
    (whl,) = (tmp_path / "whl").glob("*.whl")
    names = zipfile.ZipFile(whl).namelist()
    for pkg in ("distgrad/__init__.py", "distgrad/workers/__init__.py", "distgrad/scheduler/__init__.py"):
        assert pkg in names, f"{pkg} missing from the image's wheel"


# ---------------------------------------------------------------------------
# submit_job.py, no cluster needed
# ---------------------------------------------------------------------------

def test_submit_job_helpers(monkeypatch, tmp_path):
    sj = _submit_module()
    assert sj.parse_env(["A=1", "B=x=y"]) == {"A": "1", "B": "x=y"}
    with pytest.raises(sj.SubmitError):
        sj.parse_env(["NOEQUALS"])
    with pytest.raises(sj.SubmitError):
        sj.parse_env(["RAY_AUTH_TOKEN=abc"])  # never through the runtime env

    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert sj.read_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-default\n")
    assert sj.read_token() == "from-default"
    f = tmp_path / "tok"
    f.write_text("  from-path \n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(f))
    assert sj.read_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert sj.read_token() == "from-env"
    assert sj.read_token(str(f)) == "from-path"  # --token-file wins
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(sj.SubmitError):
        sj.read_token(str(tmp_path / "empty"))

    args = sj.make_parser().parse_args(
        ["--working-dir", str(REPO), "--env", "K=V", "--pip", "tqdm", "--", "python", "-c", "print(1)"])
    env = sj.build_runtime_env(args)
    assert env["working_dir"] == str(REPO)
    assert {".git", ".ci-venv"} <= set(env["excludes"])
    assert env["env_vars"] == {"K": "V"} and env["pip"] == ["tqdm"]
    assert args.entrypoint[-3:] == ["python", "-c", "print(1)"]


def test_submit_job_default_address(monkeypatch):
    sj = _submit_module()
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_DASHBOARD_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    assert sj.default_address() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # a GCS address is not the job server
    assert sj.default_address() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert sj.default_address() == "http://head:8265"
    monkeypatch.setenv("RAY_DASHBOARD_ADDRESS", "http://svc:8265")  # what KubeRay's submitter sets
    assert sj.default_address() == "http://svc:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://api:8265")
    assert sj.default_address() == "http://api:8265"


def test_submit_job_refuses_auth_vars_from_every_source():
    sj = _submit_module()
    parse = sj.make_parser().parse_args
    for argv in (["--env", "RAY_AUTH_TOKEN=abc"], ["--env", "ray_auth_mode=token"],
                 ["--runtime-env-json", '{"env_vars": {"RAY_AUTH_TOKEN": "abc"}}'],
                 ["--runtime-env-json", '{"env_vars": {"RAY_AUTH_TOKEN_PATH": "/t"}}']):
        with pytest.raises(sj.SubmitError, match="(?i)ray_auth_.*must not travel"):
            sj.build_runtime_env(parse(argv))
    with pytest.raises(sj.SubmitError, match="env_vars must map names to string values"):
        sj.build_runtime_env(parse(["--runtime-env-json", '{"env_vars": ["A"]}']))
    env = sj.build_runtime_env(parse(["--runtime-env-json", '{"env_vars": {"A": "1"}}',
                                      "--env", "B=2"]))
    assert env["env_vars"] == {"A": "1", "B": "2"}


@pytest.mark.parametrize("address,ok", [
    ("https://head.example:8265", True), ("http://127.0.0.1:8265", True),
    ("http://127.3.4.5:8265", True), ("http://[::1]:8265", True), ("http://localhost:8265", True),
    ("http://10.0.0.5:8265", False), ("http://head:8265", False), ("http://[::ffff:10.0.0.1]:8265", False),
    ("ftp://127.0.0.1", False), ("127.0.0.1:8265", False), ("https://", False)])
def test_submit_job_sends_the_token_only_over_https_or_loopback(address, ok, monkeypatch):
    sj = _submit_module()
    sent = []

    class Client:                         # stands in for Ray's client: records the header
        def __init__(self, addr, headers):
            sent.append(headers)
    import ray.job_submission
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", Client)
    if ok:
        sj.connect(address, "tok", 1.0)
        assert sent == [{"Authorization": "Bearer tok"}]
    else:
        with pytest.raises(sj.SubmitError, match="--address"):
            sj.connect(address, "tok", 1.0)
        assert not sent, "the token left for a refused address"


def test_submit_job_refuses_without_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token there
    r = subprocess.run([sys.executable, str(SUBMIT), "--address", "http://127.0.0.1:9"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "no Ray auth token" in r.stderr


# ---------------------------------------------------------------------------
# (c) A real Ray head with token auth, and jobs submitted to it
# ---------------------------------------------------------------------------

def _free_ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _session_members(sid):
    """PIDs whose session id is ``sid``: the head we started and all it spawned."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:  # field 6 of /proc/PID/stat: session
                pids.append(int(d.name))
    return pids


def _clean_env():
    """This process's environment without any Ray settings (e.g. a RAY_ADDRESS left by ray.init)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}


class _Head:
    def __init__(self, tmp):
        self.tmp = tmp
        self.token = secrets.token_hex(32)
        self.token_file = tmp / "auth_token"
        self.token_file.write_text(self.token)
        self.token_file.chmod(0o600)
        (gcs, self.dashboard_port, client, nm, om, agent_http, agent_grpc, rte, metrics) = _free_ports(9)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        env = _clean_env()
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_file), RAY_USAGE_STATS_ENABLED="0")
        # Jobs that say `python` (as the README's do) get this interpreter, as on a cluster
        # whose image has distgrad's Python first on PATH.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        # The job server listens on 127.0.0.1 only. (`ray start` maps a loopback
        # --node-ip-address to the machine's address anyway, so GCS and the
        # other ports take the free ports picked here, behind the token.)
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
               f"--port={gcs}",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
               f"--ray-client-server-port={client}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
               f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--runtime-env-agent-port={rte}", f"--metrics-export-port={metrics}",
               "--num-cpus=4", f"--temp-dir={tmp / 'ray'}", "--disable-usage-stats"]
        self.log = open(tmp / "head.log", "w")
        # A new session: every process the head spawns stays in it, so the
        # teardown can find exactly ours.
        self.proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def request(self, path, token=None):
        req = urllib.request.Request(self.address + path)
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def wait_ready(self, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.request("/api/jobs/", self.token) == 200:
                    return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the Ray head did not come up in {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n=4000):
        self.log.flush()
        return (self.tmp / "head.log").read_text()[-n:]

    def stop(self):
        sid = self.proc.pid
        if self.proc.poll() is None:
            # `ray start --block` tears down its own processes on SIGTERM.
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _session_members(sid) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in _session_members(sid):  # stragglers: only processes of our session
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()


@pytest.fixture(scope="module")
def ray_head():
    pytest.importorskip("ray.job_submission")
    if not sys.platform.startswith("linux"):
        pytest.skip("the head teardown relies on Linux /proc")
    try:  # the job server is part of the dashboard, which plain `pip install ray` lacks
        from ray._private.utils import get_dashboard_dependency_error
        missing = get_dashboard_dependency_error()
    except Exception:  # private helper moved: let `ray start` report it
        missing = None
    if missing:
        pytest.skip(f"job submission needs the Ray dashboard: pip install 'ray[default]' ({missing})")
    # Short path: Ray's unix sockets live under the temp dir (108-byte limit).
    tmp = Path(tempfile.mkdtemp(prefix="dgdeploy-", dir="/tmp"))
    head = _Head(tmp)
    try:
        head.wait_ready()
        yield head
    finally:
        head.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _submit(head, *args, token_file=None, timeout=300):
    env = _clean_env()
    env["HOME"] = str(head.tmp)  # no stray ~/.ray/auth_token
    if token_file is not False:
        env["RAY_AUTH_TOKEN_PATH"] = str(token_file or head.token_file)
    cmd = [sys.executable, str(SUBMIT), "--address", head.address, "--connect-timeout", "30", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _py(code):
    return shlex.join([sys.executable, "-c", code])


@pytest.mark.slow
@pytest.mark.ray
def test_head_enforces_token(ray_head):
    assert ray_head.request("/api/jobs/") == 401
    assert ray_head.request("/api/jobs/", "not-the-token") == 403
    assert ray_head.request("/api/jobs/", ray_head.token) == 200
    wrong = ray_head.tmp / "wrong_token"
    wrong.write_text("not-the-token")
    r = _submit(ray_head, "--", "true", token_file=wrong)
    assert r.returncode == 2 and "refused the token" in r.stderr, r.stderr


@pytest.mark.slow
@pytest.mark.ray
def test_submit_job_succeeds(ray_head):
    code = ("import os, ray, distgrad; ray.init(address='auto'); "
            "assert ray.cluster_resources()['CPU'] >= 2; "
            "assert os.environ['DISTGRAD_DEPLOY_TEST'] == 'yes'; "
            "print('DEPLOY-OK', distgrad.__version__)")
    r = _submit(ray_head, "--working-dir", str(REPO), "--env", "DISTGRAD_DEPLOY_TEST=yes",
                "--timeout", "180", "--", _py(code))
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert "DEPLOY-OK" in r.stdout
    assert "SUCCEEDED" in r.stderr
    assert ray_head.token not in r.stdout + r.stderr


@pytest.mark.slow
@pytest.mark.ray
def test_submit_job_exit_codes(ray_head):
    r = _submit(ray_head, "--timeout", "120", "--", _py("raise SystemExit(3)"))
    assert r.returncode == 1 and "FAILED" in r.stderr, r.stderr
    r = _submit(ray_head, "--timeout", "3", "--poll", "0.5", "--", _py("import time; time.sleep(120)"))
    assert r.returncode == 3, r.stderr
    assert "stopping it" in r.stderr


def _demo_available():
    r = subprocess.run([sys.executable, "-m", "distgrad.cli", "demo", "--help"], cwd=REPO,
                       env=_clean_env(), capture_output=True, text=True, timeout=120)
    return r.returncode == 0


@pytest.mark.slow
@pytest.mark.ray
def test_submit_the_demo(ray_head):
    if not _demo_available():
        pytest.skip("`distgrad demo` is not available yet (python -m distgrad.cli demo --help failed)")
    entry = shlex.join([sys.executable, "-m", "distgrad.cli", "demo",
                        "--steps", "20", "--workers", "2", "--address", "auto"])
    r = _submit(ray_head, "--working-dir", str(REPO), "--timeout", "300", "--", entry, timeout=420)
    assert r.returncode == 0, f"stdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}"
    assert "SUCCEEDED" in r.stderr


def _readme_cluster_block():
    """The shell block of README.md's cluster section that its marker comment says is run here."""
    text = (REPO / "README.md").read_text()
    marker = "tests/test_deploy.py::test_readme_cluster_commands"
    assert marker in text, "README.md lost the marker of its tested cluster commands"
    return re.search(r"```bash\n(.*?)```", text.split(marker, 1)[1], re.S).group(1)


def test_docs_do_not_install_distgrad_from_a_package_index():
    """distgrad is not on a package index: no `pip install distgrad[...]` or runtime-env
    `"pip": ["distgrad"]` in the docs, nor in the hints that errors print."""
    texts = {p: p.read_text() for p in [REPO / "README.md", DEPLOY / "README.md",
                                        *sorted((REPO / "distgrad").rglob("*.py"))]}
    bad = re.compile(r"pip install ['\"]?distgrad\[|\"pip\":\s*\[[^\]]*\"distgrad")
    offenders = [str(p.relative_to(REPO)) for p, t in texts.items() if bad.search(t)]
    assert not offenders, f"these tell users to pip-install distgrad from an index: {offenders}"


@pytest.mark.slow
@pytest.mark.ray
def test_readme_cluster_commands(ray_head):
    """README.md's cluster commands, run as written from the checkout against a Ray head with
    token auth; only the job server's address changes (this head listens on a free port,
    not on the forwarded 8265). The token sits where the README says: ~/.ray/auth_token."""
    block = _readme_cluster_block()
    assert "http://127.0.0.1:8265" in block and "ray job submit" in block
    home = ray_head.tmp / "home"
    (home / ".ray").mkdir(parents=True, exist_ok=True)
    shutil.copy(ray_head.token_file, home / ".ray" / "auth_token")
    env = _clean_env()
    env["HOME"] = str(home)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    r = subprocess.run(["bash", "-euc", block.replace("http://127.0.0.1:8265", ray_head.address)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    assert re.search(r"held-out accuracy [\d.]+%", out) and "(match)" in out, out[-5000:]
    assert "succeeded" in out, out[-3000:]
    assert ray_head.token not in out


def test_helm_steps_add_the_repo_and_pin_the_operator():
    readme = (DEPLOY / "README.md").read_text()
    assert re.search(r"^helm repo add kuberay https://\S+", readme, re.M)
    install = re.search(r"^helm install kuberay-operator kuberay/kuberay-operator --version (\d+)\.(\d+)\.(\d+)",
                        readme, re.M)
    assert install, "deploy/README.md must pin the KubeRay operator chart with --version"
    minimum = re.search(r"KubeRay operator, (\d+)\.(\d+)\.(\d+) or later", readme)
    assert minimum and tuple(map(int, install.groups())) >= tuple(map(int, minimum.groups()))
