"""The on-disk chunk store: its pinned layout, restarts, crash leftovers, corruption, eviction."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from coldbrew.agent.cache import verify
from coldbrew.agent.cache.store import ChunkStore, Entry, Limits
from coldbrew.agent.core.manifest import FileIdentity, digest
from coldbrew.agent.errors import CacheError, CacheFull, CorruptData, FileBusy
from coldbrew.agent.metrics import AgentMetrics

CHUNK = 1024
NO_LIMIT = Limits(size_bytes=None, reserve_bytes=0)


def blob(n: int, seed: int = 0) -> bytes:
    return bytes((i * 31 + seed * 7 + (i >> 8)) % 251 for i in range(n))


def ident(name: str = "model.bin", size: int = 2 * CHUNK + 100, etag: str = '"e1"') -> FileIdentity:
    return FileIdentity(f"s3://bucket/{name}", etag, size)


MakeStore = Callable[..., ChunkStore]


@pytest.fixture
def make_store(tmp_path: Path) -> Iterator[MakeStore]:
    """``make_store(limits=..., metrics=...)`` opens a store on tmp_path/cache; closed after."""
    opened: list[ChunkStore] = []

    def make(limits: Limits = NO_LIMIT, metrics: AgentMetrics | None = None,
             chunk_size: int = CHUNK, open_: bool = True) -> ChunkStore:
        store = ChunkStore(tmp_path / "cache", chunk_size, limits, metrics)
        opened.append(store)
        if open_:
            store.open()
        return store

    yield make
    for s in opened:
        s.close()


def fill(store: ChunkStore, identity: FileIdentity, seed: int = 0) -> tuple[Entry, bytes]:
    """Write every chunk of ``identity``; returns the entry and the whole file's bytes."""
    entry = store.entry(identity)
    data = blob(identity.size, seed)
    for i in range(entry.layout.count):
        start, end = entry.layout.bounds(i)
        store.write_chunk(entry, i, memoryview(data[start:end]))
    return entry, data


def reopen(store: ChunkStore, make_store: MakeStore, **kw) -> ChunkStore:
    store.close()
    return make_store(**kw)


# --- round trip and the on-disk contract ---------------------------------------------------------


def test_write_then_read_verified_round_trip(make_store):
    store = make_store()
    entry = store.entry(ident())
    data = blob(CHUNK, 3)
    returned = store.write_chunk(entry, 0, memoryview(data))
    assert returned == digest(data)
    assert store.has(entry, 0)
    assert not store.has(entry, 1)
    assert store.read_verified(entry, 0) == data
    assert store.verify_present(entry, 0)
    assert store.used_bytes == CHUNK


def test_short_last_chunk_round_trip(make_store):
    store = make_store()
    entry, data = fill(store, ident(size=2 * CHUNK + 100))
    assert store.read_verified(entry, 2) == data[2 * CHUNK:]
    assert entry.complete
    assert entry.cached_bytes == store.used_bytes == len(data)


def test_on_disk_layout_is_pinned(make_store, tmp_path):
    store = make_store()
    identity = FileIdentity("s3://bucket/llama/model.safetensors", '"abc123-2"', CHUNK + 5)
    entry = store.entry(identity)
    first, second = blob(CHUNK, 1), blob(5, 2)
    store.write_chunk(entry, 0, memoryview(first))
    store.write_chunk(entry, 1, memoryview(second))
    store.touch(entry)

    key = identity.key()
    root = tmp_path / "cache" / "coldbrew-v2"
    base = root / "files" / key[:2] / key
    assert entry.path == base
    assert sorted(p.name for p in root.iterdir()) == ["LOCK", "files", "tmp"]
    assert list((root / "tmp").iterdir()) == []
    assert sorted(p.name for p in base.iterdir()) == ["data", "journal", "meta.json", "used"]
    # the data file is the object's raw bytes at their own offsets, no header
    assert (base / "data").read_bytes() == first + second
    assert entry.data_path == base / "data"
    assert json.loads((base / "meta.json").read_bytes()) == {
        "format": 2, "uri": "s3://bucket/llama/model.safetensors", "etag": '"abc123-2"',
        "size": CHUNK + 5, "chunk_size": CHUNK}
    journal = (base / "journal").read_bytes()
    assert journal == (b"0 " + digest(first).encode() + b"\n"
                       + b"1 " + digest(second).encode() + b"\n")
    assert all(re.fullmatch(rb"\d+ [0-9a-f]{32}", line) for line in journal.splitlines())
    assert (base / "used").read_bytes() == b""


