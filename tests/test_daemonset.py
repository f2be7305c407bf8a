"""The Kubernetes manifests (daemonset/), the agent image's recipe and the docs that go with them.

Rendered with the real kustomize (kubectl's) and validated offline against the Kubernetes
schemas (tests/support/manifests.py says how, the ServiceMonitor included); then the
properties that make the thing work on a node are checked on the rendered objects, against
the agent's own parsers; and an agent started with the ConfigMap's config comes up healthy
on its probe endpoints and prewarms the listed models from the local S3 server.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from support.manifests import ROOT, VERSIONS, render, validate_all

from coldbrew.agent.app.cli import build_parser
from coldbrew.agent.config import load_config
from coldbrew.agent.fetch.prewarm_list import parse_file

BASE = ROOT / "daemonset" / "base"
OVERLAY = ROOT / "daemonset" / "overlays" / "example"
DIRS = {"base": BASE, "overlay": OVERLAY}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(path) for name, path in DIRS.items()}


class Cluster:
    """The rendered objects of one kustomization, with the lookups the checks need."""

    def __init__(self, objs: list[dict[str, Any]]) -> None:
        self.objs = objs

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [o for o in self.objs if o["kind"] == kind
                 and (name is None or o["metadata"]["name"] == name)]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    @property
    def daemonset(self) -> dict[str, Any]:
        return self.one("DaemonSet", "coldbrew-agent")

    @property
    def pod(self) -> dict[str, Any]:
        return self.daemonset["spec"]["template"]["spec"]

    @property
    def agent(self) -> dict[str, Any]:
        (container,) = self.pod["containers"]
        return container

    def volume(self, name: str) -> dict[str, Any]:
        (v,) = [v for v in self.pod["volumes"] if v["name"] == name]
        return v

    def mount_of(self, container: dict[str, Any], path: PurePosixPath) -> dict[str, Any]:
        """The container's volume mount that ``path`` lies under (the deepest one)."""
        found = [m for m in container.get("volumeMounts", [])
                 if path == PurePosixPath(m["mountPath"])
                 or PurePosixPath(m["mountPath"]) in path.parents]
        assert found, f"{path} is under no volume mount of container {container['name']}"
        return max(found, key=lambda m: len(m["mountPath"]))

    def config_file(self) -> tuple[str, str]:
        """(file name, text) of the agent config the DaemonSet runs with."""
        args = self.agent["args"]
        path = PurePosixPath(args[args.index("--config") + 1])
        mount = self.mount_of(self.agent, path)
        volume = self.volume(mount["name"])
        cm = self.one("ConfigMap", volume["configMap"]["name"])
        key = str(path.relative_to(mount["mountPath"]))
        assert key in cm["data"], f"the DaemonSet reads {path}, the ConfigMap has {list(cm['data'])}"
        return key, cm["data"][key]

    def config(self, tmp: Path):
        name, text = self.config_file()
        path = tmp / name
        path.write_text(text)
        return load_config(file=path, env={}), text


