"""The last source of every chunk: the origin, one fetch slot at a time, into the cache.

A request waits for a slot (:mod:`.slots`, in priority order) and the chunk is read into
that slot's buffer — or, where the origin can, landed in the data file piece by piece as
it arrives. A cache disk that is full or failing never fails the read: the bytes are handed
back from memory, and the failure is logged and counted.

For a chunk of a file shared with other agents (:class:`~.sources.SharedChunk`), the
origin's bytes go to the sharing side instead of the store, and a slot that comes free
first asks whether the chunk is still this agent's to fetch.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ..cache.store import ChunkStore
from ..errors import CacheError, CorruptData, ObjectChanged
from ..metrics import AgentMetrics
from ..origin.origin import Origin, finish_in_thread
from .slots import Slots
from .sources import Answer, ChunkRequest, ChunkSource, OpenFile, Outcome, SharedChunk

log = logging.getLogger("coldbrew.fetcher")


class OriginSource(ChunkSource):
    name = "origin"

    def __init__(self, origin: Origin, store: ChunkStore, slots: Slots, metrics: AgentMetrics) -> None:
        self.origin = origin
        self.store = store
        self.slots = slots
        self.metrics = metrics

    async def get(self, request: ChunkRequest) -> Answer:
        if request.shared is None:
            async with self._slot(request) as view:
                answer = await self._to_store(request.file, request.index, view)
        else:
            answer = await self._to_shared(request, request.shared)
        if answer is not Outcome.OWNED_ELSEWHERE:
            self.metrics.chunk_seconds.labels("origin").observe(time.monotonic() - request.started)
        return answer

    @asynccontextmanager
    async def _slot(self, request: ChunkRequest) -> AsyncIterator[memoryview]:
        """A fetch slot, and the part of its buffer that chunk ``request.index`` fills."""
        async with self.slots.acquire(request.priority, request.waiters) as buf:
            yield memoryview(buf)[: request.file.entry.layout.length(request.index)]

    async def _to_shared(self, request: ChunkRequest, shared: SharedChunk) -> Answer:
        f, index = request.file, request.index
        async with self._slot(request) as view:
            if not request.final and not shared.still_mine():
                return Outcome.OWNED_ELSEWHERE
            await self.origin.read_into(f.info, f.entry.offset(index), view)
            if not shared.still_shared():
                return await self._store(f, index, view)
            # Copied out so the slot's buffer goes back to the next origin read now, not
            # after libtorrent has hashed and written the piece.
            piece = await asyncio.to_thread(bytes, view)
        # The sharing side owns a shared entry's data file: the bytes go in through it.
        try:
            await shared.put(piece)
            return Outcome.PRESENT
        except CacheError as e:
            _warn_uncached(f, index, e)
            return piece

    async def _to_store(self, f: OpenFile, index: int, view: memoryview) -> Answer:
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
            return Outcome.PRESENT
        except CorruptData:
            raise _changed_under_etag(f, index) from None
        except CacheError as e:
            return await self._uncached(f, index, view, e)

    async def _uncached(self, f: OpenFile, index: int, view: memoryview, error: Exception) -> bytes:
        """The chunk from the origin into memory only: the cache disk failed (``error``)."""
        _warn_uncached(f, index, error)
        await self.origin.read_into(f.info, f.entry.offset(index), view)
        return await asyncio.to_thread(bytes, view)

    async def _store(self, f: OpenFile, index: int, view: memoryview) -> Answer:
        try:
            await finish_in_thread(asyncio.to_thread(self.store.write_chunk, f.entry, index, view))
            return Outcome.PRESENT
        except CorruptData:
            raise _changed_under_etag(f, index) from None
        except CacheError as e:
            _warn_uncached(f, index, e)
            return bytes(view)


def _changed_under_etag(f: OpenFile, index: int) -> ObjectChanged:
    # Same ETag, different bytes than we verified before: the origin broke its
    # own contract. Refuse to guess which version is right.
    return ObjectChanged(f"{f.info.uri}: chunk {index} changed at the origin under the "
                         f"same ETag {f.info.etag}; open it again")


def _warn_uncached(f: OpenFile, index: int, error: Exception) -> None:
    log.warning("cache write failed; serving from memory", extra={
        "uri": f.info.uri, "chunk": index, "error": str(error)})