def test_a_chunk_lands_at_its_offset_in_a_sparse_data_file(make_store):
    chunk = 64 << 10
    store = make_store(chunk_size=chunk)
    entry = store.entry(ident(size=12 * chunk))
    data = blob(chunk, 3)
    store.write_chunk(entry, 11, memoryview(data))
    st = entry.data_path.stat()
    assert st.st_size == 12 * chunk, "the data file has the object's size from the start"
    assert st.st_blocks * 512 <= 2 * chunk, "and holds disk blocks only for what was written"
    with open(entry.data_path, "rb") as f:
        assert os.pread(f.fileno(), chunk, 11 * chunk) == data
        assert os.pread(f.fileno(), chunk, 10 * chunk) == bytes(chunk)


def test_entry_is_created_once_and_found_by_key(make_store):
    store = make_store()
    identity = ident()
    entry = store.entry(identity)
    assert store.entry(identity) is entry
    assert store.find(identity.key()) is entry
    assert store.find("0" * 32) is None
    assert store.entries() == [entry]


def test_other_versions_lists_same_uri_other_etag(make_store):
    store = make_store()
    old = store.entry(ident(etag='"v1"'))
    store.entry(ident(name="other.bin"))
    new_identity = ident(etag='"v2"')
    store.entry(new_identity)
    assert store.other_versions(new_identity) == [old]


def test_metrics_gauges_follow_the_cache(make_store):
    metrics = AgentMetrics()
    store = make_store(metrics=metrics)
    fill(store, ident(size=CHUNK + 1))
    assert metrics.value("coldbrew_cache_bytes") == CHUNK + 1
    assert metrics.value("coldbrew_cache_files") == 1
    assert metrics.value("coldbrew_cache_capacity_bytes") > 0


# --- restarts ---------------------------------------------------------------------------------------


def test_reopen_finds_the_chunks(make_store):
    store = make_store()
    identity = ident()
    entry, data = fill(store, identity)
    store = reopen(store, make_store)
    again = store.find(identity.key())
    assert again is not None and again is not entry
    assert again.present == {0, 1, 2}
    assert again.digests == entry.digests
    assert again.chunk_size == CHUNK
    assert store.used_bytes == len(data)
    assert b"".join(store.read_verified(again, i) for i in range(3)) == data


def test_reopen_keeps_the_entrys_own_chunk_size(make_store):
    store = make_store()
    identity = ident(size=3 * CHUNK)
    fill(store, identity)
    store = reopen(store, make_store, chunk_size=4 * CHUNK)
    entry = store.find(identity.key())
    assert entry is not None
    assert entry.chunk_size == CHUNK and entry.complete


def test_last_use_survives_a_restart(make_store):
    store = make_store()
    identity = ident()
    entry, _ = fill(store, identity)
    store.touch(entry)
    os.utime(entry.path / "used", (1_000_000, 1_000_000))
    store = reopen(store, make_store)
    assert store.find(identity.key()).last_used == 1_000_000


def test_entry_without_used_file_is_oldest(make_store):
    store = make_store()
    identity = ident()
    fill(store, identity)
    store = reopen(store, make_store)
    assert store.find(identity.key()).last_used == 0.0


# --- crash leftovers, built on disk -----------------------------------------------------------------


def test_a_cache_of_the_earlier_layout_is_removed_at_open(make_store, tmp_path):
    old = tmp_path / "cache" / "coldbrew-v1" / "files" / "ab" / "abc" / "chunks"
    old.mkdir(parents=True)
    (old / "00000000").write_bytes(b"x" * CHUNK)
    store = make_store()
    assert not (tmp_path / "cache" / "coldbrew-v1").exists()
    assert store.entries() == [] and store.used_bytes == 0


def test_temp_files_are_removed_at_open(make_store, tmp_path):
    store = make_store()
    tmp = tmp_path / "cache" / "coldbrew-v2" / "tmp"
    (tmp / "abc.0.123.456").write_bytes(b"half a chunk")
    (tmp / "x.meta.json.1").write_bytes(b"{")
    store = reopen(store, make_store)
    assert list(tmp.iterdir()) == []


def put_at(entry: Entry, offset: int, data: bytes) -> None:
    """Write into an entry's data file behind the store's back (what a crash can leave)."""
    with open(entry.data_path, "r+b") as f:
        os.pwrite(f.fileno(), data, offset)


def chunk_bytes(entry: Entry, index: int) -> bytes:
    start, end = entry.layout.bounds(index)
    with open(entry.data_path, "rb") as f:
        return os.pread(f.fileno(), end - start, start)


def test_bytes_without_a_journal_line_are_not_present(make_store):
    store = make_store()
    identity = ident(size=4 * CHUNK)
    entry = store.entry(identity)
    store.write_chunk(entry, 0, memoryview(blob(CHUNK)))
    put_at(entry, 2 * CHUNK, blob(CHUNK, 9))  # written, crashed before the journal append
    store = reopen(store, make_store)
    again = store.find(identity.key())
    assert again.present == {0}
    assert store.used_bytes == CHUNK
    store.write_chunk(again, 2, memoryview(blob(CHUNK, 2)))  # fetched again: overwritten
    assert chunk_bytes(again, 2) == blob(CHUNK, 2)


