"""Peer-to-peer between real agent processes: real libtorrent, real S3 server, a counting proxy.

Every agent here runs on 127.0.0.1 with its own ports and cache; the S3 server sits
behind a FaultProxy, whose byte counters are the proof of how much came from the origin.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from support.data import put_random

from coldbrew.agent.core.manifest import Manifest, digest, sidecar_uri
from coldbrew.agent.devtools.locals3 import free_port_pair

CHUNK = 1 << 20
CHUNK_ARG = "1MiB"


@pytest.fixture
def swarm(make_agent: Any, proxy: Any, bucket: str) -> Any:
    """``swarm(n, **kw)``: n agents reading the bucket through the proxy, each listing the others."""

    def make(n: int, *, extra: list[list[str]] | None = None, start: bool = True) -> list[Any]:
        ports = [free_port_pair() for _ in range(n)]
        agents = []
        for i, port in enumerate(ports):
            others = ",".join(f"127.0.0.1:{p}" for p in ports if p != port)
            args = ["--chunk-size", CHUNK_ARG, "--p2p-port", str(port), "--p2p-address", "127.0.0.1",
                    "--peers-refresh-s", "0.5", "--p2p-chunk-timeout-s", "5", "--log-level", "DEBUG"]
            if others:
                args += ["--peers", others]
            args += (extra[i] if extra else [])
            agents.append(make_agent(f"s3://{bucket}", endpoint=proxy.url, start=start,
                                     extra_args=args, name=f"peer{i}"))
        if start:
            wait_for_peers(agents, n - 1)
        return agents

    return make


def wait_for_peers(agents: list[Any], count: int, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(a.metric("coldbrew_p2p_peers") >= count for a in agents):
            return
        time.sleep(0.1)
    raise AssertionError(f"agents did not find their {count} peer(s): "
                         f"{[a.metric('coldbrew_p2p_peers') for a in agents]}")


def prewarm_all(agents: list[Any], uri: str, timeout: float = 120) -> list[Any]:
    """``coldbrew prewarm --wait`` on every agent at the same moment."""
    results: list[Any] = [None] * len(agents)
    barrier = threading.Barrier(len(agents))

    def run(i: int) -> None:
        barrier.wait()
        results[i] = agents[i].cli("prewarm", uri, "--wait", "--quiet", timeout=timeout)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(agents))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, r in zip(agents, results):
        assert r.returncode == 0, f"prewarm failed: {r.stderr}\n{a.log()}"
    return results


def assert_exact(agent: Any, uri: str, data: bytes, tmp_path: Path) -> None:
    dest = tmp_path / f"out-{agent.socket.stem}-{hashlib.md5(uri.encode()).hexdigest()[:6]}"
    agent.cli("get", uri, str(dest), "--quiet", check=True)
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    dest.unlink()


def publish(agent: Any, uri: str, *args: str) -> Any:
    return agent.cli("publish", uri, "--chunk-size", CHUNK_ARG, "--quiet", *args, check=True)


def p2p_status(agent: Any) -> dict[str, Any]:
    return json.loads(agent.cli("status", "--json", check=True).stdout)["agent"]["p2p"]


def wait_shared(agent: Any, torrents: int, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if agent.metric("coldbrew_p2p_torrents") >= torrents:
            return
        time.sleep(0.1)
    raise AssertionError(f"agent shares {agent.metric('coldbrew_p2p_torrents')} file(s), "
                         f"expected {torrents}:\n{agent.log()}")


# --- publish ------------------------------------------------------------------------------


def test_publish_writes_a_verifiable_manifest_hidden_from_listings(
        swarm: Any, s3_client: Any, bucket: str, proxy: Any) -> None:
    data = put_random(s3_client, bucket, "m/model.safetensors", 5 * CHUNK + 123, seed=1)
    (agent,) = swarm(1)
    out = publish(agent, f"s3://{bucket}/m/")
    assert "published: " in out.stdout and "(6 chunks)" in out.stdout
    raw = s3_client.get_object(Bucket=bucket, Key="m/.coldbrew/model.safetensors.manifest.json")
    manifest = Manifest.from_json(json.loads(raw["Body"].read()))
    assert sidecar_uri(f"s3://{bucket}/m/model.safetensors").endswith(
        "m/.coldbrew/model.safetensors.manifest.json")
    assert manifest.chunk_size == CHUNK and manifest.identity.size == len(data)
    for i in range(6):
        piece = data[i * CHUNK:(i + 1) * CHUNK]
        assert manifest.digests[i] == digest(piece)
        assert manifest.sha1s[i] == hashlib.sha1(piece).hexdigest()
    # A second run finds it up to date; --force rewrites it.
    assert "up to date: " in publish(agent, f"s3://{bucket}/m/").stdout
    assert "published: " in publish(agent, f"s3://{bucket}/m/", "--force").stdout
    # The sidecar folder is coldbrew's, not the model's: not listed, not prewarmed.
    ls = json.loads(agent.cli("ls", "m/", "--json", check=True).stdout)
    assert [e["name"] for e in ls["entries"]] == ["model.safetensors"]
    job = json.loads(agent.cli("prewarm", "m/", "--wait", "--json", check=True).stdout)
    assert job["files"] == 1


def test_publish_errors_are_clear(swarm: Any, bucket: str) -> None:
    (agent,) = swarm(1)
    missing = agent.cli("publish", f"s3://{bucket}-nope/m/", "--quiet")
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    bad = agent.cli("publish", f"s3://{bucket}/m/", "--chunk-size", "3MiB")
    assert bad.returncode == 2 and "power of two" in bad.stderr


# --- sharing --------------------------------------------------------------------------------


def test_three_agents_pull_a_published_model_from_the_origin_about_once(
        swarm: Any, s3_client: Any, bucket: str, proxy: Any, tmp_path: Path) -> None:
    files = {f"llm/model-0000{i}-of-00002.safetensors": put_random(
        s3_client, bucket, f"llm/model-0000{i}-of-00002.safetensors", 12 * CHUNK + 4567, seed=10 + i)
        for i in (1, 2)}
    total = sum(len(d) for d in files.values())
    agents = swarm(3)
    publish(agents[0], f"s3://{bucket}/llm/")
    proxy.reset_counts()
    proxy.bandwidth = 40e6  # the origin is the bottleneck, as in a real rollout
    prewarm_all(agents, f"s3://{bucket}/llm/")
    from_origin = proxy.counts["response_body_bytes"]
    proxy.bandwidth = None
    assert from_origin <= 1.1 * total, f"origin served {from_origin / total:.2f}x the model"
    received = [a.metric("coldbrew_p2p_received_bytes_total") for a in agents]
    assert sum(received) >= 1.5 * total, received  # most of it went peer to peer
    for a in agents:
        for key, data in files.items():
            assert_exact(a, f"s3://{bucket}/{key}", data, tmp_path)
    st = p2p_status(agents[0])
    assert len(st["peers"]) == 2 and st["torrents"] == 2
    assert st["bytes_from_peers"] == received[0] and st["peers_banned"] == 0
    assert sum(p2p_status(a)["bytes_to_peers"] for a in agents) > 0
    assert "p2p: 2 peer(s)" in agents[1].cli("status", check=True).stdout


def test_without_a_published_manifest_the_first_agent_builds_it(
        swarm: Any, s3_client: Any, bucket: str, proxy: Any, tmp_path: Path) -> None:
    data = put_random(s3_client, bucket, "raw/model.bin", 9 * CHUNK + 99, seed=3)
    first, second = swarm(2)
    first.cli("prewarm", "raw/model.bin", "--wait", "--quiet", check=True)
    wait_shared(first, 1)
    assert first.metric("coldbrew_p2p_manifests_total", source="built") == 1
    assert first.metric("coldbrew_p2p_received_bytes_total") == 0  # it had no one to ask
    proxy.reset_counts()
    second.cli("prewarm", "raw/model.bin", "--wait", "--quiet", check=True)
    assert second.metric("coldbrew_p2p_manifests_total", source="peer") == 1
    assert second.metric("coldbrew_p2p_received_bytes_total") == len(data)
    assert second.metric("coldbrew_origin_bytes_total") == 0
    assert proxy.counts["response_body_bytes"] < 0.05 * len(data)  # metadata only
    assert_exact(second, f"s3://{bucket}/raw/model.bin", data, tmp_path)
    # Served bytes are counted by where they came from: the prewarm took them all from the
    # first agent, so the first read of each chunk is a peer's bytes, and none the origin's.
    assert second.metric("coldbrew_bytes_served_total", source="peer") == len(data)
    assert second.metric("coldbrew_bytes_served_total", source="origin") == 0
    # A restart keeps sharing what it had (the manifest is kept with the cache entry), and
    # serves it: the first agent drops its copy and gets every byte back from the second.
    second.stop()
    second.start()
    wait_shared(second, 1)
    first.cli("evict", "raw/model.bin", check=True)
    wait_for_peers([first, second], 1)
    proxy.reset_counts()
    before = first.metric("coldbrew_p2p_received_bytes_total")
    first.cli("prewarm", "raw/model.bin", "--wait", "--quiet", check=True, timeout=60)
    assert first.metric("coldbrew_p2p_received_bytes_total") - before == len(data)
    assert proxy.counts["response_body_bytes"] < 0.05 * len(data)  # metadata only
    assert_exact(first, f"s3://{bucket}/raw/model.bin", data, tmp_path)


def test_a_peer_killed_mid_transfer_costs_a_fallback_not_a_stall(
        swarm: Any, s3_client: Any, bucket: str, proxy: Any, tmp_path: Path) -> None:
    data = put_random(s3_client, bucket, "k/model.safetensors", 24 * CHUNK, seed=4)
    seed, leech = swarm(2, extra=[["--p2p-upload-limit", "3MiB"], []])
    publish(seed, f"s3://{bucket}/k/")
    seed.cli("prewarm", "k/", "--wait", "--quiet", check=True)
    leech.cli("prewarm", "k/", check=True)  # started, not waited on
    deadline = time.monotonic() + 30
    while leech.metric("coldbrew_p2p_received_bytes_total") < 3 * CHUNK:
        assert time.monotonic() < deadline, "no bytes arrived from the seed"
        time.sleep(0.05)
    seed.kill()
    # The same files again, waited on: joins what is in flight, returns when all is cached.
    done = json.loads(leech.cli("prewarm", "k/", "--wait", "--json", check=True, timeout=60).stdout)
    assert done["state"] == "done", done
    assert leech.metric("coldbrew_p2p_received_bytes_total") < len(data)  # the seed died first
    assert leech.metric("coldbrew_origin_bytes_total") > 0  # the rest came from the origin
    assert_exact(leech, f"s3://{bucket}/k/model.safetensors", data, tmp_path)


def test_a_lying_peer_is_banned_and_costs_no_wrong_byte(
        swarm: Any, s3_client: Any, bucket: str, tmp_path: Path) -> None:
    data = put_random(s3_client, bucket, "l/model.safetensors", 8 * CHUNK, seed=5)
    liar, victim = swarm(2)
    publish(liar, f"s3://{bucket}/l/")
    liar.cli("prewarm", "l/", "--wait", "--quiet", check=True)
    # The liar's disk rots under it: libtorrent serves its data file as it is.
    files = sorted(liar.cache_dir.glob("coldbrew-v2/files/*/*/data"))
    assert len(files) == 1 and files[0].stat().st_size == 8 * CHUNK
    with open(files[0], "r+b") as f:
        f.seek(2 * CHUNK + 1000)
        byte = f.read(1)
        f.seek(2 * CHUNK + 1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    victim.cli("prewarm", "l/", "--wait", "--quiet", check=True, timeout=60)
    assert victim.metric("coldbrew_p2p_peers_banned_total") >= 1
    assert victim.metric("coldbrew_corrupt_chunks_total", source="peer") >= 1
    assert victim.metric("coldbrew_origin_bytes_total") >= CHUNK  # the bad chunk, refetched
    assert_exact(victim, f"s3://{bucket}/l/model.safetensors", data, tmp_path)
