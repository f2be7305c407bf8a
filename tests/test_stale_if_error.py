"""Stale-if-error: a cached file keeps serving when the origin cannot answer.

Real agent, real FUSE mount, real S3 on 127.0.0.1 behind the fault proxy. Each case of an
outage is a fault at the proxy: S3 stopped (the proxy gone: connection refused), HEAD-only 503,
everything 503, and a HEAD the proxy holds. Each reader of a wholly cached file must
succeed, byte-exact, within a time bounded by the configured ``version_timeout_s``. The fault
must be shown to have fired, and the stale-serve counter must have moved.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from support.faultproxy import Fault

from coldbrew.loader import iter_tensors, load_file
from coldbrew.loader.runtime import wait_writeback

VERSION_TIMEOUT_S = 1.0
#: A reader's whole call, as a multiple of the version timeout (the decision is one timeout).
BOUND = 6 * VERSION_TIMEOUT_S
CHUNK = 64 * 1024
FAST = ["--retry-base-delay-s", "0.01", "--retry-max-delay-s", "0.05"]

OUTAGES = ("s3-stopped", "head-503", "all-503", "head-hangs")


def _model() -> bytes:
    g = torch.Generator().manual_seed(7)
    return st_save({f"w{i}": torch.randn(128, 256, generator=g) for i in range(6)})  # ~770 KiB


def _same(got: dict[str, torch.Tensor], data: bytes) -> bool:
    want = st_load(data)
    return set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def _outage(proxy: Any, kind: str) -> Any:
    """Start the outage; returns the rule whose ``applied`` proves it fired (None: stopped)."""
    if kind == "s3-stopped":
        proxy.stop()
        return None
    if kind == "head-503":
        return proxy.add_fault(Fault.status(503, "ServiceUnavailable"), method="HEAD")
    if kind == "all-503":
        return proxy.add_fault(Fault.status(503, "ServiceUnavailable"))
    return proxy.add_fault(Fault.delay(60), method="HEAD")


def _timed(fn: Any) -> tuple[Any, float]:
    t0 = time.monotonic()
    out = fn()
    return out, time.monotonic() - t0


@pytest.fixture
def warm(make_agent: Any, proxy: Any, s3_client: Any, bucket: str, tmp_path: Path) -> Any:
    """An agent with a FUSE view and a wholly cached model, its origin behind the proxy."""
    data = _model()
    s3_client.put_object(Bucket=bucket, Key="m/model.safetensors", Body=data)
    mnt = tmp_path / "mnt"
    agent = make_agent(f"s3://{bucket}", endpoint=proxy.url, extra_args=[
        "--chunk-size", "64KiB", "--version-timeout-s", str(VERSION_TIMEOUT_S), *FAST,
        "--mount", str(mnt), "--fuse-metadata-ttl-s", "0.1"])
    uri = f"s3://{bucket}/m/model.safetensors"
    agent.cli("prewarm", uri, "--wait", check=True)
    assert (mnt / "m" / "model.safetensors").read_bytes() == data  # the mount works, healthy
    yield agent, uri, data, mnt
    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, check=False)


@pytest.mark.parametrize("kind", OUTAGES)
def test_every_reader_of_a_cached_file_serves_through_an_outage(warm: Any, proxy: Any,
                                                               kind: str, tmp_path: Path) -> None:
    agent, uri, data, mnt = warm
    time.sleep(2.2)  # past the fetcher's stat cache (2 s): every reader asks about versions
    rule = _outage(proxy, kind)

    r, took = _timed(lambda: agent.cli("get", uri, str(tmp_path / "got")))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "got").read_bytes() == data and took < BOUND, took

    time.sleep(0.3)  # past the mount's metadata TTL: the open lists and stats again
    got, took = _timed(lambda: (mnt / "m" / "model.safetensors").read_bytes())
    assert got == data and took < BOUND, took

    sd, took = _timed(lambda: load_file(uri, socket=agent.socket, agent=True, cache_dir=False))
    assert _same(dict(sd), data) and took < BOUND, took

    r, took = _timed(lambda: agent.cli("prewarm", uri, "--wait"))
    assert r.returncode == 0, r.stderr + r.stdout
    assert took < BOUND, took

    if rule is not None:
        assert rule.applied > 0, f"the {kind} fault never fired"
    assert agent.metric("coldbrew_stale_serves_total", what="stat") >= 1
    assert agent.metric("coldbrew_origin_reachable") == 0
    status = agent.client.status()["agent"]
    assert status["origin_reachable"] is False and status["origin_error"]
    ready = urllib.request.urlopen(f"http://{agent.metrics_address}/readyz", timeout=5)
    assert ready.status == 200 and b"origin unreachable, serving cache" in ready.read()
    logged = [line for line in agent.log().splitlines() if "serving the cached version" in line]
    assert len({re.search(r'"uri": "([^"]+)"', line).group(1) for line in logged}) == len(logged), \
        "a stale serve was logged more than once for the same file"

    if kind == "s3-stopped":
        return
    # The origin answers again: the agent picks it up without a restart.
    proxy.clear_faults()
    deadline = time.monotonic() + 10
    while agent.client.status()["agent"]["origin_reachable"] is False:
        assert time.monotonic() < deadline, "the agent never saw the origin come back"
        agent.cli("get", uri, str(tmp_path / "again"), check=True)
        time.sleep(0.2)
    assert agent.metric("coldbrew_origin_reachable") == 1


def test_origin_unreachable_fail_refuses_quickly(make_agent: Any, proxy: Any, s3_client: Any,
                                                 bucket: str, tmp_path: Path) -> None:
    s3_client.put_object(Bucket=bucket, Key="x.bin", Body=b"x" * 200_000)
    agent = make_agent(f"s3://{bucket}", endpoint=proxy.url, extra_args=[
        "--chunk-size", "64KiB", "--version-timeout-s", str(VERSION_TIMEOUT_S),
        "--origin-unreachable", "fail", *FAST])
    agent.cli("prewarm", f"s3://{bucket}/x.bin", "--wait", check=True)
    time.sleep(2.2)
    rule = proxy.add_fault(Fault.status(503, "ServiceUnavailable"))
    r, took = _timed(lambda: agent.cli("get", f"s3://{bucket}/x.bin", str(tmp_path / "x")))
    assert r.returncode != 0 and "origin_unreachable = fail" in r.stderr, r.stderr
    assert took < BOUND and rule.applied > 0
    assert not (tmp_path / "x").exists()
    assert agent.metric("coldbrew_stale_serves_total", what="stat") == 0


def test_a_partly_cached_file_serves_its_chunks_and_names_the_outage(
        make_agent: Any, proxy: Any, s3_client: Any, bucket: str) -> None:
    data = os.urandom(4 * CHUNK)
    s3_client.put_object(Bucket=bucket, Key="p.bin", Body=data)
    agent = make_agent(f"s3://{bucket}", endpoint=proxy.url, extra_args=[
        "--chunk-size", "64KiB", "--version-timeout-s", str(VERSION_TIMEOUT_S), *FAST])
    uri = f"s3://{bucket}/p.bin"
    client = agent.client
    assert b"".join(client.read(uri, 0, CHUNK)) == data[:CHUNK]  # chunk 0 only is cached
    time.sleep(2.2)
    rule = proxy.add_fault(Fault.status(503, "SlowDown"))
    assert b"".join(client.read(uri, 0, CHUNK)) == data[:CHUNK]
    t0 = time.monotonic()
    with pytest.raises(Exception, match="origin is unreachable") as info:
        b"".join(client.read(uri, 3 * CHUNK, CHUNK))
    assert time.monotonic() - t0 < BOUND, info.value
    assert rule.applied > 0


def test_the_agent_starts_on_a_warm_cache_while_the_origin_is_down(
        make_agent: Any, proxy: Any, s3_client: Any, bucket: str, tmp_path: Path) -> None:
    data = os.urandom(3 * CHUNK)
    s3_client.put_object(Bucket=bucket, Key="w.bin", Body=data)
    args = ["--chunk-size", "64KiB", "--version-timeout-s", str(VERSION_TIMEOUT_S), *FAST]
    first = make_agent(f"s3://{bucket}", endpoint=proxy.url, extra_args=args, name="first")
    first.cli("prewarm", f"s3://{bucket}/w.bin", "--wait", check=True)
    first.stop()
    rule = proxy.add_fault(Fault.status(503, "ServiceUnavailable"))
    again = make_agent(f"s3://{bucket}", endpoint=proxy.url, extra_args=args, name="again",
                       cache_dir=first.cache_dir)
    assert again.client.health()["ready"] is True and rule.applied > 0
    again.cli("get", f"s3://{bucket}/w.bin", str(tmp_path / "w"), check=True)
    assert (tmp_path / "w").read_bytes() == data
    # An empty cache has nothing to serve: a dead origin still stops the start.
    with pytest.raises(RuntimeError, match="exited at start"):
        make_agent(f"s3://{bucket}", endpoint=proxy.url, extra_args=args, name="cold")


@pytest.mark.parametrize("kind", ("all-503", "head-hangs"))
def test_the_loader_without_an_agent_serves_its_warm_cache(
        proxy: Any, s3: Any, s3_client: Any, bucket: str, tmp_path: Path, monkeypatch: Any,
        kind: str) -> None:
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("COLDBREW_VERSION_TIMEOUT_S", str(VERSION_TIMEOUT_S))
    data = _model()
    s3_client.put_object(Bucket=bucket, Key="l/model.safetensors", Body=data)
    uri = f"s3://{bucket}/l/model.safetensors"
    cache = tmp_path / "loader-cache"
    opts = {"agent": False, "cache_dir": cache, "endpoint_url": proxy.url}
    first = load_file(uri, **opts)
    assert wait_writeback(60) and set(first.stats["bytes_by_source"]) == {"origin"}
    rule = _outage(proxy, kind)
    sd, took = _timed(lambda: load_file(uri, **opts))
    assert _same(dict(sd), data) and sd.stats.get("stale") is True
    assert set(sd.stats["bytes_by_source"]) == {"cache"} and took < BOUND, took
    assert rule.applied > 0
    # Not a whole load (some tensors; or streamed): no location record, the file's own copy.
    some = load_file(uri, names={"w1", "w4"}, **opts)
    assert set(some) == {"w1", "w4"} and torch.equal(some["w4"], st_load(data)["w4"])
    streamed, took = _timed(lambda: dict(iter_tensors(uri, **opts)))
    assert _same(streamed, data) and took < BOUND, took
    monkeypatch.setenv("COLDBREW_ORIGIN_UNREACHABLE", "fail")
    with pytest.raises(Exception, match="unreachable|did not answer"):
        load_file(uri, **opts)


_SHORT_SCRIPT = """
import sys
from coldbrew.loader import iter_tensors, load_file
sd = load_file(sys.argv[1], agent=False, cache_dir=sys.argv[2], endpoint_url=sys.argv[3])
print(len(sd))
"""


def test_a_short_script_leaves_a_committed_cache_entry(s3: Any, s3_client: Any, bucket: str,
                                                       tmp_path: Path) -> None:
    """The write-behind runs after load_file returns: at interpreter exit it must finish,
    not die with a traceback and a .part file."""
    data = _model()
    s3_client.put_object(Bucket=bucket, Key="s/model.safetensors", Body=data)
    cache = tmp_path / "c"
    out = subprocess.run([sys.executable, "-c", _SHORT_SCRIPT, f"s3://{bucket}/s/model.safetensors",
                          str(cache), s3.env()["AWS_ENDPOINT_URL"]],
                         env={**os.environ, **s3.env()}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "6", out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert not list(cache.rglob("*.part")), list(cache.rglob("*"))
    sidecars = list(cache.rglob("files/*/*.json"))
    assert len(sidecars) == 1, list(cache.rglob("*"))


def test_get_dash_writes_standard_output(make_agent: Any, s3_client: Any, bucket: str,
                                         tmp_path: Path) -> None:
    data = os.urandom(3 * CHUNK + 17)
    s3_client.put_object(Bucket=bucket, Key="o.bin", Body=data)
    agent = make_agent(f"s3://{bucket}", extra_args=["--chunk-size", "64KiB"])
    out = subprocess.run([str(Path(sys.executable).parent / "coldbrew"), "get",
                          f"s3://{bucket}/o.bin", "-", "--quiet", "--socket", str(agent.socket)],
                         capture_output=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == data and not (tmp_path / "-").exists()


@pytest.mark.parametrize("how", ("SIGTERM", "SIGKILL"))
def test_a_load_whose_agent_goes_away_finishes_from_the_origin(
        make_agent: Any, proxy: Any, s3: Any, s3_client: Any, bucket: str, monkeypatch: Any,
        how: str) -> None:
    import signal
    import threading

    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    g = torch.Generator().manual_seed(3)
    data = st_save({f"w{i}": torch.randn(512, 512, generator=g) for i in range(8)})  # 8 MiB
    s3_client.put_object(Bucket=bucket, Key="k/model.safetensors", Body=data)
    uri = f"s3://{bucket}/k/model.safetensors"
    agent = make_agent(f"s3://{bucket}", endpoint=proxy.url,
                       extra_args=["--chunk-size", "64KiB", *FAST])
    proxy.bandwidth = 3e6  # the agent's origin is slow: the load is mid-way when it dies
    started = threading.Event()

    def progress(done: int, total: int) -> None:
        if done:
            started.set()

    def kill_when_started() -> None:
        assert started.wait(30)
        agent.proc.send_signal(signal.SIGTERM if how == "SIGTERM" else signal.SIGKILL)

    killer = threading.Thread(target=kill_when_started)
    killer.start()
    sd = load_file(uri, socket=agent.socket, agent=None, cache_dir=False, progress=progress)
    killer.join()
    assert agent.proc.wait(20) is not None  # it did go away
    assert _same(dict(sd), data)
    sources = sd.stats["bytes_by_source"]
    assert sources.get("agent", 0) > 0 and sources.get("origin", 0) > 0, sources
    # agent=True asked for the agent: without it, the load fails as asked.
    from coldbrew.agent.errors import AgentUnavailable

    with pytest.raises(AgentUnavailable):
        load_file(uri, socket=agent.socket, agent=True, cache_dir=False)