def test_a_data_file_of_the_wrong_size_loses_its_chunks(make_store):
    store = make_store()
    identity = ident()
    entry, data = fill(store, identity)
    with open(entry.data_path, "r+b") as f:
        f.truncate(identity.size - 1)
    store = reopen(store, make_store)
    again = store.find(identity.key())
    assert again.present == set() and store.used_bytes == 0
    fill(store, identity)  # and it is filled again
    assert again.complete and again.data_path.read_bytes() == data


def test_a_missing_data_file_loses_its_chunks_and_is_made_again(make_store):
    store = make_store()
    identity = ident()
    entry, data = fill(store, identity)
    entry.data_path.unlink()
    store = reopen(store, make_store)
    again = store.find(identity.key())
    assert again.present == set() and store.used_bytes == 0
    fill(store, identity)
    assert again.data_path.read_bytes() == data


def test_a_dropped_chunk_stays_dropped_after_restart(make_store):
    store = make_store()
    identity = ident()
    entry, _ = fill(store, identity)
    store.drop_chunk(entry, 1)
    assert chunk_bytes(entry, 1) == bytes(CHUNK), "its bytes are punched out of the data file"
    store = reopen(store, make_store)
    again = store.find(identity.key())
    assert again.present == {0, 2}
    assert set(again.digests) == {0, 1, 2}, "its digest is still known (refetches are checked)"
    assert store.used_bytes == CHUNK + 100
    store.write_chunk(again, 1, memoryview(blob(identity.size)[CHUNK:2 * CHUNK]))
    store = reopen(store, make_store)
    assert store.find(identity.key()).present == {0, 1, 2}


def test_torn_last_journal_line_is_ignored(make_store):
    store = make_store()
    identity = ident()
    entry = store.entry(identity)
    store.write_chunk(entry, 0, memoryview(blob(CHUNK)))
    second = blob(CHUNK, 1)
    put_at(entry, CHUNK, second)  # the write happened...
    with open(entry.path / "journal", "ab") as f:  # ...the journal append was cut short
        f.write(b"1 " + digest(second).encode()[:13])
    store = reopen(store, make_store)
    again = store.find(identity.key())
    assert again.present == {0}
    assert set(again.digests) == {0}
    assert (entry.path / "journal").read_bytes().endswith(b"\n"), "the torn tail is cut off"


def test_unreadable_meta_json_drops_the_entry(make_store):
    store = make_store()
    identity = ident()
    entry, _ = fill(store, identity)
    (entry.path / "meta.json").write_bytes(b"{not json")
    store = reopen(store, make_store)
    assert store.find(identity.key()) is None
    assert not entry.path.exists()
    assert store.used_bytes == 0


@pytest.mark.parametrize("meta", [
    b"[]", b"{}", b'{"uri": "s3://bucket/model.bin", "etag": "e"}', b'"text"',
    b'{"uri": "s3://bucket/model.bin", "etag": "\\"e1\\"", "size": "big", "chunk_size": 1024}',
])
def test_meta_json_with_missing_or_wrong_fields_drops_the_entry(make_store, meta):
    store = make_store()
    identity = ident()
    entry, _ = fill(store, identity)
    (entry.path / "meta.json").write_bytes(meta)
    store = reopen(store, make_store)
    assert store.find(identity.key()) is None
    assert not entry.path.exists()


def test_meta_json_for_another_identity_drops_the_entry(make_store):
    store = make_store()
    identity = ident()
    entry, _ = fill(store, identity)
    meta = json.loads((entry.path / "meta.json").read_bytes())
    meta["etag"] = '"someone-else"'
    (entry.path / "meta.json").write_text(json.dumps(meta))
    store = reopen(store, make_store)
    assert store.entries() == []
    assert not entry.path.exists()


def test_a_dropped_entry_does_not_hide_good_ones(make_store):
    store = make_store()
    bad, _ = fill(store, ident(name="bad.bin"))
    good_identity = ident(name="good.bin")
    fill(store, good_identity, seed=5)
    (bad.path / "meta.json").write_bytes(b"")
    store = reopen(store, make_store)
    assert [e.identity for e in store.entries()] == [good_identity]


# --- corruption --------------------------------------------------------------------------------------


def flip_chunk_byte(entry: Entry, index: int, at: int = 10) -> None:
    flip_byte(entry.data_path, entry.layout.bounds(index)[0] + at)


def flip_byte(path: Path, at: int = 10) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


