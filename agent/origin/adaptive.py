"""How many GETs an origin gets at once, found by measuring: pure code, times passed in.

A ranged GET from S3 is latency-bound: one connection gets tens of MB/s after tens of ms,
so filling a node's NIC takes many in flight, and how many depends on the link, the bucket
and the hour. On loopback the opposite holds: the CPU is the limit and more in flight only
queues. No fixed number is right for both (the issue behind this module measured 8 at 47 %
of the best throughput on a 20 ms link, while 32 there would only add queueing here).

The rule is Little's law with fixed sizes: at ``C`` requests in flight, each taking ``D`` per
byte, the throughput is ``C / D`` bytes per second. Over a *round* (the requests started since
the last change, once enough of them have finished), the controller takes the round's time
per byte ``D`` (its requests' seconds over their bytes) and ``tau``, the least ``D`` of the
recent rounds: what a request takes when fewer share the pipe. The *gradient* is
``tau / D``. (Not the fastest single request: connections on one link differ by a third
(12.5-18.4 MB/s on bench/link.py's), and against the fastest, a round with nothing shared
read as congested.)

* Gradient at or above :data:`FREE`: the requests run as fast as alone, so more in flight
  adds throughput. Grow: in slow start four times while each request gets less than
  :data:`SLOW_CONNECTION` (a latency-bound link), else twice; after it, a quarter more.
* Below: they queue for something shared (the NIC, the CPU, the server), and ``C * tau / D``
  in flight would carry the same throughput. Set the limit to that with a quarter of
  headroom, and leave slow start.
* A growth after slow start is a probe: if the next round's throughput is not 10 % higher,
  the limit goes back, and holds for :data:`PROBE_HOLD` rounds. (Once ``tau`` has aged out,
  a saturated pipe looks as fast as alone; without this the limit would creep up, buying
  memory and nothing else.)
* A throttling answer (503, SlowDown) halves the limit and leaves slow start.
* A round in which fewer than :data:`BUSY` of the limit were in flight on average says
  nothing (the callers had no more to ask) and changes nothing.

Only requests started in the round measure it: one started under the old limit ran part of
its time beside fewer others. ``tau`` is the minimum over the last :data:`TAU_ROUNDS`
rounds, so a link that became slower is soon seen as slower, not as congestion. The limit
stays within ``[minimum, maximum]``; the maximum is the memory budget's (each GET in flight
may hold a chunk buffer).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

#: Gradient (``tau / D``) at or above this: the requests run as fast as alone, grow.
FREE = 0.85
#: One request slower than this (bytes/s) is latency-bound: slow start grows four times.
SLOW_CONNECTION = 100e6
#: Headroom kept above what carries the throughput once the pipe is full (a quarter more).
HEADROOM = 1.25
#: A round counts only if at least this share of the limit was in flight on average.
BUSY = 0.7
#: A growth outside slow start is kept only if the next round's throughput is this much
#: higher; after one that is not, the limit holds for PROBE_HOLD rounds.
PROBE_GAIN = 1.1
PROBE_HOLD = 8
#: Rounds ``tau`` is remembered for.
TAU_ROUNDS = 6
#: Fewest requests a round ends on, and the shortest round, in seconds.
ROUND_MIN_REQUESTS = 4
ROUND_MIN_S = 0.05


@dataclass(frozen=True)
class Round:
    """What one round measured, and what was decided (for logs, metrics and tests)."""

    limit: int  # the limit the round ran at
    throughput: float  # bytes/s: mean in flight / the round's time per byte (Little's law)
    in_flight: float  # mean requests in flight
    gradient: float  # tau / the round's time per byte: 1.0 is "as fast as alone"
    decided: int  # the limit from now on
    why: str  # "grow", "saturated", "no gain", "hold", "idle", "throttled"


class FixedLimit:
    """An operator's fixed ``fetch_concurrency``: the same interface, no adapting."""

    adaptive = False

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.throughput = 0.0
        self.last: Round | None = None

    def began(self, now: float) -> None:
        pass

    def ended(self, nbytes: int, started: float, now: float) -> None:
        pass

    def throttled(self, now: float) -> None:
        pass


