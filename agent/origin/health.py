"""Whether the origin answers: the one state every stale-if-error decision reads. Pure.

The origin becomes *unreachable* when an operation fails in a way that retrying could fix
(connection refused or reset, a timeout, a 5xx or SlowDown) after its retries are spent, or
when a version check gets no answer before its deadline. It becomes *reachable* again as soon
as any operation succeeds, so the agent picks the origin up again without a restart.

While it is unreachable, every operation retries only briefly (:data:`QUICK`). A reader then
learns within a second that a chunk the cache lacks cannot be fetched, not after the full
backoff of every read (which exists to ride out a blip, not an outage). An answer such as
404 or 403 is an answer: it says nothing about reachability.
"""

from __future__ import annotations

from dataclasses import dataclass

from .retry import RetryPolicy

#: Retries while the origin is unreachable, and for version checks (HEADs) whose answer a
#: cached version can stand in for: about 0.3 s of pauses in all.
QUICK = RetryPolicy(attempts=3, base_delay_s=0.1, max_delay_s=0.4)


@dataclass
class OriginHealth:
    reachable: bool = True
    #: Monotonic time of the last change (0: never changed).
    since: float = 0.0
    #: The error that made it unreachable ("" while reachable).
    error: str = ""

    def failed(self, error: str, now: float) -> bool:
        """Record an operation that could not reach the origin. True if it just became
        unreachable (the caller logs and counts that once)."""
        changed = self.reachable
        if changed:
            self.reachable, self.since = False, now
        self.error = error
        return changed

    def answered(self, now: float) -> bool:
        """Record an operation the origin answered. True if it just became reachable again."""
        changed = not self.reachable
        if changed:
            self.reachable, self.since, self.error = True, now, ""
        return changed

    def policy(self, normal: RetryPolicy) -> RetryPolicy:
        """The retries an operation gets now."""
        return normal if self.reachable else QUICK