def test_flipped_byte_is_caught_by_read_verified(make_store):
    metrics = AgentMetrics()
    store = make_store(metrics=metrics)
    entry, _ = fill(store, ident())
    flip_chunk_byte(entry, 1)
    with pytest.raises(CorruptData, match="chunk 1 of s3://bucket/model.bin"):
        store.read_verified(entry, 1)
    assert not store.has(entry, 1)
    assert chunk_bytes(entry, 1) == bytes(CHUNK), "punched out"
    assert metrics.value("coldbrew_corrupt_chunks_total", source="cache") == 1
    assert store.used_bytes == CHUNK + 100
    assert store.has(entry, 0) and store.has(entry, 2)


def test_corrupt_chunk_found_after_restart(make_store):
    metrics = AgentMetrics()
    store = make_store()
    identity = ident()
    entry, _ = fill(store, identity)
    flip_chunk_byte(entry, 0, at=0)  # the journal still vouches for it, so it loads as present
    store = reopen(store, make_store, metrics=metrics)
    again = store.find(identity.key())
    assert store.has(again, 0)
    with pytest.raises(CorruptData):
        store.read_verified(again, 0)
    assert not store.has(again, 0)
    assert metrics.value("coldbrew_corrupt_chunks_total", source="cache") == 1


def test_verify_present_drops_a_corrupt_chunk(make_store):
    metrics = AgentMetrics()
    store = make_store(metrics=metrics)
    entry, _ = fill(store, ident())
    assert store.verify_present(entry, 0)
    assert store.verify_present(entry, 1), "a chunk at an offset that is not page-aligned"
    flip_chunk_byte(entry, 0)
    assert store.verify_present(entry, 0) is False
    assert not store.has(entry, 0)
    assert chunk_bytes(entry, 0) == bytes(CHUNK)
    assert metrics.value("coldbrew_corrupt_chunks_total", source="cache") == 1


def test_verify_present_counts_a_chunk_cut_off_the_data_file_as_corrupt(make_store):
    metrics = AgentMetrics()
    store = make_store(metrics=metrics)
    entry, _ = fill(store, ident())
    with open(entry.data_path, "r+b") as f:
        f.truncate(2 * CHUNK + 50)
    assert store.verify_present(entry, 2) is False
    assert not store.has(entry, 2)
    assert metrics.value("coldbrew_corrupt_chunks_total", source="cache") == 1


def test_missing_data_file_is_a_cache_error_not_corruption(make_store):
    metrics = AgentMetrics()
    store = make_store(metrics=metrics)
    entry, _ = fill(store, ident())
    entry.data_path.unlink()
    assert store.verify_present(entry, 0) is False
    assert not store.has(entry, 0)
    entry2, _ = fill(store, ident(name="b.bin"))
    entry2.data_path.unlink()
    with pytest.raises(CacheError):
        store.read_verified(entry2, 1)
    assert not store.has(entry2, 1)
    assert metrics.value("coldbrew_corrupt_chunks_total", source="cache") == 0


def test_write_with_bytes_differing_from_a_known_digest_is_corrupt(make_store):
    store = make_store()
    entry, data = fill(store, ident())
    with pytest.raises(CorruptData, match="different bytes"):
        store.write_chunk(entry, 0, memoryview(blob(CHUNK, 99)))
    assert store.read_verified(entry, 0) == data[:CHUNK]


def test_known_digest_is_enforced_after_a_drop(make_store):
    store = make_store()
    entry, data = fill(store, ident())
    journal = (entry.path / "journal").read_bytes()
    store.drop_chunk(entry, 0)
    assert not store.has(entry, 0)
    with pytest.raises(CorruptData):
        store.write_chunk(entry, 0, memoryview(blob(CHUNK, 99)))
    assert not store.has(entry, 0)
    store.write_chunk(entry, 0, memoryview(data[:CHUNK]))  # the right bytes are welcome back
    assert store.read_verified(entry, 0) == data[:CHUNK]
    # the journal says it went and came back (the last line per chunk wins at restart)
    assert (entry.path / "journal").read_bytes() == (
        journal + b"0 -\n" + b"0 " + digest(data[:CHUNK]).encode() + b"\n")


# --- landings: chunks written into the data file by someone else (the S3 data plane) -------------


def land(store: ChunkStore, entry: Entry, index: int, data: bytes, piece: int = 300) -> str:
    """Land ``data`` as chunk ``index`` the way the data plane does: in pieces, in order."""
    landing = store.open_landing(entry, index)
    for pos in range(0, len(data), piece):
        store.land_piece(landing, pos, memoryview(data[pos:pos + piece]))
    return store.commit_landing(landing)


def test_a_chunk_landed_in_pieces_is_hashed_on_the_way_and_journaled(make_store):
    store = make_store()
    entry = store.entry(ident())
    data = blob(entry.identity.size)
    for i in range(entry.layout.count):
        start, end = entry.layout.bounds(i)
        assert land(store, entry, i, data[start:end]) == digest(data[start:end])
    assert entry.complete and store.used_bytes == len(data)
    assert entry.data_path.read_bytes() == data
    store = reopen(store, make_store)  # the journal vouches for them after a restart
    again = store.entry(ident())
    assert again.complete and store.read_verified(again, 2) == data[2 * CHUNK:]


