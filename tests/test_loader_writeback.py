"""Write-through: loads without an agent leave a verified local copy; faults cost speed only.

The S3 traffic is counted by the fault proxy between the loader and the S3
server, so "the second load reads no byte from S3" is measured at the wire.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import xxhash
from support.faultproxy import Fault
from test_loader_files import assert_same, make_file, reference, write_shards

import coldbrew.loader.sources as sources
from coldbrew.agent.core.manifest import FileIdentity
from coldbrew.agent.errors import ObjectChanged, ObjectNotFound
from coldbrew.loader import load_dir, load_file, wait_writeback
from coldbrew.loader.writeback import LAYOUT, WriteThroughCache

KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture
def env(s3, monkeypatch, tmp_path):
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("COLDBREW_SOCKET", str(tmp_path / "no-agent.sock"))
    monkeypatch.setattr(sources.Source, "span_bytes", 256 * KiB)


@pytest.fixture
def model(bucket, s3_client, tmp_path):
    """A ~3 MiB file in S3 and its reference tensors."""
    data = make_file(7, count=10, big=True)
    while len(data) < 2 * MiB:  # make sure it spans several blocks
        data = make_file(len(data), count=14, big=True)
    s3_client.put_object(Bucket=bucket, Key="m/model.safetensors", Body=data)
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    return f"s3://{bucket}/m/model.safetensors", data, reference(path)[0]


def identity_of(s3_client, bucket, uri, size):
    etag = s3_client.head_object(Bucket=bucket, Key=uri.split("/", 3)[3])["ETag"]
    return FileIdentity(uri, etag, size)


def test_first_load_leaves_verified_entry_second_reads_no_s3_byte(env, model, proxy, tmp_path,
                                                                  s3_client, bucket):
    uri, data, ref = model
    cache_dir = tmp_path / "cache"
    first = load_file(uri, endpoint_url=proxy.url, cache_dir=cache_dir)
    assert_same(first, ref)
    assert first.stats["bytes_by_source"] == {"origin": first.stats["bytes"]}
    assert wait_writeback(30)
    entry = WriteThroughCache(cache_dir).lookup(identity_of(s3_client, bucket, uri, len(data)))
    assert entry is not None
    assert entry.data_path.read_bytes() == data
    assert all(xxhash.xxh3_128_hexdigest(data[b:b + entry.block_bytes]) == d
               for b, d in zip(range(0, len(data), entry.block_bytes), entry.digests))
    assert not list((cache_dir / LAYOUT / "tmp").iterdir())

    proxy.reset_counts()
    second = load_file(uri, endpoint_url=proxy.url, cache_dir=cache_dir)
    assert_same(second, ref)
    assert second.stats["bytes_by_source"] == {"cache": second.stats["bytes"]}
    assert proxy.counts["ranged_gets"] == 0, proxy.counts
    assert proxy.counts["response_body_bytes"] == 0, proxy.counts  # a HEAD for the ETag only


def test_corrupt_cache_block_is_read_from_origin_and_entry_dropped(env, model, proxy, tmp_path,
                                                                   s3_client, bucket, caplog):
    caplog.set_level("INFO", logger="coldbrew.loader")
    uri, data, ref = model
    cache_dir = tmp_path / "cache"
    load_file(uri, endpoint_url=proxy.url, cache_dir=cache_dir)
    assert wait_writeback(30)
    cache = WriteThroughCache(cache_dir)
    identity = identity_of(s3_client, bucket, uri, len(data))
    entry = cache.lookup(identity)
    with open(entry.data_path, "r+b") as f:  # bit rot in the second block
        f.seek(entry.block_bytes + 1000)
        byte = f.read(1)
        f.seek(entry.block_bytes + 1000)
        f.write(bytes([byte[0] ^ 1]))
    proxy.reset_counts()
    got = load_file(uri, endpoint_url=proxy.url, cache_dir=cache_dir)
    assert_same(got, ref)
    by = got.stats["bytes_by_source"]
    assert 0 < by["origin"] <= entry.block_bytes and by["cache"] > 0
    assert "could not be used" in caplog.text, "the warm start met the bad block first"
    assert "checked_while_loading" not in got.stats
    assert 1 <= proxy.counts["ranged_gets"] <= 4
    assert cache.lookup(identity) is None, "a corrupt entry is dropped"


# --- warm starts: cached bytes read while the origin confirms the versions -----------------


@pytest.fixture
def sharded(bucket, s3_client, tmp_path):
    """A 3-shard model dir with an index, in S3 under m/dir/, and its reference tensors."""
    files = write_shards(tmp_path / "dir", 5, 3, index=True)
    for p in (tmp_path / "dir").iterdir():
        s3_client.put_object(Bucket=bucket, Key=f"m/dir/{p.name}", Body=p.read_bytes())
    ref: dict = {}
    for path in files.values():
        ref.update(reference(path)[0])
    return f"s3://{bucket}/m/dir/", files, ref


def test_warm_dir_load_reads_cache_while_origin_confirms(env, sharded, proxy, tmp_path):
    uri, files, ref = sharded
    cache_dir = tmp_path / "cache"
    first = load_dir(uri, endpoint_url=proxy.url, cache_dir=cache_dir)
    assert_same(first, ref)
    assert "checked_while_loading" not in first.stats
    assert wait_writeback(30)
    assert list((cache_dir / LAYOUT / "locations").glob("*.json")), "the location was recorded"

    proxy.reset_counts()
    second = load_dir(uri, endpoint_url=proxy.url, cache_dir=cache_dir)
    assert_same(second, ref)
    assert second.stats["checked_while_loading"] is True
    assert second.stats["bytes_by_source"] == {"cache": second.stats["bytes"]}
    assert second.files == [uri + name for name in sorted(files)]
    index_bytes = (tmp_path / "dir" / "model.safetensors.index.json").stat().st_size
    assert proxy.counts["response_body_bytes"] == index_bytes, "no tensor byte came from S3"
    assert proxy.counts["by_method"]["HEAD"] >= len(files), "every file's version was checked"


def test_replaced_object_is_never_served_from_a_warm_start(env, model, proxy, tmp_path, s3_client,
                                                          bucket, caplog):
    caplog.set_level("INFO", logger="coldbrew.loader")
    uri, data, _ = model
    cache_dir = tmp_path / "cache"
    load_file(uri, endpoint_url=proxy.url, cache_dir=cache_dir)
    assert wait_writeback(30)
    new = make_file(1234, count=12, big=True)
    s3_client.put_object(Bucket=bucket, Key="m/model.safetensors", Body=new)
    (tmp_path / "new.safetensors").write_bytes(new)
    got = load_file(uri, endpoint_url=proxy.url, cache_dir=cache_dir)
    assert_same(got, reference(tmp_path / "new.safetensors")[0])
    assert "changed at the origin since it was cached" in caplog.text, "the warm start really ran"
    assert got.stats["bytes_by_source"] == {"origin": got.stats["bytes"]}
    assert wait_writeback(30)
    third = load_file(uri, endpoint_url=proxy.url, cache_dir=cache_dir)
    assert third.stats["checked_while_loading"] is True
    assert_same(third, reference(tmp_path / "new.safetensors")[0])


def test_deleted_object_is_an_error_not_a_stale_warm_start(env, model, tmp_path, s3_client, bucket):
    uri, data, _ = model
    cache_dir = tmp_path / "cache"
    load_file(uri, cache_dir=cache_dir)
    assert wait_writeback(30)
    assert WriteThroughCache(cache_dir).recall("file:" + uri)
    s3_client.delete_object(Bucket=bucket, Key="m/model.safetensors")
    with pytest.raises(ObjectNotFound, match="model.safetensors"):
        load_file(uri, cache_dir=cache_dir)


def test_torn_or_foreign_entries_are_never_served(env, model, tmp_path, s3_client, bucket, proxy):
    uri, data, ref = model
    cache_dir = tmp_path / "cache"
    load_file(uri, cache_dir=cache_dir)
    assert wait_writeback(30)
    cache = WriteThroughCache(cache_dir)
    identity = identity_of(s3_client, bucket, uri, len(data))
    entry = cache.lookup(identity)
    meta = entry.data_path.with_suffix(".json")
    saved = meta.read_bytes()
    meta.unlink()  # data without its sidecar: never committed
    assert cache.lookup(identity) is None
    meta.write_bytes(saved)
    with open(entry.data_path, "r+b") as f:  # a short data file
        f.truncate(len(data) - 1)
    assert cache.lookup(identity) is None
    proxy.reset_counts()
    got = load_file(uri, endpoint_url=proxy.url, cache_dir=cache_dir)
    assert_same(got, ref)
    assert got.stats["bytes_by_source"] == {"origin": got.stats["bytes"]}
    assert proxy.counts["ranged_gets"] > 0
    assert wait_writeback(30)
    assert cache.lookup(identity) is not None, "the next load rewrote it"


def test_cache_write_failures_never_fail_the_load(env, model, tmp_path, caplog):
    uri, data, ref = model
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    got = load_file(uri, cache_dir=not_a_dir)
    assert_same(got, ref)
    assert wait_writeback(30)
    assert "could not cache" in caplog.text


@pytest.fixture
def tiny_disk(make_tmpfs):
    return make_tmpfs("1m")


def test_full_cache_disk(env, model, tiny_disk, caplog):
    """The file's blocks are asked for when its entry opens: the 1 MiB disk says no before a
    byte is written. The load goes on from the origin, and nothing is left behind: no temp
    file, and no location record (it would name a file that is not cached)."""
    uri, data, ref = model
    got = load_file(uri, cache_dir=tiny_disk / "cache")
    assert_same(got, ref)
    assert wait_writeback(30)
    assert "could not cache" in caplog.text and "No space left" in caplog.text
    files = [p for p in (tiny_disk / "cache").rglob("*") if p.is_file()]
    assert files == [], f"a failed entry leaves nothing behind: {files}"


def test_object_replaced_mid_load_raises_and_caches_nothing(env, model, proxy, tmp_path, s3_client,
                                                            bucket):
    uri, data, ref = model
    cache_dir = tmp_path / "cache"
    proxy.add_fault(Fault.delay(0.25), method="GET", ranged_only=True)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            load_file(uri, endpoint_url=proxy.url, cache_dir=cache_dir, concurrency=1)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 30
    while proxy.counts["ranged_gets"] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # the header is read and data GETs have begun
    s3_client.put_object(Bucket=bucket, Key="m/model.safetensors", Body=make_file(99, count=3))
    t.join(60)
    assert len(errors) == 1 and isinstance(errors[0], ObjectChanged), errors
    assert "model.safetensors" in str(errors[0]) and "reading tensor" in str(errors[0])
    assert wait_writeback(30)
    assert not list(cache_dir.rglob("*.json")) and not list(cache_dir.rglob("*.part"))


KILLED_LOAD = textwrap.dedent("""
    import sys
    import coldbrew.loader.sources as sources
    from coldbrew.loader import load_file
    sources.Source.span_bytes = 256 << 10
    print("start", flush=True)
    load_file(sys.argv[1], endpoint_url=sys.argv[2], cache_dir=sys.argv[3], concurrency=1)
    print("done", flush=True)
