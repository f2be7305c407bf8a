"""Which version of a file the agent serves: the origin's current one, or the newest one in the
cache when the origin cannot be reached (stale-if-error, the ``origin_unreachable`` setting).

A node cache earns its keep on the bad day: an S3 outage, a throttling storm or a broken route
is exactly when a scale-up must not fail. So every question about versions — an open
(:meth:`Versions.stat`), a prewarm (:meth:`Versions.expand`), a listing (:meth:`Versions.list_dir`)
— goes to the origin as before when the origin answers. When the origin cannot answer, the
cache answers instead.

* **When the cache can stand in**, the origin gets a short, bounded chance: brief retries and
  at most ``version_timeout_s`` (:meth:`Origin.stat` with ``quick``). A HEAD that hangs then
  costs seconds, not every retry's read timeout. After that the cached version is served,
  logged once per file, and counted in ``coldbrew_stale_serves_total``.
* **While the origin is unreachable** (:mod:`~coldbrew.agent.origin.health`), versions are not
  checked in the reader's path at all. At most one probe a second runs in the background, and
  the first one the origin answers makes it reachable again.
* **When nothing is cached**, nothing can stand in: the origin gets its full retries, as it
  always did.

``origin_unreachable = fail`` refuses instead of serving, and says why. An answer such as 404
or 403 is the origin's word, never overridden by the cache. A file filled under a peer's
manifest still on probation (:mod:`~coldbrew.agent.p2p.trust`) is not a version to serve
stale: the origin has not vouched for its bytes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from ..cache.store import ChunkStore, Entry
from ..errors import OriginUnavailable
from ..metrics import AgentMetrics
from ..origin.origin import ObjectInfo, Origin

log = logging.getLogger("coldbrew.fetcher")

#: While the origin is unreachable: at most one background version check this often.
PROBE_INTERVAL_S = 1.0
#: Files whose stale serve is remembered as logged (the origin's own "unreachable" and
#: "reachable again" lines mark each outage; this keeps a flapping one from flooding the log).
_TOLD_MAX = 10_000


def newest_cached(entries: list[Entry], uri: str, unchecked: Callable[[Entry], bool]
                  ) -> Entry | None:
    """The cached version of ``uri`` to serve without the origin: the most recently used one
    holding any bytes, and not on probation."""
    usable = [e for e in entries
              if e.identity.uri == uri and e.present and not unchecked(e)]
    return max(usable, key=lambda e: e.last_used, default=None)


def cached_under(entries: list[Entry], uri: str, unchecked: Callable[[Entry], bool]
                 ) -> list[Entry]:
    """The newest usable cached version of every file that ``uri`` names (itself, or every
    file under it as a prefix), in URI order."""
    prefix = uri.rstrip("/") + "/"
    uris = sorted({e.identity.uri for e in entries
                   if e.identity.uri == uri or e.identity.uri.startswith(prefix)})
    found = (newest_cached(entries, u, unchecked) for u in uris)
    return [e for e in found if e is not None]


def listing_from(entries: list[Entry], uri: str) -> list[dict[str, Any]]:
    """One level under ``uri`` as :meth:`Origin.list_dir` gives it, from cached files only."""
    prefix = uri.rstrip("/") + "/"
    items: dict[str, dict[str, Any]] = {}
    for e in entries:
        rest = e.identity.uri[len(prefix):]
        name, sep, _ = rest.partition("/")
        if sep:
            items.setdefault(name, {"uri": prefix + name, "name": name, "type": "directory",
                                    "size": 0})
        else:
            items[name] = {"uri": e.identity.uri, "name": name, "type": "file",
                           "size": e.identity.size, "etag": e.identity.etag, "mtime": None}
    return [items[n] for n in sorted(items)]


def info_of(entry: Entry) -> ObjectInfo:
    i = entry.identity
    return ObjectInfo(i.uri, i.size, i.etag)


class Versions:
    def __init__(self, origin: Origin, store: ChunkStore, metrics: AgentMetrics,
                 policy: str = "serve-cached",
                 unchecked: Callable[[Entry], bool] = lambda e: False) -> None:
        self.origin = origin
        self.store = store
        self.metrics = metrics
        self.policy = policy
        self.unchecked = unchecked
        self._told: set[str] = set()  # files whose stale serve was logged (once per file)
        self._probe: asyncio.Task[Any] | None = None
        self._probed_at = 0.0

    async def stat(self, uri: str) -> ObjectInfo:
        cached = newest_cached(self.store.entries(), uri, self.unchecked)
        if cached is None:
            return await self.origin.stat(uri)
        return (await self._ask(uri, "stat", lambda: self.origin.stat(uri, quick=True),
                                lambda: info_of(cached), f"{uri} is cached"))

    async def expand(self, uri: str) -> list[ObjectInfo]:
        cached = cached_under(self.store.entries(), uri, self.unchecked)
        if not cached:
            return await self.origin.expand(uri)
        return await self._ask(uri, "expand", lambda: self.origin.expand(uri, quick=True),
                               lambda: [info_of(e) for e in cached],
                               f"{len(cached)} file(s) under {uri} are cached")

    async def list_dir(self, uri: str) -> list[dict[str, Any]]:
        cached = cached_under(self.store.entries(), uri, self.unchecked)
        if not cached:
            return await self.origin.list_dir(uri)
        return await self._ask(uri, "list", lambda: self.origin.list_dir(uri, quick=True),
                               lambda: listing_from(cached, uri),
                               f"{len(cached)} file(s) under {uri} are cached")

    # --- the decision ---------------------------------------------------------------------

    async def _ask(self, uri: str, what: str, ask: Callable[[], Any], stale: Callable[[], Any],
                   held: str) -> Any:
        """``ask()`` the origin; if it cannot answer, ``stale()`` (the cache's answer)."""
        if self.origin.health.reachable:
            try:
                return await ask()
            except OriginUnavailable as e:
                error = str(e)
        else:
            error = self.origin.health.error
            self._probe_soon(ask)
        if self.policy == "fail":
            raise OriginUnavailable(f"{error}; {held}, but origin_unreachable = fail, so it is "
                                    "not served without the origin") from None
        self.metrics.stale_serves.labels(what).inc()
        if uri not in self._told:
            if len(self._told) >= _TOLD_MAX:
                self._told.clear()
            self._told.add(uri)
            log.warning("origin unreachable: serving the cached version",
                        extra={"uri": uri, "what": what, "error": error})
        return stale()

    def _probe_soon(self, ask: Callable[[], Any]) -> None:
        """One background check of the origin (its outcome updates the origin's health)."""
        now = time.monotonic()
        if (self._probe is not None and not self._probe.done()) or \
                now - self._probed_at < PROBE_INTERVAL_S:
            return
        self._probed_at = now
        self._probe = asyncio.ensure_future(ask())
        self._probe.add_done_callback(_quiet)

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)


def _quiet(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # the probe's failure is the health's business, not a lost error