def test_a_landing_with_bytes_differing_from_a_known_digest_is_corrupt_and_given_back(make_store):
    store = make_store()
    entry, data = fill(store, ident())
    store.drop_chunk(entry, 0)
    with pytest.raises(CorruptData, match="different bytes"):
        land(store, entry, 0, blob(CHUNK, 99))
    assert not store.has(entry, 0)
    assert entry.data_path.read_bytes()[:CHUNK] == bytes(CHUNK), "the wrong bytes were punched out"
    assert store.used_bytes == len(data) - CHUNK
    assert land(store, entry, 0, data[:CHUNK])  # the right bytes are welcome back
    assert store.read_verified(entry, 0) == data[:CHUNK]


def test_an_overwritten_present_chunk_that_lands_wrong_is_dropped(make_store):
    store = make_store()
    entry, data = fill(store, ident())
    with pytest.raises(CorruptData):
        land(store, entry, 1, blob(CHUNK, 99))
    assert not store.has(entry, 1), "its old bytes are gone: the journal must not vouch for them"
    assert store.has(entry, 0) and store.read_verified(entry, 0) == data[:CHUNK]


def test_an_abandoned_landing_gives_its_room_back(make_store):
    store = make_store(limits=Limits(size_bytes=2 * CHUNK, reserve_bytes=0))
    entry = store.entry(ident("a.bin", size=2 * CHUNK))
    first = store.open_landing(entry, 0)
    second = store.open_landing(entry, 1)
    store.land_piece(first, 0, memoryview(blob(100)))
    third = store.entry(ident("b.bin", size=CHUNK))
    with pytest.raises(CacheFull):  # both chunks' room is held while they land
        store.open_landing(third, 0)
    store.abandon_landing(first)
    store.abandon_landing(second)
    assert not store.has(entry, 0) and store.used_bytes == 0
    assert land(store, third, 0, blob(CHUNK))  # the room came back
    assert store.has(third, 0)


def test_a_retried_landing_starts_its_digest_again(make_store):
    """The origin cut the body short and was asked again: the chunk starts over at 0, and
    only the second attempt's bytes are hashed."""
    store = make_store()
    entry = store.entry(ident())
    data = blob(entry.identity.size)
    landing = store.open_landing(entry, 0)
    store.land_piece(landing, 0, memoryview(blob(500, 9)))  # the first attempt, cut short
    store.land_piece(landing, 0, memoryview(data[:600]))
    store.land_piece(landing, 600, memoryview(data[600:CHUNK]))
    assert store.commit_landing(landing) == digest(data[:CHUNK])
    assert store.read_verified(entry, 0) == data[:CHUNK]


def test_landing_pieces_out_of_order_or_short_are_refused(make_store):
    from coldbrew.agent.errors import UsageError

    store = make_store()
    entry = store.entry(ident())
    landing = store.open_landing(entry, 0)
    store.land_piece(landing, 0, memoryview(blob(100)))
    with pytest.raises(UsageError, match="piece at 200"):
        store.land_piece(landing, 200, memoryview(blob(100)))
    with pytest.raises(CorruptData, match="100 of 1024 bytes landed"):
        store.commit_landing(landing)
    assert not store.has(entry, 0) and store.used_bytes == 0


def test_a_landing_whose_disk_fails_is_a_cache_error_counted(make_store, make_tmpfs):
    metrics = AgentMetrics()
    store = make_store(metrics=metrics, chunk_size=1 << 20)
    entry = store.entry(ident(size=1 << 20))
    landing = store.open_landing(entry, 0)
    full = make_tmpfs("64k") / "data"  # the data file's disk fills mid-chunk
    fd = os.open(full, os.O_RDWR | os.O_CREAT, 0o644)
    os.close(landing.fd)
    landing.fd, landing.offset = fd, 0
    with pytest.raises(CacheFull, match="is full"):
        store.land_piece(landing, 0, memoryview(blob(256 * 1024)))
    store.abandon_landing(landing)
    assert metrics.value("coldbrew_cache_write_errors_total", reason="full") == 1
    assert not store.has(entry, 0) and store.used_bytes == 0


def test_a_landing_gets_its_blocks_first_and_gives_them_back_if_abandoned(make_store):
    store = make_store(chunk_size=1 << 20)
    entry = store.entry(ident(size=3 << 20))
    landing = store.open_landing(entry, 1)
    assert os.fstat(landing.fd).st_blocks * 512 >= 1 << 20, "chunk 1's blocks, before any byte"
    store.land_piece(landing, 0, memoryview(blob(4096)))
    store.abandon_landing(landing)
    assert os.stat(entry.data_path).st_blocks == 0, "an abandoned chunk's blocks go back"
    assert not store.has(entry, 1) and store.used_bytes == 0


