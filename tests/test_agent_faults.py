"""Faults between real parts: a proxy in front of a real S3 server, a real agent process.

Every fault test proves its fault fired (the proxy's counters) and that the
reader still got exactly the origin's bytes.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from support.data import put_random
from support.faultproxy import Fault

from coldbrew.agent.errors import ObjectChanged

MiB = 1 << 20
FAST_RETRIES = ["--retry-base-delay-s", "0.01", "--retry-max-delay-s", "0.05", "--retry-attempts", "20"]


def _read(client, uri, offset, length, lease=None):
    return b"".join(client.read(uri, offset, length, lease=lease))


def test_random_reads_are_byte_exact_under_s3_faults(bucket, s3_client, make_agent, proxy, tmp_path):
    size = 24 * MiB + 4321
    data = put_random(s3_client, bucket, "m/faulty.bin", size, 42)
    agent = make_agent(f"s3://{bucket}", endpoint=proxy.url,
                       extra_args=["--chunk-size", "1MiB", "--fetch-concurrency", "4", *FAST_RETRIES])
    # Object GETs carry a Range header; metadata calls do not and stay clean.
    proxy.add_fault(Fault.status(503, "SlowDown"), method="GET", ranged_only=True, probability=0.15, seed=1)
    proxy.add_fault(Fault.status(500, "InternalError"), method="GET", ranged_only=True, count=4)
    proxy.add_fault(Fault.truncate(100_000), method="GET", ranged_only=True, probability=0.1, seed=2)
    proxy.add_fault(Fault.reset(), method="GET", ranged_only=True, count=3)
    proxy.add_fault(Fault.delay(0.3), method="GET", ranged_only=True, count=2)

    client = agent.client
    rng = random.Random(7)
    lease = client.ensure(f"s3://{bucket}/m/faulty.bin", 0, 0)["lease"]
    mismatches = 0
    for n in range(5000):  # with the mount's 6000 (tests/test_fuse.py): over 10,000 per run
        offset = rng.randrange(size)
        length = rng.choice([1, 17, 4096, 65536, 1 * MiB + 3, 3 * MiB])
        length = min(length, size - offset)
        # half by URI (stat + open), half through a lease (the loader's way)
        got = _read(client, f"s3://{bucket}/m/faulty.bin" if n % 2 else None, offset, length,
                    lease=None if n % 2 else lease)
        mismatches += got != data[offset:offset + length]
    assert mismatches == 0

    dest = tmp_path / "faulty.bin"
    agent.cli("get", f"s3://{bucket}/m/faulty.bin", str(dest), "--quiet", check=True)
    assert dest.read_bytes() == data

    fired = proxy.counts["fired"]
    assert fired["status"] >= 4 and fired["truncate"] >= 1 and fired["reset"] == 3 and fired["delay"] == 2
    retries = sum(v for (name, _), v in agent.metrics().items() if name == "coldbrew_origin_retries_total")
    # (aiohttp itself retries a reset on a reused keep-alive connection, so resets may not all
    # reach our retry loop; every 5xx and short body must.)
    assert retries >= fired["status"] + fired["truncate"]
    assert agent.metric("coldbrew_origin_retries_total", reason="short_body") >= 1
    assert agent.metric("coldbrew_origin_retries_total", reason="slowdown") >= 1


def test_hundred_readers_of_one_cold_chunk_cause_one_origin_get(bucket, s3_client, make_agent, proxy):
    data = put_random(s3_client, bucket, "m/one-chunk.bin", 4 * MiB, 5)
    agent = make_agent(f"s3://{bucket}", endpoint=proxy.url, extra_args=["--chunk-size", "4MiB"])
    uri = f"s3://{bucket}/m/one-chunk.bin"
    agent.client.status(uri)  # warm the agent's connections; no object bytes read
    proxy.reset_counts()
    # Hold the one GET long enough that all readers pile up behind it.
    proxy.add_fault(Fault.delay(1.0), method="GET", ranged_only=True)
    barrier = threading.Barrier(100)
    client = agent.client

    def reader(i: int) -> bool:
        barrier.wait()
        offset = (i * 40_009) % (4 * MiB - 1000)
        if i % 2:  # both entry points share one fetch: streamed reads and the loader's ensure
            return _read(client, uri, offset, 1000) == data[offset:offset + 1000]
        window = client.ensure(uri, offset, 1000)
        client.release(window["lease"])
        path = window["chunks"][0]["path"]
        with open(path, "rb") as f:
            return f.read() == data

    with ThreadPoolExecutor(100) as pool:
        results = list(pool.map(reader, range(100)))
    assert all(results)
    assert proxy.counts["ranged_gets"] == 1, proxy.counts
    assert proxy.counts["fired"]["delay"] == 1
    assert agent.metric("coldbrew_origin_requests_total", op="get", outcome="ok") == 1
    joins = agent.metric("coldbrew_singleflight_joins_total")
    hits = agent.metric("coldbrew_cache_hits_total")
    assert joins >= 90 and joins + hits == 99


def test_flipped_byte_in_cached_chunk_is_detected_counted_and_refetched(bucket, s3_client, make_agent,
                                                                       proxy, tmp_path):
    size = 6 * MiB
    data = put_random(s3_client, bucket, "m/rot.bin", size, 11)
    agent = make_agent(f"s3://{bucket}", endpoint=proxy.url, extra_args=["--chunk-size", "1MiB"])
    uri = f"s3://{bucket}/m/rot.bin"
    agent.cli("prewarm", uri, "--wait", "--quiet", check=True)
    files = sorted((agent.cache_dir / "coldbrew-v2" / "files").glob("*/*/data"))
    assert len(files) == 1 and files[0].read_bytes() == data
    path = files[0]

    def flip(index, offset):  # a byte of chunk ``index`` in the data file
        offset += index * MiB
        with open(path, "r+b") as f:
            f.seek(offset)
            b = f.read(1)
            f.seek(offset)
            f.write(bytes([b[0] ^ 0x40]))

    def corrupt_count():
        return agent.metric("coldbrew_corrupt_chunks_total", source="cache")

    # 1. `coldbrew get` (the client verifies the cache file itself)
    flip(1, 12345)
    proxy.reset_counts()
    agent.cli("get", uri, str(tmp_path / "a"), "--quiet", check=True)
    assert (tmp_path / "a").read_bytes() == data
    assert corrupt_count() == 1
    assert proxy.counts["ranged_gets"] == 1, "exactly the bad chunk is refetched"

    # 2. reads streamed by the agent (the agent verifies)
    flip(3, 0)
    assert _read(agent.client, uri, 3 * MiB - 10, 20) == data[3 * MiB - 10: 3 * MiB + 10]
    assert corrupt_count() == 2

    # 3. prewarm re-verifies what is already cached
    flip(5, size // 6 - 1)
    out = agent.cli("prewarm", uri, "--wait", "--quiet", check=True)
    assert "prewarm done" in out.stdout
    assert corrupt_count() == 3
    assert path.read_bytes() == data, "every bad chunk was written again in place"


@pytest.fixture
def tiny_disk(make_tmpfs):
    return make_tmpfs("6m")


def test_full_cache_disk_still_serves_correct_bytes(bucket, s3_client, make_agent, tiny_disk, tmp_path):
    size = 20 * MiB + 99
    data = put_random(s3_client, bucket, "m/big.bin", size, 13)
    agent = make_agent(f"s3://{bucket}", cache_dir=tiny_disk / "cache",
                       extra_args=["--chunk-size", "1MiB", "--cache-size", "100%", "--cache-reserve", "0"])
    uri = f"s3://{bucket}/m/big.bin"
    dest = tmp_path / "big.bin"
    agent.cli("get", uri, str(dest), "--quiet", check=True)
    assert dest.read_bytes() == data
    rng = random.Random(3)
    for _ in range(50):
        offset = rng.randrange(size)
        length = min(rng.randrange(1, 2 * MiB), size - offset)
        assert _read(agent.client, uri, offset, length) == data[offset:offset + length]
    assert agent.metric("coldbrew_cache_write_errors_total", reason="full") > 0
    assert agent.metric("coldbrew_cache_bytes") <= 6 * MiB

    result = agent.cli("prewarm", uri, "--wait", "--quiet")
    assert result.returncode == 1
    assert "could not be cached" in result.stderr and "cache full" in result.stderr


def _entry_dir_on(disk: Path, cache_dir: Path, uri: str, etag: str, size: int) -> None:
    """Make the cache entry of (uri, etag, size) live on ``disk``: the store's free-space
    check looks at the cache dir's (large) disk, but the entry's data file lands on this one."""
    from coldbrew.agent.cache.store import LAYOUT_VERSION
    from coldbrew.agent.core.manifest import FileIdentity

    key = FileIdentity(uri, etag, size).key()
    entry_dir = cache_dir / LAYOUT_VERSION / "files" / key[:2] / key
    entry_dir.parent.mkdir(parents=True)
    entry_dir.symlink_to(disk)


def _origin_gets(agent) -> float:
    """GETs the agent sent the origin, whatever their outcome (one cut short by the disk too)."""
    return sum(v for (name, labels), v in agent.metrics().items()
               if name == "coldbrew_origin_requests_total" and ("op", "get") in labels)


def _get_through_a_small_disk(s3_client, bucket, make_agent, tmp_path, disk: Path, name: str):
    size = 6 * MiB  # 3 chunks of 2 MiB, none of which fits the disk
    data = put_random(s3_client, bucket, f"m/{name}", size, 14)
    uri = f"s3://{bucket}/m/{name}"
    etag = s3_client.head_object(Bucket=bucket, Key=f"m/{name}")["ETag"]
    cache_dir = tmp_path / "cache"
    _entry_dir_on(disk, cache_dir, uri, etag, size)
    agent = make_agent(f"s3://{bucket}", cache_dir=cache_dir,
                       extra_args=["--chunk-size", "2MiB", "--cache-reserve", "0"])
    dest = tmp_path / name
    agent.cli("get", uri, str(dest), "--quiet", check=True)
    assert dest.read_bytes() == data
    assert (disk / "data").exists(), "the chunks were headed for the small disk"
    assert f"is full; serving {uri} from origin without caching" in agent.log()
    assert agent.metric("coldbrew_cache_write_errors_total", reason="full") >= 3
    assert agent.metric("coldbrew_cache_bytes") == 0
    return agent


def test_a_disk_that_cannot_take_a_chunk_refuses_it_before_its_get(
        bucket, s3_client, make_agent, make_tmpfs, tmp_path):
    """tmpfs allocates ahead: each chunk's blocks are asked for before its GET, the disk says
    no at once, and the chunk is fetched once, into memory; `get`'s read of it is answered
    from there (the lease keeps what its ensure could not cache)."""
    disk = make_tmpfs("1m")
    agent = _get_through_a_small_disk(s3_client, bucket, make_agent, tmp_path, disk, "nofit.bin")
    assert _origin_gets(agent) == agent.metric("coldbrew_cache_write_errors_total", reason="full") \
        == 3, "one GET per chunk: none into the file first, none again when `get` reads it"
    assert (disk / "data").stat().st_blocks == 0, "nothing was written to the small disk"


def test_a_data_file_whose_disk_fills_mid_chunk_still_serves_correct_bytes(
        bucket, s3_client, make_agent, make_ext2, tmp_path):
    """ext2 cannot allocate ahead: every chunk's landing fails part-way with ENOSPC. Each
    chunk is then fetched again into memory and served from there, and the blocks the
    failed landings wrote are given back."""
    disk = make_ext2("2m")
    agent = _get_through_a_small_disk(s3_client, bucket, make_agent, tmp_path, disk, "midfull.bin")
    assert _origin_gets(agent) >= 2 * 3, "each chunk was fetched twice: into the file, then into memory"
    assert (disk / "data").stat().st_blocks * 512 < MiB, "the part-written chunks were punched out"


def test_object_replaced_between_reads_is_never_mixed(bucket, s3_client, make_agent, tmp_path):
    v1 = put_random(s3_client, bucket, "m/v.bin", 3 * MiB + 5, 21)
    agent = make_agent(f"s3://{bucket}", extra_args=["--chunk-size", "1MiB"])
    uri = f"s3://{bucket}/m/v.bin"
    agent.cli("get", uri, str(tmp_path / "v1"), "--quiet", check=True)
    assert (tmp_path / "v1").read_bytes() == v1
    old_etag = agent.client.status(uri)["files"][0]["etag"]

    v2 = put_random(s3_client, bucket, "m/v.bin", 2 * MiB + 77, 22)
    time.sleep(2.2)  # the agent's stat cache lives 2 s
    agent.cli("get", uri, str(tmp_path / "v2"), "--quiet", check=True)
    assert (tmp_path / "v2").read_bytes() == v2
    files = agent.client.status()["files"]
    assert [f["etag"] for f in files if f["uri"] == uri] != [old_etag]
    assert len([f for f in files if f["uri"] == uri]) == 1, "the old version is dropped"

    # Replaced mid-read, under an open lease: the reader fails loudly, never mixes.
    v3 = put_random(s3_client, bucket, "m/v.bin", 2 * MiB + 77, 23)
    time.sleep(2.2)
    window = agent.client.ensure(uri, 0, 1 * MiB)  # v3's first chunk only
    put_random(s3_client, bucket, "m/v.bin", 2 * MiB + 77, 24)
    assert _read(agent.client, None, 0, 1 * MiB, lease=window["lease"]) == v3[:1 * MiB]
    with pytest.raises(ObjectChanged, match="changed at the origin"):
        _read(agent.client, None, 0, 2 * MiB + 77, lease=window["lease"])


def test_range_reads_reuse_connections_and_never_a_cut_one(bucket, s3_client, s3, proxy, monkeypatch):
    """The data plane reads each body straight into the caller's buffer. A body read whole
    hands its connection back to the pool (one connection for many GETs); a body cut short
    never goes back, so the next GET cannot read the rest of the old one."""
    from coldbrew.agent.config import OriginSettings
    from coldbrew.agent.origin.s3data import S3RangeReader

    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    data = put_random(s3_client, bucket, "m/pool.bin", 3 * MiB, 31)
    etag = s3_client.head_object(Bucket=bucket, Key="m/pool.bin")["ETag"]
    reader = S3RangeReader(OriginSettings(
        url=f"s3://{bucket}", endpoint_url=proxy.url, region="us-east-1", anonymous=False,
        fetch_concurrency=1, retry_attempts=1, retry_base_delay_s=0.01, retry_max_delay_s=0.01,
        connect_timeout_s=5, read_timeout_s=5))
    buf = bytearray(MiB)
    try:
        proxy.reset_counts()
        for i in range(3):
            assert reader.read_into(bucket, "m/pool.bin", i * MiB, memoryview(buf), etag)[0] == MiB
            assert buf == data[i * MiB:(i + 1) * MiB]
        assert proxy.counts["connections"] == 1, "one kept-alive connection for three GETs"
        proxy.add_fault(Fault.truncate(1000), method="GET", ranged_only=True, count=1)
        got, _ = reader.read_into(bucket, "m/pool.bin", 0, memoryview(buf), etag)
        assert got == 1000 and proxy.counts["fired"]["truncate"] == 1
        assert reader.read_into(bucket, "m/pool.bin", MiB, memoryview(buf), etag)[0] == MiB
        assert buf == data[MiB:2 * MiB], "the next GET got its own bytes, on a new connection"
        assert proxy.counts["connections"] == 2
    finally:
        reader.close()


def _range_reader(s3, proxy, monkeypatch):
    from coldbrew.agent.config import OriginSettings
    from coldbrew.agent.origin.s3data import S3RangeReader

    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    return S3RangeReader(OriginSettings(
        url="s3://unused", endpoint_url=proxy.url, region="us-east-1", anonymous=False,
        fetch_concurrency=1, retry_attempts=1, retry_base_delay_s=0.01, retry_max_delay_s=0.01,
        connect_timeout_s=5, read_timeout_s=5))


def test_land_hands_bodies_on_in_pieces_on_reused_connections(bucket, s3_client, s3, proxy,
                                                              monkeypatch):
    """A body goes on piece by piece, in order, through the head of the buffer; the connection
    is reused after a whole body and never after a cut one."""
    from coldbrew.agent.origin import s3data

    data = put_random(s3_client, bucket, "m/land.bin", 3 * MiB + 5, 32)
    etag = s3_client.head_object(Bucket=bucket, Key="m/land.bin")["ETag"]
    reader = _range_reader(s3, proxy, monkeypatch)
    scratch = bytearray(3 * MiB + 5)
    pieces: list[tuple[int, bytes]] = []

    def write(pos, piece):
        pieces.append((pos, bytes(piece)))

    try:
        proxy.reset_counts()
        for _ in range(2):
            pieces.clear()
            assert reader.land(bucket, "m/land.bin", 0, memoryview(scratch), etag, write) == \
                (3 * MiB + 5, etag)
            assert [p for p, _ in pieces] == [0, MiB, 2 * MiB, 3 * MiB]
            assert b"".join(b for _, b in pieces) == data
            assert max(len(b) for _, b in pieces) == s3data._PIECE
        assert scratch[s3data._PIECE:] == bytes(len(scratch) - s3data._PIECE), "only its head is used"
        assert proxy.counts["connections"] == 1, "one kept-alive connection for two GETs"

        proxy.add_fault(Fault.truncate(5000), method="GET", ranged_only=True, count=1)
        pieces.clear()
        got, _ = reader.land(bucket, "m/land.bin", 0, memoryview(scratch), etag, write)
        assert got == 5000 and proxy.counts["fired"]["truncate"] == 1
        assert b"".join(b for _, b in pieces) == data[:5000]
        pieces.clear()
        assert reader.land(bucket, "m/land.bin", MiB, memoryview(scratch)[:MiB], etag, write)[0] == MiB
        assert pieces == [(0, data[MiB:2 * MiB])], "the next GET got its own bytes"
        assert proxy.counts["connections"] == 2
    finally:
        reader.close()


def _raised_low_water_marks() -> int:
    """Sockets of this process whose receive low-water mark (SO_RCVLOWAT) is above 1."""
    raised = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(int(fd)))
        except OSError:
            continue
        with sock:
            raised += sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) > 1
    return raised


def test_a_landing_body_wakes_its_reader_in_batches_and_its_socket_goes_back_as_it_was(
        bucket, s3_client, s3, proxy, monkeypatch):
    """While more than a little of a body is to come its socket's low-water mark is up (the
    reader wakes per 256 KiB, not per few KiB); before the tail, and before the connection
    goes back to the pool, it is down. Left up, the next response on that connection would
    wait for bytes that never come: its 100-byte body below would time out."""
    data = put_random(s3_client, bucket, "m/lowat.bin", 3 * MiB + 5, 34)
    etag = s3_client.head_object(Bucket=bucket, Key="m/lowat.bin")["ETag"]
    tiny = put_random(s3_client, bucket, "m/tiny.bin", 100, 35)
    tiny_etag = s3_client.head_object(Bucket=bucket, Key="m/tiny.bin")["ETag"]
    reader = _range_reader(s3, proxy, monkeypatch)
    marks: list[tuple[int, int]] = []
    got = bytearray()

    def write(pos, piece):
        marks.append((pos, _raised_low_water_marks()))
        got.extend(piece)

    try:
        proxy.reset_counts()
        assert reader.land(bucket, "m/lowat.bin", 0, memoryview(bytearray(3 * MiB + 5)), etag,
                           write)[0] == 3 * MiB + 5
        assert got == data
        assert marks == [(0, 1), (MiB, 1), (2 * MiB, 0), (3 * MiB, 0)]
        assert _raised_low_water_marks() == 0
        small = bytearray(100)
        assert reader.read_into(bucket, "m/tiny.bin", 0, memoryview(small), tiny_etag)[0] == 100
        assert small == tiny
        assert proxy.counts["connections"] == 1, "the tiny body came on the landing's connection"
        # Odd sizes: less than the mark behind the first piece (read with the mark down).
        for start in (0, MiB, 2 * MiB - 5):
            odd = memoryview(bytearray(MiB + 100 * 1024))
            size = min(len(odd), len(data) - start)
            got.clear()
            assert reader.land(bucket, "m/lowat.bin", start, odd[:size], etag, write)[0] == size
            assert got == data[start:start + size]
    finally:
        reader.close()


def test_the_low_water_mark_is_up_only_while_more_than_it_is_still_to_come():
    """The kernel wakes a sleeping reader once the mark's bytes are queued, whatever it asked
    for: with less than that left of the body, a read would sleep until the read timeout
    (seen: 1 in 16 reads of 8 concurrent bodies, when the rule allowed it). So the rule, on a
    real TCP socket: up only with at least the mark, plus http.client's 8 KiB of read-ahead,
    still to come after the piece."""
    from types import SimpleNamespace as NS

    from coldbrew.agent.origin.s3data import TAIL_BYTES, BatchedWakeups

    assert TAIL_BYTES >= BatchedWakeups.LOWAT + 8192
    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.create_connection(server.getsockname()) as sock:
        wakeups = BatchedWakeups(NS(_fp=NS(fp=NS(raw=NS(_sock=sock)))))  # urllib3's nesting

        def mark() -> int:
            return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)

        wakeups.batch(TAIL_BYTES)
        assert mark() == BatchedWakeups.LOWAT and not wakeups.down
        wakeups.batch(TAIL_BYTES - 1)
        assert mark() == 1 and wakeups.down
        wakeups.batch(16 * MiB)
        wakeups.batch(0)
        assert mark() == 1 and wakeups.down


def test_what_the_writer_raises_ends_the_get_and_the_next_body_is_clean(bucket, s3_client, s3,
                                                                         proxy, monkeypatch):
    from coldbrew.agent.errors import CacheFull

    data = put_random(s3_client, bucket, "m/full.bin", 4 * MiB, 33)
    etag = s3_client.head_object(Bucket=bucket, Key="m/full.bin")["ETag"]
    reader = _range_reader(s3, proxy, monkeypatch)
    scratch = memoryview(bytearray(4 * MiB))
    got = bytearray()

    def full_after_one_piece(pos, piece):
        if pos:
            raise CacheFull("cache disk is full")

    try:
        proxy.reset_counts()
        with pytest.raises(CacheFull):
            reader.land(bucket, "m/full.bin", 0, scratch, etag, full_after_one_piece)
        assert reader.land(bucket, "m/full.bin", 0, scratch, etag,
                           lambda pos, piece: got.extend(piece))[0] == 4 * MiB
        assert got == data, "no byte of the abandoned body came with the next one"
        assert proxy.counts["connections"] == 2, "the abandoned body's connection was dropped"
    finally:
        reader.close()
