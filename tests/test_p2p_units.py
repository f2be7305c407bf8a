"""The pure parts of P2P: torrent bytes, info-hash agreement, stripes, manifests with piece hashes,
and the store's adoption of chunks written by libtorrent."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections import Counter
from pathlib import Path

import libtorrent as lt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coldbrew.agent.cache.store import ChunkStore, Limits
from coldbrew.agent.core.manifest import FileIdentity, Manifest, digest, is_sidecar, sidecar_uri
from coldbrew.agent.errors import CorruptData
from coldbrew.agent.metrics import AgentMetrics
from coldbrew.agent.p2p.membership import ACTIVE_S, JOIN_S, LOST_S, SETTLE_S, PeerView, availability_from
from coldbrew.agent.p2p.session import P2PSettings
from coldbrew.agent.p2p.swarm import Swarm, Torrent
from coldbrew.agent.p2p.torrent import bencode, info_hash, stripe_owner, torrent_bytes

CHUNK = 64 << 10


def manifest_for(data: bytes, uri: str = "s3://b/m/model.safetensors", etag: str = '"e1"') -> Manifest:
    chunks = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]
    return Manifest(FileIdentity(uri, etag, len(data)), CHUNK, [digest(c) for c in chunks],
                    [hashlib.sha1(c).hexdigest() for c in chunks])


def test_bencode_is_canonical() -> None:
    assert bencode({"b": 1, "a": [b"x", "y", -2]}) == b"d1:al1:x1:yi-2ee1:bi1ee"
    with pytest.raises(TypeError):
        bencode(True)


@settings(max_examples=30, deadline=None)
@given(size=st.integers(1, 5 * CHUNK + 7), uri=st.text(min_size=1, max_size=40))
def test_every_agent_computes_the_info_hash_libtorrent_computes(size: int, uri: str) -> None:
    data = bytes(i % 251 for i in range(size))
    m = manifest_for(data, uri=f"s3://b/{uri}")
    info = lt.torrent_info(torrent_bytes(m))
    assert str(info.info_hashes().v1) == info_hash(m)
    assert info.num_pieces() == m.layout.count and info.piece_length() == CHUNK
    assert [info.hash_for_piece(i).hex() for i in range(info.num_pieces())] == m.sha1s
    files = info.files()  # one file: the cache entry's data file, the object's bytes as they are
    assert files.num_files() == 1 and files.file_size(0) == size
    assert files.file_path(0) == "data"


def test_the_same_bytes_under_two_names_are_two_torrents() -> None:
    data = b"x" * (3 * CHUNK)
    assert info_hash(manifest_for(data, uri="s3://b/a")) != info_hash(manifest_for(data, uri="s3://b/c"))
    assert info_hash(manifest_for(data, etag='"1"')) != info_hash(manifest_for(data, etag='"2"'))


def test_no_torrent_without_every_piece_hash() -> None:
    m = manifest_for(b"y" * (2 * CHUNK))
    m.sha1s[1] = None
    assert not m.shareable
    with pytest.raises(ValueError, match="piece hashes unknown"):
        torrent_bytes(m)


def test_stripes_split_a_file_evenly_and_every_member_agrees() -> None:
    members = [b"cb" + bytes([65 + i]) * 18 for i in range(4)]
    owners = [stripe_owner(i, "0123abcd" * 4, members) for i in range(400)]
    assert Counter(owners) == {m: 100 for m in members}
    assert owners == [stripe_owner(i, "0123abcd" * 4, list(reversed(members))) for i in range(400)]
    # Different files start their stripes on different members.
    firsts = {stripe_owner(0, f"{k:08x}" + "0" * 24, members) for k in range(16)}
    assert len(firsts) > 1


def test_manifest_with_piece_hashes_round_trips_and_rejects_junk() -> None:
    m = manifest_for(b"z" * (2 * CHUNK + 5))
    again = Manifest.from_json(json.loads(m.dumps()))
    assert again == m and again.shareable
    bad = m.to_json()
    bad["sha1"] = ["nothex" * 5, None, None]
    with pytest.raises(ValueError, match="malformed sha1"):
        Manifest.from_json(bad)
    bad["sha1"] = [None]
    with pytest.raises(ValueError, match="1 sha1 for 3 chunks"):
        Manifest.from_json(bad)


def test_sidecar_names() -> None:
    assert sidecar_uri("s3://b/llama/model.safetensors") == \
        "s3://b/llama/.coldbrew/model.safetensors.manifest.json"
    assert sidecar_uri("s3://b/top.bin") == "s3://b/.coldbrew/top.bin.manifest.json"
    assert is_sidecar("b/llama/.coldbrew/model.safetensors.manifest.json")
    assert not is_sidecar("b/llama/model.safetensors")
    with pytest.raises(ValueError):
        sidecar_uri("s3://")


def put_at(entry, index: int, data: bytes) -> None:
    """Write chunk bytes into the entry's data file the way libtorrent does (in place)."""
    with open(entry.data_path, "r+b") as f:
        os.pwrite(f.fileno(), data, index * entry.chunk_size)