def test_a_chunk_the_disk_cannot_hold_fails_at_open_before_any_byte(make_store, make_tmpfs):
    """The store's own disk has room, but the entry's data file lies on a 64 KiB one."""
    metrics = AgentMetrics()
    store = make_store(metrics=metrics, chunk_size=1 << 20)
    entry = store.entry(ident(size=2 << 20))
    small = make_tmpfs("64k") / "data"
    small.touch()
    entry.data_path.unlink()
    entry.data_path.symlink_to(small)
    with pytest.raises(CacheFull, match="is full"):
        store.open_landing(entry, 0)
    assert metrics.value("coldbrew_cache_write_errors_total", reason="full") == 1
    assert small.stat().st_blocks == 0 and store.used_bytes == 0
    assert land(store, store.entry(ident("other.bin", size=1 << 20)), 0, blob(1 << 20)), \
        "the room it asked for was given back"


def test_a_landing_on_a_cache_that_cannot_make_room_holds_nothing(make_store):
    store = make_store(limits=Limits(size_bytes=CHUNK, reserve_bytes=0))
    a, _ = fill(store, ident("a.bin", size=CHUNK))
    store.pin(a)
    entry = store.entry(ident("b.bin", size=CHUNK))
    with pytest.raises(CacheFull, match="is full"):
        store.open_landing(entry, 0)
    store.unpin(a)
    assert land(store, entry, 0, blob(CHUNK)) and not a.complete  # a was evicted for it


# --- the lock ------------------------------------------------------------------------------------------


def test_second_store_on_the_same_dir_is_refused(make_store):
    make_store()
    second = make_store(open_=False)
    with pytest.raises(CacheError, match="in use by another agent"):
        second.open()


def test_lock_is_released_on_close(make_store):
    first = make_store()
    first.close()
    second = make_store(open_=False)
    second.open()  # does not raise
    assert second.entries() == []


def test_unusable_cache_dir_is_a_cache_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"not a directory")
    store = ChunkStore(blocker, CHUNK, NO_LIMIT)
    with pytest.raises(CacheError, match="cannot use cache directory"):
        store.open()


# --- capacity and eviction ------------------------------------------------------------------------------


def two_chunk(name: str) -> FileIdentity:
    return ident(name=name, size=2 * CHUNK)


def test_lru_file_is_evicted_when_the_limit_is_hit(make_store):
    metrics = AgentMetrics()
    store = make_store(limits=Limits(size_bytes=5 * CHUNK, reserve_bytes=0), metrics=metrics)
    old, _ = fill(store, two_chunk("old.bin"))
    new, _ = fill(store, two_chunk("new.bin"))
    old.last_used, new.last_used = 100.0, 200.0
    third = store.entry(two_chunk("third.bin"))
    store.write_chunk(third, 0, memoryview(blob(CHUNK)))  # fits: 5 chunks
    assert store.find(old.key) is not None
    store.write_chunk(third, 1, memoryview(blob(CHUNK)))  # 6 > 5: the oldest file goes
    assert store.find(old.key) is None
    assert not old.path.exists()
    assert store.find(new.key) is new and new.complete
    assert third.complete
    assert store.used_bytes == 4 * CHUNK
    assert metrics.value("coldbrew_cache_evictions_total") == 1
    assert metrics.value("coldbrew_cache_evicted_bytes_total") == 2 * CHUNK


def test_lru_order_follows_last_used_not_write_order(make_store):
    store = make_store(limits=Limits(size_bytes=4 * CHUNK, reserve_bytes=0))
    first, _ = fill(store, two_chunk("first.bin"))
    second, _ = fill(store, two_chunk("second.bin"))
    first.last_used, second.last_used = 300.0, 100.0  # first was read more recently
    fill(store, two_chunk("third.bin"))
    assert store.find(second.key) is None
    assert store.find(first.key) is first


def test_eviction_takes_as_many_files_as_needed(make_store):
    store = make_store(limits=Limits(size_bytes=4 * CHUNK, reserve_bytes=0))
    a, _ = fill(store, ident(name="a.bin", size=CHUNK))
    b, _ = fill(store, ident(name="b.bin", size=CHUNK))
    c, _ = fill(store, ident(name="c.bin", size=2 * CHUNK))
    a.last_used, b.last_used, c.last_used = 1.0, 2.0, 3.0
    big = store.entry(ident(name="big.bin", size=4 * CHUNK))
    for i in range(2):
        store.write_chunk(big, i, memoryview(blob(CHUNK, i)))
    assert store.find(a.key) is None and store.find(b.key) is None
    assert store.find(c.key) is c
    assert store.used_bytes == 4 * CHUNK


