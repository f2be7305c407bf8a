"""An origin's data requests in flight: the limit that sizes them (:mod:`.adaptive`), and a
gate for callers that have none of their own.

The agent's fetcher gates its GETs with its slots (each holds a chunk buffer, granted by
priority) and sizes them by :attr:`Flow.limit`; the loader's direct reads wait at
:meth:`Flow.gate`. Either way every GET reports to the limit, in :meth:`Origin._get
<coldbrew.agent.origin.origin.Origin>`, so the one measure of the origin covers all of them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ..config import OriginSettings
from .adaptive import AdaptiveLimit, FixedLimit

log = logging.getLogger("coldbrew.origin")

#: Where an adaptive limit starts: the old fixed default. 16 gained 4 % on the emulated link
#: (512 MiB prewarm) and cost 12 % on loopback (bench/RESULTS.md, the emulated S3 link).
START = 8
#: The least an adaptive limit goes down to.
MINIMUM = 2


class Flow:
    def __init__(self, limit: AdaptiveLimit | FixedLimit) -> None:
        self.limit = limit
        self._in_use = 0
        self._waiters: list[asyncio.Future[None]] = []

    @classmethod
    def for_settings(cls, settings: OriginSettings) -> Flow:
        if settings.fetch_concurrency is not None:
            return cls(FixedLimit(settings.fetch_concurrency))
        top = settings.max_in_flight
        return cls(AdaptiveLimit(start=min(START, top), minimum=min(MINIMUM, top), maximum=top))

    @property
    def allowed(self) -> int:
        return self.limit.limit

    # --- what every GET reports (the origin calls these) -----------------------------------

    def began(self) -> float:
        now = time.monotonic()
        self.limit.began(now)
        return now

    def ended(self, nbytes: int, started: float) -> None:
        last = self.limit.last
        self.limit.ended(nbytes, started, time.monotonic())
        done = self.limit.last
        if done is not last and done is not None and done.decided != done.limit:
            log.info("origin concurrency", extra={
                "from": done.limit, "to": done.decided, "why": done.why,
                "throughput_mb_s": round(done.throughput / 1e6, 1),
                "gradient": round(done.gradient, 2), "in_flight": round(done.in_flight, 1)})
        self._wake()

    def throttled(self) -> None:
        self.limit.throttled(time.monotonic())

    # --- the gate ----------------------------------------------------------------------------

    @asynccontextmanager
    async def gate(self) -> AsyncIterator[None]:
        """Hold one of the :attr:`allowed` places while a request runs."""
        while self._in_use >= self.allowed:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                self._waiters.remove(waiter)
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # woken, then cancelled: the place goes to the next one
                raise
            self._waiters.remove(waiter)
        self._in_use += 1
        try:
            yield
        finally:
            self._in_use -= 1
            self._wake()

    def _wake(self) -> None:
        room = self.allowed - self._in_use
        for waiter in self._waiters[:max(0, room)]:
            if not waiter.done():
                waiter.set_result(None)
