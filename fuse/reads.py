"""The read path: where the bytes of a read are, made present first, with read-ahead.

A cached file's data file (the store keeps each file's bytes at their own offsets) is
opened once and kept open; a read is answered with *where* its bytes are — descriptor
and offset, handed to libfuse (:mod:`.bufvec`), which moves them into the kernel itself
(spliced, where the kernel allows), so no Python code copies a cached byte. Each chunk is
checked against its digest before it is first served (:mod:`.datafiles`: when, and how
long a check holds); a chunk that fails is dropped (counted as corrupt) and fetched again.
Chunks the cache could not store (disk full or failing) come back from the fetcher as
bytes and are kept per open file, a few at a time.

Read-ahead. A reader that goes on past what is cached, chunk after chunk, has the rest of
the file prefetched ahead of it (the fetcher's prefetch, on the agent's loop).
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from ..agent.cache.store import ChunkStore
from ..agent.errors import ObjectChanged
from ..agent.fetch.fetcher import Fetcher, Priority
from . import bufvec
from .bridge import LoopBridge
from .datafiles import DataFile, DataFiles
from .handles import Handle

#: Chunks the cache could not store, kept per open file (bytes in memory).
_UNCACHED_KEPT = 4


class Reader:
    def __init__(self, fetcher: Fetcher, store: ChunkStore, files: DataFiles, bridge: LoopBridge,
                 on_changed: Callable[[str], None]) -> None:
        self.fetcher = fetcher
        self.store = store
        self.files = files
        self.bridge = bridge
        #: Called with a path whose object changed at the origin (the next open sees the new one).
        self.on_changed = on_changed

    def pieces(self, handle: Handle, offset: int, end: int) -> list[bufvec.FilePiece | bytearray]:
        """Where bytes [offset, end) are (neighbouring ranges of one file joined); every file
        descriptor in it stays open until this thread's next read (libfuse reads from them
        after we return)."""
        layout = handle.file.entry.layout
        first, last = offset // layout.chunk_size, (end - 1) // layout.chunk_size
        for _ in range(8):
            sources = [self._chunk(handle, index) for index in range(first, last + 1)]
            if self.files.hold(s for s in sources if isinstance(s, DataFile)):
                break  # else one was closed between lookup and here (rare): look again
        else:
            raise OSError(errno.EIO, f"{handle.file.info.uri}: its data file kept changing under the read")
        pieces: list[bufvec.FilePiece | bytearray] = []
        for index, source in zip(range(first, last + 1), sources):
            start = index * layout.chunk_size
            lo, hi = max(offset, start), min(end, start + layout.length(index))
            if not isinstance(source, DataFile):
                pieces.append(source if (lo, hi) == (start, start + len(source))
                              else source[lo - start:hi - start])
            elif pieces and isinstance(pieces[-1], tuple) and pieces[-1][0] == source.fd:
                fd, at, n = pieces[-1]  # the next chunk of the same file: one range
                pieces[-1] = (fd, at, n + hi - lo)
            else:
                pieces.append((source.fd, lo, hi - lo))
        return pieces

    def _chunk(self, handle: Handle, index: int) -> DataFile | bytearray:
        """Chunk ``index``: the data file it was checked in, or the bytes when the cache could
        not store them."""
        kept = handle.uncached.get(index)
        if kept is not None:
            return kept
        f = handle.file
        if handle.last_index == index - 1 and index and not self.store.has(f.entry, index):
            # A sequential reader went past what is cached: fetch the rest ahead of it.
            self.bridge.soon(self.fetcher.prefetch, f, index + 1)
        handle.last_index = index
        for _ in range(3):
            if not self.store.has(f.entry, index):
                data = self._fetch(handle, index)
                if data is not None:  # the cache could not store it: here are the bytes
                    return self._keep(handle, index, data)
            found = self.files.checked(f.entry, index)
            if found is not None:
                return found
        raise OSError(errno.EIO, f"chunk {index} of {f.info.uri} kept failing its digest check")

    def _fetch(self, handle: Handle, index: int) -> bytes | None:
        """Make chunk ``index`` present; its bytes if the cache could not store them."""
        try:
            return self.bridge.call("read", self.fetcher.ensure(handle.file, index, Priority.READ))
        except ObjectChanged:
            self.on_changed(handle.rel)
            raise

    @staticmethod
    def _keep(handle: Handle, index: int, data: bytes) -> bytearray:
        kept = handle.uncached[index] = bytearray(data)
        while len(handle.uncached) > _UNCACHED_KEPT:
            handle.uncached.popitem(last=False)
        return kept