def test_pinned_files_are_never_evicted(make_store):
    store = make_store(limits=Limits(size_bytes=4 * CHUNK, reserve_bytes=0))
    old, _ = fill(store, two_chunk("old.bin"))
    new, _ = fill(store, two_chunk("new.bin"))
    old.last_used, new.last_used = 100.0, 200.0
    store.pin(old)
    fill(store, two_chunk("third.bin"))
    assert store.find(old.key) is old and old.complete
    assert store.find(new.key) is None


def test_cache_full_when_only_pinned_files_remain(make_store):
    metrics = AgentMetrics()
    store = make_store(limits=Limits(size_bytes=4 * CHUNK, reserve_bytes=0), metrics=metrics)
    a, _ = fill(store, two_chunk("a.bin"))
    b, _ = fill(store, two_chunk("b.bin"))
    store.pin(a)
    store.pin(b)
    third = store.entry(two_chunk("third.bin"))
    with pytest.raises(CacheFull, match="is full"):
        store.write_chunk(third, 0, memoryview(blob(CHUNK)))
    assert not store.has(third, 0)
    assert third.data_path.read_bytes() == bytes(third.identity.size), "nothing was written"
    assert a.complete and b.complete and store.used_bytes == 4 * CHUNK
    assert metrics.value("coldbrew_cache_write_errors_total", reason="full") == 1
    assert list((store.root / "tmp").iterdir()) == []


def test_the_file_being_written_is_not_evicted_to_make_room_for_itself(make_store):
    store = make_store(limits=Limits(size_bytes=2 * CHUNK, reserve_bytes=0))
    entry = store.entry(ident(size=3 * CHUNK))
    store.write_chunk(entry, 0, memoryview(blob(CHUNK)))
    store.write_chunk(entry, 1, memoryview(blob(CHUNK)))
    with pytest.raises(CacheFull):
        store.write_chunk(entry, 2, memoryview(blob(CHUNK)))
    assert entry.present == {0, 1}


def test_concurrent_writers_never_overshoot_the_limit(make_store, monkeypatch):
    """Eight chunks written at once into room for four: four land, four are CacheFull.

    Each write is held in the middle (after its room was granted, before it is
    counted as used) until all eight have asked for room: the window in which
    writers that only looked at the used bytes all saw the same free space.
    """
    import threading

    store = make_store(limits=Limits(size_bytes=4 * CHUNK, reserve_bytes=0))
    entry = store.entry(ident(size=8 * CHUNK))
    asked = threading.Barrier(8, timeout=10)
    real_write = store.disk.write_at

    def held_write(entry, offset, data):
        real_write(entry, offset, data)
        asked.wait()  # every writer has been granted room, or refused, by now

    real_make_room = store.space.make_room

    def make_room(nbytes, for_entry):
        try:
            real_make_room(nbytes, for_entry)
        except CacheFull:
            asked.wait()
            raise

    monkeypatch.setattr(store.disk, "write_at", held_write)
    monkeypatch.setattr(store.space, "make_room", make_room)
    outcomes: list[str] = []

    def write(i: int) -> None:
        try:
            store.write_chunk(entry, i, memoryview(blob(CHUNK, i)))
            outcomes.append("stored")
        except CacheFull:
            outcomes.append("full")

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == ["full"] * 4 + ["stored"] * 4
    assert store.used_bytes == 4 * CHUNK and len(entry.present) == 4
    assert store.space.reserved == 0, "every reservation was given back"


def test_unpin_makes_a_file_evictable_again(make_store):
    store = make_store(limits=Limits(size_bytes=4 * CHUNK, reserve_bytes=0))
    a, _ = fill(store, two_chunk("a.bin"))
    b, _ = fill(store, two_chunk("b.bin"))
    a.last_used, b.last_used = 1.0, 2.0
    store.pin(a)
    store.pin(a)
    store.unpin(a)
    assert store.pinned(a)  # pins are counted
    store.unpin(a)
    assert not store.pinned(a)
    fill(store, two_chunk("c.bin"))
    assert store.find(a.key) is None


def test_evict_of_a_pinned_entry_is_refused(make_store):
    store = make_store()
    entry, _ = fill(store, ident())
    store.pin(entry)
    with pytest.raises(FileBusy, match="in use"):
        store.evict(entry)
    assert store.find(entry.key) is entry and entry.complete
    store.unpin(entry)
    assert store.evict(entry) == entry.layout.size
    assert store.find(entry.key) is None
    assert not entry.path.exists()
    assert store.used_bytes == 0


def test_evicted_file_stays_gone_after_restart(make_store):
    store = make_store()
    identity = ident()
    entry, _ = fill(store, identity)
    store.evict(entry)
    store = reopen(store, make_store)
    assert store.find(identity.key()) is None