""")


def test_kill_during_load_leaves_nothing_servable(env, model, proxy, tmp_path, s3_client, bucket, s3):
    uri, data, ref = model
    cache_dir = tmp_path / "cache"
    proxy.add_fault(Fault.delay(0.3), method="GET", ranged_only=True)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_LOAD, uri, proxy.url, str(cache_dir)],
                            env={**os.environ, **s3.env()}, stdout=subprocess.PIPE, text=True)
    tmp = cache_dir / LAYOUT / "tmp"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        parts = list(tmp.glob("*.part")) if tmp.exists() else []
        if parts and proxy.counts["ranged_gets"] >= 4:
            break
        time.sleep(0.05)
    assert parts, "the load never started writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    cache = WriteThroughCache(cache_dir)
    identity = identity_of(s3_client, bucket, uri, len(data))
    assert cache.lookup(identity) is None
    assert not list(cache_dir.rglob("*.json"))
    half = parts[0].read_bytes()
    assert half != data, "the temp file really was half-written"

    proxy.clear_faults()
    proxy.reset_counts()
    got = load_file(uri, endpoint_url=proxy.url, cache_dir=cache_dir)
    assert_same(got, ref)
    assert got.stats["bytes_by_source"] == {"origin": got.stats["bytes"]}
    assert wait_writeback(30)
    entry = cache.lookup(identity)
    assert entry is not None and entry.data_path.read_bytes() == data
    assert not parts[0].exists(), "the dead writer's temp file was swept"
