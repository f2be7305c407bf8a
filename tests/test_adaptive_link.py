"""The automatic fetch_concurrency on a link where one connection is slow: a FaultProxy caps
each response body's rate and delays every first byte, as a long-haul S3 connection does.
A real agent and the real loader against the real S3 server behind it."""

from __future__ import annotations

import time

import safetensors.torch
import torch
from support.data import put_random
from support.faultproxy import Fault
from test_loader_files import assert_same, reference

from coldbrew.loader import load_file, sources

KiB, MiB = 1 << 10, 1 << 20


def _most_at_once(timeline) -> int:
    """The most ranged GETs the proxy had open at one moment."""
    edges = sorted([(r.began, 1) for r in timeline if r.range] +
                   [(r.ended, -1) for r in timeline if r.range])
    now = most = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def _slow_link(proxy) -> None:
    proxy.connection_bandwidth = 3 * MiB  # per connection: 8 in flight carry 24 MiB/s
    proxy.add_fault(Fault.delay(0.03), method="GET", ranged_only=True)  # first byte


def test_a_prewarm_opens_up_on_a_slow_link(bucket, s3_client, make_agent, proxy, tmp_path):
    size = 40 * MiB
    data = put_random(s3_client, bucket, "m/slow.bin", size, 21)
    uri = f"s3://{bucket}/m/slow.bin"
    _slow_link(proxy)
    args = ["--chunk-size", "256KiB"]
    seconds, most = {}, {}
    for name, extra in (("fixed", ["--fetch-concurrency", "8"]), ("auto", [])):
        agent = make_agent(f"s3://{bucket}", endpoint=proxy.url, extra_args=[*args, *extra],
                           name=name)
        proxy.reset_counts()
        started = time.monotonic()
        agent.cli("prewarm", uri, "--wait", "--quiet", check=True, timeout=120)
        seconds[name] = time.monotonic() - started
        most[name] = _most_at_once(proxy.timeline)
        if name == "auto":
            assert agent.metric("coldbrew_origin_concurrency") > 8
            assert agent.metric("coldbrew_origin_throughput_bytes_per_second") > 0
            status = agent.cli("status", check=True).stdout
            assert "GETs in flight (auto)" in status, status
            dest = tmp_path / "slow.bin"
            agent.cli("get", uri, str(dest), "--quiet", check=True)
            assert dest.read_bytes() == data
        agent.stop()
    assert most["fixed"] <= 8 < most["auto"], most
    # Side by side on the same link: the adapted prewarm is clearly the faster.
    assert seconds["auto"] < 0.8 * seconds["fixed"], seconds


def test_the_loader_opens_up_on_a_slow_link(loader_env, bucket, s3_client, proxy, tmp_path,
                                            monkeypatch):
    gen = torch.Generator().manual_seed(5)
    tensors = {f"w{i}": torch.randint(-99, 99, (3 * MiB // 4,), dtype=torch.int32, generator=gen)
               for i in range(12)}  # 36 MiB in 3 MiB tensors
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    s3_client.put_object(Bucket=bucket, Key="m.safetensors", Body=path.read_bytes())
    _slow_link(proxy)
    # Spans of 1 MiB: enough GETs in a small model for several rounds of the limit.
    monkeypatch.setattr(sources.Source, "span_bytes", 1 * MiB)
    proxy.reset_counts()
    got = load_file(f"s3://{bucket}/m.safetensors", endpoint_url=proxy.url, cache_dir=False,
                    agent=False)
    assert_same(got, reference(path)[0], "load_file")
    assert got.stats["origin_concurrency"] > 8, got.stats
    assert _most_at_once(proxy.timeline) > 8
