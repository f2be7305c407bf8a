"""The cache's space: bytes held, the most it may hold, room promised to chunks being
written, and eviction of whole files to make that room.

Which files go is :mod:`coldbrew.agent.core.eviction`'s pure policy (least recently used,
never a pinned one); this drives it over the index and removes what it chose. Room is
reserved before a chunk is written and counted as used once it is recorded: without the
reservation, concurrent writers all see the same free space and overshoot the limit.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

from ..core import eviction
from ..errors import CacheFull, FileBusy
from ..metrics import AgentMetrics
from .entry import Entry
from .index import Index
from .layout import CacheDir

log = logging.getLogger("coldbrew.store")


@dataclass(frozen=True)
class Limits:
    size_bytes: int | None  # None: no limit but the disk and its reserve
    reserve_bytes: int


class Space:
    """Used and reserved bytes (under the index's lock), and the eviction that frees them."""

    def __init__(self, index: Index, disk: CacheDir, limits: Limits,
                 metrics: AgentMetrics | None) -> None:
        self.index = index
        self.disk = disk
        self.limits = limits
        self.metrics = metrics
        self.used = 0
        #: Room promised to chunks being written now (not yet in ``used``).
        self.reserved = 0

    def capacity(self) -> int:
        """Most bytes the cache may hold right now (its limit, minus the disk reserve)."""
        try:
            st = os.statvfs(self.disk.root)
            disk_total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        except OSError:
            return self.used
        limit = self.limits.size_bytes if self.limits.size_bytes is not None else disk_total
        return eviction.capacity_bytes(limit, self.used, free, self.limits.reserve_bytes)

    def count_in(self, nbytes: int) -> None:
        """``nbytes`` more are held (a chunk was recorded present)."""
        with self.index.lock:
            self.used += nbytes

    def count_out(self, nbytes: int) -> None:
        """``nbytes`` fewer are held (a chunk was dropped)."""
        with self.index.lock:
            self.used -= nbytes

    # --- room for a chunk being written ----------------------------------------------------------

    @contextlib.contextmanager
    def room(self, entry: Entry, index: int, nbytes: int) -> Iterator[None]:
        """Room for chunk ``index`` held while it is written (none needed if it is present)."""
        if index in entry.present:  # rewriting a present chunk needs no new room
            yield
            return
        self.make_room(nbytes, entry)
        try:
            yield
        finally:
            self.release_room(nbytes)

    def make_room(self, nbytes: int, for_entry: Entry) -> None:
        """Evict until ``nbytes`` more fit, and reserve them; CacheFull if they cannot."""
        with self.index.lock:
            need = self.used + self.reserved + nbytes - self.capacity()
            if need > 0:
                entries = {e.key: e for e in self.index.entries()}
                candidates = [eviction.Candidate(e.key, e.cached_bytes, e.last_used,
                                                 self.index.pinned(e) or e is for_entry)
                              for e in entries.values()]
                for victim in eviction.choose_victims(candidates, need):
                    self._evict_locked(entries[victim.key], reason="lru")
                if self.used + self.reserved + nbytes > self.capacity():
                    if self.metrics:
                        self.metrics.cache_write_errors.labels("full").inc()
                    raise CacheFull(f"cache {self.disk.root.parent} is full ({self.used} bytes "
                                    "used, the rest in use); serving from origin without caching")
            self.reserved += nbytes

    def release_room(self, nbytes: int) -> None:
        with self.index.lock:
            self.reserved -= nbytes

    # --- eviction --------------------------------------------------------------------------------

    def evict(self, entry: Entry) -> int:
        """Remove a whole file from the cache unless it is in use. Returns bytes freed."""
        with self.index.lock:
            if self.index.pinned(entry):
                raise FileBusy(f"{entry.identity.uri} is in use (open or being loaded); "
                               "not evicted")
            return self._evict_locked(entry, reason="request")

    def _evict_locked(self, entry: Entry, reason: str) -> int:
        self.index.notify(entry)
        freed = entry.cached_bytes
        self.index.remove(entry)
        self.used -= freed
        entry.present.clear()
        self.disk.remove(entry)
        if self.metrics and reason == "lru":
            self.metrics.cache_evictions.inc()
            self.metrics.cache_evicted_bytes.inc(freed)
        log.info("evicted", extra={"uri": entry.identity.uri, "bytes": freed, "reason": reason})
        self.publish()
        return freed

    def publish(self) -> None:
        """The cache's gauges, as they stand."""
        if self.metrics:
            self.metrics.cache_bytes.set(self.used)
            self.metrics.cache_files.set(self.index.files_with_chunks())
            self.metrics.cache_capacity.set(self.capacity())
