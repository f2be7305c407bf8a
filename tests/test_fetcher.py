"""The fetcher over its ordered sources: single-flight, priorities, a full cache, cancellation,
failures, and the outcomes by which the cache, peer and origin sources hand a chunk on.

A real chunk store on tmp_path; the origin is a fake that serves bytes from memory, can
hold reads back or fail one, and counts every read. Peer-like sources are scripted fakes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from coldbrew.agent.cache.store import ChunkStore, Limits
from coldbrew.agent.errors import CacheError, ColdbrewError, OriginUnavailable
from coldbrew.agent.fetch.fetcher import _ROUNDS, Fetcher
from coldbrew.agent.fetch.sources import (
    Answer,
    ChunkRequest,
    ChunkSource,
    OpenFile,
    Outcome,
    Priority,
)
from coldbrew.agent.metrics import AgentMetrics
from coldbrew.agent.origin.health import OriginHealth
from coldbrew.agent.origin.origin import ObjectInfo

pytestmark = pytest.mark.unit

CHUNK = 1024
URI = "s3://bucket/model.bin"
NO_LIMIT = Limits(size_bytes=None, reserve_bytes=0)
DATA = bytes((i * 37 + (i >> 7)) % 256 for i in range(4 * CHUNK + 100))  # 5 chunks, the last short


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=10))


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run until ``condition`` holds (what a test waits for has happened)."""
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition never became true")


