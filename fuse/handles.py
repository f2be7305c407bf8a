"""Files open through the mount: one handle per FUSE open, and the pin each one holds.

An open file is pinned to one version of its object (``Fetcher.open_info``) and its cache
entry is pinned in the store (never evicted while open). The pin is taken when the file
is opened on the agent's loop; the handle table takes it over with the handle and gives
it back at release. When the last handle on an entry goes, the entry's data-file
descriptors are closed (the kernel sends RELEASE only after its last read of the file).
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from ..agent.cache.store import ChunkStore
from ..agent.fetch.fetcher import OpenFile


@dataclass
class Handle:
    rel: str
    file: OpenFile
    mode: str = "cached"  # "passthrough", "cached" (the mount's page cache), "direct" (direct_io)
    #: Chunks the cache could not store, as bytes (a few, see :mod:`.reads`).
    uncached: OrderedDict[int, bytearray] = field(default_factory=OrderedDict)
    last_index: int = -1  # the chunk the last read ended in (sequential reads prefetch)


class Handles:
    def __init__(self, store: ChunkStore, on_last_close: Callable[[str], None]) -> None:
        self.store = store
        #: Called with an entry's key when its last handle is released.
        self.on_last_close = on_last_close
        self._lock = threading.Lock()
        self._handles: dict[int, Handle] = {}
        self._fh = itertools.count(1)
        self._per_entry: dict[str, int] = {}

    def add(self, handle: Handle) -> int:
        """The new handle's number (``fi.fh``); the handle now holds its file's pin."""
        key = handle.file.entry.key
        with self._lock:
            fh = next(self._fh)
            self._handles[fh] = handle
            self._per_entry[key] = self._per_entry.get(key, 0) + 1
        return fh

    def get(self, fh: int) -> Handle | None:
        return self._handles.get(fh)

    def values(self) -> list[Handle]:
        with self._lock:
            return list(self._handles.values())

    def release(self, fh: int) -> Handle | None:
        """Forget handle ``fh`` and give back its pin; None if there is no such handle."""
        with self._lock:
            handle = self._handles.pop(fh, None)
            if handle is None:
                return None
            key = handle.file.entry.key
            left = self._per_entry.get(key, 1) - 1
            if left > 0:
                self._per_entry[key] = left
            else:
                self._per_entry.pop(key, None)
                self.on_last_close(key)
        self.store.unpin(handle.file.entry)
        return handle

    def release_all(self) -> int:
        """Forget every handle and give back their pins (the mount is going away); returns
        how many there were."""
        with self._lock:
            handles = list(self._handles.values())
            self._handles.clear()
            self._per_entry.clear()
        for handle in handles:
            self.store.unpin(handle.file.entry)
        return len(handles)
