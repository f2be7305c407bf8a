"""The per-file pipeline: plan, read spans in parallel, finish tensors in file order.

One :class:`FileLoad` moves one opened :class:`~coldbrew.loader.sources.Source`
into a sink (:mod:`coldbrew.loader.device`):

1. Plan the wanted tensors into spans on the source's grid
   (:func:`~coldbrew.loader.plan.plan_reads`): one span per agent chunk or cache
   block, at most ``span_bytes`` long.
2. Admit spans in file order, at most ``concurrency`` in flight (and, on CUDA, one
   pinned buffer each). Tensors are allocated when the first span touching them
   is admitted; in streaming mode (``iter_tensors``) a byte budget holds back new
   allocations while finished tensors wait for the caller.
3. Each span: the source fills the sink's views; the write-through (if any) gets
   the block's digest and bytes; the sink finishes its part (CUDA: copies on the
   side stream). Pieces are counted per tensor: a tensor is complete when its
   last piece arrives, whichever span brought it.
4. Complete tensors are emitted strictly in file order.

A load of several files runs them as one :class:`Pipeline`: the next file's spans are
admitted into the same window as soon as the previous file's last span is, and its
tensors wait for the earlier files' before they are emitted.

Any failure cancels the spans in flight, drops the write-through entry and
re-raises the first error, amended with the file and the tensor it was reading.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from coldbrew.agent.errors import ColdbrewError
from coldbrew.loader.device import Slot
from coldbrew.loader.header import torch_dtype_and_shape
from coldbrew.loader.plan import DEFAULT_MAX_GAP_BYTES, NameFilter, ReadSpan, plan_reads, select_tensors
from coldbrew.loader.sources import Source

log = logging.getLogger("coldbrew.loader")


class Budget:
    """Bytes of tensors allocated but not yet taken by the caller (streaming mode only).

    A span that would allocate new tensors waits while the budget is exceeded and
    finished tensors are waiting for the caller. It never waits when nothing
    finished is waiting: then only spans not yet admitted can make progress, so
    waiting could deadlock (a tensor's last piece may share a span with the next
    tensor's first). Memory stays within ``limit`` plus what one window of spans
    touches.
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.used = 0
        self.waiting_for_caller = 0
        self._changed = asyncio.Event()

    async def take(self, n: int) -> None:
        if self.limit is not None:
            while n and self.used + n > self.limit and self.waiting_for_caller > 0:
                self._changed.clear()
                await self._changed.wait()
        self.used += n

    def emitted(self, n: int) -> None:
        self.waiting_for_caller += n

    def give(self, n: int) -> None:
        """The caller took a tensor of ``n`` bytes (called on the loop)."""
        self.used -= n
        self.waiting_for_caller -= n
        self._changed.set()


class Progress:
    """Bytes done of bytes planned, to a callback and/or a tqdm bar (on the loop thread)."""

    def __init__(self, callback: Callable[[int, int], Any] | None, bar: Any) -> None:
        self.callback = callback
        self.bar = bar
        self.done = 0
        self.total = 0

    def plan(self, n: int) -> None:
        self.total += n
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

    def add(self, n: int) -> None:
        self.done += n
        if self.bar is not None and n:
            self.bar.update(n)
        if self.callback is not None:
            self.callback(self.done, self.total)


def planned_bytes(source: Source, names: NameFilter) -> int:
    return sum(t.nbytes for t in select_tensors(source.header, names))


class FileLoad:
    """Loads the ``names`` tensors of one opened source into ``sink``."""

    def __init__(self, source: Source, names: NameFilter, sink: Any, *,
                 emit: Callable[[Slot], None], concurrency: int, budget: Budget,
                 progress: Progress, writeback: Any = None,
                 window: asyncio.Semaphore | None = None,
                 admitted: asyncio.Event | None = None) -> None:
        self.source = source
        self.sink = sink
        self.emit = emit
        self.concurrency = max(1, concurrency)
        #: Spans in flight; shared by the files of one load (:class:`Pipeline`).
        self.window = window
        #: Set once every span is admitted: the next file of the load may start its own.
        self.admitted = admitted or asyncio.Event()
        self.budget = budget
        self.progress = progress
        self.writeback = writeback
        header = source.header
        self.order = select_tensors(header, names)
        # Validate every dtype and shape before allocating anything.
        self.slots: dict[str, Slot] = {}
        for t in self.order:
            dtype, shape = torch_dtype_and_shape(t, source=source.name)
            self.slots[t.name] = Slot(t, dtype, shape, remaining=0)
        whole = source.whole_blocks or writeback is not None
        self.spans = plan_reads(header, names, span_bytes=source.span_bytes,
                                max_gap_bytes=source.span_bytes if whole else DEFAULT_MAX_GAP_BYTES)
        for span in self.spans:
            for p in span.pieces:
                self.slots[p.tensor.name].remaining += 1
        self._head = 0
        self.bytes = sum(t.nbytes for t in self.order)
        self.seconds = 0.0

    async def run(self) -> None:
        started = time.perf_counter()
        self.sink.begin_file(self.source.span_bytes)
        try:
            try:
                async with asyncio.TaskGroup() as group:
                    await self._schedule(group)
            except BaseExceptionGroup as eg:
                raise first_error(eg) from None
            await self.source.finish()
        except BaseException:
            await self.source.close()
            if self.writeback is not None:
                await self.writeback.abort()
            raise
        self.seconds = time.perf_counter() - started

    async def _schedule(self, group: asyncio.TaskGroup) -> None:
        # Empty tensors need no bytes: allocate them now, they are complete.
        for slot in self.slots.values():
            if slot.remaining == 0:
                await self._allocate(slot)
                self._complete(slot)
        window = self.window or asyncio.Semaphore(self.concurrency)
        for span in self.spans:
            new = [self.slots[p.tensor.name] for p in span.pieces
                   if self.slots[p.tensor.name].tensor is None and not self.slots[p.tensor.name].ready]
            await self.budget.take(sum(s.nbytes for s in new))
            await window.acquire()
            buffer = await self.sink.acquire(span)
            for slot in new:
                self._allocate_now(slot)
            group.create_task(self._span(span, buffer, window))
        self.admitted.set()

    async def _allocate(self, slot: Slot) -> None:
        await self.budget.take(slot.nbytes)
        self._allocate_now(slot)

    def _allocate_now(self, slot: Slot) -> None:
        if slot.tensor is None:
            self.sink.allocate(slot)

    async def _span(self, span: ReadSpan, buffer: Any, window: asyncio.Semaphore) -> None:
        issued = False
        try:
            views = self.sink.views(span, self.slots, buffer)
            if span.nbytes:
                try:
                    await self.source.fill(span.begin, span.end, views)
                except ColdbrewError as e:
                    raise _with_context(e, self.source.name, span) from e
            written = None
            if self.writeback is not None and span.nbytes:
                wb = self.writeback
                index = span.begin // wb.block_bytes
                digest = wb.block_digest(index, span.begin, [v for _, v in views])
                written = wb.add(index, digest, views, keep=self.sink.keep(span, self.slots))
            await self.sink.after_fill(span, self.slots, buffer, written)
            issued = True
        finally:
            if not issued:
                await self.sink.release(buffer)
            window.release()
        for p in span.pieces:
            slot = self.slots[p.tensor.name]
            slot.remaining -= 1
            if slot.remaining == 0:
                self._complete(slot)
        self.progress.add(sum(p.nbytes for p in span.pieces))

    def _complete(self, slot: Slot) -> None:
        self.sink.finish(slot)
        slot.ready = True
        while self._head < len(self.order):
            head = self.slots[self.order[self._head].name]
            if not head.ready:
                break
            self._head += 1
            self.budget.emitted(head.nbytes)
            self.emit(head)


class Pipeline:
    """The files of one load as one stream of reads: file ``i + 1`` starts admitting spans as
    soon as file ``i`` has admitted its last, into the same window, so the requests in flight
    do not drain at a file boundary (two shards loaded one after the other lost ~16 % to it).
    Tensors still reach the caller in file order: those of a later file wait here until every
    earlier file has emitted all of its own."""

    def __init__(self, count: int, emit: Callable[[Slot], None], concurrency: int) -> None:
        self.emit = emit
        self.window = asyncio.Semaphore(max(1, concurrency))
        self._current = 0
        self._held: list[list[Slot]] = [[] for _ in range(count)]
        self._done = [False] * count
        #: Files that began while the one before was still loading (``stats["files_overlapped"]``).
        self.overlapped = 0

    def starting(self, index: int) -> None:
        """File ``index`` begins (the one before has admitted its last span)."""
        if index and not self._done[index - 1]:
            self.overlapped += 1

    def emitter(self, index: int) -> Callable[[Slot], None]:
        def emit(slot: Slot) -> None:
            if index == self._current:
                self.emit(slot)
            else:
                self._held[index].append(slot)
        return emit

    def finished(self, index: int) -> None:
        """File ``index`` has emitted every tensor: hand over the next files' held ones."""
        self._done[index] = True
        while self._current < len(self._done) and self._done[self._current]:
            self._current += 1
            if self._current < len(self._held):
                held, self._held[self._current] = self._held[self._current], []
                for slot in held:
                    self.emit(slot)


def first_error(eg: BaseExceptionGroup) -> BaseException:
    """The error to show from a task group: the first leaf that is not a cancellation."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(eg)
    for e in leaves:
        if not isinstance(e, asyncio.CancelledError):
            return e
    return leaves[0]


def _with_context(e: ColdbrewError, source: str, span: ReadSpan) -> ColdbrewError:
    """The same error class, its message naming the file and the tensor being read."""
    names = [p.tensor.name for p in span.pieces]
    what = repr(names[0]) if len(names) == 1 else f"{names[0]!r} (and {len(names) - 1} more)"
    message = str(e)
    if source not in message:
        message = f"{source}: {message}"
    message = f"{message} [reading tensor {what}, bytes {span.begin}-{span.end}]"
    try:
        amended = type(e)(message)
    except TypeError:
        return e
    return amended
