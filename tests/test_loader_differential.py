"""The loader against ``safetensors.torch.load_file``, from every kind of source.

One corpus of generated files (every dtype torch has, 0-d and empty tensors,
odd alignments, unicode names, metadata, sharded dirs with and without an
index) is loaded from a local path, from S3 without an agent (cold, then from
the write-through cache), and from S3 through a real agent; each result must
equal what safetensors reads from the same bytes. Spans are shrunk to 64 KiB
(the agent's smallest chunk) so tensors cross span lines, share spans, and
take both kinds of origin GET (straight into the tensor, or through scratch).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_loader_files import assert_same, cast_like_the_loader, make_file, reference, write_shards

import coldbrew.loader.sources as sources
from coldbrew.loader import iter_tensors, load_dir, load_file, wait_writeback
from coldbrew.loader.header import parse_prefix

KiB = 1 << 10
SEEDS = range(24)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for seed in SEEDS:
        (root / f"f{seed:02d}.safetensors").write_bytes(make_file(seed, big=seed % 3 == 0))
    write_shards(root / "sharded", 1, 3, index=True)
    write_shards(root / "plain", 2, 2, index=False)
    return root


def single_files(root: Path) -> list[Path]:
    return sorted(root.glob("f*.safetensors"))


@pytest.fixture
def small_spans(monkeypatch):
    monkeypatch.setattr(sources.Source, "span_bytes", 64 * KiB)
    monkeypatch.setattr(sources, "HEADER_PROBE_BYTES", 64)  # most headers need a second GET


def upload(s3_client, bucket: str, root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            s3_client.put_object(Bucket=bucket, Key=f"m/{p.relative_to(root)}", Body=p.read_bytes())


def file_order(path: Path) -> list[str]:
    data = path.read_bytes()
    return [t.name for t in parse_prefix(data, file_size=len(data), source=str(path)).tensors]


def check_all(corpus: Path, location, **kw) -> list[dict]:
    """Load every corpus file and dir from ``location(relpath)``; compare; return stats."""
    stats = []
    for path in single_files(corpus):
        ref, meta = reference(path)
        got = load_file(location(path.name), **kw)
        assert_same(got, ref, path.name)
        assert got.metadata == meta
        stats.append(got.stats)
    for sub in ("sharded", "plain"):
        ref = {}
        for shard in sorted((corpus / sub).glob("*.safetensors")):
            ref.update(reference(shard)[0])
        got = load_dir(location(sub), **kw)
        assert_same(got, ref, sub)
        assert got.metadata is None or got.metadata.get("format") == "pt"
        stats.append(got.stats)
    return stats


# --- local files ----------------------------------------------------------------------------


def test_local_files_equal_safetensors(corpus, small_spans):
    check_all(corpus, lambda rel: str(corpus / rel), cache_dir=False)


def test_local_default_spans_and_file_uri(corpus):
    check_all(corpus, lambda rel: f"file://{corpus / rel}", cache_dir=False)


def test_iter_tensors_yields_in_file_order(corpus, small_spans):
    for path in single_files(corpus)[:8]:
        ref, _ = reference(path)
        got = list(iter_tensors(path, cache_dir=False))
        assert [n for n, _ in got] == file_order(path)
        assert_same(dict(got), ref, path.name)
    shards = sorted((corpus / "sharded").glob("*.safetensors"))
    got = list(iter_tensors(corpus / "sharded", cache_dir=False))
    assert [n for n, _ in got] == [n for s in shards for n in file_order(s)]


def test_iter_tensors_streams_within_a_small_budget(corpus, small_spans):
    path = corpus / "f00.safetensors"
    ref, _ = reference(path)
    got = {}
    for name, t in iter_tensors(path, cache_dir=False, budget_bytes=1, concurrency=2):
        got[name] = t.clone()
    assert_same(got, ref)


def test_name_filter_and_dtype_cast(corpus, small_spans):
    path = corpus / "sharded" / "model-00002-of-00003.safetensors"
    ref, _ = reference(path)
    wanted = sorted(ref)[:3]
    got = load_file(path, names=wanted, cache_dir=False)
    assert_same(got, {n: ref[n] for n in wanted})
    got = load_file(path, names=lambda n: n.endswith("1.weight"), cache_dir=False)
    assert_same(got, {n: t for n, t in ref.items() if n.endswith("1.weight")})
    # Through the index: only the shards holding wanted names are opened.
    got = load_dir(corpus / "sharded", names=wanted, cache_dir=False)
    assert_same(got, {n: ref[n] for n in wanted})
    assert len(got.files) == 1
    with pytest.raises(KeyError, match="nope"):
        load_dir(corpus / "sharded", names=["nope"], cache_dir=False)
    with pytest.raises(KeyError, match="nope"):
        load_file(path, names=["nope"], cache_dir=False)
    # dtype casts floating-point tensors only, like from_pretrained's torch_dtype.
    got = load_file(path, dtype=torch.float16, cache_dir=False)
    assert_same(got, cast_like_the_loader(ref, torch.float16))
    assert any(t.dtype == torch.float16 for t in got.values())
    assert any(not t.dtype.is_floating_point for t in got.values())


def test_loaded_tensors_are_owned_and_writable(corpus):
    got = load_file(corpus / "f00.safetensors", cache_dir=False)
    for t in got.values():
        if t.numel() and t.dtype in (torch.float32, torch.bfloat16, torch.int64, torch.uint8):
            t.zero_()  # over a read-only mmap this would kill the process


# --- S3 without an agent, then from the write-through cache ------------------------------


def test_s3_without_agent_then_from_cache(corpus, small_spans, loader_env, bucket, s3_client,
                                         tmp_path):
    upload(s3_client, bucket, corpus)
    cold = check_all(corpus, lambda rel: f"s3://{bucket}/m/{rel}")
    assert wait_writeback(60)
    assert all(set(s["bytes_by_source"]) <= {"origin"} for s in cold)
    warm = check_all(corpus, lambda rel: f"s3://{bucket}/m/{rel}")
    assert all(set(s["bytes_by_source"]) <= {"cache"} for s in warm), warm
    assert any(s["bytes_by_source"] for s in warm)
    # With the cache switched off, the origin again.
    again = check_all(corpus, lambda rel: f"s3://{bucket}/m/{rel}", cache_dir=False)
    assert all(set(s["bytes_by_source"]) <= {"origin"} for s in again)


def test_s3_prefix_without_trailing_slash_is_a_dir(corpus, loader_env, bucket, s3_client):
    upload(s3_client, bucket, corpus / "plain")
    ref = {}
    for shard in sorted((corpus / "plain").glob("*.safetensors")):
        ref.update(reference(shard)[0])
    got = dict(iter_tensors(f"s3://{bucket}/m", cache_dir=False))
    assert_same(got, ref)


# --- S3 through the agent -----------------------------------------------------------------


def test_s3_via_agent(corpus, small_spans, bucket, s3_client, make_agent, monkeypatch):
    upload(s3_client, bucket, corpus)
    agent = make_agent(f"s3://{bucket}", extra_args=["--chunk-size", "64KiB"])
    monkeypatch.setenv("COLDBREW_SOCKET", str(agent.socket))
    stats = check_all(corpus, lambda rel: f"s3://{bucket}/m/{rel}", agent=True, cache_dir=False)
    assert all(set(s["bytes_by_source"]) <= {"agent"} for s in stats)
    assert agent.metric("coldbrew_corrupt_chunks_total", source="cache") == 0
    # The same files again: all from the agent's cache, not one more origin GET.
    gets = agent.metric("coldbrew_origin_requests_total", op="get", outcome="ok")
    check_all(corpus, lambda rel: f"s3://{bucket}/m/{rel}", agent=True, cache_dir=False)
    assert agent.metric("coldbrew_origin_requests_total", op="get", outcome="ok") == gets


# --- the agent's FUSE mount -----------------------------------------------------------------


def test_files_on_the_fuse_mount(corpus, small_spans, bucket, s3_client, make_agent, tmp_path):
    """A path under the mount is a local path: same tensors, every byte through the node cache."""
    import subprocess

    upload(s3_client, bucket, corpus)
    mnt = tmp_path / "models"
    agent = make_agent(f"s3://{bucket}", extra_args=["--chunk-size", "64KiB", "--mount", str(mnt)])
    try:
        stats = check_all(corpus, lambda rel: str(mnt / "m" / rel), cache_dir=False, agent=False)
        assert all(set(s["bytes_by_source"]) <= {"local"} for s in stats)
        assert agent.metric("coldbrew_fuse_read_bytes_total") > 0
        assert agent.metric("coldbrew_origin_bytes_total") > 0, "the mount read through the agent"
    finally:
        agent.stop()
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, check=False)


def test_a_header_read_in_two_gets_never_resizes_a_buffer_a_reader_may_hold(monkeypatch):
    """The executor thread that filled the first probe may still hold its view a moment after
    the read returned (it drops its work item after setting the result). Growing the probe in
    place then raised BufferError (seen once in CI); here the origin holds every view for good."""
    import asyncio
    import json
    import struct

    from coldbrew.agent.origin.adaptive import FixedLimit
    from coldbrew.agent.origin.flow import Flow
    from coldbrew.agent.origin.origin import ObjectInfo

    header = json.dumps({"t": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}).encode()
    data = struct.pack("<Q", len(header)) + header + b"abcd"
    held: list[memoryview] = []

    class HoldingOrigin:  # a real origin's data plane, minus the network and the race
        flow = Flow(FixedLimit(2))

        async def read_into(self, obj: ObjectInfo, start: int, view: memoryview) -> None:
            view[:] = data[start:start + len(view)]
            held.append(view)

    monkeypatch.setattr(sources, "HEADER_PROBE_BYTES", 16)
    info = ObjectInfo("s3://b/m.safetensors", len(data), '"e"')
    source = asyncio.run(sources.OriginSource.open(HoldingOrigin(), info))
    assert len(held) == 2, "the header took a second GET"
    assert source.header_bytes == data[:8 + len(header)]
