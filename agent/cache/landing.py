"""How a chunk arrives in the cache: written whole from memory, landed piece by piece as the
origin streams it, or adopted where libtorrent wrote it; then recorded in the journal.

A chunk is written in place (``pwrite`` at its offset in the entry's data file) and only
then journaled (:mod:`.ledger`). From the origin it comes piece by piece through a
:class:`Landing`, which first allocates the chunk's blocks (:func:`.blocks.allocate`), so
a full disk is known before its GET, and hashes the pieces on the way. Bytes that
disagree with a digest verified before are refused (:class:`CorruptData`) and their
blocks given back; a landing that does not complete leaves its bytes unjournaled, never
served (and overwritten when the chunk is fetched again).

Each chunk's SHA-1 (its BitTorrent piece hash) is computed as it is written, once, and
only when P2P is on.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from typing import Any

from ..core.manifest import digest, digester
from ..errors import CacheError, CacheFull, CorruptData, UsageError
from . import verify
from .blocks import allocate, punch_hole
from .entry import Entry
from .layout import CacheDir, pwrite_all
from .ledger import Ledger
from .space import Space


@dataclass
class Landing:
    """Room held for one chunk, and its entry's data file open to take the chunk in place,
    piece by piece as it arrives (:meth:`Landings.land_piece`), hashed on the way.

    Handed back with :meth:`Landings.commit` or :meth:`Landings.abandon`.
    """

    entry: Entry
    index: int
    fd: int
    offset: int
    length: int
    reserved: int  # bytes of room held (0 when the chunk was already present)
    received: int = 0  # bytes written so far, from the chunk's start
    hasher: Any = None  # the chunk digest of those bytes, so far
    sha1: Any = None  # and their piece hash, where one is wanted (P2P)


class Landings:
    """Chunks written into the cache, and recorded once whole and agreeing with what is known."""

    def __init__(self, disk: CacheDir, space: Space, ledger: Ledger, piece_hashes: bool) -> None:
        self.disk = disk
        self.space = space
        self.ledger = ledger
        #: Also record each chunk's SHA-1 (the torrent piece hash) as it is written.
        self.piece_hashes = piece_hashes

    def _wants_sha1(self, entry: Entry, index: int) -> bool:
        return self.piece_hashes and index not in entry.sha1s

    # --- a whole chunk from memory -----------------------------------------------------------

    def write_chunk(self, entry: Entry, index: int, data: memoryview) -> str:
        """Store verified bytes of chunk ``index``: written at its offset, then journaled.
        Returns the digest. Raises like :meth:`coldbrew.agent.cache.store.ChunkStore.write_chunk`."""
        chunk_digest = digest(data)
        known = entry.digests.get(index)
        if known is not None and known != chunk_digest:
            raise CorruptData(f"chunk {index} of {entry.identity.uri} arrived with different bytes "
                              "than before (digest mismatch)")
        if len(data) != entry.layout.length(index):
            raise CorruptData(f"chunk {index} of {entry.identity.uri} has {len(data)} bytes, "
                              f"expected {entry.layout.length(index)}")
        with self.space.room(entry, index, len(data)):
            sha1 = hashlib.sha1(data).hexdigest() if self._wants_sha1(entry, index) else None
            try:
                self.disk.write_at(entry, entry.offset(index), data)
            except OSError as e:
                raise self.ledger.write_error(e, entry) from e
            self.ledger.record(entry, index, chunk_digest, sha1)
        return chunk_digest

    # --- a chunk in pieces, as the origin streams it ---------------------------------------------

    def open(self, entry: Entry, index: int) -> Landing:
        """Make room for chunk ``index``, give it its disk blocks and open the data file for it
        to be written in place. Raises :class:`CacheFull` / :class:`CacheError` (a full disk
        shows here, before any byte is fetched); then nothing is held."""
        length = entry.layout.length(index)
        reserved = 0 if index in entry.present else length
        if reserved:
            self.space.make_room(reserved, entry)
        fd = -1
        try:
            fd = self.disk.open_data(entry)
            allocate(fd, entry.offset(index), length)
        except OSError as e:
            if fd >= 0:
                os.close(fd)
            self.space.release_room(reserved)
            raise self.ledger.write_error(e, entry) from e
        landing = Landing(entry, index, fd, entry.offset(index), length, reserved)
        self._start(landing)
        return landing

    def _start(self, landing: Landing) -> None:
        landing.received, landing.hasher = 0, digester()
        landing.sha1 = hashlib.sha1() if self._wants_sha1(landing.entry, landing.index) else None

    def land_piece(self, landing: Landing, pos: int, piece: memoryview) -> None:
        """Write bytes at ``pos`` of the landing chunk. Pieces come in order; one at ``pos`` 0
        starts the chunk again (the origin was retried)."""
        if pos == 0 and landing.received:
            self._start(landing)
        if pos != landing.received or pos + len(piece) > landing.length:
            raise UsageError(f"chunk {landing.index} of {landing.entry.identity.uri}: piece at "
                             f"{pos} (+{len(piece)}) after {landing.received} of {landing.length} bytes")
        try:
            pwrite_all(landing.fd, piece, landing.offset + pos)
        except OSError as e:
            raise self.ledger.write_error(e, landing.entry) from e
        landing.hasher.update(piece)
        if landing.sha1 is not None:
            landing.sha1.update(piece)
        landing.received += len(piece)

    def commit(self, landing: Landing) -> str:
        """Journal a chunk that landed whole; returns its digest. The landing is closed.

        Raises :class:`CorruptData` if its bytes disagree with a digest verified before
        (their blocks are then given back), :class:`CacheError` if the disk fails.
        """
        entry, index = landing.entry, landing.index
        try:
            if landing.received != landing.length:
                raise CorruptData(f"chunk {index} of {entry.identity.uri}: {landing.received} of "
                                  f"{landing.length} bytes landed")
            chunk_digest = landing.hasher.hexdigest()
            sha1 = landing.sha1.hexdigest() if landing.sha1 is not None else None
            known = entry.digests.get(index)
            if known is not None and known != chunk_digest:
                self._discard(landing)
                raise CorruptData(f"chunk {index} of {entry.identity.uri} arrived with different "
                                  "bytes than before (digest mismatch)")
            self.ledger.journal(entry, index, chunk_digest, sha1)
            try:
                entry.note_own_write(os.fstat(landing.fd))
            except OSError as e:
                raise self.ledger.write_error(e, entry) from e
            self.ledger.mark_present(entry, index, chunk_digest, sha1)
            return chunk_digest
        finally:
            self._close(landing)

    def abandon(self, landing: Landing) -> None:
        """Close a landing whose chunk did not arrive whole. What part of it was written stays
        unjournaled, never served, and its blocks go back to the disk; a present chunk it had
        begun to overwrite is dropped."""
        if landing.fd >= 0 and (landing.received or landing.index not in landing.entry.present):
            self._discard(landing)
        self._close(landing)

    def _discard(self, landing: Landing) -> None:
        """Give back what a landing wrote (and the blocks allocated for it)."""
        if landing.index in landing.entry.present:  # its old bytes were overwritten
            self.ledger.drop(landing.entry, landing.index)
        else:
            with contextlib.suppress(OSError):
                punch_hole(landing.fd, landing.offset, landing.length)

    def _close(self, landing: Landing) -> None:
        if landing.fd >= 0:
            os.close(landing.fd)
            landing.fd = -1
            self.space.release_room(landing.reserved)

    # --- a chunk libtorrent wrote in place ---------------------------------------------------

    def adopt(self, entry: Entry, index: int, sha1: str, expected: str | None = None) -> str:
        """Take in chunk ``index`` that libtorrent wrote in place and checked against ``sha1``.

        The file is hashed where it lies (page cache: it was just written) for its xxh3
        digest, which must equal ``expected`` (the manifest's, when it has one) and any
        digest verified before; then it is journaled like any other chunk. Returns the digest.
        """
        want = entry.layout.length(index)
        chunk_digest = self._digest_in_place(entry, index)
        known = entry.digests.get(index)
        if known is not None and known != chunk_digest:
            raise CorruptData(f"chunk {index} of {entry.identity.uri} from peers differs from "
                              "the bytes verified before (digest mismatch)")
        if expected is not None and expected != chunk_digest:
            raise CorruptData(f"chunk {index} of {entry.identity.uri} from peers differs from "
                              "its manifest's digest")
        try:
            with self.space.room(entry, index, want):
                self.ledger.journal(entry, index, chunk_digest,
                                    sha1 if index not in entry.sha1s else None)
                self.ledger.mark_present(entry, index, chunk_digest, sha1)
            with contextlib.suppress(OSError):
                entry.note_own_write(os.stat(entry.data_path))
        except CacheFull:
            self.ledger.drop(entry, index)  # its blocks go back; libtorrent has it no more
            raise
        return chunk_digest

    @staticmethod
    def _digest_in_place(entry: Entry, index: int) -> str:
        """The digest of chunk ``index`` as it lies in the data file (:func:`verify.digest_at`)."""
        try:
            fd = os.open(entry.data_path, os.O_RDONLY)
            try:
                found = verify.digest_at(fd, entry.offset(index), entry.layout.length(index))
            finally:
                os.close(fd)
        except OSError as e:
            raise CacheError(f"cannot read chunk {index} of {entry.identity.uri} from peers: {e}"
                             ) from e
        if found is None:
            raise CorruptData(f"chunk {index} of {entry.identity.uri} from peers is not in its "
                              "data file (the file is shorter)")
        return found
