"""Capped exponential backoff with jitter, and the loop that applies it.

Only :class:`~coldbrew.agent.errors.TransientOriginError` is retried: a 404 or
403 fails at once (retrying cannot fix it), while a 503, a SlowDown, a reset
connection or a short body gets another attempt after a growing, jittered pause
— jitter so a hundred agents that failed together do not retry together.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from ..errors import OriginUnavailable, TransientOriginError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 8
    base_delay_s: float = 0.1
    max_delay_s: float = 5.0

    def delay_s(self, retry_number: int, rng: random.Random) -> float:
        """Pause before retry ``retry_number`` (0-based): half fixed, half jitter."""
        # min() on the exponent first: 2**1100 would overflow a float.
        ceiling = min(self.max_delay_s, self.base_delay_s * (2 ** min(retry_number, 60)))
        return ceiling / 2 + rng.uniform(0, ceiling / 2)


OnRetry = Callable[[TransientOriginError, int, float], None]


async def with_retries(
    attempt: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    what: str,
    on_retry: OnRetry | None = None,
    rng: random.Random | None = None,
) -> T:
    """Run ``attempt`` until it succeeds, fails permanently, or retries run out.

    ``what`` names the operation for the final error (``GET s3://b/k bytes 0-15``).
    """
    rng = rng or random.Random()
    for number in range(policy.attempts):
        try:
            return await attempt()
        except TransientOriginError as e:
            if number + 1 == policy.attempts:
                raise OriginUnavailable(
                    f"{what}: still failing after {policy.attempts} attempts; last error: {e}"
                ) from e
            pause = policy.delay_s(number, rng)
            if on_retry is not None:
                on_retry(e, number + 1, pause)
            await asyncio.sleep(pause)
    raise AssertionError("unreachable: attempts must be >= 1")
