"""The on-disk chunk cache, as the rest of the agent uses it: :class:`ChunkStore`.

One data file per cached file, not one file per chunk: the FUSE view hands a complete
file to the kernel whole (passthrough: the kernel reads ``data`` itself), the loader maps
it, and P2P is a single-file torrent over it (one piece per chunk) — everyone reads the
very same bytes, never a second copy.

No fsync on the hot path: measured here, fsync caps writes at ~0.29 GB/s against
~1.1 GB/s without, below the S3 transport. Durability comes from verification
instead: every chunk read back from disk is checked against its journal digest
(:mod:`.verify`, the one integrity check), so a chunk torn by a power loss is detected
and fetched again — speed lost, not correctness.

The store is a facade over its parts, each with one job:

* :mod:`.layout` — the entry directory format (versioned, pinned by tests), the lock,
  and recovery at start (journal replay, crash leftovers, earlier layouts);
* :mod:`.landing` — how a chunk arrives (whole, in pieces, or adopted from libtorrent);
* :mod:`.ledger` — each chunk's record, journaled then mirrored in its :class:`Entry`;
* :mod:`.space` — capacity, room reserved for writes, and eviction of whole files;
* :mod:`.index` — which files are cached and which are pinned (in use);
* here — reading chunks back, checked, and the entry-level calls.

All methods are blocking and thread-safe; the fetcher calls them from worker
threads. Any OSError from the disk becomes :class:`CacheError` (or
:class:`CacheFull`), which callers treat as "serve from origin, uncached" (:mod:`.failures`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from ..core.manifest import FileIdentity, Manifest
from ..errors import CacheError, CorruptData
from ..metrics import AgentMetrics
from . import verify
from .entry import DATA_FILE, Entry
from .failures import count_write_error
from .index import Index
from .landing import Landing, Landings
from .layout import LAYOUT_VERSION, CacheDir
from .ledger import Ledger
from .space import Limits, Space

__all__ = ["ChunkStore", "DATA_FILE", "Entry", "LAYOUT_VERSION", "Landing", "Limits"]

log = logging.getLogger("coldbrew.store")


class ChunkStore:
    def __init__(self, cache_dir: Path, chunk_size: int, limits: Limits,
                 metrics: AgentMetrics | None = None, piece_hashes: bool = False) -> None:
        self.chunk_size = chunk_size
        self.limits = limits
        self.metrics = metrics
        self.disk = CacheDir(cache_dir)
        self.index = Index()
        self.space = Space(self.index, self.disk, limits, metrics)
        self.ledger = Ledger(self.index, self.disk, self.space, metrics)
        self.landings = Landings(self.disk, self.space, self.ledger, piece_hashes)
        #: Called (with the store lock held, before any file goes) when an entry loses a
        #: chunk or is evicted: P2P must stop serving those files first.
        self.on_change: list[Callable[[Entry], None]] = self.index.on_change

    @property
    def root(self) -> Path:
        """``<cache_dir>/<LAYOUT_VERSION>``."""
        return self.disk.root

    @property
    def piece_hashes(self) -> bool:
        """Also record each chunk's SHA-1 (the torrent piece hash) as it is written."""
        return self.landings.piece_hashes

    # --- lifecycle --------------------------------------------------------------

    def open(self) -> None:
        """Take the cache, clean what a crash left, and load the index from disk."""
        removed = self.disk.take()
        for entry in self.disk.load_entries():
            self.index.add(entry)
            self.space.count_in(entry.cached_bytes)
        log.info("cache opened", extra={"dir": str(self.root), "files": len(self.index.entries()),
                                        "bytes": self.space.used, "temp_files_removed": removed})
        self.space.publish()

    def close(self) -> None:
        self.disk.release()

    # --- entries ------------------------------------------------------------------

    def entry(self, identity: FileIdentity) -> Entry:
        """The entry for ``identity``, created (meta.json on disk) if new."""
        key = identity.key()
        new = Entry(identity, self.chunk_size, self.disk.entry_path(key))
        entry = self.index.add(new)
        if entry is not new:
            return entry
        try:
            self.disk.create(entry)
        except OSError as e:
            # The entry still works in memory; chunks will fail to write and be served uncached.
            count_write_error(self.metrics, e)
            log.warning("cannot create cache entry", extra={"uri": identity.uri, "error": str(e)})
        self.space.publish()
        return entry

    def find(self, key: str) -> Entry | None:
        return self.index.find(key)

    def entries(self) -> list[Entry]:
        return self.index.entries()

    def other_versions(self, identity: FileIdentity) -> list[Entry]:
        return self.index.other_versions(identity)

    def touch(self, entry: Entry) -> None:
        """Mark ``entry`` used now (LRU order survives restarts via the ``used`` file's mtime)."""
        now = time.time()
        if now - entry.last_used < 1.0:
            return  # LRU needs no finer clock; spare the syscall on hot paths
        entry.last_used = now
        try:
            self.disk.mark_used(entry)
        except OSError:
            pass

    # --- pins: what is in use is never evicted -----------------------------------

    def pin(self, entry: Entry) -> None:
        self.index.pin(entry)

    def unpin(self, entry: Entry) -> None:
        self.index.unpin(entry)

    def pinned(self, entry: Entry) -> bool:
        return self.index.pinned(entry)

    # --- reading chunks back, checked ------------------------------------------------

    def has(self, entry: Entry, index: int) -> bool:
        return index in entry.present

    def read_verified(self, entry: Entry, index: int) -> bytes:
        """Chunk ``index``'s bytes, checked against its digest.

        A mismatch drops the chunk (so it is fetched again), counts it and raises
        :class:`CorruptData`; an unreadable file raises :class:`CacheError`.
        """
        try:
            with open(entry.data_path, "rb") as f:
                data = os.pread(f.fileno(), entry.layout.length(index), entry.offset(index))
        except OSError as e:
            self.drop_chunk(entry, index)
            raise CacheError(f"cannot read cached chunk {index} of {entry.identity.uri}: {e}") from e
        if not verify.intact(data, entry.digests.get(index)):  # a short read is not intact
            self.report_corrupt(entry, index)
            raise CorruptData(f"cached chunk {index} of {entry.identity.uri} failed its digest "
                              "check; it was removed and will be fetched again")
        return data

    def verify_present(self, entry: Entry, index: int) -> bool:
        """True if chunk ``index`` is on disk and intact; a bad one is dropped and counted (a
        missing data file drops it uncounted: that is a lost file, not corruption)."""
        try:
            fd = os.open(entry.data_path, os.O_RDONLY)
        except OSError:
            self.drop_chunk(entry, index)
            return False
        try:
            ok = verify.intact_at(fd, entry.offset(index), entry.layout.length(index),
                                  entry.digests.get(index))
        finally:
            os.close(fd)
        if not ok:
            self.report_corrupt(entry, index)
        return ok

    def distrust(self, entry: Entry) -> None:
        """Someone other than the store wrote ``entry``'s data file: check its chunks again
        before serving them without a digest check of their own (FUSE passthrough)."""
        with self.index.lock:
            entry.known_good.clear()

    def report_corrupt(self, entry: Entry, index: int) -> None:
        """A reader found chunk ``index`` corrupt: count it and drop it."""
        if self.metrics:
            self.metrics.corrupt_chunks.labels("cache").inc()
        log.warning("corrupt chunk dropped", extra={"uri": entry.identity.uri, "chunk": index})
        self.drop_chunk(entry, index)

    def drop_chunk(self, entry: Entry, index: int) -> None:
        """Forget chunk ``index``: journaled as dropped, its blocks given back to the disk."""
        self.ledger.drop(entry, index)

    # --- chunks arriving (:mod:`.landing`) ---------------------------------------------

    def write_chunk(self, entry: Entry, index: int, data: memoryview) -> str:
        """Store verified bytes of chunk ``index``: written at its offset, then journaled.
        Returns the digest.

        Raises :class:`CacheFull` when no room can be made, :class:`CacheError`
        when the disk fails, :class:`CorruptData` if the bytes disagree with a
        digest already known for this chunk (a peer or origin returned other bytes).
        """
        return self.landings.write_chunk(entry, index, data)

    def open_landing(self, entry: Entry, index: int) -> Landing:
        """Make room for chunk ``index``, give it its disk blocks and open the data file for
        it to be written in place, piece by piece (:meth:`land_piece`).

        Raises :class:`CacheFull` / :class:`CacheError` like :meth:`write_chunk` (a full disk
        shows here, before any byte is fetched); then nothing is held. Hand the landing back
        with :meth:`commit_landing` or :meth:`abandon_landing`.
        """
        return self.landings.open(entry, index)

    def land_piece(self, landing: Landing, pos: int, piece: memoryview) -> None:
        """Write bytes at ``pos`` of the landing chunk. Pieces come in order; one at ``pos`` 0
        starts the chunk again (the origin was retried). Raises like :meth:`write_chunk`."""
        self.landings.land_piece(landing, pos, piece)

    def commit_landing(self, landing: Landing) -> str:
        """Journal a chunk that landed whole; returns its digest. The landing is closed.

        Raises :class:`CorruptData` if its bytes disagree with a digest verified before
        (their blocks are then given back), :class:`CacheError` if the disk fails.
        """
        return self.landings.commit(landing)

    def abandon_landing(self, landing: Landing) -> None:
        """Close a landing whose chunk did not arrive whole: its bytes are never served."""
        self.landings.abandon(landing)

    def adopt_chunk(self, entry: Entry, index: int, sha1: str, expected: str | None = None) -> str:
        """Take in chunk ``index`` that libtorrent wrote in place and checked against ``sha1``;
        its digest must equal ``expected`` (when known) and any verified before. Returns it."""
        return self.landings.adopt(entry, index, sha1, expected)

    # --- piece hashes and manifests ----------------------------------------------------

    def piece_hash(self, entry: Entry, index: int) -> str:
        """SHA-1 of present chunk ``index`` (read from disk, verified, and journaled once)."""
        found = entry.sha1s.get(index)
        if found is not None:
            return found
        sha1 = hashlib.sha1(self.read_verified(entry, index)).hexdigest()
        self.ledger.add_piece_hash(entry, index, sha1)
        return sha1

    def save_manifest(self, entry: Entry, manifest: Manifest) -> None:
        """Keep a shareable manifest with the entry (so a restart can seed without rehashing)."""
        try:
            self.disk.save_manifest(entry, manifest)
        except OSError as e:
            raise self.ledger.write_error(e, entry) from e

    def load_manifest(self, entry: Entry) -> Manifest | None:
        return self.disk.load_manifest(entry)

    def set_unchecked(self, entry: Entry, unchecked: bool) -> None:
        """Mark ``entry`` as being filled under a peer's manifest the origin has not yet
        confirmed (a restart drops its chunks), or clear the mark once it has."""
        try:
            self.disk.set_unchecked(entry, unchecked)
        except OSError as e:
            raise self.ledger.write_error(e, entry) from e

    def clear(self, entry: Entry) -> None:
        """Drop every chunk of ``entry`` and forget every digest and piece hash known for it
        (a peer's manifest for it lied). The entry stays, empty, for its readers."""
        self.ledger.clear(entry)

    # --- capacity and eviction (:mod:`.space`) -----------------------------------------

    def capacity(self) -> int:
        """Most bytes the cache may hold right now (its limit, minus the disk reserve)."""
        return self.space.capacity()

    @property
    def used_bytes(self) -> int:
        return self.space.used

    def evict(self, entry: Entry) -> int:
        """Remove a whole file from the cache unless it is in use. Returns bytes freed."""
        return self.space.evict(entry)
