"""The agent end to end with real parts: prewarm, status, ls, get, evict, restart, health."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
import tempfile
import urllib.request
from pathlib import Path

import pytest
from support.data import put_random

MiB = 1 << 20


def test_prewarm_status_get_evict(bucket, s3_client, make_agent, tmp_path):
    files = {
        "llama/model-00001.safetensors": put_random(s3_client, bucket, "llama/model-00001.safetensors", 5 * MiB + 7, 1),
        "llama/model-00002.safetensors": put_random(s3_client, bucket, "llama/model-00002.safetensors", 3 * MiB, 2),
        "llama/config.json": put_random(s3_client, bucket, "llama/config.json", 300, 3),
        "llama/empty.txt": b"",
    }
    s3_client.put_object(Bucket=bucket, Key="llama/empty.txt", Body=b"")
    agent = make_agent(f"s3://{bucket}", extra_args=["--chunk-size", "1MiB"])

    done = agent.cli("prewarm", "llama", "--wait", "--quiet", check=True)
    assert "prewarm done: 4/4 files" in done.stdout

    status = json.loads(agent.cli("status", "llama", "--json", check=True).stdout)
    by_uri = {f["uri"]: f for f in status["files"]}
    assert set(by_uri) == {f"s3://{bucket}/{k}" for k in files}
    for key, data in files.items():
        entry = by_uri[f"s3://{bucket}/{key}"]
        assert entry["complete"] and entry["cached_bytes"] == len(data) == entry["size"]
    assert status["agent"]["cache_bytes"] == sum(len(d) for d in files.values())

    human = agent.cli("status", check=True).stdout
    assert "100%" in human and "model-00001.safetensors" in human

    listing = json.loads(agent.cli("ls", f"s3://{bucket}/llama/", "--json", check=True).stdout)
    assert sorted(e["name"] for e in listing["entries"]) == sorted(k.split("/")[-1] for k in files)
    top = agent.cli("ls", check=True).stdout
    assert "PRE" in top and "llama/" in top

    for key, data in files.items():
        dest = tmp_path / key.replace("/", "_")
        agent.cli("get", f"s3://{bucket}/{key}", str(dest), "--quiet", check=True)
        assert dest.read_bytes() == data

    # get into a directory keeps the object's name
    outdir = tmp_path / "out"
    outdir.mkdir()
    agent.cli("get", "llama/config.json", str(outdir), "--quiet", check=True)
    assert (outdir / "config.json").read_bytes() == files["llama/config.json"]

    evicted = json.loads(agent.cli("evict", f"s3://{bucket}/llama", "--json", check=True).stdout)
    assert len(evicted["evicted"]) == 4 and evicted["bytes"] == sum(len(d) for d in files.values())
    after = json.loads(agent.cli("status", "llama", "--json", check=True).stdout)
    assert all(f["cached_bytes"] == 0 for f in after["files"]) and after["agent"]["cache_bytes"] == 0
    assert not list((agent.cache_dir / "coldbrew-v2" / "files").glob("*/*"))


def test_restart_comes_back_warm(bucket, s3_client, make_agent, proxy, tmp_path):
    data = put_random(s3_client, bucket, "m/w.bin", 6 * MiB + 123, 9)
    agent = make_agent(f"s3://{bucket}", endpoint=proxy.url, extra_args=["--chunk-size", "1MiB"])
    agent.cli("prewarm", "m/w.bin", "--wait", "--quiet", check=True)
    assert agent.stop() == 0
    assert not agent.socket.exists(), "SIGTERM must remove the control socket"

    agent.start()
    proxy.reset_counts()
    status = agent.client.status("m/w.bin")
    assert status["files"][0]["complete"]
    agent.cli("get", "m/w.bin", str(tmp_path / "w.bin"), "--quiet", check=True)
    assert (tmp_path / "w.bin").read_bytes() == data
    assert proxy.counts["ranged_gets"] == 0, \
        "a warm restart must read no object bytes from origin"
    assert agent.metric("coldbrew_origin_bytes_total") == 0
    assert agent.metric("coldbrew_bytes_served_total", source="cache") == len(data)


def test_health_ready_and_metrics(bucket, make_agent):
    agent = make_agent(f"s3://{bucket}")
    base = f"http://{agent.metrics_address}"
    assert urllib.request.urlopen(base + "/healthz").read() == b"ok\n"
    assert urllib.request.urlopen(base + "/readyz").status == 200
    text = urllib.request.urlopen(base + "/metrics").read().decode()
    for name in ("coldbrew_bytes_served_total", "coldbrew_origin_requests_total",
                 "coldbrew_cache_bytes", "coldbrew_cache_capacity_bytes", "coldbrew_corrupt_chunks_total",
                 "coldbrew_inflight_fetches", "coldbrew_ready"):
        assert name in text
    assert agent.metric("coldbrew_ready") == 1
    facts = agent.client.health()
    assert facts["origin"] == f"s3://{bucket}" and facts["ready"] is True


def test_lru_eviction_keeps_files_in_use(bucket, s3_client, make_agent, tmp_path):
    a = put_random(s3_client, bucket, "m/a.bin", 5 * MiB, 31)
    put_random(s3_client, bucket, "m/b.bin", 5 * MiB, 32)
    put_random(s3_client, bucket, "m/c.bin", 5 * MiB, 33)
    agent = make_agent(f"s3://{bucket}", extra_args=["--chunk-size", "1MiB", "--cache-size", "11MiB",
                                                     "--cache-reserve", "0"])
    agent.cli("prewarm", "m/a.bin", "--wait", "--quiet", check=True)
    agent.cli("prewarm", "m/b.bin", "--wait", "--quiet", check=True)
    # c does not fit beside a and b: the least recently used (a) goes.
    agent.cli("prewarm", "m/c.bin", "--wait", "--quiet", check=True)
    cached = {f["uri"].rsplit("/", 1)[-1]: f["cached_bytes"] for f in agent.client.status()["files"]}
    assert cached == {"b.bin": 5 * MiB, "c.bin": 5 * MiB}
    assert agent.metric("coldbrew_cache_evictions_total") == 1

    # Readers hold b and c (leases, as the loader takes them): no room for a, and
    # nothing in use is evicted.
    lease_b = agent.client.ensure(f"s3://{bucket}/m/b.bin", 0, 1)["lease"]
    lease_c = agent.client.ensure(f"s3://{bucket}/m/c.bin", 0, 1)["lease"]
    r = agent.cli("prewarm", "m/a.bin", "--wait", "--quiet")
    assert r.returncode == 1 and "could not be cached" in r.stderr
    cached = {f["uri"].rsplit("/", 1)[-1]: f["cached_bytes"] for f in agent.client.status()["files"]}
    assert cached["b.bin"] == 5 * MiB and cached["c.bin"] == 5 * MiB
    # ... yet a is still readable, byte-exact, straight from origin
    agent.cli("get", "m/a.bin", str(tmp_path / "a.bin"), "--quiet", check=True)
    assert (tmp_path / "a.bin").read_bytes() == a
    r = agent.cli("evict", "m/b.bin")
    assert r.returncode == 1 and "in use" in r.stderr

    agent.client.release(lease_b)
    agent.client.release(lease_c)
    agent.cli("prewarm", "m/a.bin", "--wait", "--quiet", check=True)
    assert agent.metric("coldbrew_cache_evictions_total") == 2


def test_get_streams_when_the_client_cannot_see_the_cache(bucket, s3_client, make_agent, tmp_path):
    """A reader in another mount namespace (a pod without the hostPath) still gets every byte."""
    import subprocess
    import sys

    data = put_random(s3_client, bucket, "m/far.bin", 3 * MiB + 11, 41)
    agent = make_agent(f"s3://{bucket}", extra_args=["--chunk-size", "1MiB"])
    agent.cli("prewarm", "m/far.bin", "--wait", "--quiet", check=True)
    dest = tmp_path / "far.bin"
    # An empty tmpfs over the cache dir, visible to the client's namespace only.
    script = (f"mount -t tmpfs none {agent.cache_dir} && test -z \"$(ls -A {agent.cache_dir})\" && "
              f"{sys.executable} -m coldbrew.agent get "
              f"m/far.bin {dest} --quiet --socket {agent.socket}")
    result = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert dest.read_bytes() == data
    assert agent.metric("coldbrew_corrupt_chunks_total", source="cache") == 0
    assert "corrupt" not in agent.log(), "an unreadable cache file is not corruption"


NOBODY = 65534


def connect_as_nobody(path: Path) -> int:
    """Connect to ``path`` from a child that has become uid/gid 65534: 0, or the errno."""
    pid = os.fork()
    if pid == 0:  # the child: no Python-level cleanup, just the answer
        code = 0
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(path))
        except OSError as e:
            code = e.errno or 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_socket_mode_and_group_decide_which_runners_may_connect(bucket, make_agent):
    if os.geteuid() != 0:
        pytest.skip("acting as another user needs root")
    shared = Path(tempfile.mkdtemp(prefix="coldbrew-sockets-"))
    shared.chmod(0o755)  # as /run/coldbrew is: any runner may reach the socket file itself
    try:
        agents = {}
        for name, args in (("plain", []), ("grouped", ["--socket-group", str(NOBODY)]),
                           ("open", ["--socket-mode", "0666"])):
            a = make_agent(f"s3://{bucket}", start=False, name=name, extra_args=args)
            a.socket = shared / f"{name}.sock"
            agents[name] = a.start()
        modes = {n: stat.S_IMODE(os.stat(a.socket).st_mode) for n, a in agents.items()}
        assert modes == {"plain": 0o660, "grouped": 0o660, "open": 0o666}
        assert os.stat(agents["grouped"].socket).st_gid == NOBODY
        assert connect_as_nobody(agents["plain"].socket) == errno.EACCES
        assert connect_as_nobody(agents["grouped"].socket) == 0
        assert connect_as_nobody(agents["open"].socket) == 0
        assert agents["grouped"].client.health()["ready"] is True  # root still gets in
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_the_agent_raises_a_low_open_file_limit():
    """A node's default soft limit (often 1024) is too low for the files the agent keeps
    open; it raises it towards 65536, never above the hard limit."""
    import subprocess
    import sys

    code = """
import resource
from coldbrew.agent.app.daemon import raise_open_file_limit
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
before, after = raise_open_file_limit()
now = resource.getrlimit(resource.RLIMIT_NOFILE)
print(before, after, now[0], now[1], hard)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after, soft, hard_now, hard = (int(x) for x in out.stdout.split())
    assert before == 256
    want = 65536 if hard == -1 else min(65536, hard)  # RLIM_INFINITY is -1
    assert after == soft == want and hard_now == hard