def _store(tmp_path: Path) -> ChunkStore:
    store = ChunkStore(tmp_path, CHUNK, Limits(None, 0), piece_hashes=True)
    store.open()
    return store


def test_store_records_piece_hashes_and_adopts_chunks_written_in_place(tmp_path: Path) -> None:
    data = bytes(range(256)) * (3 * CHUNK // 256)
    m = manifest_for(data)
    store = _store(tmp_path)
    entry = store.entry(m.identity)
    store.write_chunk(entry, 0, memoryview(data[:CHUNK]))
    assert entry.sha1s[0] == m.sha1s[0]
    # libtorrent writes chunk 1 into the entry's data file itself, then we adopt it.
    put_at(entry, 1, data[CHUNK:2 * CHUNK])
    store.adopt_chunk(entry, 1, m.sha1s[1] or "")
    assert store.read_verified(entry, 1) == data[CHUNK:2 * CHUNK]
    # A chunk its data file is too short to hold is refused, never journaled.
    with open(entry.data_path, "r+b") as f:
        f.truncate(2 * CHUNK + 5)
    with pytest.raises(CorruptData, match="shorter"):
        store.adopt_chunk(entry, 2, m.sha1s[2] or "")
    assert not store.has(entry, 2)
    store.write_chunk(entry, 2, memoryview(data[2 * CHUNK:]))
    assert store.piece_hash(entry, 2) == m.sha1s[2]
    assert entry.manifest() == m
    store.save_manifest(entry, entry.manifest())
    store.close()
    # After a restart: digests, piece hashes and the manifest are all still there.
    again = _store(tmp_path)
    reloaded = again.find(m.identity.key())
    assert reloaded is not None and reloaded.present == {0, 1, 2}
    assert reloaded.sha1s == entry.sha1s and again.load_manifest(reloaded) == m


def test_eviction_tells_p2p_first(tmp_path: Path) -> None:
    store = _store(tmp_path)
    entry = store.entry(FileIdentity("s3://b/x", "e", CHUNK))
    store.write_chunk(entry, 0, memoryview(b"q" * CHUNK))
    seen: list[tuple[str, bool]] = []
    store.on_change.append(lambda e: seen.append((e.key, e.data_path.exists())))
    store.evict(entry)
    assert seen == [(entry.key, True)]  # called while the files were still there


def test_adopt_refuses_bytes_that_differ_from_the_manifest(tmp_path: Path) -> None:
    data = os.urandom(2 * CHUNK)
    m = manifest_for(data)
    store = _store(tmp_path)
    entry = store.entry(m.identity)
    put_at(entry, 0, data[CHUNK:])  # right size, other bytes
    with pytest.raises(CorruptData, match="manifest"):
        store.adopt_chunk(entry, 0, m.sha1s[0] or "", m.digests[0])
    assert not store.has(entry, 0)
    put_at(entry, 0, data[:CHUNK])
    assert store.adopt_chunk(entry, 0, m.sha1s[0] or "", m.digests[0]) == m.digests[0]


class _FlushCountingHandle:
    def __init__(self) -> None:
        self.flushes = 0

    def flush_cache(self) -> None:
        self.flushes += 1


def test_pieces_are_adopted_only_once_libtorrent_has_flushed_them(tmp_path: Path) -> None:
    """libtorrent's disk backend may finish (hash) a piece while its bytes are still in its
    write cache: a piece is adopted only after a flush asked for after it finished."""
    data = os.urandom(3 * CHUNK)
    m = manifest_for(data)
    store = _store(tmp_path)
    entry = store.entry(m.identity)
    loop = asyncio.new_event_loop()
    swarm = Swarm(P2PSettings("127.0.0.1", 0, 0, 5.0), "cb-unit-test", store, AgentMetrics(), loop)
    try:
        handle = _FlushCountingHandle()
        t = Torrent(entry, m, handle, PeerView(swarm.pid, entry.key, time.monotonic()))
        swarm._on_piece_finished(t, 1)  # its file is not written yet
        assert handle.flushes == 1 and not store.has(entry, 1)
        put_at(entry, 1, data[CHUNK:2 * CHUNK])  # libtorrent writes it
        swarm._on_piece_finished(t, 2)  # finished while that flush is under way
        assert handle.flushes == 1, "one flush at a time"
        swarm._on_flushed(t)
        assert store.has(entry, 1) and not store.has(entry, 2)
        assert handle.flushes == 2, "the next flush covers piece 2"
        put_at(entry, 2, data[2 * CHUNK:])
        swarm._on_flushed(t)
        assert store.has(entry, 2) and handle.flushes == 2
        # Bytes on disk that differ from the manifest are never taken in.
        put_at(entry, 0, data[CHUNK:2 * CHUNK])
        swarm._on_piece_finished(t, 0)
        swarm._on_flushed(t)
        assert not store.has(entry, 0)
        assert store.read_verified(entry, 1) == data[CHUNK:2 * CHUNK]
    finally:
        swarm.close()
        loop.close()
        store.close()


def test_availability_comes_from_peer_bitfields_when_libtorrent_keeps_none() -> None:
    """libtorrent has no per-piece counts until it needs a piece picker; with only a seed
    connected, every piece must still count as available (else it goes to the origin)."""
    seed = (4, [True] * 4)
    partial = (2, [True, False, True, False])
    empty = (0, [])
    assert availability_from([seed], 4) == [1, 1, 1, 1]
    assert availability_from([seed, partial, empty], 4) == [2, 1, 2, 1]
    assert availability_from([], 4) == [0, 0, 0, 0]


ME, PEER = b"A" * 20, b"B" * 20


def _owned_by(view: PeerView, who: bytes, chunks: int = 64) -> list[int]:
    return [i for i in range(chunks) if stripe_owner(i, view.key, view.members) == who]


def test_striping_waits_for_an_expected_peer_then_splits_the_file() -> None:
    view = PeerView(ME, "5e" * 16, attached_at=0.0, expected={PEER})
    view.observe([(PEER, 0)], [0] * 64, now=0.1)  # connected, bitfield not trusted yet
    assert not any(view.should_fetch(i, [PEER], now=0.1) for i in range(64))
    view.observe([(PEER, 0)], [0] * 64, now=0.1 + SETTLE_S + 0.01)
    assert view.members == (ME, PEER)
    # past FIRST_S the stripes decide: this agent fetches its own and leaves the peer's
    view.observe([(PEER, 0)], [0] * 64, now=1.01)
    mine = [i for i in range(64) if view.should_fetch(i, [PEER], now=1.01)]
    assert mine == _owned_by(view, ME) and 0 < len(mine) < 64


def test_a_stale_view_or_a_lost_peer_defers_the_decision() -> None:
    view = PeerView(ME, "c0" * 16, attached_at=0.0)
    assert view.should_fetch(0, [], now=100.0), "alone: every chunk is this agent's"
    view.observe([(PEER, 0)], [0] * 8, now=10.0)
    assert not view.should_fetch(0, [PEER], now=10.0 + 1.0), "a view two ticks old is stale"
    view.observe([], [0] * 8, now=11.0)  # the peer's connection dropped
    assert PEER in view.lost
    assert not any(view.should_fetch(i, [PEER], now=11.0) for i in range(8))
    view.observe([], [0] * 8, now=11.0 + LOST_S)
    assert all(view.should_fetch(i, [PEER], now=11.0 + LOST_S) for i in range(8))


def test_a_peer_that_stops_making_progress_loses_its_stripes() -> None:
    view = PeerView(ME, "c0" * 16, attached_at=0.0)
    view.observe([(PEER, 1)], [1] + [0] * 7, now=JOIN_S)
    view.observe([(PEER, 1)], [1] + [0] * 7, now=JOIN_S + SETTLE_S + 0.01)
    assert view.members == (ME, PEER)
    view.observe([(PEER, 1)], [1] + [0] * 7, now=JOIN_S + ACTIVE_S + 0.01)
    assert view.members == (ME,)
    assert not view.still_mine(0), "a chunk a peer holds is fetched from it, not the origin"
    assert all(view.still_mine(i) for i in range(1, 8))