class FakeOrigin:
    """One object in memory. Counts reads (chunk indexes, in order); can hold them back
    until ``release()`` and fail the next one."""

    can_land = False  # every chunk comes through read_into, which is what is counted

    def __init__(self) -> None:
        self.reads: list[int] = []
        self.health = OriginHealth()
        self.held: asyncio.Event | None = None
        self.fail_next: Exception | None = None

    def hold(self) -> None:
        self.held = asyncio.Event()

    def release(self) -> None:
        assert self.held is not None
        self.held.set()

    async def read_into(self, info: ObjectInfo, start: int, view: memoryview) -> None:
        self.reads.append(start // CHUNK)
        if self.held is not None:
            await self.held.wait()
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        view[:] = DATA[start:start + len(view)]


class Scripted(ChunkSource):
    """A peer-like source: answers with ``script(request)`` and records what it was asked."""

    name = "scripted"

    def __init__(self, script: Callable[[ChunkRequest], Answer]) -> None:
        self.script = script
        self.asked: list[tuple[int, bool]] = []  # (chunk, final) per request
        self.prepared: list[OpenFile] = []
        self.completed_files: list[OpenFile] = []

    async def get(self, request: ChunkRequest) -> Answer:
        self.asked.append((request.index, request.final))
        return self.script(request)

    def prepare(self, f: OpenFile) -> None:
        self.prepared.append(f)

    def completed(self, f: OpenFile) -> None:
        self.completed_files.append(f)


class FakeShared:
    """A chunk of a file shared with others, as the origin step sees it (a SharedChunk)."""

    def __init__(self, store: ChunkStore, f: OpenFile, index: int, mine: bool = True,
                 shared: bool = True, put_fails: bool = False) -> None:
        self.store, self.f, self.index = store, f, index
        self.mine, self.shared, self.put_fails = mine, shared, put_fails
        self.mine_asked = 0
        self.puts: list[bytes] = []

    def still_mine(self) -> bool:
        self.mine_asked += 1
        return self.mine

    def still_shared(self) -> bool:
        return self.shared

    async def put(self, piece: bytes) -> None:
        self.puts.append(piece)
        if self.put_fails:
            raise CacheError("no longer shared")
        self.store.write_chunk(self.f.entry, self.index, memoryview(piece))


@pytest.fixture
def origin() -> FakeOrigin:
    return FakeOrigin()


@pytest.fixture
def metrics() -> AgentMetrics:
    return AgentMetrics()


@pytest.fixture
def make_store(tmp_path: Path, metrics: AgentMetrics) -> Iterator[Callable[..., ChunkStore]]:
    opened: list[ChunkStore] = []

    def make(limits: Limits = NO_LIMIT) -> ChunkStore:
        store = ChunkStore(tmp_path / "cache", CHUNK, limits, metrics)
        store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(make_store: Callable[..., ChunkStore]) -> ChunkStore:
    return make_store()


def fetcher_for(origin: FakeOrigin, store: ChunkStore, metrics: AgentMetrics, concurrency: int = 2,
                peers: ChunkSource | None = None) -> tuple[Fetcher, OpenFile]:
    fetcher = Fetcher(origin, store, metrics, concurrency, peers=peers)  # type: ignore[arg-type]
    return fetcher, fetcher.open_info(ObjectInfo(URI, len(DATA), '"e1"'))


def chunk(index: int) -> bytes:
    return DATA[index * CHUNK:(index + 1) * CHUNK]


# --- single-flight -------------------------------------------------------------------------


def test_concurrent_ensures_of_one_chunk_fetch_it_once(origin, store, metrics):
    async def main() -> list[bytes | None]:
        peers = Scripted(lambda _: Outcome.PASS)
        fetcher, f = fetcher_for(origin, store, metrics, peers=peers)
        origin.hold()
        waiting = [asyncio.create_task(fetcher.ensure(f, 1)) for _ in range(5)]
        await until(lambda: origin.reads == [1])
        origin.release()
        results = await asyncio.gather(*waiting)
        assert peers.asked == [(1, False)], "the peer source was asked more than once"
        return results

    assert run(main()) == [None] * 5
    assert origin.reads == [1]
    assert store.has(store.entry(ObjectInfo(URI, len(DATA), '"e1"').identity), 1)
    assert metrics.value("coldbrew_singleflight_joins_total") == 4
    assert metrics.value("coldbrew_cache_misses_total") == 1


def test_a_cached_chunk_asks_no_source(origin, store, metrics):
    async def main() -> None:
        peers = Scripted(lambda _: Outcome.PASS)
        fetcher, f = fetcher_for(origin, store, metrics, peers=peers)
        assert await fetcher.ensure(f, 0) is None
        assert await fetcher.ensure(f, 0) is None
        assert peers.asked == [(0, False)]

    run(main())
    assert origin.reads == [0]
    assert metrics.value("coldbrew_cache_hits_total") == 1


# --- priorities ------------------------------------------------------------------------------


def test_a_read_queued_after_prewarms_is_fetched_first(origin, store, metrics):
    async def main() -> None:
        fetcher, f = fetcher_for(origin, store, metrics, concurrency=1)
        origin.hold()
        first = asyncio.create_task(fetcher.ensure(f, 0, Priority.PREWARM))  # takes the one slot
        await until(lambda: origin.reads == [0])
        queued = [asyncio.create_task(fetcher.ensure(f, i, Priority.PREWARM)) for i in (1, 2)]
        await until(lambda: fetcher.slots.waiting == 2)
        read = asyncio.create_task(fetcher.ensure(f, 3, Priority.READ))
        await until(lambda: fetcher.slots.waiting == 3)
        origin.release()
        await asyncio.gather(first, *queued, read)

    run(main())
    assert origin.reads == [0, 3, 1, 2]


def test_a_reader_joining_a_queued_prewarm_moves_it_up(origin, store, metrics):
    async def main() -> None:
        fetcher, f = fetcher_for(origin, store, metrics, concurrency=1)
        origin.hold()
        first = asyncio.create_task(fetcher.ensure(f, 0, Priority.PREWARM))
        await until(lambda: origin.reads == [0])
        queued = [asyncio.create_task(fetcher.ensure(f, i, Priority.PREWARM)) for i in (1, 2)]
        await until(lambda: fetcher.slots.waiting == 2)
        joined = asyncio.create_task(fetcher.ensure(f, 2, Priority.READ))  # joins chunk 2's fetch
        await until(lambda: metrics.value("coldbrew_singleflight_joins_total") == 1)
        origin.release()
        await asyncio.gather(first, *queued, joined)

    run(main())
    assert origin.reads == [0, 2, 1]


# --- a full cache ---------------------------------------------------------------------------


def test_a_full_cache_hands_the_bytes_over_from_memory(origin, make_store, metrics):
    store = make_store(Limits(size_bytes=CHUNK // 2, reserve_bytes=0))

    async def main() -> list[bytes | None]:
        fetcher, f = fetcher_for(origin, store, metrics)
        origin.hold()
        waiting = [asyncio.create_task(fetcher.ensure(f, 2)) for _ in range(3)]
        await until(lambda: origin.reads == [2])
        origin.release()
        return await asyncio.gather(*waiting)

    assert run(main()) == [chunk(2)] * 3
    assert origin.reads == [2]
    assert metrics.value("coldbrew_cache_write_errors_total", reason="full") == 1
    assert not store.has(store.entry(ObjectInfo(URI, len(DATA), '"e1"').identity), 2)


def test_read_ahead_into_a_full_cache_stops_and_hands_over_what_it_fetched(origin, make_store, metrics):
    """Read-ahead the cache cannot keep would fetch every chunk twice (once for nothing, once
    for the reader): it stops after the first round, and gives those chunks' bytes to ``keep``."""
    store = make_store(Limits(size_bytes=CHUNK // 2, reserve_bytes=0))
    kept: dict[int, bytes] = {}

    async def main() -> None:
        fetcher, f = fetcher_for(origin, store, metrics, concurrency=1)
        fetcher.prefetch(f, 0, keep=kept.__setitem__)
        await until(lambda: not fetcher._prefetch)

    run(main())
    assert origin.reads == [0], "read-ahead went on into a cache that keeps nothing"
    assert kept == {0: chunk(0)}


# --- cancellation and failures ------------------------------------------------------------


def test_one_waiter_leaving_does_not_cancel_the_fetch(origin, store, metrics):
    async def main() -> None:
        fetcher, f = fetcher_for(origin, store, metrics)
        origin.hold()
        waiting = [asyncio.create_task(fetcher.ensure(f, 4)) for _ in range(3)]
        await until(lambda: origin.reads == [4])
        waiting[0].cancel()
        await asyncio.sleep(0)
        origin.release()
        results = await asyncio.gather(*waiting, return_exceptions=True)
        assert isinstance(results[0], asyncio.CancelledError)
        assert results[1:] == [None, None]
        assert fetcher.store.has(f.entry, 4)

    run(main())
    assert origin.reads == [4]


def test_a_failing_fetch_reaches_every_waiter_and_the_next_ensure_tries_again(origin, store, metrics):
    async def main() -> None:
        fetcher, f = fetcher_for(origin, store, metrics)
        origin.hold()
        origin.fail_next = OriginUnavailable("the origin is down")
        waiting = [asyncio.create_task(fetcher.ensure(f, 1)) for _ in range(3)]
        await until(lambda: origin.reads == [1])
        origin.release()
        results = await asyncio.gather(*waiting, return_exceptions=True)
        assert all(isinstance(r, OriginUnavailable) for r in results), results
        assert not fetcher.store.has(f.entry, 1)
        assert await fetcher.ensure(f, 1) is None

    run(main())
    assert origin.reads == [1, 1]


def test_a_peer_source_that_raises_fails_the_fetch_not_the_next_one(origin, store, metrics):
    failures = [RuntimeError("peer side broke")]

    def script(_: ChunkRequest) -> Answer:
        if failures:
            raise failures.pop()
        return Outcome.PASS

    async def main() -> None:
        fetcher, f = fetcher_for(origin, store, metrics, peers=Scripted(script))
        results = await asyncio.gather(fetcher.ensure(f, 0), fetcher.ensure(f, 0),
                                       return_exceptions=True)
        assert [type(r) for r in results] == [RuntimeError, RuntimeError]
        assert origin.reads == []
        assert await fetcher.ensure(f, 0) is None

    run(main())
    assert origin.reads == [0]


# --- the ordered sources ----------------------------------------------------------------


def test_a_peer_answering_present_keeps_the_origin_out(origin, store, metrics):
    def from_a_peer(request: ChunkRequest) -> Answer:
        store.write_chunk(request.file.entry, request.index, memoryview(chunk(request.index)))
        return Outcome.PRESENT

    async def main() -> None:
        fetcher, f = fetcher_for(origin, store, metrics, peers=Scripted(from_a_peer))
        assert await fetcher.ensure(f, 3) is None
        assert await fetcher.chunk_bytes(f, 3) == chunk(3)

    run(main())
    assert origin.reads == []


def test_a_peer_passing_falls_through_to_the_origin(origin, store, metrics):
    async def main() -> None:
        peers = Scripted(lambda _: Outcome.PASS)
        fetcher, f = fetcher_for(origin, store, metrics, peers=peers)
        assert await fetcher.chunk_bytes(f, 0) == chunk(0)
        assert peers.asked == [(0, False)]

    run(main())
    assert origin.reads == [0]


def test_a_chunk_owned_elsewhere_goes_back_to_peers_at_most_rounds_times(origin, store, metrics):
    shared: list[FakeShared] = []

    def not_mine(request: ChunkRequest) -> Answer:
        if request.shared is None:
            shared.append(FakeShared(store, request.file, request.index, mine=False))
            request.shared = shared[0]
        return Outcome.PASS

    async def main() -> None:
        peers = Scripted(not_mine)
        fetcher, f = fetcher_for(origin, store, metrics, peers=peers)
        assert await fetcher.ensure(f, 2) is None
        # Sent back on every round but the last, where the origin is final.
        assert peers.asked == [(2, False)] * (_ROUNDS - 1) + [(2, True)]

    run(main())
    assert shared[0].mine_asked == _ROUNDS - 1
    assert origin.reads == [2], "a round sent back to peers read from the origin"
    assert shared[0].puts == [chunk(2)], "a shared chunk's bytes must go through the sharing side"


def test_a_source_that_keeps_sending_chunks_back_is_stopped(origin, store, metrics):
    async def main() -> None:
        peers = Scripted(lambda _: Outcome.OWNED_ELSEWHERE)
        fetcher, f = fetcher_for(origin, store, metrics, peers=peers)
        with pytest.raises(ColdbrewError, match="no source"):
            await fetcher.ensure(f, 0)
        assert len(peers.asked) == _ROUNDS

    run(main())
    assert origin.reads == []


def test_peers_giving_up_send_the_chunk_to_the_origin_with_no_second_thoughts(origin, store, metrics):
    shared: list[FakeShared] = []

    def gave_up(request: ChunkRequest) -> Answer:
        shared.append(FakeShared(store, request.file, request.index, mine=False))
        request.shared = shared[-1]
        return Outcome.GAVE_UP

    async def main() -> None:
        peers = Scripted(gave_up)
        fetcher, f = fetcher_for(origin, store, metrics, peers=peers)
        assert await fetcher.ensure(f, 1) is None
        assert peers.asked == [(1, False)]

    run(main())
    assert shared[0].mine_asked == 0
    assert origin.reads == [1]
    assert shared[0].puts == [chunk(1)]


@pytest.mark.parametrize("still_shared, put_fails, expected_uncached", [
    (False, False, False),  # unshared during the read: the bytes go to the store
    (True, True, True),  # the sharing side could not cache them: served from memory
])
def test_a_shared_chunk_from_the_origin(origin, store, metrics, still_shared, put_fails, expected_uncached):
    fake: list[FakeShared] = []

    def share(request: ChunkRequest) -> Answer:
        fake.append(FakeShared(store, request.file, request.index, shared=still_shared,
                               put_fails=put_fails))
        request.shared = fake[-1]
        return Outcome.PASS

    async def main() -> bytes | None:
        fetcher, f = fetcher_for(origin, store, metrics, peers=Scripted(share))
        result = await fetcher.ensure(f, 0)
        assert fetcher.store.has(f.entry, 0) is not expected_uncached
        return result

    assert run(main()) == (chunk(0) if expected_uncached else None)
    assert fake[0].mine_asked == 1
    assert fake[0].puts == ([chunk(0)] if still_shared else [])


def test_sources_hear_when_a_file_is_opened_and_when_it_is_whole(origin, store, metrics):
    async def main() -> None:
        peers = Scripted(lambda _: Outcome.PASS)
        fetcher, f = fetcher_for(origin, store, metrics, peers=peers)
        assert peers.prepared == [f]
        await fetcher.ensure_all(f, [0, 1, 2, 3], Priority.PREWARM)
        assert peers.completed_files == []
        await fetcher.ensure(f, 4)
        assert peers.completed_files == [f]

    run(main())
