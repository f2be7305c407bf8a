"""The automatic fetch_concurrency (agent/origin/adaptive.py) against links it must fill: a
simulated clock and a fluid model of a link, so each case is exact and takes milliseconds.

The model: a GET waits ``latency`` for its first byte, then receives at most ``per_conn``
bytes/s, and all GETs in their body share ``total`` bytes/s (the NIC, or the CPU of a small
node). That is the S3 link of issue 19 (one connection ~24 MB/s after 20-90 ms) and, with a
low ``total`` and a high ``per_conn``, loopback on two cores.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from coldbrew.agent.origin.adaptive import AdaptiveLimit, FixedLimit

MB = 1e6
CHUNK = 16 << 20


@dataclass
class _Get:
    started: float
    left: float


def simulate(limit, *, latency: float, per_conn: float, total: float, seconds: float,
             size: int = CHUNK, demand: int = 10_000, dt: float = 0.002) -> float:
    """Run the model for ``seconds`` with ``demand`` GETs wanted at once; returns bytes/s."""
    now, done, flying = 1000.0, 0.0, []
    end = now + seconds
    while now < end:
        while len(flying) < min(limit.limit, demand):
            limit.began(now)
            flying.append(_Get(now, size))
        body = [g for g in flying if now - g.started >= latency]
        rate = min(per_conn, total / len(body)) if body else 0.0
        now += dt
        for g in body:
            g.left -= rate * dt
        for g in [g for g in flying if g.left <= 0]:
            flying.remove(g)
            limit.ended(size, g.started, now)
            done += size
    return done / seconds


def best_fixed(**link) -> tuple[int, float]:
    rates = {n: simulate(FixedLimit(n), **link) for n in (4, 8, 16, 32, 64)}
    best = max(rates, key=rates.__getitem__)
    return best, rates[best]


S3_LINK = {"latency": 0.05, "per_conn": 24 * MB, "total": 1250 * MB}  # ~10 Gbit/s NIC
LOOPBACK = {"latency": 0.001, "per_conn": 2000 * MB, "total": 700 * MB}  # two busy cores


def test_a_latency_bound_link_grows_to_fill_it():
    limit = AdaptiveLimit(start=8, maximum=64)
    got = simulate(limit, seconds=20, **S3_LINK)
    _, best = best_fixed(seconds=20, **S3_LINK)
    # 8 in flight carry 8 x 24 MB/s; the NIC takes 52 of them. It finds them (slow start:
    # three rounds of ~0.75 s), and keeps them.
    assert limit.limit >= 48, limit.last
    assert got >= 0.85 * best, (got / MB, best / MB)
    assert simulate(FixedLimit(8), seconds=20, **S3_LINK) < 0.2 * got


def test_a_cpu_bound_link_stays_small():
    limit = AdaptiveLimit(start=8, maximum=64)
    got = simulate(limit, seconds=6, **LOOPBACK)
    _, best = best_fixed(seconds=6, **LOOPBACK)
    # More in flight would only queue: the limit does not climb to its maximum.
    assert limit.limit <= 16, limit.last
    assert not limit.slow_start and limit.last is not None and limit.last.why in ("saturated", "hold")
    assert got >= 0.95 * best


def test_it_follows_a_link_that_changes():
    limit = AdaptiveLimit(start=8, maximum=64)
    simulate(limit, seconds=6, **LOOPBACK)
    small = limit.limit
    simulate(limit, seconds=20, **S3_LINK)  # the same node, now across a real network
    assert limit.limit >= 3 * small, (small, limit.last)


def test_throttling_halves_it_and_ends_slow_start():
    limit = AdaptiveLimit(start=32, maximum=64)
    limit.began(1.0)
    limit.throttled(1.1)
    assert limit.limit == 16 and not limit.slow_start
    assert limit.last is not None and limit.last.why == "throttled"
    for t in range(10):
        limit.throttled(2.0 + t)
    assert limit.limit == limit.minimum


def test_a_caller_with_little_to_ask_changes_nothing():
    limit = AdaptiveLimit(start=16, maximum=64)
    simulate(limit, seconds=5, demand=3, **S3_LINK)
    assert limit.limit == 16
    assert limit.last is not None and limit.last.why == "idle"


def test_it_stays_within_its_bounds():
    limit = AdaptiveLimit(start=100, minimum=2, maximum=24)
    assert limit.limit == 24
    simulate(limit, seconds=8, **S3_LINK)
    assert limit.limit <= 24
    with pytest.raises(ValueError):
        AdaptiveLimit(minimum=0)
    fixed = FixedLimit(5)
    simulate(fixed, seconds=2, **S3_LINK)
    assert fixed.limit == 5 and not fixed.adaptive


def test_the_gate_follows_the_limit_and_passes_a_wakeup_on():
    """Flow.gate (the loader's GETs): no more inside than the limit allows, more as it grows,
    and a waiter cancelled after it was woken hands its place to the next."""
    import asyncio

    from coldbrew.agent.origin.flow import Flow

    async def main():
        limit = FixedLimit(1)
        flow = Flow(limit)
        inside, most = 0, 0
        release = asyncio.Event()

        async def one():
            nonlocal inside, most
            async with flow.gate():
                inside += 1
                most = max(most, inside)
                await release.wait()
                inside -= 1

        first = asyncio.create_task(one())
        waiting = [asyncio.create_task(one()) for _ in range(3)]
        await asyncio.sleep(0.01)
        assert inside == 1 and len(flow._waiters) == 3
        limit.limit = 2
        flow.ended(0, 0.0)  # what a finished GET does: wake up to the new limit
        waiting[0].cancel()  # woken, and cancelled before it could enter
        await asyncio.sleep(0.01)
        assert inside == 2, "the cancelled waiter's place went to the next"
        release.set()
        await asyncio.gather(first, *waiting[1:])
        assert most == 2 and flow._in_use == 0 and not flow._waiters

    asyncio.run(main())