def test_capacity_respects_the_reserve(make_store, tmp_path):
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    store = make_store(limits=Limits(size_bytes=None, reserve_bytes=free + 10**9))
    assert store.capacity() == 0
    entry = store.entry(ident())
    with pytest.raises(CacheFull):
        store.write_chunk(entry, 0, memoryview(blob(CHUNK)))
    assert not store.has(entry, 0)


def test_capacity_is_the_size_limit_when_the_disk_has_room(make_store):
    store = make_store(limits=Limits(size_bytes=7 * CHUNK, reserve_bytes=0))
    assert store.capacity() == 7 * CHUNK


# --- known bug: a torn journal line poisons the next append -------------------------------------------


def _store_with_torn_journal(make_store, torn_tail: bytes, size: int) -> tuple[ChunkStore, FileIdentity]:
    store = make_store()
    identity = ident(size=size)
    entry = store.entry(identity)
    store.write_chunk(entry, 0, memoryview(blob(CHUNK)))
    with open(entry.path / "journal", "ab") as f:
        f.write(torn_tail)  # a crash mid-append
    return reopen(store, make_store), identity


def test_chunk_written_after_a_torn_journal_line_survives_the_next_restart(make_store):
    second = blob(CHUNK, 1)
    store, identity = _store_with_torn_journal(make_store, b"1 " + digest(second).encode()[:9],
                                               size=3 * CHUNK)
    entry = store.find(identity.key())
    store.write_chunk(entry, 1, memoryview(second))
    store = reopen(store, make_store)
    assert store.find(identity.key()).present == {0, 1}


def test_torn_journal_tail_cannot_give_one_chunk_anothers_digest(make_store):
    size = 20 * CHUNK
    store, identity = _store_with_torn_journal(make_store, b"1", size=size)
    entry = store.find(identity.key())
    store.write_chunk(entry, 3, memoryview(blob(CHUNK, 3)))
    store = reopen(store, make_store)
    entry = store.find(identity.key())
    assert entry.present == {0, 3}
    assert 13 not in entry.digests
    store.write_chunk(entry, 13, memoryview(blob(CHUNK, 13)))  # CorruptData today
    assert store.has(entry, 13)


def test_an_abandoned_landing_over_a_present_chunk_drops_it(make_store):
    """Its old bytes were partly overwritten: the journal must not vouch for them any more."""
    store = make_store()
    entry = store.entry(ident())
    data = blob(entry.identity.size)
    land(store, entry, 0, data[:CHUNK])
    landing = store.open_landing(entry, 0)
    store.land_piece(landing, 0, memoryview(blob(100, 5)))
    store.abandon_landing(landing)
    assert not store.has(entry, 0) and store.used_bytes == 0
    assert land(store, entry, 0, data[:CHUNK]) and store.read_verified(entry, 0) == data[:CHUNK]


# --- the one integrity check (verify.py), which every reader of cached bytes asks ----------------


def test_intact_needs_the_recorded_digest_and_rejects_a_flip_or_an_unknown_one():
    data = blob(3 * CHUNK + 7)
    good = digest(data)
    flipped = bytearray(data)
    flipped[CHUNK + 1] ^= 1
    assert verify.intact(data, good) and verify.intact(memoryview(data), good)
    assert not verify.intact(bytes(flipped), good)
    assert not verify.intact(data[:-1], good), "a short read is not intact"
    assert not verify.intact(data, None), "a chunk nobody verified is not served as verified"
    pieces = [memoryview(data)[:10], memoryview(data)[10:CHUNK], memoryview(data)[CHUNK:]]
    assert verify.intact_pieces(pieces, good)
    assert not verify.intact_pieces(pieces[::-1], good), "the pieces count in order"
    assert not verify.intact_pieces(pieces, None)


@pytest.mark.parametrize("offset", [0, 4096, CHUNK + 5])  # a chunk need not start on a page
def test_intact_at_hashes_a_range_of_an_open_file(tmp_path, offset):
    data = blob(2 * CHUNK + 3, 4)
    path = tmp_path / "data"
    path.write_bytes(bytes(offset) + data)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert verify.digest_at(fd, offset, len(data)) == digest(data)
        assert verify.intact_at(fd, offset, len(data), digest(data))
        assert not verify.intact_at(fd, offset, len(data), digest(data[:-1] + b"x"))
        assert verify.digest_at(fd, offset, len(data) + 1) is None, "past the end of the file"
        assert not verify.intact_at(fd, offset, len(data) + 1, digest(data))
        assert verify.digest_at(fd, offset, 0) == digest(b"")
        assert not verify.intact_at(fd, offset, len(data), None)
    finally:
        os.close(fd)
    assert not verify.intact_at(fd, offset, len(data), digest(data)), "an unreadable file is not intact"
