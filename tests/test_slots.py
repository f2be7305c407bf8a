"""Slots: bounded origin concurrency granted by priority, with reused buffers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from coldbrew.agent.fetch.slots import Slots, Waiter


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=10))


async def settle() -> None:
    """Let every ready task run until it blocks again."""
    for _ in range(10):
        await asyncio.sleep(0)


class Recorder:
    """Tasks that take a slot, note it, and hold it until released."""

    def __init__(self, slots: Slots) -> None:
        self.slots = slots
        self.order: list[str] = []
        self.holding: set[str] = set()
        self.max_holding = 0
        self.buffers: dict[str, bytearray] = {}
        self.waiters: dict[str, list[Waiter]] = {}
        self.release: dict[str, asyncio.Event] = {}

    def start(self, name: str, priority: int) -> asyncio.Task[None]:
        self.release[name] = asyncio.Event()
        return asyncio.create_task(self._hold(name, priority))

    async def _hold(self, name: str, priority: int) -> None:
        out: list[Waiter] = []
        self.waiters[name] = out  # filled when acquire() starts
        async with self.slots.acquire(priority, out) as buf:
            self.order.append(name)
            self.buffers[name] = buf
            self.holding.add(name)
            self.max_holding = max(self.max_holding, len(self.holding))
            await self.release[name].wait()
            self.holding.discard(name)

    def waiter(self, name: str) -> Waiter:
        return self.waiters[name][0]


def test_grants_at_most_count_at_once():
    async def main():
        slots = Slots(2, 16)
        rec = Recorder(slots)
        tasks = [rec.start(f"t{i}", 5) for i in range(6)]
        await settle()
        assert len(rec.holding) == 2
        assert slots.waiting == 4
        for name in [f"t{i}" for i in range(6)]:
            rec.release[name].set()
            await settle()
            assert len(rec.holding) <= 2
        await asyncio.gather(*tasks)
        assert rec.max_holding == 2
        assert sorted(rec.order) == [f"t{i}" for i in range(6)]
        assert slots.waiting == 0

    run(main())


def test_free_slot_goes_to_lowest_priority_number_then_fifo():
    async def main():
        slots = Slots(1, 8)
        rec = Recorder(slots)
        tasks = [rec.start("holder", 0)]
        await settle()
        for name, prio in [("low-a", 9), ("high-a", 1), ("mid", 5), ("high-b", 1), ("low-b", 9)]:
            tasks.append(rec.start(name, prio))
            await settle()
        for name in ["holder", "high-a", "high-b", "mid", "low-a", "low-b"]:
            rec.release[name].set()
            await settle()
        await asyncio.gather(*tasks)
        assert rec.order == ["holder", "high-a", "high-b", "mid", "low-a", "low-b"]

    run(main())


def test_boost_moves_a_waiter_ahead():
    async def main():
        slots = Slots(1, 8)
        rec = Recorder(slots)
        tasks = [rec.start("holder", 0)]
        await settle()
        for name, prio in [("reader", 2), ("prefetch", 9)]:
            tasks.append(rec.start(name, prio))
            await settle()
        rec.waiter("prefetch").boost(1)
        assert rec.waiter("prefetch").priority == 1
        for name in ["holder", "prefetch", "reader"]:
            rec.release[name].set()
            await settle()
        await asyncio.gather(*tasks)
        assert rec.order == ["holder", "prefetch", "reader"]

    run(main())


def test_boost_never_lowers_urgency():
    async def main():
        slots = Slots(1, 8)
        rec = Recorder(slots)
        tasks = [rec.start("holder", 0)]
        await settle()
        for name, prio in [("a", 2), ("b", 3)]:
            tasks.append(rec.start(name, prio))
            await settle()
        rec.waiter("a").boost(7)  # a larger number is less urgent: ignored
        assert rec.waiter("a").priority == 2
        for name in ["holder", "a", "b"]:
            rec.release[name].set()
            await settle()
        await asyncio.gather(*tasks)
        assert rec.order == ["holder", "a", "b"]

    run(main())


def test_boost_after_grant_is_a_no_op():
    async def main():
        slots = Slots(1, 8)
        rec = Recorder(slots)
        tasks = [rec.start("holder", 5)]
        await settle()
        waiter = rec.waiter("holder")
        waiter.boost(0)
        assert waiter.priority == 5
        assert slots.waiting == 0
        tasks.append(rec.start("next", 3))
        await settle()
        for name in ["holder", "next"]:
            rec.release[name].set()
            await settle()
        await asyncio.gather(*tasks)
        assert rec.order == ["holder", "next"]

    run(main())


def test_cancelled_waiter_does_not_leak_its_slot():
    async def main():
        slots = Slots(1, 8)
        rec = Recorder(slots)
        holder = rec.start("holder", 0)
        await settle()
        doomed = rec.start("doomed", 1)
        await settle()
        doomed.cancel()
        await settle()
        later = rec.start("later", 2)
        await settle()
        rec.release["holder"].set()
        await settle()
        assert rec.holding == {"later"}
        rec.release["later"].set()
        await asyncio.gather(holder, later)
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert rec.order == ["holder", "later"]
        assert slots.waiting == 0
        # every slot is free again
        async with slots.acquire(0) as buf:
            assert len(buf) == 8

    run(main())


def test_cancel_after_grant_before_resume_releases_the_buffer():
    async def main():
        slots = Slots(1, 8)
        held = slots.acquire(0)
        await held.__aenter__()
        entered: list[bytearray] = []

        async def wait_for_slot():
            async with slots.acquire(1) as buf:
                entered.append(buf)

        task = asyncio.create_task(wait_for_slot())
        await settle()
        await held.__aexit__(None, None, None)  # grants the waiter synchronously...
        task.cancel()                            # ...which is cancelled before it resumes
        with pytest.raises(asyncio.CancelledError):
            await task
        assert entered == []
        got = await asyncio.wait_for(_take(slots), timeout=1)
        assert len(got) == 8
        assert slots._in_use == 0 and len(slots._free) == 1  # the one buffer, back and reused

    run(main())


async def _take(slots: Slots) -> bytearray:
    async with slots.acquire(0) as buf:
        return buf


def test_exception_inside_the_block_releases_the_slot():
    async def main():
        slots = Slots(1, 8)
        with pytest.raises(RuntimeError):
            async with slots.acquire(0):
                raise RuntimeError("fetch failed")
        assert len(await asyncio.wait_for(_take(slots), timeout=1)) == 8

    run(main())


def test_buffers_are_reused_and_never_more_than_count_allocated():
    async def main():
        slots = Slots(3, 1024)
        seen: dict[int, bytearray] = {}
        active = 0
        peak = 0

        async def worker(i: int) -> None:
            nonlocal active, peak
            async with slots.acquire(i % 4) as buf:
                active += 1
                peak = max(peak, active)
                assert len(buf) == 1024
                seen[id(buf)] = buf
                buf[0] = i % 256
                await asyncio.sleep(0)
                active -= 1

        await asyncio.gather(*(worker(i) for i in range(50)))
        assert peak == 3
        assert len(seen) == 3            # the same three bytearrays served all 50 holders
        assert len(slots._free) == 3 and slots._in_use == 0
        assert sorted(map(id, slots._free)) == sorted(seen)

    run(main())


def test_buffers_are_allocated_lazily():
    async def main():
        slots = Slots(8, 64)
        assert not slots._free and slots._in_use == 0
        first = await _take(slots)
        second = await _take(slots)
        assert first is second  # one at a time needs only one buffer
        assert len(slots._free) == 1

    run(main())


def test_waiting_counts_a_boosted_waiter_once():
    async def main():
        slots = Slots(1, 8)
        rec = Recorder(slots)
        tasks = [rec.start("holder", 0), rec.start("waiter", 9)]
        await settle()
        assert slots.waiting == 1
        rec.waiter("waiter").boost(1)
        try:
            assert slots.waiting == 1
        finally:
            for name in ["holder", "waiter"]:
                rec.release[name].set()
                await settle()
            await asyncio.gather(*tasks)

    run(main())


def test_the_limit_is_read_at_every_grant():
    """The origin's limit (fetch_concurrency = auto) moves: more slots as it grows, and a
    buffer released above a lower limit is dropped, so its memory goes back."""
    async def main():
        limit = [2]
        slots = Slots(lambda: limit[0], 8)
        held = [slots.acquire(0) for _ in range(4)]
        first = [await h.__aenter__() for h in held[:2]]
        third = asyncio.ensure_future(held[2].__aenter__())
        await settle()
        assert not third.done() and slots.waiting == 1  # at the limit
        limit[0] = 3
        await held[0].__aexit__(None, None, None)  # a release grants up to the new limit
        await settle()
        assert third.done()
        fourth = asyncio.ensure_future(held[3].__aenter__())
        await settle()
        assert fourth.done(), "three held of a limit of 3 once one went back... and one more room"
        limit[0] = 1
        for h in (held[1], held[2], held[3]):
            await h.__aexit__(None, None, None)
        assert slots._in_use == 0 and len(slots._free) == 1, "buffers above the limit dropped"
        assert len(first) == 2

    run(main())