class AdaptiveLimit:
    """Requests in flight for one origin, adapted round by round (rules above).

    Call :meth:`began` when a request starts, :meth:`ended` when it finished with its bytes
    (failed ones: :meth:`ended` with 0 bytes), :meth:`throttled` on a throttling answer.
    """

    adaptive = True

    def __init__(self, start: int = 8, minimum: int = 2, maximum: int = 64) -> None:
        if not 1 <= minimum <= maximum:
            raise ValueError(f"need 1 <= minimum <= maximum, got {minimum}, {maximum}")
        self.minimum, self.maximum = minimum, maximum
        self.limit = min(max(start, minimum), maximum)
        self.slow_start = True
        #: Bytes/s of the last round (0 before the first).
        self.throughput = 0.0
        self.last: Round | None = None
        self._in_flight = 0
        self._taus: deque[float] = deque(maxlen=TAU_ROUNDS)
        self._new_round(0.0)
        self._begun = False
        #: (limit, throughput) before a growth outside slow start: kept only if it pays.
        self._probe: tuple[int, float] | None = None
        self._hold = 0  # rounds left before the next probe after one that did not pay

    # --- events ---------------------------------------------------------------------------

    def began(self, now: float) -> None:
        if not self._begun:  # the first round starts with the first request
            self._begun = True
            self._new_round(now)
        self._advance(now)
        self._in_flight += 1

    def ended(self, nbytes: int, started: float, now: float) -> None:
        self._advance(now)
        self._in_flight = max(0, self._in_flight - 1)
        if nbytes <= 0 or now <= started:
            return
        if started >= self._since:  # only requests the current limit started
            self._done += 1
            self._bytes += nbytes
            self._seconds += now - started
            self._last_end = now
            if (self._done >= max(ROUND_MIN_REQUESTS, self.limit // 2)
                    and now - self._since >= ROUND_MIN_S):
                self._decide(now)

    def throttled(self, now: float) -> None:
        self._advance(now)
        self.slow_start = False
        decided = max(self.minimum, self.limit // 2)
        self._set(decided, now, Round(self.limit, self.throughput, self._in_flight, 0.0,
                                      decided, "throttled"))

    # --- the decision ---------------------------------------------------------------------

    def _decide(self, now: float) -> None:
        elapsed = self._last_end - self._since
        in_flight = self._area / elapsed if elapsed > 0 else float(self._in_flight)
        per_byte = self._seconds / self._bytes
        self._taus.append(per_byte)
        gradient = min(1.0, min(self._taus) / per_byte)
        throughput = in_flight / per_byte
        probe, self._probe = self._probe, None
        if in_flight < BUSY * self.limit:
            decided, why = self.limit, "idle"
        elif probe is not None and throughput < probe[1] * PROBE_GAIN:
            # More in flight brought nothing: back, and no probing for a while.
            decided, why = probe[0], "no gain"
            self._hold = PROBE_HOLD
        elif gradient >= FREE and not self.slow_start and self._hold > 0:
            self._hold -= 1
            decided, why = self.limit, "hold"
        elif gradient >= FREE:
            if not self.slow_start:
                self._probe = (self.limit, throughput)
            decided = math.ceil(self.limit * (self._leap(per_byte) if self.slow_start else HEADROOM))
            why = "grow"
        else:
            self.slow_start = False
            decided, why = math.ceil(in_flight * gradient * HEADROOM), "saturated"
        decided = min(max(decided, self.minimum), self.maximum)
        self.throughput = throughput
        self._set(decided, now, Round(self.limit, throughput, in_flight, gradient, decided, why))

    @staticmethod
    def _leap(per_byte: float) -> float:
        """Slow start's growth: four times when each request is slow (a latency-bound link,
        where a round lasts a request's time, ~1.3 s for 16 MiB on bench/link.py's, so
        doubling from 8 to 64 costs three of them), else twice (loopback, where the first
        round cannot tell a CPU-bound pipe from a free one and four times cost 17 %)."""
        return 4.0 if 1 / per_byte < SLOW_CONNECTION else 2.0

    def _set(self, limit: int, now: float, done: Round) -> None:
        self.limit = limit
        self.last = done
        self._new_round(now)

    def _new_round(self, now: float) -> None:
        self._since = now
        self._last_end = now
        self._area = 0.0  # the integral of requests in flight over the round, request-seconds
        self._clock = now
        self._done = 0
        self._bytes = 0
        self._seconds = 0.0  # the round's requests' durations, summed

    def _advance(self, now: float) -> None:
        if now > self._clock:
            self._area += self._in_flight * (now - self._clock)
            self._clock = now
