"""The loader's direct path as the network sees it: requests per byte, and in flight across
the files of a sharded load. Real S3 server, real loader, a FaultProxy recording every request."""

from __future__ import annotations

import re
from pathlib import Path

import safetensors.torch
import torch
from support.faultproxy import Fault
from test_loader_files import assert_same, reference

from coldbrew.loader import iter_tensors, load_dir, load_file, sources
from coldbrew.loader.header import parse_prefix
from coldbrew.loader.plan import plan_reads

KiB, MiB = 1 << 10, 1 << 20


def _upload(s3_client, bucket: str, root: Path, prefix: str) -> None:
    for p in sorted(root.iterdir()):
        s3_client.put_object(Bucket=bucket, Key=f"{prefix}/{p.name}", Body=p.read_bytes())


def _data_gets(timeline, name: str) -> list:
    """The ranged GETs of one file after its header's (which every file sends at open)."""
    gets = [r for r in timeline if r.method == "GET" and r.range and name in r.target]
    return [r for r in gets if not r.range.startswith("bytes=0-")]


def test_a_sharded_load_keeps_reads_in_flight_across_files(loader_env, s3_client, bucket, proxy,
                                                          tmp_path, monkeypatch):
    """The next shard's reads start while the last ones of the shard before are still out, so
    the pipe does not drain at each file boundary; tensors still come in file order."""
    monkeypatch.setattr(sources.Source, "span_bytes", 64 * KiB)
    root = tmp_path / "model"
    root.mkdir()
    gen = torch.Generator().manual_seed(9)
    files = {}
    for shard in (1, 2):  # ~1.5 MiB each: some 24 spans of 64 KiB per file
        name = f"model-0000{shard}-of-00002.safetensors"
        safetensors.torch.save_file(
            {f"layers.{shard}.{i}": torch.randn(6000 + 17 * i, generator=gen) for i in range(60)},
            str(root / name))
        files[name] = root / name
    _upload(s3_client, bucket, root, "sharded")
    first, second = sorted(files)
    # Every data GET takes 40 ms more: a window of reads is always out when a file ends.
    rule = proxy.add_fault(Fault.delay(0.04), method="GET", ranged_only=True)
    proxy.reset_counts()
    got = load_dir(f"s3://{bucket}/sharded/", endpoint_url=proxy.url, concurrency=4,
                   cache_dir=False, agent=False)
    assert rule.applied > 10, "the delay fired"
    ref = {}
    for name in (first, second):
        ref.update(reference(files[name])[0])
    assert_same(got, ref, "load_dir")
    timeline = proxy.timeline
    a, b = _data_gets(timeline, first), _data_gets(timeline, second)
    assert len(a) > 8 and len(b) > 8, (len(a), len(b))
    # The second shard began while the first still had reads out (each takes 40 ms more than
    # the loader's few ms to start a file). Loading them one after the other gives 0.
    assert got.stats["files_overlapped"] == 1, got.stats
    # iter_tensors hands the tensors over in file order, shard by shard, all the same.
    names = [n for n, _ in iter_tensors(f"s3://{bucket}/sharded/", endpoint_url=proxy.url,
                                        concurrency=4, cache_dir=False, agent=False)]
    want = [*safetensors.torch.load_file(str(files[first])),
            *safetensors.torch.load_file(str(files[second]))]
    order = {n: i for i, n in enumerate(want)}
    assert sorted(names, key=order.__getitem__) == names


def test_one_get_per_span_however_many_tensors_it_carries(loader_env, s3_client, bucket, proxy,
                                                         tmp_path):
    """Forty 1.5 MiB tensors on the 16 MiB grid: one GET per span of the plan (and one for the
    header), not one per tensor: each GET costs a round trip and the server's first byte."""
    gen = torch.Generator().manual_seed(3)
    tensors = {f"w{i:02d}": torch.randint(0, 255, (1536 * KiB,), dtype=torch.uint8, generator=gen)
               for i in range(40)}
    path = tmp_path / "many.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    data = path.read_bytes()
    s3_client.put_object(Bucket=bucket, Key="many.safetensors", Body=data)
    proxy.reset_counts()
    got = load_file(f"s3://{bucket}/many.safetensors", endpoint_url=proxy.url, cache_dir=False,
                    agent=False)
    assert_same(got, reference(path)[0], "load_file")
    header = parse_prefix(data, file_size=len(data), source="many")
    spans = plan_reads(header, span_bytes=sources.DEFAULT_SPAN_BYTES)
    gets = [r for r in proxy.timeline if r.method == "GET" and r.range]
    assert len(gets) == len(spans) + 1, (len(gets), len(spans))
    # Each span's GET is exactly its bytes: nothing asked twice, nothing padded.
    asked = sorted((int(m[1]), int(m[2]) + 1) for m in
                   (re.match(r"bytes=(\d+)-(\d+)", r.range) for r in _data_gets(gets, "many")))
    assert asked == sorted((s.begin, s.end) for s in spans)
    assert got.stats["bytes_by_source"] == {"origin": sum(s.nbytes for s in spans)}