def port_named(container: dict[str, Any], name: str) -> int:
    (p,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return p


# --- rendered and valid --------------------------------------------------------------------------


@pytest.mark.parametrize("name", DIRS)
def test_every_manifest_renders_and_is_valid_kubernetes(rendered, name):
    objs = rendered[name]
    kinds = {o["kind"] for o in objs}
    assert {"Namespace", "ServiceAccount", "ResourceQuota", "DaemonSet", "Service", "ConfigMap",
            "ServiceMonitor"} <= kinds
    if name == "overlay":
        assert "Deployment" in kinds  # the example model runner
    assert validate_all(objs) == []


def _copy_base(tmp_path: Path) -> Path:
    copy = tmp_path / "base"
    shutil.copytree(BASE, copy)
    shutil.copytree(ROOT / "daemonset" / "schemas", tmp_path / "schemas")
    return copy


@pytest.mark.parametrize("file, old, new, problem", [
    ("daemonset.yaml", "mountPropagation: Bidirectional", "mountPropagaton: Bidirectional",
     ("DaemonSet/coldbrew-agent is not valid for Kubernetes 1.29: spec.template.spec.containers.0"
      ".volumeMounts.2: Additional properties are not allowed ('mountPropagaton' was unexpected)")),
    ("daemonset.yaml", "containerPort: 9400", "containerPort: nine-four-hundred",
     "spec.template.spec.containers.0.ports.0.containerPort: 'nine-four-hundred' is not of type"),
    ("service.yaml", "clusterIP: None", "clusterIP: [None]", "Service/coldbrew-agent-peers"),
    ("servicemonitor.yaml", "  endpoints:", "  endpoint:",
     ("ServiceMonitor/coldbrew-agent is not a valid ServiceMonitor: spec: Additional properties "
      "are not allowed ('endpoint' was unexpected)")),
    ("servicemonitor.yaml", "interval: 15s", "interval: 15 seconds",
     "ServiceMonitor/coldbrew-agent is not a valid ServiceMonitor: spec.endpoints.0.interval"),
    ("servicemonitor.yaml", "kind: ServiceMonitor", "kind: PodMonitor",
     "PodMonitor/coldbrew-agent: no schema to check it against"),
])
def test_a_broken_manifest_is_rejected_by_the_same_check(tmp_path, file, old, new, problem):
    copy = _copy_base(tmp_path)
    text = (copy / file).read_text()
    assert text.count(old) == 1
    (copy / file).write_text(text.replace(old, new))
    problems = validate_all(render(copy), versions=VERSIONS[:1])
    assert problems and problem in problems[0], problems


# --- what makes it work on a node ----------------------------------------------------------------


@pytest.mark.parametrize("name", DIRS)
def test_the_agent_pod_can_mount_fuse_and_share_it_with_runners(rendered, name, tmp_path):
    c = Cluster(rendered[name])
    cfg, _ = c.config(tmp_path)
    agent = c.agent
    assert agent["securityContext"]["privileged"] is True
    # /dev/fuse from the host
    fuse = c.mount_of(agent, PurePosixPath("/dev/fuse"))
    assert fuse["mountPath"] == "/dev/fuse"
    assert c.volume(fuse["name"])["hostPath"] == {"path": "/dev/fuse", "type": "CharDevice"}
    # the FUSE mount point and the socket: a hostPath directory with Bidirectional propagation
    assert cfg.mount is not None
    run = c.mount_of(agent, PurePosixPath(cfg.mount))
    assert run["mountPropagation"] == "Bidirectional"
    assert PurePosixPath(run["mountPath"]) != PurePosixPath(cfg.mount), \
        "mount the parent of the view: kubelet cannot stat a dead FUSE mount it must mount itself"
    assert "hostPath" in c.volume(run["name"])
    assert c.mount_of(agent, PurePosixPath(str(cfg.socket)))["name"] == run["name"]
    # the cache: a hostPath (the node's disk), not the container's
    cache = c.mount_of(agent, PurePosixPath(str(cfg.cache_dir)))
    assert "hostPath" in c.volume(cache["name"]) and not cache.get("readOnly")
    # preStop detaches exactly the configured view
    command = agent["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["/bin/sh", "-c"]
    assert f"fusermount3 -u -z {shlex.quote(str(cfg.mount))}" in command[2]
    assert command[2].rstrip().endswith("|| true")  # a failed unmount must not block the stop


@pytest.mark.parametrize("name", DIRS)
def test_probes_and_ports_point_at_the_agents_listeners(rendered, name, tmp_path):
    c = Cluster(rendered[name])
    cfg, _ = c.config(tmp_path)
    agent = c.agent
    metrics_port = cfg.metrics_address[1]
    assert port_named(agent, "metrics") == metrics_port
    assert cfg.metrics_address[0] == "0.0.0.0"  # the kubelet probes the pod IP
    probes = {k: agent[k]["httpGet"] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert {p["port"] for p in probes.values()} == {"metrics"}
    annotations = c.daemonset["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(metrics_port)
    # P2P: the peer endpoint on p2p_port, libtorrent on the next one, found through the
    # headless Service
    assert cfg.p2p_port > 0
    assert port_named(agent, "p2p") == cfg.p2p_port
    assert port_named(agent, "torrent") == cfg.p2p_port + 1
    svc = c.one("Service", "coldbrew-agent-peers")
    assert svc["spec"]["clusterIP"] == "None"
    pod_labels = c.daemonset["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert cfg.peers_dns == f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc"
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert ports["p2p"]["port"] == cfg.p2p_port and ports["p2p"]["targetPort"] == "p2p"
    assert ports["torrent"]["port"] == cfg.p2p_port + 1
    assert ports["metrics"]["targetPort"] == "metrics"
    # Prometheus Operator: the ServiceMonitor finds that Service and its metrics port
    sm = c.one("ServiceMonitor", "coldbrew-agent")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"]
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    assert sm["metadata"]["namespace"] == svc["metadata"]["namespace"]


@pytest.mark.parametrize("name", DIRS)
def test_scheduling_resources_and_config_delivery(rendered, name, tmp_path):
    c = Cluster(rendered[name])
    pod = c.pod
    assert pod["priorityClassName"] == "system-node-critical"
    quota = c.one("ResourceQuota")["spec"]["scopeSelector"]["matchExpressions"][0]
    assert quota["scopeName"] == "PriorityClass" and "system-node-critical" in quota["values"]
    assert pod["nodeSelector"], "GPU nodes only"
    assert any(t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists" for t in pod["tolerations"])
    res = c.agent["resources"]
    assert {"cpu", "memory"} <= set(res["requests"]) and "memory" in res["limits"]
    assert pod["serviceAccountName"] == c.one("ServiceAccount")["metadata"]["name"]
    namespace = c.one("Namespace")["metadata"]["name"]
    assert {o["metadata"].get("namespace") for o in c.objs
            if o["kind"] not in ("Namespace", "Deployment")} == {namespace}
    # The config reaches running agents: a whole-directory ConfigMap mount (subPath mounts are
    # never updated) under a fixed name (a hash suffix would roll the DaemonSet on every edit).
    key, text = c.config_file()
    args = c.agent["args"]
    config_mount = c.mount_of(c.agent, PurePosixPath(args[args.index("--config") + 1]))
    assert "subPath" not in config_mount
    assert c.volume(config_mount["name"])["configMap"]["name"] == "coldbrew-agent"
    # The args are the real CLI's, and the file is a config the agent accepts.
    assert build_parser().parse_args(args).command == "agent"
    cfg, _ = c.config(tmp_path)
    assert cfg.log_format == "json" and cfg.prewarm_reload_s > 0
    parse_file(text, key, lambda u: u)  # the prewarm list parses


def test_the_example_runner_reaches_the_agent_through_the_host(rendered, tmp_path):
    c = Cluster(rendered["overlay"])
    cfg, _ = c.config(tmp_path)
    run = c.mount_of(c.agent, PurePosixPath(str(cfg.socket)))
    host_run = PurePosixPath(c.volume(run["name"])["hostPath"]["path"])

    def on_host(container_path: PurePosixPath, container: dict, volumes: list[dict]) -> PurePosixPath:
        m = c.mount_of(container, container_path)
        (vol,) = [v for v in volumes if v["name"] == m["name"]]
        return PurePosixPath(vol["hostPath"]["path"]) / container_path.relative_to(m["mountPath"])

    agent_socket = on_host(PurePosixPath(str(cfg.socket)), c.agent, c.pod["volumes"])
    agent_view = on_host(PurePosixPath(str(cfg.mount)), c.agent, c.pod["volumes"])
    assert agent_socket.parent == host_run

    runner = c.one("Deployment", "model-runner")["spec"]["template"]["spec"]
    for container in runner["initContainers"] + runner["containers"]:
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        socket = PurePosixPath(env["COLDBREW_SOCKET"])
        m = c.mount_of(container, socket)
        assert m["mountPropagation"] == "HostToContainer", container["name"]
        assert on_host(socket, container, runner["volumes"]) == agent_socket
        # the FUSE view is under the same propagated mount
        view = PurePosixPath(m["mountPath"]) / agent_view.relative_to(
            on_host(PurePosixPath(m["mountPath"]), container, runner["volumes"]))
        assert c.mount_of(container, view)["name"] == m["name"]
    # the init container runs the real CLI: prewarm --wait through the socket
    (init,) = runner["initContainers"]
    args = build_parser().parse_args(init["args"])
    assert args.command == "prewarm" and args.wait
    # the server's program is Python that uses the loader through the agent
    (server,) = runner["containers"]
    program = server["args"][0]
    compile(program, "model-runner", "exec")
    assert "from coldbrew.loader import load_dir" in program
    env = {e["name"]: e.get("value") for e in server["env"]}
    assert env["MODEL_URI"].startswith(cfg.origin.rstrip("/") + "/")
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    # pods that share /run/coldbrew both see the agent's image: the init container uses it
    assert init["image"].rsplit(":", 1)[0] == c.agent["image"].rsplit(":", 1)[0]


# --- the agent, started with the ConfigMap's config -----------------------------------------------


def rewrite(text: str, **values: str) -> str:
    """Set ``key = value`` lines (TOML literals) in the config text; each key must be there once."""
    for key, literal in values.items():
        pattern = re.compile(rf"^{key}\s*=.*$", re.MULTILINE)
        assert len(pattern.findall(text)) == 1, f"{key} is not set exactly once in the ConfigMap config"
        text = pattern.sub(lambda _m, line=f"{key} = {literal}": line, text)
    return text


@pytest.mark.parametrize("name", DIRS)
def test_agent_with_the_configmap_config_is_healthy_and_prewarms_the_list(
        rendered, name, tmp_path, s3_client, bucket, make_agent):
    c = Cluster(rendered[name])
    key, text = c.config_file()
    cfg, _ = c.config(tmp_path)
    configured = parse_file(text, key, lambda u: u).prewarm
    if name == "overlay":
        assert len(configured) >= 2
    # Every listed model exists in the test bucket (a prefix gets a file under it).
    origin = f"s3://{bucket}"
    bodies = {}
    for n, entry in enumerate(configured):
        rel = entry.removeprefix(cfg.origin.rstrip("/") + "/") if "://" in entry else entry
        key_name = rel.strip("/") + ("/model.safetensors" if entry.endswith("/") else "")
        bodies[key_name] = os.urandom((n + 1) * 300_000)
        s3_client.put_object(Bucket=bucket, Key=key_name, Body=bodies[key_name])
    s3_client.put_object(Bucket=bucket, Key="README", Body=b"a model bucket")

    run = tmp_path / "run"  # stands for the host's /run/coldbrew
    conf = tmp_path / "etc" / key
    conf.parent.mkdir()
    conf.write_text(rewrite(
        text, origin=f'"{origin}/"', cache_dir=f'"{tmp_path / "cache"}"',
        socket=f'"{run / "agent.sock"}"', mount=f'"{run / "models"}"',
        metrics_address='"127.0.0.1:0"',
        p2p_port="0"))  # P2P is tested on its own (tests/test_p2p*); one agent has no peers
    agent = make_agent(origin, cache_dir=tmp_path / "cache", extra_args=["--config", str(conf)],
                       start=False)
    agent.socket = run / "agent.sock"  # the harness passes it as a flag too: the same value
    agent.start()
    try:
        # the probes' paths on the metrics listener answer as the kubelet wants
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            path = c.agent[probe]["httpGet"]["path"]
            with urllib.request.urlopen(f"http://{agent.metrics_address}{path}", timeout=5) as r:
                assert r.status == 200, (probe, path)
        # the listed models get cached, byte for byte
        deadline = time.monotonic() + 60
        while True:
            cached = {f["uri"].removeprefix(origin + "/"): f["cached_bytes"]
                      for f in agent.client.status()["files"]}
            if all(cached.get(k) == len(b) for k, b in bodies.items()):
                break
            assert time.monotonic() < deadline, f"not prewarmed: {cached}\n{agent.log()}"
            time.sleep(0.1)
        assert set(cached) == set(bodies)  # nothing unlisted was pulled
        assert agent.metric("coldbrew_prewarm_list_entries") == len(configured)
        # the view is mounted where runner pods look for it
        if bodies:
            first = min(bodies)
            assert (run / "models" / first).read_bytes() == bodies[first]
        else:
            assert "README" in os.listdir(run / "models")
    finally:
        assert agent.stop() == 0
    assert not os.path.ismount(run / "models")


# --- the image ----------------------------------------------------------------------------------


def test_dockerfile_installs_the_agent_without_torch():
    text = (ROOT / "Dockerfile").read_text()
    install = [line for line in text.splitlines() if "pip install" in line]
    assert install and all('".[fuse,p2p]"' in line for line in install)
    assert "torch" not in "\n".join(install) and "loader]" not in text
    assert "fuse3" in text  # libfuse3 for the view, fusermount3 for the preStop
    assert 'ENTRYPOINT ["coldbrew"]' in text
    # .dockerignore ignores everything, then lets in exactly what the Dockerfile copies
    # (no .venv, caches or tests in the build context)
    rules = [r for r in (ROOT / ".dockerignore").read_text().splitlines()
             if r.strip() and not r.startswith("#")]
    assert rules[0] == "*"
    let_in = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied = {path for line in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.MULTILINE)
              for path in line.split()}
    assert copied == let_in
    for path in copied:
        assert (ROOT / path).exists(), f"the Dockerfile copies {path}, which is not in the repo"


def test_the_agent_and_its_view_run_without_torch(tmp_path):
    """What the image holds: the agent's code paths import with torch and safetensors absent."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'safetensors', 'transformers', 'numpy'):\n"
        "            raise ImportError(f'{name} is not in the agent image')\n"
        "sys.meta_path.insert(0, _Block())\n")
    code = ("import coldbrew.agent.app.daemon, coldbrew.agent.fetch.prewarm_list, coldbrew.fuse.mount, "
            "coldbrew.fuse.view, coldbrew.agent.control.client\n"
            "from coldbrew.agent.app.cli import main\n"
            "raise SystemExit(main(['agent', '--help']))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)}, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "--prewarm-reload-s" in result.stdout
    check = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(tmp_path)}, timeout=60, check=False)
    assert "is not in the agent image" in check.stderr  # the blocker really blocks


def test_docs_build_command_and_manifests_name_the_same_image():
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)[1]
    image = f"coldbrew-agent:{version}"
    assert f"docker build -t {image} ." in (ROOT / "Dockerfile").read_text()
    assert f"docker build -t {image} ." in (ROOT / "docs" / "kubernetes.md").read_text()
    assert Cluster(render(BASE)).agent["image"] == image


# --- the docs -----------------------------------------------------------------------------------

_METRIC_CALL = re.compile(r"\b(Counter|Gauge|Histogram|Summary|Info|Enum)\(\s*\"(coldbrew_\w+)\"")
METRICS_DOC = ROOT / "docs" / "metrics.md"
METRICS_SECTION = "## Metrics"
#: Every document whose relative links must resolve.
DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "RESULTS.md")


def metrics_in_code() -> dict[str, str]:
    """Every metric any module defines, as it appears on /metrics (counters get ``_total``)."""
    found = {}
    for folder in ("agent", "fuse", "loader"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            for kind, name in _METRIC_CALL.findall(path.read_text()):
                shown = name + "_total" if kind == "Counter" and not name.endswith("_total") else name
                found[shown] = str(path.relative_to(ROOT))
    return found


def test_every_metric_is_documented():
    """docs/metrics.md's "## Metrics" table is the one list of metrics; a new metric needs a row there."""
    text = METRICS_DOC.read_text()
    start = text.index(METRICS_SECTION)
    end = text.find("\n## ", start + len(METRICS_SECTION))
    section = text[start:end if end > 0 else None]
    in_code = metrics_in_code()
    assert len(in_code) >= 25  # the scan finds them (it would pass vacuously otherwise)
    missing = [f"{name} (defined in {where})" for name, where in sorted(in_code.items())
               if not re.search(rf"`{re.escape(name)}[`{{]", section)]
    assert not missing, f"add these to the table under {METRICS_SECTION!r} in docs/metrics.md: {missing}"


def test_docs_links_resolve():
    assert len(DOCS) >= 6, DOCS  # README, docs/*.md, bench/RESULTS.md
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" in target:
                continue
            assert (doc.parent / target).exists(), f"{doc.relative_to(ROOT)} links to {target}, which is missing"
