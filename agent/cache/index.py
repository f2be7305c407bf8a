"""Which files the cache holds (its entries, by key) and which of them are in use (pinned).

A pin is held by whoever reads or writes a file (an open through the FUSE view, a load,
a fetch); a pinned file is never evicted. The index's lock is the store's one lock over
its in-memory state: the space accounting and each entry's chunk sets change under it too,
so an eviction never races a chunk being recorded.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable

from ..core.manifest import FileIdentity
from .entry import Entry

log = logging.getLogger("coldbrew.store")


class Index:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._entries: dict[str, Entry] = {}
        self._pins: Counter[str] = Counter()
        #: Called (with the lock held, before any file goes) when an entry loses a chunk or
        #: is evicted: P2P must stop serving those files first.
        self.on_change: list[Callable[[Entry], None]] = []

    # --- entries -------------------------------------------------------------------------------

    def find(self, key: str) -> Entry | None:
        with self.lock:
            return self._entries.get(key)

    def entries(self) -> list[Entry]:
        with self.lock:
            return list(self._entries.values())

    def add(self, entry: Entry) -> Entry:
        """``entry``, now in the index; or the one already there under its key."""
        with self.lock:
            return self._entries.setdefault(entry.key, entry)

    def remove(self, entry: Entry) -> None:
        with self.lock:
            self._entries.pop(entry.key, None)

    def other_versions(self, identity: FileIdentity) -> list[Entry]:
        with self.lock:
            return [e for e in self._entries.values()
                    if e.identity.uri == identity.uri and e.identity != identity]

    def files_with_chunks(self) -> int:
        with self.lock:
            return sum(1 for e in self._entries.values() if e.present)

    def notify(self, entry: Entry) -> None:
        """Tell the ``on_change`` hooks that ``entry`` is about to lose bytes."""
        for hook in self.on_change:
            try:
                hook(entry)
            except Exception as e:  # a hook must never stop an eviction
                log.warning("cache change hook failed", extra={"uri": entry.identity.uri,
                                                                "error": str(e)})

    # --- pins: what is in use is never evicted ---------------------------------------------------

    def pin(self, entry: Entry) -> None:
        with self.lock:
            self._pins[entry.key] += 1

    def unpin(self, entry: Entry) -> None:
        with self.lock:
            self._pins[entry.key] -= 1
            if self._pins[entry.key] <= 0:
                del self._pins[entry.key]

    def pinned(self, entry: Entry) -> bool:
        with self.lock:
            return self._pins.get(entry.key, 0) > 0
