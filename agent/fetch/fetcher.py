"""Making chunks present: one fetch per chunk, in priority order, its sources asked in turn.

However many readers wait on a cold chunk, one fetch gets it (single-flight); the others
join that fetch. The fetch asks the fetcher's sources in order (:mod:`.sources`): the
cache, then the peers when P2P is on (``peers``, a source from ``agent/p2p``), then the
origin (:mod:`.origin_source`), which never passes. A chunk that became another agent's
to fetch while it waited for an origin slot goes back to the first source, at most
``_ROUNDS`` times. A cache disk that is full or failing never fails a read: the origin
source hands the bytes back from memory.

The fetcher also owns the stat cache (URI → ObjectInfo, briefly; versions come from
:mod:`.versions`, which serves cached ones while the origin is unreachable) and the
read-ahead that follows a reader through a file.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ..cache.store import ChunkStore, Entry
from ..errors import CacheError, ColdbrewError, CorruptData, ManifestRejected, ObjectChanged
from ..metrics import AgentMetrics
from ..origin.flow import START
from ..origin.origin import ObjectInfo, Origin
from .origin_source import OriginSource
from .slots import Slots
from .sources import CacheSource, ChunkRequest, ChunkSource, OpenFile, Outcome, Priority
from .versions import Versions

__all__ = ["Fetcher", "OpenFile", "Priority"]

log = logging.getLogger("coldbrew.fetcher")


#: A chunk goes back to waiting on peers at most this many times before the origin is final.
_ROUNDS = 3
#: A source's name as the ``source`` label of coldbrew_bytes_served_total says it.
_SERVED_AS = {"peers": "peer"}
#: Chunks fetched and not yet served that the fetcher remembers the source of (1 TiB at the
#: default chunk size: a bound, not a limit anyone meets).
_FETCHED_BY_MAX = 1 << 16


class _Flight:
    """One chunk fetch in progress that several callers may wait on."""

    def __init__(self, request: ChunkRequest, future: asyncio.Future[bytes | None]) -> None:
        self.request = request
        self.future = future


class Fetcher:
    def __init__(self, origin: Origin, store: ChunkStore, metrics: AgentMetrics,
                 concurrency: int | None = None, stat_ttl_s: float = 2.0,
                 peers: ChunkSource | None = None, origin_unreachable: str = "serve-cached") -> None:
        """``concurrency``: origin GETs in flight, fixed; None: the origin's own limit, which
        adapts (:mod:`..origin.flow`)."""
        self.origin = origin
        self.store = store
        self.metrics = metrics
        if concurrency is None:
            flow = origin.flow
            self.slots = Slots(lambda: flow.allowed, store.chunk_size)
            widest = origin.max_in_flight
        else:
            self.slots = Slots(concurrency, store.chunk_size)
            widest = concurrency
        # Chunks a prewarm keeps in flight: enough to fill every slot the limit may allow. Not
        # wider with peers: many piece requests at once made libtorrent stall some of them
        # (bench/RESULTS.md, Finding: P2P rollout).
        self.concurrency = widest if peers is None else min(widest, concurrency or START)
        self.stat_ttl_s = stat_ttl_s
        self.peers = peers
        #: Asked in this order for every chunk that is not in the cache yet.
        self.sources: list[ChunkSource] = [
            CacheSource(store), *([peers] if peers is not None else []),
            OriginSource(origin, store, self.slots, metrics)]
        #: Versions from the origin, or from the cache while it cannot answer (:mod:`.versions`).
        self.versions = Versions(origin, store, metrics, origin_unreachable, self.unchecked)
        self._flights: dict[tuple[str, int], _Flight] = {}
        #: Which source fetched a chunk not yet served (see :meth:`served_from`).
        self._fetched_by: dict[tuple[str, int], str] = {}
        self._stats: dict[str, tuple[float, ObjectInfo]] = {}
        self._prefetch: dict[str, asyncio.Task[None]] = {}

    # --- files ----------------------------------------------------------------------

    async def stat(self, uri: str) -> ObjectInfo:
        cached = self._stats.get(uri)
        if cached and time.monotonic() - cached[0] < self.stat_ttl_s:
            return cached[1]
        info = await self.versions.stat(uri)
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
        for source in self.sources:
            source.prepare(f)
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
            for waiter in flight.request.waiters:
                waiter.boost(priority)
        else:
            self.metrics.cache_misses.inc()
            flight = _Flight(ChunkRequest(f, index, priority), asyncio.get_running_loop().create_future())
            flight.future.add_done_callback(_consume_exception)
            self._flights[key] = flight
            asyncio.create_task(self._fetch(flight))
        # shield: one impatient caller leaving must not cancel the fetch the others wait on
        return await asyncio.shield(flight.future)

    async def _fetch(self, flight: _Flight) -> None:
        f = flight.request.file
        self.metrics.inflight_fetches.inc()
        try:
            result = await self._ask_sources(flight.request)
            if f.entry.complete:
                for source in self.sources:
                    source.completed(f)
            flight.future.set_result(result)
        except ObjectChanged as e:
            self.forget_stat(f.info.uri)
            flight.future.set_exception(e)
        except BaseException as e:  # every waiter must hear how it ended
            flight.future.set_exception(e)
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            self._flights.pop((f.entry.key, flight.request.index), None)
            self.metrics.inflight_fetches.dec()

    async def _ask_sources(self, request: ChunkRequest) -> bytes | None:
        """The sources in order until one has the chunk: None (it is on disk) or its bytes."""
        for round_ in range(_ROUNDS):
            # On the last round no source may send the chunk back: the origin is final.
            request.final = round_ == _ROUNDS - 1
            for source in self.sources:
                answer = await source.get(request)
                if isinstance(answer, bytes) or answer is Outcome.PRESENT:
                    if source.name != CacheSource.name:
                        self._fetched(request, source.name)
                    return answer if isinstance(answer, bytes) else None
                if answer is Outcome.OWNED_ELSEWHERE:
                    break  # another agent fetches it: wait on peers again, from the first source
                if answer is Outcome.GAVE_UP:
                    request.final = True  # peers too slow: the origin, no second thoughts
        raise ColdbrewError(f"{request.file.info.uri}: no source could provide chunk {request.index}")

    def _fetched(self, request: ChunkRequest, source: str) -> None:
        if len(self._fetched_by) >= _FETCHED_BY_MAX:  # prewarmed, never read: forget them
            self._fetched_by.clear()
        self._fetched_by[(request.file.entry.key, request.index)] = _SERVED_AS.get(source, source)

    def served_from(self, f: OpenFile, index: int) -> str:
        """Where the bytes of chunk ``index`` came from, for ``coldbrew_bytes_served_total``:
        the source that fetched it, the first time it is served (read-ahead and prewarm fetch
        most chunks before a reader asks), and the cache every time after."""
        return self._fetched_by.pop((f.entry.key, index), CacheSource.name)

    def unchecked(self, entry: Entry) -> bool:
        """Does a source still owe ``entry``'s bytes a check (see :meth:`trust`)?"""
        return any(source.unchecked(entry) for source in self.sources)

    def rejections(self, entry: Entry) -> int:
        """How often bytes of ``entry`` were found false after they were cached."""
        return sum(source.rejections(entry) for source in self.sources)

    async def trust(self, f: OpenFile, since: int | None = None) -> str:
        """Why ``f``'s cached bytes can be trusted, once every check a source still owes them
        is done: a source with bytes on probation has the whole file fetched and checked
        first. ``origin``: nothing but the origin vouched for them (digests made here).

        Raises :class:`ManifestRejected` if a check fails, or if bytes were found false
        since the reader began (``since``: :meth:`rejections` then).
        """
        verdict = "origin"
        for source in self.sources:
            if source.unchecked(f.entry):
                missing = [i for i in range(f.entry.layout.count) if not self.store.has(f.entry, i)]
                await self.ensure_all(f, missing, Priority.READ)
            found = await source.verdict(f)
            if found is not None:
                verdict = found
                break
        if since is not None and self.rejections(f.entry) != since:
            raise ManifestRejected(
                f"{f.info.uri}: bytes of it that came from peers were found false while it was "
                "being read (a peer's manifest the origin refuted); they were dropped and the "
                "file is fetched again: load it again")
        return verdict

    async def verify(self, f: OpenFile, index: int) -> bool:
        """Check a present chunk against its digest (mmap, no copy); drop it if corrupt."""
        return await asyncio.to_thread(self.store.verify_present, f.entry, index)

    async def chunk_bytes(self, f: OpenFile, index: int, priority: Priority = Priority.READ
                          ) -> bytes:
        """One whole chunk, verified; a corrupt cached copy is refetched once."""
        for _ in range(2):
            uncached = await self.ensure(f, index, priority)
            if uncached is not None:
                self.metrics.bytes_served.labels(self.served_from(f, index)).inc(len(uncached))
                return uncached
            try:
                data = await asyncio.to_thread(self.store.read_verified, f.entry, index)
            except (CorruptData, CacheError) as e:
                log.warning("cached chunk unusable; fetching again",
                            extra={"uri": f.info.uri, "chunk": index, "error": str(e)})
                continue
            self.metrics.bytes_served.labels(self.served_from(f, index)).inc(len(data))
            return data
        raise CorruptData(f"chunk {index} of {f.info.uri} failed verification twice in a row; "
                          "the cache disk may be failing")

    # --- read-ahead -----------------------------------------------------------------------

    def prefetch(self, f: OpenFile, from_index: int = 0, priority: Priority = Priority.PREFETCH,
                 keep: Callable[[int, bytes], None] | None = None) -> None:
        """Fetch the rest of the file in order, ahead of the reader, in the background.

        A chunk the cache cannot keep (disk full or failing) ends the read-ahead: fetching
        further would only fetch each chunk twice, once for nothing and once for the reader.
        ``keep`` is handed such chunks' bytes (the reader's lease holds a few for its read).
        """
        task = self._prefetch.get(f.entry.key)
        if task is not None and not task.done():
            return
        self._prefetch[f.entry.key] = asyncio.create_task(
            self._prefetch_run(f, from_index, priority, keep))

    async def _prefetch_run(self, f: OpenFile, from_index: int, priority: Priority,
                            keep: Callable[[int, bytes], None] | None) -> None:
        missing = [i for i in range(from_index, f.entry.layout.count)
                   if not self.store.has(f.entry, i)]
        self.store.pin(f.entry)
        try:
            await self.ensure_all(f, missing, priority, uncached=keep, stop_when_uncached=True)
        except Exception as e:  # a reader will hit and report the same error
            log.info("prefetch stopped", extra={"uri": f.info.uri, "error": str(e)})
        finally:
            self.store.unpin(f.entry)
            self._prefetch.pop(f.entry.key, None)

    async def ensure_all(self, f: OpenFile, indexes: list[int], priority: Priority, *,
                         uncached: Callable[[int, bytes], None] | None = None,
                         stop_when_uncached: bool = False) -> int:
        """Ensure every chunk in ``indexes`` with enough in flight to fill every slot.

        Returns how many came back uncached (cache full or failing); ``uncached`` is handed
        each one's bytes, and with ``stop_when_uncached`` no new chunk starts after one.
        """
        pending = iter(indexes)
        count = 0

        async def worker() -> None:
            nonlocal count
            for index in pending:
                data = await self.ensure(f, index, priority)
                if data is not None:
                    count += 1
                    if uncached is not None:
                        uncached(index, data)
                if count and stop_when_uncached:
                    return  # the others stop too: each checks after its chunk

        workers = [asyncio.create_task(worker()) for _ in range(self.concurrency)]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
        return count

    async def close(self) -> None:
        for task in list(self._prefetch.values()):
            task.cancel()
        await self.versions.close()


def _consume_exception(future: asyncio.Future) -> None:
    # Nobody may be left waiting when a fetch fails; don't let asyncio log it as lost.
    if not future.cancelled():
        future.exception()
