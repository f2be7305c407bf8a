"""Making chunks present: cache first, then origin — one fetch per chunk, in priority order.

However many readers wait on a cold chunk, one origin GET fetches it
(single-flight); the others join that fetch. Sources are tried cache → peers →
origin (peers when P2P is on and the file is shared: :mod:`.sharing`, :mod:`.peers`).
A cache disk that is full or failing never fails a read: the bytes fetched from
origin are handed to the waiters straight from memory, and the failure is logged
and counted.

The fetcher also owns the stat cache (URI → ObjectInfo, briefly) and the
read-ahead that follows a reader through a file.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any

from ..errors import CacheError, CorruptData, ObjectChanged
from ..metrics import AgentMetrics
from ..origin.origin import ObjectInfo, Origin, finish_in_thread
from .slots import Slots, Waiter
from ..cache.store import ChunkStore, Entry

if TYPE_CHECKING:
    from ..p2p.swarm import Torrent
    from ..p2p.sharing import Sharing

log = logging.getLogger("coldbrew.fetcher")


#: A chunk goes back to waiting on peers at most this many times before the origin is final.
_ROUNDS = 3
_NOT_YET = object()


class Priority(IntEnum):
    """Lower is sooner."""

    READ = 0  # a reader is blocked on this chunk
    PREFETCH = 5  # a reader will want it soon
    PREWARM = 10  # someone wants it on this node eventually


@dataclass(frozen=True)
class OpenFile:
    """A file pinned to one version (ETag) and its cache entry."""

    info: ObjectInfo
    entry: Entry


class _Flight:
    """One chunk fetch in progress that several callers may wait on."""

    def __init__(self, future: asyncio.Future[bytes | None]) -> None:
        self.future = future
        self.waiters: list[Waiter] = []


class Fetcher:
    def __init__(self, origin: Origin, store: ChunkStore, metrics: AgentMetrics,
                 concurrency: int, stat_ttl_s: float = 2.0) -> None:
        self.origin = origin
        self.store = store
        self.metrics = metrics
        self.slots = Slots(concurrency, store.chunk_size)
        self.concurrency = concurrency
        self.stat_ttl_s = stat_ttl_s
        self._flights: dict[tuple[str, int], _Flight] = {}
        self._stats: dict[str, tuple[float, ObjectInfo]] = {}
        self._prefetch: dict[str, asyncio.Task[None]] = {}
        self.sharing: Sharing | None = None  # set by the agent when P2P is on

    # --- files ----------------------------------------------------------------------

    async def stat(self, uri: str) -> ObjectInfo:
        cached = self._stats.get(uri)
        if cached and time.monotonic() - cached[0] < self.stat_ttl_s:
            return cached[1]
        info = await self.origin.stat(uri)
        self._stats[uri] = (time.monotonic(), info)
        return info

    async def open(self, uri: str) -> OpenFile:
        """Pin ``uri`` to its current version; older cached versions are dropped if unused."""
        return self.open_info(await self.stat(uri))

    def open_info(self, info: ObjectInfo) -> OpenFile:
        entry = self.store.entry(info.identity)
        for old in self.store.other_versions(info.identity):
            if not self.store.pinned(old):
                log.info("object changed at origin; dropping the old version",
                         extra={"uri": info.uri, "old_etag": old.identity.etag, "etag": info.etag})
                self.store.evict(old)
        self.store.touch(entry)
        f = OpenFile(info, entry)
        if self.sharing is not None:
            self.sharing.prepare(f)
        return f

    def forget_stat(self, uri: str) -> None:
        self._stats.pop(uri, None)

    # --- chunks ------------------------------------------------------------------------

    async def ensure(self, f: OpenFile, index: int, priority: Priority = Priority.READ
                     ) -> bytes | None:
        """Make chunk ``index`` present. None: it is on disk. Bytes: cache failed, here they are."""
        if self.store.has(f.entry, index):
            self.metrics.cache_hits.inc()
            return None
        key = (f.entry.key, index)
        flight = self._flights.get(key)
        if flight is not None:
            self.metrics.singleflight_joins.inc()
            for waiter in flight.waiters:
                waiter.boost(priority)
        else:
            self.metrics.cache_misses.inc()
            flight = _Flight(asyncio.get_running_loop().create_future())
            flight.future.add_done_callback(_consume_exception)
            self._flights[key] = flight
            asyncio.create_task(self._fetch(f, index, priority, flight))
        # shield: one impatient caller leaving must not cancel the fetch the others wait on
        return await asyncio.shield(flight.future)

    async def _fetch(self, f: OpenFile, index: int, priority: Priority, flight: _Flight) -> None:
        started = time.monotonic()
        self.metrics.inflight_fetches.inc()
        try:
            torrent = await self.sharing.torrent_for(f) if self.sharing else None
            result = _NOT_YET
            for round_ in range(_ROUNDS):
                verdict = "mine"
                if torrent is not None and self.sharing:
                    verdict = await self.sharing.swarm.from_peers(torrent, index)
                if verdict == "got":
                    result = None
                    break
                # "gave up" (peers too slow) or the last round: no second thoughts.
                final = verdict == "gave up" or round_ == _ROUNDS - 1
                result = await self._from_origin(f, index, priority, flight, torrent, final)
                if result is not _NOT_YET:
                    self.metrics.chunk_seconds.labels("origin").observe(time.monotonic() - started)
                    break
            if self.sharing and f.entry.complete:
                self.sharing.completed(f)
            flight.future.set_result(result)
        except ObjectChanged as e:
            self.forget_stat(f.info.uri)
            flight.future.set_exception(e)
        except BaseException as e:  # noqa: BLE001 - every waiter must hear how it ended
            flight.future.set_exception(e)
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            self._flights.pop((f.entry.key, index), None)
            self.metrics.inflight_fetches.dec()

    async def _from_origin(self, f: OpenFile, index: int, priority: Priority, flight: _Flight,
                           torrent: "Torrent | None", final: bool) -> Any:
        """The chunk from the origin; ``_NOT_YET`` if, by the time a slot was free, it had
        become another agent's to fetch (then the caller waits on peers again)."""
        async with self.slots.acquire(priority, flight.waiters) as buf:
            swarm = self.sharing.swarm if self.sharing else None
            if torrent is not None and swarm is not None and not final \
                    and not swarm.still_mine(torrent, index):
                return _NOT_YET
            start, end = f.entry.layout.bounds(index)
            view = memoryview(buf)[: end - start]
            if torrent is None or swarm is None:
                return await self._to_store(f, index, view)
            await self.origin.read_into(f.info, start, view)
            if swarm.torrent(f.entry.key) is not torrent:
                return await self._store(f, index, view)
            # Copied out so the slot's buffer goes back to the next origin read now, not
            # after libtorrent has hashed and written the piece.
            piece = await asyncio.to_thread(bytes, view)
        # libtorrent owns a shared entry's data file: the bytes go in through it.
        try:
            await swarm.put_piece(torrent, index, piece)
            return None
        except CacheError as e:
            _warn_uncached(f, index, e)
            return piece

    async def _to_store(self, f: OpenFile, index: int, view: memoryview) -> bytes | None:
        """Chunk ``index`` from the origin into the cache; bytes if the cache could not take it.

        Where the origin can, the chunk lands in the data file piece by piece as it arrives
        (:meth:`Origin.land`); otherwise it is read into ``view`` whole and written from there.
        """
        if not self.origin.can_land:
            await self.origin.read_into(f.info, f.entry.offset(index), view)
            return await self._store(f, index, view)
        opening = asyncio.ensure_future(asyncio.to_thread(self.store.open_landing, f.entry, index))
        try:
            landing = await asyncio.shield(opening)
        except CacheError as e:
            return await self._uncached(f, index, view, e)
        except asyncio.CancelledError:
            # The thread runs on: what it opens must still be closed, or its room stays held.
            await asyncio.wait([opening])
            if not opening.cancelled() and opening.exception() is None:
                self.store.abandon_landing(opening.result())
            raise
        try:
            await self.origin.land(f.info, landing.offset, view,
                                   functools.partial(self.store.land_piece, landing))
        except BaseException as e:
            self.store.abandon_landing(landing)
            if isinstance(e, CacheError):
                return await self._uncached(f, index, view, e)
            raise
        try:
            await finish_in_thread(asyncio.to_thread(self.store.commit_landing, landing))
            return None
        except CorruptData:
            raise self._changed_under_etag(f, index) from None
        except CacheError as e:
            return await self._uncached(f, index, view, e)

    async def _uncached(self, f: OpenFile, index: int, view: memoryview, error: Exception) -> bytes:
        """The chunk from the origin into memory only: the cache disk failed (``error``)."""
        _warn_uncached(f, index, error)
        await self.origin.read_into(f.info, f.entry.offset(index), view)
        return await asyncio.to_thread(bytes, view)

    @staticmethod
    def _changed_under_etag(f: OpenFile, index: int) -> ObjectChanged:
        # Same ETag, different bytes than we verified before: the origin broke its
        # own contract. Refuse to guess which version is right.
        return ObjectChanged(f"{f.info.uri}: chunk {index} changed at the origin under the "
                             f"same ETag {f.info.etag}; open it again")

    async def _store(self, f: OpenFile, index: int, view: memoryview) -> bytes | None:
        try:
            await finish_in_thread(asyncio.to_thread(self.store.write_chunk, f.entry, index, view))
            return None
        except CorruptData:
            raise self._changed_under_etag(f, index) from None
        except CacheError as e:
            _warn_uncached(f, index, e)
            return bytes(view)

    async def verify(self, f: OpenFile, index: int) -> bool:
        """Check a present chunk against its digest (mmap, no copy); drop it if corrupt."""
        return await asyncio.to_thread(self.store.verify_present, f.entry, index)

    async def chunk_bytes(self, f: OpenFile, index: int, priority: Priority = Priority.READ
                          ) -> bytes:
        """One whole chunk, verified; a corrupt cached copy is refetched once."""
        for _ in range(2):
            uncached = await self.ensure(f, index, priority)
            if uncached is not None:
                self.metrics.bytes_served.labels("origin").inc(len(uncached))
                return uncached
            try:
                data = await asyncio.to_thread(self.store.read_verified, f.entry, index)
            except (CorruptData, CacheError) as e:
                log.warning("cached chunk unusable; fetching again",
                            extra={"uri": f.info.uri, "chunk": index, "error": str(e)})
                continue
            self.metrics.bytes_served.labels("cache").inc(len(data))
            return data
        raise CorruptData(f"chunk {index} of {f.info.uri} failed verification twice in a row; "
                          "the cache disk may be failing")

    # --- read-ahead -----------------------------------------------------------------------

    def prefetch(self, f: OpenFile, from_index: int = 0,
                 priority: Priority = Priority.PREFETCH) -> None:
        """Fetch the rest of the file in order, ahead of the reader, in the background."""
        task = self._prefetch.get(f.entry.key)
        if task is not None and not task.done():
            return
        self._prefetch[f.entry.key] = asyncio.create_task(self._prefetch_run(f, from_index, priority))

    async def _prefetch_run(self, f: OpenFile, from_index: int, priority: Priority) -> None:
        missing = [i for i in range(from_index, f.entry.layout.count)
                   if not self.store.has(f.entry, i)]
        self.store.pin(f.entry)
        try:
            await self.ensure_all(f, missing, priority)
        except Exception as e:  # noqa: BLE001 - a reader will hit and report the same error
            log.info("prefetch stopped", extra={"uri": f.info.uri, "error": str(e)})
        finally:
            self.store.unpin(f.entry)
            self._prefetch.pop(f.entry.key, None)

    async def ensure_all(self, f: OpenFile, indexes: list[int], priority: Priority) -> int:
        """Ensure every chunk in ``indexes`` with enough in flight to fill every slot.

        Returns how many came back uncached (cache full or failing).
        """
        pending = iter(indexes)
        uncached = 0

        async def worker() -> None:
            nonlocal uncached
            for index in pending:
                data = await self.ensure(f, index, priority)
                if data is not None:
                    uncached += 1

        # Not wider with peers: many piece requests at once made libtorrent stall some of
        # them (bench/RESULTS.md, P2P rollout).
        workers = [asyncio.create_task(worker()) for _ in range(self.concurrency)]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
        return uncached

    async def close(self) -> None:
        for task in list(self._prefetch.values()):
            task.cancel()


def _warn_uncached(f: OpenFile, index: int, error: Exception) -> None:
    log.warning("cache write failed; serving from memory", extra={
        "uri": f.info.uri, "chunk": index, "error": str(error)})


def _consume_exception(future: asyncio.Future) -> None:
    # Nobody may be left waiting when a fetch fails; don't let asyncio log it as lost.
    if not future.cancelled():
        future.exception()
