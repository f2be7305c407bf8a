"""Bounded origin concurrency, granted in priority order, and the buffers it fills.

A reader waiting on a chunk must not queue behind a prewarm of 50 GB, so a
free slot goes to the most urgent waiter (lowest number), first come first
served within a priority. A waiter can be *boosted* while it waits: when a
reader joins a fetch that prefetch had queued at low priority, the fetch moves
up to the reader's priority (no priority inversion through single-flight).

Each slot owns one chunk-sized buffer for as long as it is held. Buffers are
reused rather than allocated per chunk: fresh memory is slow on these VMs
(~0.3 GB/s first touch) and reuse keeps the agent's memory flat however large
the model.

How many slots there are is the origin's limit (:mod:`..origin.flow`), read at every grant:
it may grow (more buffers, made as needed) and shrink (a buffer released above it is
dropped, so the memory goes back).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager


def _new_buffer(size: int) -> bytearray:
    buf = bytearray(size)
    # bytearray(n) is calloc'd: its pages are not really ours until written once.
    for offset in range(0, size, 4096):
        buf[offset] = 1
    return buf


class Waiter:
    def __init__(self, priority: int, future: asyncio.Future[bytearray]) -> None:
        self.priority = priority
        self.future = future
        self.slots: Slots | None = None

    def boost(self, priority: int) -> None:
        """Raise this waiter's urgency (lower number = sooner). No-op once granted."""
        if priority < self.priority and not self.future.done() and self.slots is not None:
            self.priority = priority
            self.slots._push(self)


class Slots:
    """``limit``: how many slots may be held now (a number, or read at each grant)."""

    def __init__(self, limit: int | Callable[[], int], buffer_bytes: int) -> None:
        self._limit = limit if callable(limit) else (lambda: limit)
        self.buffer_bytes = buffer_bytes
        self._free: list[bytearray] = []
        self._in_use = 0
        self._heap: list[tuple[int, int, Waiter]] = []
        self._seq = itertools.count()

    @property
    def count(self) -> int:
        return max(1, self._limit())

    def _push(self, waiter: Waiter) -> None:
        heapq.heappush(self._heap, (waiter.priority, next(self._seq), waiter))

    def _take_buffer(self) -> bytearray | None:
        if self._in_use >= self.count:
            return None
        self._in_use += 1
        if self._free:
            return self._free.pop()
        # Made while a GET waits: not touched here (that would cost the loop ~50 ms per
        # 16 MiB); the thread that reads into it faults its pages in.
        return bytearray(self.buffer_bytes)

    def preallocate(self) -> None:
        """Allocate and touch the buffers of the current limit now (call from a thread at
        start-up).

        First touch of fresh memory runs at ~0.3 GB/s on these VMs; paying it at
        start keeps it off the first prewarm and off the event loop.
        """
        while len(self._free) + self._in_use < self.count:
            self._free.append(_new_buffer(self.buffer_bytes))

    def _grant_next(self) -> None:
        while self._heap:
            _, _, waiter = self._heap[0]
            if waiter.future.done():  # granted already (a stale boost entry) or cancelled
                heapq.heappop(self._heap)
                continue
            buf = self._take_buffer()
            if buf is None:
                return
            heapq.heappop(self._heap)
            waiter.future.set_result(buf)

    @asynccontextmanager
    async def acquire(self, priority: int, waiter_out: list[Waiter] | None = None
                      ) -> AsyncIterator[bytearray]:
        """Hold a slot and its buffer. ``waiter_out`` receives the waiter (to boost it)."""
        future: asyncio.Future[bytearray] = asyncio.get_running_loop().create_future()
        waiter = Waiter(priority, future)
        waiter.slots = self
        if waiter_out is not None:
            waiter_out.append(waiter)
        self._push(waiter)
        self._grant_next()
        try:
            buf = await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release(future.result())
            raise
        try:
            yield buf
        finally:
            self._release(buf)

    def _release(self, buf: bytearray) -> None:
        self._in_use -= 1
        if len(self._free) + self._in_use < self.count:
            self._free.append(buf)  # else the limit shrank: this buffer's memory goes back
        self._grant_next()

    @property
    def waiting(self) -> int:
        # a boosted waiter has two heap entries: count waiters, not entries
        return len({id(w) for _, _, w in self._heap if not w.future.done()})
