"""Each chunk's record: present, with its digest, or not. Journaled on disk first, then
mirrored in the entry and counted in the cache's space.

Order matters for crash safety: a chunk's bytes are in the data file before its journal
line, and the line before the chunk counts as present, so a crash leaves a chunk
journaled or not — bytes no journal line vouches for are never served. A dropped chunk
is taken out of the entry first (readers stop trusting it), then journaled as dropped and
its blocks punched out of the data file (the space comes back).
"""

from __future__ import annotations

from ..errors import CacheError
from ..metrics import AgentMetrics
from .entry import Entry, new_stamp
from .failures import write_error
from .index import Index
from .layout import CacheDir
from .space import Space


class Ledger:
    def __init__(self, index: Index, disk: CacheDir, space: Space,
                 metrics: AgentMetrics | None) -> None:
        self.index = index
        self.disk = disk
        self.space = space
        self.metrics = metrics

    def write_error(self, e: OSError, entry: Entry) -> CacheError:
        """What ``e``, met writing ``entry``, means to the caller (counted)."""
        return write_error(e, self.disk.root.parent, entry.identity.uri, self.metrics)

    def journal(self, entry: Entry, index: int, chunk_digest: str | None, sha1: str | None) -> None:
        """Journal chunk ``index``'s digest and/or piece hash. Raises :class:`CacheError`."""
        try:
            self.disk.journal(entry, index, chunk_digest, sha1)
        except OSError as e:
            raise self.write_error(e, entry) from e

    def mark_present(self, entry: Entry, index: int, chunk_digest: str, sha1: str | None) -> None:
        """Chunk ``index``, journaled, counts as present: new bytes, a new stamp."""
        with self.index.lock:
            entry.digests[index] = chunk_digest
            if sha1 is not None:
                entry.sha1s[index] = sha1
            entry.stamps[index] = new_stamp()
            entry.known_good.add(index)
            if index not in entry.present:
                entry.present.add(index)
                self.space.count_in(entry.layout.length(index))
        self.space.publish()

    def record(self, entry: Entry, index: int, chunk_digest: str, sha1: str | None) -> None:
        """Journal chunk ``index`` (its bytes are in the data file), then mark it present."""
        self.journal(entry, index, chunk_digest, sha1)
        self.mark_present(entry, index, chunk_digest, sha1)

    def add_piece_hash(self, entry: Entry, index: int, sha1: str) -> None:
        self.journal(entry, index, None, sha1)
        entry.sha1s[index] = sha1

    def drop(self, entry: Entry, index: int) -> None:
        """Forget chunk ``index``: journaled as dropped, its blocks given back to the disk."""
        with self.index.lock:
            self.index.notify(entry)
            entry.known_good.discard(index)
            entry.stamps.pop(index, None)  # a check of the old bytes must not vouch for new ones
            if index in entry.present:
                entry.present.discard(index)
                self.space.count_out(entry.layout.length(index))
        self.disk.forget_chunk(entry, index)
        self.space.publish()

    def clear(self, entry: Entry) -> None:
        """Forget every chunk of ``entry`` and every digest and piece hash ever verified for
        it: they came under a manifest found to lie, so none may judge new bytes."""
        with self.index.lock:
            self.index.notify(entry)
            self.space.count_out(sum(entry.layout.length(i) for i in entry.present))
            entry.present.clear()
            entry.digests.clear()
            entry.sha1s.clear()
            entry.stamps.clear()
            entry.known_good.clear()
        try:
            self.disk.clear_chunks(entry)
        except OSError as e:
            raise self.write_error(e, entry) from e
        finally:
            self.space.publish()
